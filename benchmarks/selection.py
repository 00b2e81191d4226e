"""Selection cost against the physical floor: each compressor's ``compress()`` on one large flat gradient, as a
multiple of one memory pass over the same tensor (``x.abs()``: read n floats, write n floats into a new tensor),
measured in the same run on the same tensor; and of the same pass into a preallocated tensor
(``torch.abs(x, out=buf)``), which on a CPU is several times cheaper: a new tensor of this size is page-faulted in
on first touch.

    python benchmarks/selection.py                       # 25M fp32 elements, densities 0.1 % and 1 %
    python benchmarks/selection.py --numel 1000000 --threads 2

The gradient is heavy-tailed (normal times uniform^4, like real gradients: few large entries), the accumulator
is what the hook hands to ``compress()`` (error feedback already added). Times are the fastest of ``--repeats``
calls (warm caches; contention only adds time). ``torch.set_num_threads(--threads)``; 1 by default, as one rank of a
training job on a shared CPU. On CUDA (``--device cuda``) every call is synchronised.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsedist.compressors import build_compressor  # noqa: E402
from sparsedist.compressors.base import SelectContext  # noqa: E402


def _fastest(fn, repeats: int, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--densities", default="0.001,0.01")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.numel, generator=g) * torch.rand(args.numel, generator=g) ** 4).to(device)
    ctx = SelectContext(step=0, key="x", world_size=2, rank=0, seed=0)
    floor = _fastest(lambda: x.abs(), args.repeats, device)
    out = torch.empty_like(x)
    bare = _fastest(lambda: torch.abs(x, out=out), args.repeats, device)
    print(f"n = {args.numel:,} fp32 on {device}, {args.threads} thread(s); one memory pass (x.abs()): "
          f"{floor * 1e3:.1f} ms; the same into a preallocated tensor (torch.abs(x, out=buf)): {bare * 1e3:.1f} ms")
    print(f"{'compressor':<34s} {'density':>8s} {'sent':>10s} {'ms':>9s} {'x floor':>8s} {'x abs(out=)':>12s}")
    rows = []
    for d in (float(v) for v in args.densities.split(",")):
        # a threshold that sends about the same count, for the threshold compressor (Strom)
        tau = float(x.abs().kthvalue(args.numel - int(d * args.numel)).values)
        configs = [("topk (exact)", "topk", {"density": d}),
                   ("topk (sampled)", "topk", {"density": d, "mode": "sampled"}),
                   ("dgc (sampled, momentum)", "dgc", {"density": d, "momentum": 0.9, "warmup_steps": 0}),
                   ("randk", "randk", {"density": d}),
                   (f"threshold (tau at {d:.1%})", "threshold", {"threshold": tau})]
        for label, name, opts in configs:
            comp = build_compressor(name, **opts)
            acc = comp.accumulate(x, None, ctx)
            sent = comp.compress(acc, ctx).nnz
            t = _fastest(lambda: comp.compress(comp.accumulate(x, None, ctx), ctx), args.repeats, device)
            t_acc = _fastest(lambda: comp.accumulate(x, None, ctx), args.repeats, device)
            sel = max(t - t_acc, 0.0)
            rows.append({"compressor": label, "density": d, "sent": sent, "seconds": sel, "over_floor": sel / floor,
                         "over_preallocated_pass": sel / bare})
            print(f"{label:<34s} {d:8.3%} {sent:10,d} {sel * 1e3:9.1f} {sel / floor:8.2f} {sel / bare:12.2f}")
            comp.discard_pending(ctx.key)
    return rows


if __name__ == "__main__":
    main()
