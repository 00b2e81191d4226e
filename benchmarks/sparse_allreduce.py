"""Sparse allreduce algorithms on real training gradients: bytes per rank, measured time, and the model.

For each world size P (real processes over gloo on loopback, started with ``sparsedist.testing.run_distributed``)
every rank trains the same MNIST MLP (784-H-H-10, data-parallel: each rank its own shard, gradients averaged by
a dense allreduce) for a few steps, then takes its *own* local gradient, keeps its top-k for each density and
sums it over the ranks with every algorithm:

* ``dense``      -- ring allreduce of the densified vector (``Backend.allreduce``);
* ``allgather``  -- sparse allgather + scatter-add;
* ``ssar_rd``    -- SparCML SSAR_Recursive_double;
* ``ssar_split`` -- SparCML SSAR_Split_allgather (equal index ranges, as in the paper);
* ``ssar_split(bal)`` -- the same with Ok-Topk's data-balanced ranges (``split_bounds="balanced"``);
* ``dsar_split`` -- SparCML DSAR_Split_allgather;
* ``gtopk(est)`` -- Ok-Topk global top-k (keeps k entries of the sum), a threshold-estimation call;
* ``gtopk(reuse)`` -- the same with the threshold estimated on the previous call and reused (steady state).

It prints, per (P, density), the largest bytes sent and received by any rank (from the backend's counters),
the cost model's predicted bytes and time (link parameters probed at start-up, the measured union of supports
as the fill-in), and the measured time (median of the repeats, slowest rank). "mean B" is the average over
ranks of (sent + received) / 2. It then runs Ok-Topk SGD for
``--gtopk-steps`` steps (local top-k with residuals, global top-k, threshold reused between estimations) and
reports the volume per rank per step against Ok-Topk's bound of 6k(P-1)/P 32-bit words.

    python benchmarks/sparse_allreduce.py             # P = 2..8, densities 0.1 %, 1 %, 10 %  (a few minutes)
    python benchmarks/sparse_allreduce.py --quick     # P = 2, 4; 0.1 %, 1 %
    python benchmarks/sparse_allreduce.py --extrapolate-only   # the model's table up to P = 1024

Loopback is not a network: the times show local work and gloo's latency, not a bandwidth-limited link; the
bytes are what a real link would carry.
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

from sparsedist.collectives.choose import CostModel, expected_union  # noqa: E402
from sparsedist.collectives.report import extrapolate, format_table  # noqa: E402
from sparsedist.datasets import mnist_path, read_mnist_arrays  # noqa: E402
from sparsedist.testing import run_distributed  # noqa: E402

ALGOS = ["dense", "allgather", "ssar_recursive_double", "ssar_split_allgather", "ssar_split_balanced",
         "dsar_split_allgather", "gtopk_est", "gtopk"]
SHORT = {"dense": "dense", "allgather": "allgather", "ssar_recursive_double": "ssar_rd",
         "ssar_split_allgather": "ssar_split", "ssar_split_balanced": "ssar_split(bal)",
         "dsar_split_allgather": "dsar_split", "gtopk_est": "gtopk(est)",
         "gtopk": "gtopk(reuse)"}


class _MLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


def _char_gpt_example():
    """examples/char_gpt.py as a module (its CharGPT model and tinyshakespeare data)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("char_gpt_example", ROOT / "examples" / "char_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _set_grad(model, flat: torch.Tensor) -> None:
    off = 0
    for p in model.parameters():
        n = p.numel()
        p.grad.copy_(flat[off: off + n].view_as(p))
        off += n


def gradient_source(rank: int, ws: int, cfg: dict):
    """This rank's own gradient after ``cfg["train_steps"]`` data-parallel steps (dense allreduce in between).

    ``cfg["source"]``: ``"mnist"`` (the MLP 784-H-H-10, ``cfg["hidden"]``, ``cfg["mnist"]`` the npz path),
    ``"charlm"`` (the char-level GPT of ``examples/char_gpt.py``) or ``"synthetic"`` (``cfg["numel"]`` elements).
    Returns ``(grad, local_grad, model, opt)``: the flat fp32 gradient, and for real sources a function giving
    the next step's gradient, the model and its optimizer (None for synthetic). Needs an initialised process
    group.
    """
    import torch.distributed as dist

    torch.manual_seed(0)
    if cfg["source"] == "mnist":
        data = read_mnist_arrays(cfg["mnist"])
        x = torch.from_numpy(data["x_train"][rank::ws][: 64 * 200]).float().div_(255.0)
        y = torch.from_numpy(data["y_train"][rank::ws][: 64 * 200]).long()
        model = _MLP(cfg["hidden"])
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        bs = cfg["batch"]
        g = torch.Generator().manual_seed(rank)

        def local_grad():
            sel = torch.randint(0, x.shape[0], (bs,), generator=g)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            return _flat_grad(model).clone()

        for _ in range(cfg["train_steps"]):
            grad = local_grad()
            dist.all_reduce(grad)
            _set_grad(model, grad / ws)
            opt.step()
        grad = local_grad()  # this rank's own gradient at the measurement step
    elif cfg["source"] == "charlm":  # the char-level GPT of examples/char_gpt.py on tinyshakespeare
        example = _char_gpt_example()
        data = example.CharData(example.load_text(None))
        model = example.CharGPT(data.vocab_size, 128, 4, 4, 64)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        bs = cfg["batch"]
        g = torch.Generator().manual_seed(rank)

        def local_grad():
            xb, yb = data.batch("train", bs, 64, g)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).backward()
            return _flat_grad(model).clone()

        local_grad()  # creates every .grad, so _set_grad can copy into them
        for _ in range(cfg["train_steps"]):
            grad = local_grad()
            dist.all_reduce(grad)
            _set_grad(model, grad / ws)
            opt.step()
        grad = local_grad()
    else:  # synthetic: heavy-tailed shared component (the same large coordinates everywhere) + rank noise
        n = cfg["numel"]
        gb = torch.Generator().manual_seed(0)
        base = torch.randn(n, generator=gb) * torch.rand(n, generator=gb) ** 6
        grad = base + 0.2 * base.abs().mean() * torch.randn(n, generator=torch.Generator().manual_seed(rank + 1))
        model = opt = local_grad = None
    return grad, local_grad, model, opt


