"""Training memory against density: dense AdamW vs RigL with packed optimizer state (sparsedist.optim).

    python benchmarks/fsdp_memory.py                        # 80/90/95 % sparsity, Adam(W) and SGD momentum
    python benchmarks/fsdp_memory.py --width 2048 --layers 8 --json docs/fsdp_memory.json

One process, a stack of ``--layers`` Linear(width, width) layers (all weights sparsified, uniform density, biases
dense), batch ``--batch`` (activations are negligible next to the weights). Every run is traced from before the
model exists with the PyTorch profiler's CPU allocator events (``profile_memory=True``): the live bytes at every
allocation and free. Reported per run:

* ``resident``: live bytes between steps (after ``optimizer.step()``, ``zero_grad(set_to_none=True)`` done at the
  next step's start, so gradients still count): weights + gradients kept + optimizer state + masks;
* ``peak``: the most live bytes at any moment of the ordinary steps (temporaries included; step 0, which
  creates the optimizer state, left out);
* ``update_peak``: the same during RigL's mask-update step and the next one (whose ``zero_grad`` frees the
  update step's dense gradients);
* ``kinds``: :func:`sparsedist.fsdp.training_memory`'s bookkeeping by kind between backward and step.

Dense AdamW keeps weights + gradients + two moments: ``4 * 4 n`` bytes. Packed at density ``d``: weights ``4 n``,
gradients ``4 d n`` (packed as soon as ready), moments ``8 d n`` and the active positions ``4 d n`` (int32):
``4 n (1 + 4 d)``, plus RigL's bool masks (``n`` bytes, dense).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsedist.fsdp import training_memory  # noqa: E402
from sparsedist.optim import PackedAdamW, PackedSGD  # noqa: E402
from sparsedist.sparsity import RigL  # noqa: E402

STEPS = 6  # RigL updates at step 2 (update_every=2, total_steps=4: no update at or after step 3)
UPDATE = ("step2", "step3")  # the update step, and the next one, which frees its dense gradients in zero_grad


def make(kind: str, algo: str, density: float, width: int, layers: int):
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    packed = kind == "packed"
    if algo == "adamw":
        opt = (PackedAdamW if packed else torch.optim.AdamW)(model.parameters(), lr=1e-3, weight_decay=0.0,
                                                              **({} if packed else {"foreach": False}))
    else:
        opt = (PackedSGD if packed else torch.optim.SGD)(model.parameters(), lr=1e-3, momentum=0.9,
                                                          **({} if packed else {"foreach": False}))
    rigl = None
    if kind != "dense":
        rigl = RigL(model, opt, density=density, distribution="uniform", update_every=2, total_steps=4)
        if packed:
            opt.attach_masks(rigl)
    return model, opt, rigl


def run(kind: str, algo: str, density: float, width: int, layers: int, batch: int) -> dict:
    torch.manual_seed(0)
    kinds = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("setup"):
            model, opt, rigl = make(kind, algo, density, width, layers)
        for t in range(STEPS):
            with record_function(f"step{t}"):
                opt.zero_grad(set_to_none=True)
                model(torch.randn(batch, width)).pow(2).mean().backward()
                if t == STEPS - 1:
                    kinds = training_memory(model, opt, masks=rigl)
                opt.step()
                if rigl is not None:
                    rigl.step()
    events = list(prof.profiler.kineto_results.events())
    ranges = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith(("setup", "step"))}
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live, trace = 0, []
    for ts, nbytes in mem:
        live += nbytes
        trace.append((ts, live))

    def peak_in(name: str) -> int:
        lo, hi = ranges[name]
        return max([v for ts, v in trace if lo <= ts <= hi] or [0])

    def live_at(ts_limit: int) -> int:
        return max([(ts, v) for ts, v in trace if ts <= ts_limit] or [(0, 0)])[1]

    ordinary = [f"step{t}" for t in range(1, STEPS) if f"step{t}" not in UPDATE]
    return {"kind": kind, "algorithm": algo, "density": density if kind != "dense" else 1.0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "resident": live_at(ranges[f"step{STEPS - 1}"][0]), "peak": max(peak_in(s) for s in ordinary),
            "update_peak": max(peak_in(s) for s in UPDATE), "kinds": kinds}


def table(rows: list[dict]) -> str:
    mb = 1e6
    out = ["| optimizer | weights | sparsity | resident MB | vs dense | peak MB | vs dense | update-step peak MB | "
           "optimizer state MB (positions) | vs dense | gradients kept MB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = {r["algorithm"]: r for r in rows if r["kind"] == "dense"}
    for r in rows:
        d, k = dense[r["algorithm"]], r["kinds"]
        cells = [r["algorithm"], r["kind"], f"{1 - r['density']:.0%}"]
        for key in ("resident", "peak"):
            cells += [f"{r[key] / mb:.1f}", f"{r[key] / d[key]:.1%}"]
        cells += [f"{r['update_peak'] / mb:.1f}", f"{k['optimizer'] / mb:.1f} ({k['optimizer_index'] / mb:.1f})",
                  f"{k['optimizer'] / d['kinds']['optimizer']:.1%}", f"{k['gradients'] / mb:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--algorithms", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for algo in args.algorithms:
        rows.append(run("dense", algo, 1.0, args.width, args.layers, args.batch))
        for s in args.sparsity:
            rows.append(run("masked", algo, 1 - s, args.width, args.layers, args.batch))
            rows.append(run("packed", algo, 1 - s, args.width, args.layers, args.batch))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
