"""Probe: every option, differing on one rank.

Walks through every field of :class:`sparsedist.options.ExchangeOptions` and every option of every compressor,
giving rank 1 another value than rank 0. An option that changes what the ranks send or how they sum it must make
every rank raise at the first exchange, within the timeout, with an error naming the option; one that cannot
change the collectives (a timeout's length, the optimizer given for DGC's check, an explicit default process group
or backend) must leave training correct: identical parameters on every rank. Before the configuration check
covered them, ``collective`` differing made both ranks block until the process group's timeout, and
``check_every`` on one rank aborted rank 1 and made rank 0 report a divergence that did not exist.

Not covered, because a difference cannot be seen over the group itself: ranks passing *different* process groups
(each waits on its own group; with ``timeout=`` the wait is bounded and names the bucket).
"""

import time
from dataclasses import fields

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives import CostModel, TorchBackend
from sparsedist.compressors import COMPRESSORS, compressor_options
from sparsedist.options import ExchangeOptions
from sparsedist.sparsity import StaticSparsity
from sparsedist.testing import run_distributed

AUTO = dict(collective="auto", cost_model=CostModel(alpha=1e-5, beta=1e-7), auto_trials=0)
# option -> (value on rank 0, value on rank 1, the configuration entry the error names; None: may differ)
# (strings in angle brackets are objects built on every rank: see _value)
EXCHANGE = {
    "error_feedback": (True, False, "error_feedback"),
    "value_dtype": (None, "float16", "value_dtype"),
    "granularity": ("layer", "bucket", "granularity"),
    "dense_below": (0, 50, "dense_below"),
    "seed": (0, 1, "seed"),
    "masks": (None, "<masks>", "masks (mask-aware exchange)"),
    "grad_scaler": (None, "<scaler>", "grad_scaler (loss scaling)"),
    "optimizer": (None, "<optimizer>", None),
    "timeout": (None, 60.0, "timeout (synchronous exchange)"),
    "process_group": (None, "<world group>", None),
    "backend": (None, "<TorchBackend>", None),
    "check_every": (0, 2, "check_every"),
    "collective": ("allgather", "ssar_recursive_double", "collective"),
    "cost_model": ("<cost model>", "<another cost model>", "cost_model"),
    "auto_trials": (0, 2, "auto_trials"),
    "auto_step_check": (True, False, "auto_step_check"),
}
AUTO_OPTIONS = ("cost_model", "auto_trials", "auto_step_check")
# compressor option -> (value on rank 0, value on rank 1)
COMPRESSOR_VALUES = {
    "density": (0.1, 0.2), "mode": ("exact", "sampled"), "sample_ratio": (0.01, 0.02), "threshold": (0.01, 0.02),
    "quantize": (True, False), "variant": ("uniform", "wangni"), "alpha": (1.0, 2.0), "zeta": (0.999, 0.99),
    "keep_quantization_error": (True, False), "momentum": (0.9, 0.5), "nesterov": (False, True),
    "clip_norm": (None, 5.0), "warmup_steps": (0, 4), "warmup_stages": (4, 2), "momentum_masking": (True, False),
}


def _cases() -> dict[str, tuple]:
    """name -> (compressor on rank 0, on rank 1, options on rank 0, on rank 1, expected entry, DDP flags)."""
    out = {}
    for option, (a, b, key) in EXCHANGE.items():
        base = dict(AUTO) if option in AUTO_OPTIONS else {}
        out[f"exchange/{option}"] = ("topk", "topk", {**base, option: a}, {**base, option: b}, key, {})
    for coll in ("dense", "ssar_split_allgather", "dsar_split_allgather", "gtopk", "auto"):
        out[f"exchange/collective/allgather vs {coll}"] = ("topk", "topk", {"collective": "allgather"},
                                                          {"collective": coll}, "collective", {})
    out["exchange/timeout/30 s vs 60 s"] = ("topk", "topk", {"timeout": 30.0}, {"timeout": 60.0}, None, {})
    for name in COMPRESSORS:
        for option in compressor_options(name):
            a, b = COMPRESSOR_VALUES[option]
            key = "compressor" if option == "variant" else "compressor options"  # wangni is another compressor
            out[f"{name}/{option}"] = (name, name, {option: a}, {option: b}, key, {})
    out["compressor/topk vs threshold"] = ("topk", "threshold", {}, {}, "compressor", {})
    out["ddp/find_unused_parameters"] = ("topk", "topk", {}, {}, "find_unused_parameters (usage exchange)",
                                         {"find_unused_parameters": True})
    return out


def _value(v, objects):
    return objects[v] if isinstance(v, str) and v.startswith("<") else v


def _run_case(rank, case):
    comp0, comp1, opts0, opts1, _, ddp_flags = case
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 4))
    ddp = DDP(model, bucket_cap_mb=0.004, **({} if rank == 0 else ddp_flags))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    objects = {"<optimizer>": opt, "<world group>": dist.group.WORLD, "<TorchBackend>": TorchBackend(),
               "<scaler>": torch.amp.GradScaler("cpu", init_scale=1.0), "<cost model>": AUTO["cost_model"],
               "<another cost model>": CostModel(alpha=2e-5, beta=1e-7)}
    if "masks" in opts0 or "masks" in opts1:  # built on every rank (its construction verifies masks across ranks)
        objects["<masks>"] = StaticSparsity(ddp, opt, density=0.5, distribution="uniform", seed=3)
    compressor, opts = (comp0, opts0) if rank == 0 else (comp1, opts1)
    opts = {k: _value(v, objects) for k, v in opts.items()}
    if compressor == "dgc":
        opts["optimizer"] = opt
    sparsedist.register(ddp, compressor, **opts)
    g = torch.Generator().manual_seed(rank)
    started = time.monotonic()
    try:
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(torch.randn(8, 12, generator=g)), torch.randint(0, 4, (8,),
                                                                                                     generator=g))
            scaler = opts.get("grad_scaler")
            (loss if scaler is None else scaler.scale(loss)).backward()
            opt.step()
    except (ValueError, RuntimeError) as exc:
        return str(exc), time.monotonic() - started, None
    return None, time.monotonic() - started, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, ws):
    return {name: _run_case(rank, case) for name, case in _cases().items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=300, collective_timeout=60)


def test_the_walk_covers_every_option():
    assert set(EXCHANGE) == {f.name for f in fields(ExchangeOptions)}, "classify the new option in EXCHANGE"
    for name in COMPRESSORS:
        assert set(compressor_options(name)) <= set(COMPRESSOR_VALUES), name


@pytest.mark.parametrize("name", sorted(_cases()))
def test_an_option_differing_on_one_rank(results, name):
    key = _cases()[name][4]
    if key is None:  # cannot change the collectives: training is correct
        assert [r[name][0] for r in results] == [None, None], [r[name][0] for r in results]
        assert torch.equal(results[0][name][2], results[1][name][2]), f"{name}: ranks differ"
        return
    for rank, (message, elapsed, _) in enumerate(r[name] for r in results):
        assert message is not None, f"{name}: rank {rank} trained on"
        assert f"{key!r}" in message and "configured differently across ranks" in message, message
        assert elapsed < 30, f"{name}: rank {rank} raised after {elapsed:.0f} s"