def _worker(rank: int, ws: int, cfg: dict):

    from sparsedist.collectives.backend import TorchBackend
    from sparsedist.collectives import probe
    from sparsedist.collectives.gtopk import GlobalTopK
    from sparsedist.collectives.sparse_allreduce import sparse_allreduce

    torch.set_num_threads(1)
    be = TorchBackend(timeout=300)
    model_params = probe(be)

    grad, local_grad, model, opt = gradient_source(rank, ws, cfg)
    n = grad.numel()

    # ---- one sum per algorithm and density ----------------------------------------------------------------
    rows = []
    for d in cfg["densities"]:
        k = max(1, math.ceil(d * n))
        idx = grad.abs().topk(k).indices
        val = grad[idx]
        ref = None
        for algo in ALGOS:
            times, counts = [], None
            if algo == "gtopk":  # estimate once (not timed), then every timed call reuses the threshold
                gt = GlobalTopK(threshold_interval=10**9, repartition_interval=10**9)
                gt(idx, val, n, k, backend=be)
            for _ in range(cfg["repeats"]):
                be.barrier()
                be.reset_counters()
                t0 = time.perf_counter()
                if algo == "gtopk_est":
                    res = GlobalTopK()(idx, val, n, k, backend=be).to_dense()  # fresh: an estimation call
                elif algo == "gtopk":
                    out = gt(idx, val, n, k, backend=be)
                    assert not out.exact
                    res = out.to_dense()
                elif algo == "ssar_split_balanced":
                    res = sparse_allreduce(idx, val, n, algorithm="ssar_split_allgather", backend=be,
                                           split_bounds="balanced")
                else:
                    res = sparse_allreduce(idx, val, n, algorithm=algo, backend=be)
                times.append(time.perf_counter() - t0)
                counts = be.reset_counters()
            if algo == "dense":
                ref = res
                union = int((res != 0).sum())
            elif not algo.startswith("gtopk"):
                assert torch.allclose(res, ref, atol=1e-5, rtol=1e-5), f"{algo} differs from the dense sum"
            rows.append({"density": d, "k": k, "algo": algo, "sent": counts[0], "recv": counts[1],
                         "time": statistics.median(times), "union": union})

    # ---- Ok-Topk SGD: volume per step with threshold reuse ------------------------------------------------
    gsteps = []
    for d in cfg["gtopk_densities"]:
        k = max(1, math.ceil(d * n))
        gt = GlobalTopK(threshold_interval=cfg["threshold_interval"], repartition_interval=cfg["repartition_interval"])
        residual = torch.zeros(n)
        for step in range(cfg["gtopk_steps"]):
            g_now = local_grad() if local_grad is not None else grad * (1 + 0.01 * step)
            acc = g_now + residual
            idx = acc.abs().topk(k).indices
            out = gt(idx, acc[idx], n, k, backend=be)
            residual = acc.clone()
            residual[idx[out.kept]] = 0.0  # what survived is in the sum; the rest stays in the residual
            if model is not None:
                _set_grad(model, out.to_dense() / ws)
                opt.step()
            gsteps.append({"density": d, "k": k, "step": step, "exact": out.exact, "m": int(out.indices.numel()),
                           "sent": out.bytes_sent, "recv": out.bytes_received})
    return {"n": n, "model": model_params.state_dict(), "rows": rows, "gtopk": gsteps}


