"""Does ``algorithm="auto"`` pick a collective within 10 % of the fastest fixed one? Measured on this link.

Every rank computes its own real gradient (the MNIST MLP of ``benchmarks/sparse_allreduce.py`` after a few
data-parallel steps, or the char-level GPT with ``--source charlm``), keeps its top-k at each density, and sums
it over the ranks with every exact algorithm of :func:`sparsedist.collectives.sparse_allreduce` -- ``dense``,
``allgather``, ``ssar_recursive_double``, ``ssar_split_allgather``, ``dsar_split_allgather`` -- and with
``auto``, whose alpha-beta model was measured by :func:`sparsedist.collectives.choose.probe` at start-up (the
same model the hook's ``collective="auto"`` uses). The calls are interleaved (a round calls every algorithm
once, in a rotated order) so that drift of the machine hits all alike; a call's time is the slowest rank's,
after a barrier; the figure is the median over rounds.

Printed per density: every algorithm's median time, the model's pick, and two ratios against the fastest
*fixed* algorithm: the pick's own time (is the choice right?) and the time of ``auto`` itself (the choice plus
its one small count allgather).

It runs under any launcher that :func:`sparsedist.dist.init` knows::

    torchrun --nproc_per_node=2 benchmarks/auto_choice.py                     # loopback
    sudo python launch/emulate_cluster.py -n 4 --rate 100mbit -- python benchmarks/auto_choice.py   # slow link
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sparsedist.dist  # noqa: E402
from hook_overhead import timed_step  # noqa: E402
from sparse_allreduce import gradient_source  # noqa: E402
from sparsedist.datasets import mnist_path, read_mnist_arrays  # noqa: E402
from sparsedist.collectives.backend import TorchBackend  # noqa: E402
from sparsedist.collectives import probe  # noqa: E402
from sparsedist.collectives.registry import EXACT_ALGORITHMS  # noqa: E402
from sparsedist.collectives.sparse_allreduce import sparse_allreduce  # noqa: E402

FIXED = ["dense", "allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather"]


def hook_level(args, rank: int, ws: int, be: TorchBackend) -> list[dict]:
    """The DDP hook itself: one DDP copy of the MNIST MLP per collective (the fixed ones, ``auto``, and plain DDP
    without a hook), trained in turns on the same batches; a step's exchange time is the hook's measured time
    summed over the buckets (``stats()["collective_time"]``: accumulation, selection and the collective), and
    its step time the whole training step, each the slowest rank's. ``auto`` is measured after its trials
    (``--trial-steps`` steps are skipped for every configuration)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsedist
    from sparse_allreduce import _MLP

    data = read_mnist_arrays(args.data)
    x = torch.from_numpy(data["x_train"][rank::ws][:6400]).float().div_(255.0)
    y = torch.from_numpy(data["y_train"][rank::ws][:6400]).long()
    rows = []
    for d in (float(v) for v in args.densities.split(",")):
        runs = {}
        for algo in FIXED + ["auto", "ddp"]:
            torch.manual_seed(0)
            ddp = DDP(_MLP(args.hidden))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            # auto's per-bucket choice only: the models train in interleaved rounds, so the interval from one of
            # auto's steps to its next holds every other model's step, and its whole-step check against dense steps
            # (auto_step_check, on by default) would time those too; benchmarks/hook_overhead.py measures it
            state = None if algo == "ddp" else sparsedist.register(
                ddp, "topk", density=d, collective=algo,
                **({"cost_model": args.cost_model, "auto_step_check": False} if algo == "auto" else {}))
            runs[algo] = (ddp, opt, state, [], [])
        g = torch.Generator().manual_seed(rank)
        for step in range(args.trial_steps + args.steps):
            sel = torch.randint(0, x.shape[0], (args.batch,), generator=g)
            order = list(runs)[step % len(runs):] + list(runs)[:step % len(runs)]
            for algo in order:
                ddp, opt, state, times, steps = runs[algo]
                wall, ex = timed_step(ddp, opt, state, x[sel], y[sel], be)
                if step >= args.trial_steps:
                    times.append(ex)
                    steps.append(wall)
        med = {a: statistics.median(r[3]) for a, r in runs.items() if a != "ddp"}
        step_med = {a: statistics.median(r[4]) for a, r in runs.items()}
        best = min(FIXED, key=lambda a: med[a])
        best_step = min(FIXED, key=lambda a: step_med[a])
        st = runs["auto"][2].stats()
        chosen = {a: c for a, c in st["collectives"].items()}
        rows.append({"density": d, "median_s": med, "step_median_s": step_med, "best_fixed": best,
                     "auto_over_best": med["auto"] / med[best], "best_fixed_step": best_step,
                     "auto_step_over_best_fixed_step": step_med["auto"] / step_med[best_step],
                     "auto_step_over_ddp": step_med["auto"] / step_med["ddp"], "auto_collectives": chosen,
                     "auto_ratios": st["auto_ratios"],
                     "numel": sum(p.numel() for p in runs["auto"][0].parameters())})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["mnist", "charlm"], default="mnist")
    ap.add_argument("--densities", default="0.001,0.01,0.1")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--data", "--mnist", dest="data", default=None,
                    help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST or ./data/mnist.npz)")
    ap.add_argument("--label", default="", help="a name for the link, printed and stored")
    ap.add_argument("--json", type=Path, help="rank 0 writes the results here")
    ap.add_argument("--mode", choices=["collective", "hook"], default="collective",
                    help="time sparse_allreduce calls, or training steps through the DDP hook")
    ap.add_argument("--steps", type=int, default=20, help="hook mode: measured steps per collective")
    ap.add_argument("--trial-steps", type=int, default=12, help="hook mode: steps left out (auto's trials)")
    args = ap.parse_args(argv)

    rank, ws, _ = sparsedist.dist.init(timeout=900)
    torch.set_num_threads(1)
    be = TorchBackend(timeout=900)
    model = probe(be)
    if args.mode == "hook":
        args.cost_model = model
        rows = hook_level(args, rank, ws, be)
        summary = {"label": args.label, "world_size": ws, "mode": "hook", "rows": rows,
                   "model": {"alpha_s": model.alpha, "beta_s_per_byte": model.beta}}
        if rank == 0:
            print(f"DDP hook, collective= each fixed one and auto{(' on ' + args.label) if args.label else ''}: "
                  f"P = {ws}, MNIST MLP ({rows[0]['numel']:,} parameters), top-k; exchange seconds per step, "
                  f"median of {args.steps} steps after {args.trial_steps} (slowest rank)")
            algos = FIXED + ["auto"]
            print("density  " + "  ".join(f"{a[:14]:>14s}" for a in algos) + "  best fixed        auto/best  "
                  "auto's calls")
            for row in rows:
                print(f"{row['density']:7.3%}  " + "  ".join(f"{row['median_s'][a] * 1e3:12.2f}ms" for a in algos)
                      + f"  {row['best_fixed']:<16s}  {row['auto_over_best']:8.3f}  {row['auto_collectives']}")
            print("whole training step (forward, backward with the hook, optimizer), median, slowest rank; plain DDP "
                  "overlaps its allreduce with the backward pass")
            print("density  " + "  ".join(f"{a[:14]:>14s}" for a in algos + ["ddp"]) + "  auto/best fixed  auto/ddp")
            for row in rows:
                print(f"{row['density']:7.3%}  " + "  ".join(f"{row['step_median_s'][a] * 1e3:12.2f}ms"
                                                          for a in algos + ["ddp"])
                      + f"  {row['auto_step_over_best_fixed_step']:15.3f}  {row['auto_step_over_ddp']:8.3f}")
            print("(auto's exchange is 0 where it sent a bucket densely with no residual left: that allreduce runs "
                  "asynchronously, overlapped with the backward pass like plain DDP's; only the step time shows it)")
            if args.json:
                args.json.write_text(json.dumps(summary, indent=1))
        sparsedist.dist.shutdown()
        return summary
    cfg = {"source": args.source, "hidden": args.hidden, "batch": args.batch, "train_steps": args.train_steps,
           "mnist": str(mnist_path(args.data)) if args.source == "mnist" else None}
    grad = gradient_source(rank, ws, cfg)[0]
    n = grad.numel()
    algos = FIXED + ["auto"]
    results = []
    for d in (float(x) for x in args.densities.split(",")):
        k = max(1, math.ceil(d * n))
        idx = grad.abs().topk(k).indices
        val = grad[idx]
        choice = model.choose(n, k, ws, nnz_max=k, value_bytes=4, candidates=EXACT_ALGORITHMS)
        pick = choice.algorithm
        predicted = {a: choice.predictions[a].time for a in FIXED}
        times: dict[str, list[float]] = {a: [] for a in algos}
        ref = None
        for r in range(args.rounds):
            order = algos[r % len(algos):] + algos[:r % len(algos)]
            for algo in order:
                be.barrier()
                t0 = time.perf_counter()
                out = sparse_allreduce(idx, val, n, algorithm=algo, backend=be, cost_model=model)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                times[algo].append(max(be.allgather(dt).view(-1).tolist()))
                if ref is None:
                    ref = out
                elif not torch.allclose(out, ref, atol=1e-5, rtol=1e-5):
                    raise AssertionError(f"{algo} disagrees with the other algorithms")
        med = {a: statistics.median(t) for a, t in times.items()}
        best = min(FIXED, key=lambda a: med[a])
        row = {"density": d, "k": k, "median_s": med, "predicted_s": predicted, "pick": pick, "best_fixed": best,
               "pick_over_best": med[pick] / med[best], "auto_over_best": med["auto"] / med[best]}
        results.append(row)
    summary = {"label": args.label, "world_size": ws, "source": args.source, "numel": n, "rounds": args.rounds,
               "model": {"alpha_s": model.alpha, "beta_s_per_byte": model.beta}, "rows": results}
    if rank == 0:
        print(f"auto vs fixed collectives{(' on ' + args.label) if args.label else ''}: P = {ws}, {args.source} "
              f"gradient of {n:,} elements, median of {args.rounds} interleaved rounds (slowest rank); probed "
              f"alpha {model.alpha * 1e6:.1f} us, bandwidth {1 / model.beta / 1e6:.1f} MB/s")
        head = ("density      k  " + "  ".join(f"{a[:14]:>14s}" for a in algos)
                + "  pick             pick/best auto/best")
        print(head)
        for row in results:
            print(f"{row['density']:7.3%} {row['k']:7d}  " + "  ".join(f"{row['median_s'][a] * 1e3:12.2f}ms"
                                                              for a in algos)
                  + f"  {row['pick']:<16s} {row['pick_over_best']:9.3f} {row['auto_over_best']:9.3f}")
            print(f"{'predicted':>15s}  " + "  ".join(f"{row['predicted_s'][a] * 1e3:12.2f}ms" for a in FIXED))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    sparsedist.dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
