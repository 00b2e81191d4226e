"""Behaviour fixed bit for bit: parameter and state digests of every compressor x collective x granularity, with and
without masks, at 2 and 3 ranks, against digests recorded before the exchange was rebuilt as a pipeline.

Gradients are exact: every layer gets its own small-integer input and output weights scaled by powers of two, so
each gradient entry (and per-example second moment) is a dyadic rational computed without rounding on any CPU, and
sums over ranks are exact. The digests then depend only on the hook's arithmetic (selection, error feedback, the
collectives' order of summation, the division by the world size) and on SGD, not on the machine's matmul kernels.

Regenerate (only when a behaviour change is intended, and say so in the commit)::

    python tests/test_pipeline_digests.py --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives import CostModel
from sparsedist.sparsity import RigL, StaticSparsity
from sparsedist.testing import run_distributed

DIGESTS = Path(__file__).resolve().parent / "data" / "pipeline_digests.json"
STEPS = 6
SIZES = [(24, 40), (40, 16), (16, 8), (8, 3)]
SPARCML = ["dense", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather"]
# auto with the model alone (trials and the whole-step check measure wall-clock time, which no digest can fix):
# a slow link makes it pick sparse collectives, a host where sparse work is expensive makes it pick the dense sum
AUTO = {"auto_sparse": dict(collective="auto", cost_model=CostModel(alpha=1e-5, beta=1e-7), auto_trials=0),
        "auto_dense": dict(collective="auto", cost_model=CostModel(alpha=1e-5, beta=1e-10, gamma=1e-3),
                           auto_trials=0)}
COMPRESSORS = {
    "none": ("none", {}),
    "topk": ("topk", dict(density=0.05)),
    "topk_sampled": ("topk", dict(density=0.05, mode="sampled")),
    "threshold": ("threshold", dict(threshold=0.75)),
    "threshold_plain": ("threshold", dict(threshold=0.75, quantize=False)),
    "randk": ("randk", dict(density=0.05)),
    "wangni": ("randk", dict(density=0.05, variant="wangni")),
    "variance": ("variance", dict(alpha=1.0, zeta=0.99)),
    "dgc": ("dgc", dict(density=0.05, momentum=0.5, clip_norm=40.0, warmup_steps=3, warmup_stages=2)),
}


def configs() -> dict[str, dict]:
    """name -> {"compressor", "options", and optionally "masks" ("static"/"rigl"), "overflow", "no_sync", "dtype"}."""
    out = {}
    for cname, (comp, opts) in COMPRESSORS.items():
        collectives = {"allgather": dict(collective="allgather"),
                       **{c: dict(collective=c) for c in SPARCML}, **AUTO}
        if comp in ("topk", "dgc") and cname != "topk_sampled":
            collectives["gtopk"] = dict(collective="gtopk")
        for coll, copts in collectives.items():
            out[f"{cname}/{coll}"] = {"compressor": comp, "options": {**opts, **copts}}
        if comp != "variance":
            out[f"{cname}/allgather/bucket"] = {"compressor": comp, "options": {**opts, "granularity": "bucket"}}
            out[f"{cname}/auto_dense/bucket"] = {"compressor": comp,
                                                 "options": {**opts, **AUTO["auto_dense"], "granularity": "bucket"}}
        out[f"{cname}/allgather/overflow"] = {"compressor": comp, "options": dict(opts), "overflow": True}
        out[f"{cname}/auto_dense/overflow"] = {"compressor": comp, "options": {**opts, **AUTO["auto_dense"]},
                                               "overflow": True}
        out[f"{cname}/allgather/timeout"] = {"compressor": comp, "options": {**opts, "timeout": 60.0}}
        out[f"{cname}/auto_dense/timeout"] = {"compressor": comp,
                                              "options": {**opts, **AUTO["auto_dense"], "timeout": 60.0}}
        out[f"{cname}/allgather/no_sync"] = {"compressor": comp, "options": dict(opts), "no_sync": True}
    for cname in ("none", "topk", "randk", "dgc", "threshold"):
        comp, opts = COMPRESSORS[cname]
        for masks in ("static", "rigl"):
            out[f"{cname}/allgather/{masks}"] = {"compressor": comp, "options": dict(opts), "masks": masks}
            out[f"{cname}/auto_dense/{masks}"] = {"compressor": comp, "options": {**opts, **AUTO["auto_dense"]},
                                                  "masks": masks}
    for cname in ("topk", "threshold", "randk", "dgc"):
        comp, opts = COMPRESSORS[cname]
        out[f"{cname}/allgather/fp16_values"] = {"compressor": comp, "options": {**opts, "value_dtype": "float16"}}
        out[f"{cname}/allgather/bf16_model"] = {"compressor": comp, "options": dict(opts), "dtype": "bfloat16"}
    out["topk/allgather/no_feedback"] = {"compressor": "topk", "options": dict(density=0.05, error_feedback=False)}
    out["topk/allgather/dense_below"] = {"compressor": "topk", "options": dict(density=0.05, dense_below=50)}
    out["none/allgather/bf16_model"] = {"compressor": "none", "options": {}, "dtype": "bfloat16"}
    return out


class Layers(nn.Module):
    """Linear layers side by side (not chained): each gets its own input, so each weight gradient is exact."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in SIZES)

    def forward(self, xs, cs):
        return sum((layer(x) * c).sum() for layer, x, c in zip(self.layers, xs, cs))