def _aggregate(results: list[dict]) -> dict:
    """Largest bytes / slowest time over ranks, per (density, algorithm)."""
    base = results[0]
    agg = []
    for j, row in enumerate(base["rows"]):
        agg.append({**row, "sent": max(r["rows"][j]["sent"] for r in results),
                    "recv": max(r["rows"][j]["recv"] for r in results),
                    "mean": statistics.fmean((r["rows"][j]["sent"] + r["rows"][j]["recv"]) / 2 for r in results),
                    "time": max(r["rows"][j]["time"] for r in results)})
    gsteps = []
    for j, st in enumerate(base["gtopk"]):
        gsteps.append({**st, "sent": max(r["gtopk"][j]["sent"] for r in results),
                       "recv": max(r["gtopk"][j]["recv"] for r in results)})
    return {"n": base["n"], "model": base["model"], "rows": agg, "gtopk": gsteps}


def _print_world(P: int, res: dict, lines: list[str]) -> None:
    m = CostModel(**{k: v for k, v in res["model"].items() if k != "measured"})
    n = res["n"]

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out(f"\n=== P = {P}, n = {n:,} (fp32 values, int32 indices); probed alpha = {m.alpha * 1e6:.1f} us, "
        f"beta = {m.beta * 1e9:.3f} ns/B ({1 / m.beta / 1e9:.2f} GB/s), gamma = {m.gamma * 1e9:.1f} ns/entry, "
        f"gamma_dense = {m.gamma_dense * 1e9:.2f} ns/elem")
    if m.call_latency:
        out("  probed per-call latency [us]: " + ", ".join(f"{k} {v * 1e6:.0f}" for k, v in m.call_latency.items()))
    by_d: dict = {}
    for row in res["rows"]:
        by_d.setdefault(row["density"], []).append(row)
    for d, rows in by_d.items():
        k, union = rows[0]["k"], rows[0]["union"]
        algos = [a for a in ALGOS if a not in ("gtopk_est", "ssar_split_balanced")]
        preds = m.predict(n, k, P, union_nnz=union, algorithms=algos, threshold_interval=10**9,
                          repartition_interval=10**9)
        pred_rand = m.predict(n, k, P, algorithms=algos, threshold_interval=10**9, repartition_interval=10**9)
        preds["gtopk_est"] = m.predict(n, k, P, union_nnz=union, algorithms=["gtopk"], threshold_interval=1,
                                       repartition_interval=1)["gtopk"]
        pred_rand["gtopk_est"] = m.predict(n, k, P, algorithms=["gtopk"], threshold_interval=1,
                                           repartition_interval=1)["gtopk"]
        extra = m.predict(P, P, P, algorithms=["dense"], value_bytes=8)["dense"]  # the boundary allreduce
        for pr in (preds, pred_rand):
            sp = pr["ssar_split_allgather"]
            pr["ssar_split_balanced"] = type(sp)("ssar_split_balanced", sp.time + extra.time, sp.latency + extra.latency,
                                                 sp.bytes + extra.bytes, sp.sparse_work, sp.dense_work)
        choice = m.choose(n, k, P, union_nnz=union)
        dense_bytes = preds["dense"].bytes
        out(f"density {d:.4%}: k = {k:,} per rank; support of the sum = {union:,} measured, "
            f"{expected_union(n, k, P):,.0f} if supports were random; model picks {SHORT[choice.algorithm]}")
        out(f"  {'algorithm':<15} {'sent B':>11} {'recv B':>11} {'mean B':>11} {'model B':>11} "
            f"{'model(rand) B':>13} {'/dense':>7} {'time ms':>9} {'model ms':>9}")
        for row in rows:
            a = row["algo"]
            out(f"  {SHORT[a]:<15} {row['sent']:>11,} {row['recv']:>11,} {row['mean']:>11,.0f} "
                f"{preds[a].bytes:>11,.0f} {pred_rand[a].bytes:>13,.0f} "
                f"{max(row['sent'], row['recv']) / dense_bytes:>7.3f} {row['time'] * 1e3:>9.2f} "
                f"{preds[a].time * 1e3:>9.2f}")
        exact_rows = [r for r in rows if not r["algo"].startswith("gtopk")]
        fastest = min(exact_rows, key=lambda r: r["time"])
        picked = next(r for r in rows if r["algo"] == choice.algorithm)
        sp = [r for r in rows if r["algo"] in ("ssar_recursive_double", "ssar_split_allgather", "ssar_split_balanced",
                                               "dsar_split_allgather")]
        best_sp = min(sp, key=lambda r: max(r["sent"], r["recv"]))
        ag = next(r for r in rows if r["algo"] == "allgather")
        out(f"  fastest measured: {SHORT[fastest['algo']]} ({fastest['time'] * 1e3:.2f} ms); model's pick "
            f"{SHORT[picked['algo']]} measured {picked['time'] * 1e3:.2f} ms ({picked['time'] / fastest['time']:.2f}x); "
            f"fewest-bytes SparCML variant {SHORT[best_sp['algo']]} "
            f"{max(best_sp['sent'], best_sp['recv']):,} B vs allgather {max(ag['sent'], ag['recv']):,} B")
    gs = res["gtopk"]
    for d in sorted({s["density"] for s in gs}):
        steps = [s for s in gs if s["density"] == d]
        k = steps[0]["k"]
        bound = 6 * k * (P - 1) / P

        def words(sel, key):
            return statistics.fmean(s[key] for s in sel) / 4 if sel else float("nan")

        reuse = [s for s in steps if not s["exact"]]
        est = [s for s in steps if s["exact"]]
        worst = max(max(s["sent"], s["recv"]) for s in steps) / 4
        out(f"Ok-Topk SGD, density {d:.4%}, k = {k:,}, {len(steps)} steps ({len(est)} estimation): words/rank/step "
            f"(max over ranks) reuse sent {words(reuse, 'sent'):,.0f} recv {words(reuse, 'recv'):,.0f}; "
            f"estimation sent {words(est, 'sent'):,.0f} recv {words(est, 'recv'):,.0f}; "
            f"all steps mean {words(steps, 'sent'):,.0f}/{words(steps, 'recv'):,.0f} = "
            f"{max(words(steps, 'sent'), words(steps, 'recv')) / k:.2f} k; worst step {worst / k:.2f} k; "
            f"bound 6k(P-1)/P = {bound:,.0f} ({6 * (P - 1) / P:.2f} k); kept per step "
            f"{min(s['m'] for s in steps)}..{max(s['m'] for s in steps)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default="2,3,4,5,6,7,8")
    ap.add_argument("--densities", default="0.001,0.01,0.1")
    ap.add_argument("--gtopk-densities", default="0.001")
    ap.add_argument("--gtopk-steps", type=int, default=32)
    ap.add_argument("--threshold-interval", type=int, default=32)
    ap.add_argument("--repartition-interval", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", choices=["mnist", "charlm", "synthetic"], default="mnist",
                    help="whose gradients: the MNIST MLP, the char-level GPT of examples/char_gpt.py (818k "
                         "parameters, batch --batch sequences of 64 characters), or synthetic")
    ap.add_argument("--data", "--mnist", dest="data", default=None,
                    help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST or ./data/mnist.npz)")
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: 1.86M parameters)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--numel", type=int, default=1_863_690, help="vector length for --source synthetic")
    ap.add_argument("--quick", action="store_true", help="P = 2, 4; densities 0.1 %%, 1 %%; 8 Ok-Topk steps")
    ap.add_argument("--extrapolate-only", action="store_true")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.world_sizes, args.densities, args.gtopk_steps, args.repeats = "2,4", "0.001,0.01", 8, 2
        args.threshold_interval = 4
    lines: list[str] = []
    raw = {}
    if not args.extrapolate_only:
        cfg = {"densities": [float(d) for d in args.densities.split(",")],
               "gtopk_densities": [float(d) for d in args.gtopk_densities.split(",")],
               "gtopk_steps": args.gtopk_steps, "threshold_interval": args.threshold_interval,
               "repartition_interval": args.repartition_interval, "repeats": args.repeats, "source": args.source,
               "hidden": args.hidden, "batch": args.batch, "train_steps": args.train_steps, "numel": args.numel,
               "mnist": str(mnist_path(args.data)) if args.source == "mnist" else None}
        what = {"mnist": f" MLP 784-{args.hidden}-{args.hidden}-10", "charlm": " char-level GPT (width 128, 4 layers)",
                "synthetic": ""}[args.source]
        print(f"gradients: {args.source}{what}" + (f" after {args.train_steps} data-parallel steps, batch {args.batch} "
              f"per rank" if args.source != "synthetic" else ""), flush=True)
        t_all = time.time()
        for P in [int(p) for p in args.world_sizes.split(",")]:
            t0 = time.time()
            res = _aggregate(run_distributed(_worker, P, args=(cfg,), timeout=900))
            raw[P] = res
            _print_world(P, res, lines)
            print(f"  (P = {P} took {time.time() - t0:.1f} s)", flush=True)
        print(f"\ntotal {time.time() - t_all:.1f} s", flush=True)
    print_extrapolation()
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in raw.items()}, indent=1))


def print_extrapolation(numel: int = 25_000_000) -> None:
    """The model's predictions up to P = 1024 for a 25M-element bucket (100 MB of fp32) on two links."""
    links = {"10 GbE (alpha 20 us, 1.25 GB/s)": CostModel(alpha=20e-6, beta=1 / 1.25e9),
             "100 Gb/s InfiniBand (alpha 2 us, 12.5 GB/s)": CostModel(alpha=2e-6, beta=1 / 12.5e9)}
    for overlap in ("random", "identical"):
        for name, model in links.items():
            print(f"\nmodel, n = {numel:,}, {name}, supports {overlap}: time per allreduce [ms]")
            print(format_table(extrapolate(numel, [0.001, 0.01, 0.1], [8, 64, 256, 1024], model, overlap=overlap)))
    print(f"\nmodel, n = {numel:,}, supports random: MB per rank (the link does not matter)")
    print(format_table(extrapolate(numel, [0.001, 0.01, 0.1], [8, 64, 256, 1024], CostModel(), overlap="random"),
                       what="bytes"))


if __name__ == "__main__":
    main()
