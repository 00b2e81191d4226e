"""Overhead on a fast link: the training step of every sparsedist hook (with ``collective="auto"``) against plain
DDP, at about 1M and 25M parameters.

    torchrun --nproc_per_node=2 benchmarks/hook_overhead.py                       # loopback, ~0.9M and ~25M
    torchrun --nproc_per_node=2 benchmarks/hook_overhead.py --hidden 640 --steps 30

The model is the MNIST MLP of ``benchmarks/sparse_allreduce.py`` (784 -> H -> H -> 10, real MNIST batches), with
H = 640 (0.92M parameters) and H = 4600 (24.8M). Every configuration -- plain DDP, PyTorch's
``fp16_compress_hook`` and each sparsedist compressor at its usual setting with the auto collective -- is its own
DDP copy of the same initial model, trained on the same batches for ``--trial-steps + --steps`` consecutive steps,
one configuration after the other (consecutive, because auto's whole-step check times the interval between one
step and the next: steps of other models in between would be counted). Plain DDP runs first and again last; its
figure is the mean of the two medians (both are printed: their gap is the machine's drift). A step's time is the
slowest rank's (a barrier before it; the ranks' times are gathered after it), the figure the median over the
measured steps; the first ``--trial-steps`` steps are left out, in which ``auto`` times its candidates per bucket
and then runs its first whole-step check (sparse and dense steps alternating). Printed per size: each
configuration's median step, its ratio to plain DDP's, the hook's own exchange time per step (accumulation,
selection and the collective, from ``stats()``), what auto chose and the step check's verdict. With ``--json``
rank 0 writes all of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sparsedist  # noqa: E402
import sparsedist.dist  # noqa: E402
from sparse_allreduce import _MLP  # noqa: E402
from sparsedist.datasets import read_mnist_arrays  # noqa: E402
from sparsedist.collectives.backend import TorchBackend  # noqa: E402

CONFIGS: dict[str, tuple[str, dict] | None] = {
    "ddp": None,
    "fp16": None,
    "topk": ("topk", {"density": 0.01}),
    "topk-0.1%": ("topk", {"density": 0.001}),
    "threshold": ("threshold", {"threshold": 0.001}),
    "randk": ("randk", {"density": 0.01}),
    "dgc": ("dgc", {"density": 0.001, "momentum": 0.9}),
    "variance": ("variance", {}),
}


def build(name: str, hidden: int):
    torch.manual_seed(0)
    ddp = DDP(_MLP(hidden))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.0 if name == "dgc" else 0.9)
    state = None
    if name == "fp16":
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif CONFIGS[name] is not None:
        compressor, opts = CONFIGS[name]
        if compressor == "dgc":
            opts = dict(opts, optimizer=opt)
        state = sparsedist.register(ddp, compressor, collective="auto", **opts)
    return ddp, opt, state


def exchange_seconds(state) -> float:
    return 0.0 if state is None else sum(v["measured_s"] for v in state.stats()["collective_time"].values())


def timed_step(ddp, opt, state, x, y, be: TorchBackend) -> tuple[float, float]:
    """One training step after a barrier: (step seconds, the hook's exchange seconds), each the slowest rank's."""
    before = exchange_seconds(state)
    be.barrier()
    t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    wall = time.perf_counter() - t0
    spent = torch.tensor([wall, exchange_seconds(state) - before], dtype=torch.float64)
    wall, ex = be.allgather(spent).view(-1, 2).max(dim=0).values.tolist()
    return wall, ex


def run_config(args, name: str, hidden: int, x, y, be: TorchBackend) -> dict:
    """Train one configuration for trial + measured steps on the shared batch sequence; its row."""
    ddp, opt, state = build(name, hidden)
    g = torch.Generator().manual_seed(be.rank)
    steps, exch, calls_before = [], [], {}
    for rnd in range(args.trial_steps + args.steps):
        if rnd == args.trial_steps and state is not None:  # what auto runs after its trials: the calls from here on
            calls_before = dict(state.stats()["collectives"])
        sel = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        wall, ex = timed_step(ddp, opt, state, x[sel], y[sel], be)
        if rnd >= args.trial_steps:
            steps.append(wall)
            exch.append(ex)
    row = {"step_median_s": statistics.median(steps), "exchange_median_s": statistics.median(exch)}
    if state is not None:
        st = state.stats()
        calls = {c: n - calls_before.get(c, 0) for c, n in st["collectives"].items()}
        row.update(density=st["density"], collectives={c: n for c, n in calls.items() if n},
                   step_check=st["step_check"])
    row["numel"] = sum(p.numel() for p in ddp.parameters())
    return row


def measure(args, hidden: int, x, y, be: TorchBackend) -> dict:
    first = run_config(args, "ddp", hidden, x, y, be)
    rows = {name: run_config(args, name, hidden, x, y, be) for name in args.configs if name != "ddp"}
    last = run_config(args, "ddp", hidden, x, y, be)
    ddp_med = (first["step_median_s"] + last["step_median_s"]) / 2
    out = {"hidden": hidden, "numel": first.pop("numel"), "configs": {},
           "ddp_first_s": first["step_median_s"], "ddp_last_s": last["step_median_s"]}
    for name, row in {"ddp": dict(first, step_median_s=ddp_med), **rows}.items():
        row.pop("numel", None)
        row["over_ddp"] = row["step_median_s"] / ddp_med
        out["configs"][name] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="640,4600", help="hidden widths, comma-separated (640: 0.92M, 4600: 24.8M)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    ap.add_argument("--steps", type=int, default=20, help="measured steps")
    ap.add_argument("--trial-steps", type=int, default=30,
                    help="steps left out (auto's per-bucket trials and its first whole-step check)")
    ap.add_argument("--data", "--mnist", dest="data", default=None,
                    help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST or ./data/mnist.npz)")
    ap.add_argument("--json", type=Path, help="rank 0 writes the results here")
    args = ap.parse_args(argv)
    if "ddp" not in args.configs:
        args.configs = ["ddp", *args.configs]
    rank, ws, _ = sparsedist.dist.init()
    torch.set_num_threads(1)
    be = TorchBackend()
    data = read_mnist_arrays(args.data)
    x = torch.from_numpy(data["x_train"][rank::ws][:6400]).float().div_(255.0)
    y = torch.from_numpy(data["y_train"][rank::ws][:6400]).long()
    results = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        res = measure(args, hidden, x, y, be)
        results.append(res)
        if rank == 0:
            print(f"\n{res['numel'] / 1e6:.2f}M parameters, {ws} ranks, batch {args.batch}/rank, "
                  f"median of {args.steps} steps after {args.trial_steps}; plain DDP {res['ddp_first_s'] * 1e3:.1f} ms "
                  f"first, {res['ddp_last_s'] * 1e3:.1f} ms last")
            print("| config | step (ms) | vs plain DDP | hook exchange (ms) | density | bucket calls after the trials "
                  "| step check (sparse / dense step, verdict) |")
            print("|---|---:|---:|---:|---:|---|---|")
            for name, row in res["configs"].items():
                chose = ", ".join(f"{c} {n}" for c, n in sorted(row.get("collectives", {}).items())) or "-"
                dens = f"{row['density']:.4f}" if "density" in row else "-"
                checks = (row.get("step_check") or {}).get("checks") or []
                verdict = "; ".join(f"{c['sparse_step_s'] * 1e3:.0f} / {c['dense_step_s'] * 1e3:.0f} ms, {c['verdict']}"
                                    for c in checks) or "-"
                print(f"| {name} | {row['step_median_s'] * 1e3:.1f} | {row['over_ddp']:.2f}x | "
                      f"{row['exchange_median_s'] * 1e3:.1f} | {dens} | {chose} | {verdict} |", flush=True)
    if rank == 0 and args.json:
        args.json.write_text(json.dumps({"world_size": ws, "results": results}, indent=1))
    sparsedist.dist.shutdown()
    return {"results": results}


if __name__ == "__main__":
    main()