def _batch(rank: int, step: int, dtype: torch.dtype):
    """Inputs in {-3..3}/4 and output weights in {-7..7}/8 (batch 4): every product and sum is exact."""
    g = torch.Generator().manual_seed(1000 * step + 17 * rank + 1)
    xs = [(torch.randint(-3, 4, (4, i), generator=g).to(dtype) / 4) for i, _ in SIZES]
    cs = [(torch.randint(-7, 8, (4, o), generator=g).to(dtype) / 8) for _, o in SIZES]
    return xs, cs


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _state_tensors(state: dict) -> list[torch.Tensor]:
    """Every tensor of a state dict, in a fixed order (keys sorted), nested dicts and lists included."""
    out = []
    if isinstance(state, dict):
        for k in sorted(state, key=str):
            out += _state_tensors(state[k])
    elif isinstance(state, (list, tuple)):
        for v in state:
            out += _state_tensors(v)
    elif isinstance(state, torch.Tensor) and state.dtype != torch.uint8:  # (generator states are bytes: skip)
        out.append(state)
    return out


def _run_config(rank: int, world: int, cfg: dict) -> dict:
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    torch.manual_seed(0)
    model = Layers().to(dtype)
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=1 / 16)
    opts = dict(cfg["options"])
    masks = None
    if cfg.get("masks") == "static":
        masks = StaticSparsity(ddp, opt, density=0.5, distribution="uniform", seed=3)
    elif cfg.get("masks") == "rigl":
        masks = RigL(ddp, opt, density=0.5, distribution="uniform", update_every=2, total_steps=STEPS + 2, seed=3)
    if masks is not None:
        opts["masks"] = masks
    if cfg["compressor"] == "dgc":
        opts["optimizer"] = opt
    scaler = None
    if cfg.get("overflow"):
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
        opts["grad_scaler"] = scaler
    state = sparsedist.register(ddp, cfg["compressor"], **opts)
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if cfg.get("no_sync") and step % 3 == 1:
            with ddp.no_sync():
                xs, cs = _batch(rank, 100 + step, dtype)
                ddp(xs, cs).backward()
        xs, cs = _batch(rank, step, dtype)
        loss = ddp(xs, cs)
        if scaler is not None:
            loss = scaler.scale(loss)
            if step == 3 and rank == world - 1:
                loss = loss + model.layers[1].bias.sum() * float("inf")
        loss.backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if masks is not None:
            masks.step()
        steps.append(_digest(p for p in model.parameters()))
    sd = state.state_dict()
    return {"steps": steps, "residuals": _digest(_state_tensors(sd["feedback"])),
            "compressor": _digest(_state_tensors(sd.get("compressor", {}))),
            "overflow_steps": state.stats()["overflow_steps"]}


def _worker(rank: int, world: int, names: list[str]) -> dict:
    torch.set_num_threads(1)
    table = configs()
    return {name: _run_config(rank, world, table[name]) for name in names}


def compute(world: int, names: list[str] | None = None) -> dict:
    names = sorted(configs()) if names is None else names
    per_rank = run_distributed(_worker, world, args=(names,), timeout=900)
    for name in names:  # every rank ends every step with identical parameters
        assert all(r[name]["steps"] == per_rank[0][name]["steps"] for r in per_rank), name
    return {name: {"steps": per_rank[0][name]["steps"], "overflow_steps": per_rank[0][name]["overflow_steps"],
                   "residuals": [r[name]["residuals"] for r in per_rank],
                   "compressor": [r[name]["compressor"] for r in per_rank]} for name in names}


def test_the_pipeline_reproduces_the_recorded_digests():
    recorded = json.loads(DIGESTS.read_text())
    assert set(recorded["2"]) == set(configs()), "configurations changed: regenerate the digests (see the docstring)"
    for world in (2, 3):
        now = compute(world)
        differ = [name for name in now if now[name] != recorded[str(world)][name]]
        assert not differ, f"at {world} ranks these configurations changed behaviour: {differ}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help=f"record the digests in {DIGESTS}")
    ap.add_argument("--compare", type=Path, help="compare with this digests file and list the differences")
    a = ap.parse_args()
    result = {str(w): compute(w) for w in (2, 3)}
    if a.write:
        DIGESTS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if a.compare:
        old = json.loads(a.compare.read_text())
        for w in result:
            for name in sorted(result[w]):
                if result[w][name] != old[w].get(name):
                    print(f"{w} ranks: {name}: now {result[w][name]} recorded {old[w].get(name)}")
    print(f"{sum(len(v) for v in result.values())} configurations", file=sys.stderr)
