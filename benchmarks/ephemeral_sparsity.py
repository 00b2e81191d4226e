"""Honest accounting for sparsity in an MLP block: estimated FLOPs saved vs measured time and memory.

The block is a transformer MLP, ``y = fc2(act(fc1(x)))`` with ``fc1: d -> 4d`` and ``fc2: 4d -> d``, run on
``N`` tokens (``x`` of shape ``(N, d)``, float32). One training step is a forward pass plus the backward of
``(y * g).sum()`` for a fixed random ``g`` (so the output error is dense and un-tied), with ``x`` requiring
grad as it would inside a network.

Variants (all start from the same dense weights):

* ``dense``            GELU, ``nn.Linear``: the baseline.
* ``dense-control``    an identical copy of ``dense``: its ratio to ``dense`` is the run's timing noise.
* ``weight-mask``      90% of weights zeroed by a mask, weight gradients masked after backward (how
                       RigL/static masks train): dense kernels still multiply the zeros.
* ``weight-csr``       the same 90%-sparse weights stored as CSR (:class:`sparsedist.nn.CSRLinear`):
                       sparse x dense kernels forward and backward, SDDMM for the weight gradient.
* ``act-topk``         ``TopKActivation`` keeping 10% of the 4d hidden units per token, dense matmuls.
* ``act-threshold``    ``ThresholdActivation`` (FATReLU), dense matmuls; its kept fraction is measured.
* ``meprop``           ``SparseBackpropLinear`` in both layers with k/out = 10%: smaller backward matmuls.
* ``sparse-error``     ``sparse_error`` (10% per token) on the block output, dense matmuls below it.

FLOPs are *estimates* (multiply-adds x 2) of what a kernel that skips the zeros would do; the "kernel"
column says whether this run actually used such a kernel. Time is the best (minimum) of interleaved
repetitions (all variants take turns, so background load hits them alike), both as wall-clock
(``time.perf_counter``) and as this process's CPU time (``time.process_time``). With one thread the CPU
time is the work done, unaffected by other processes taking the CPU, so the ratios and verdicts use it;
on a busy shared machine the wall-clock can be several times larger. A ``dense-control`` variant (an
identical dense block) shows how much the measurement itself varies. Peak memory is measured with
``torch.profiler`` (``profile_memory=True``): the highest value, during one training step, of bytes
allocated minus bytes freed by PyTorch's CPU allocator since the step began. It counts activations saved
for backward, gradients (parameter grads are set to ``None`` before each step) and temporaries; it does not
count parameters or the input, which exist before the step. Ratios are against ``dense`` measured in the
same run.

Run: ``python benchmarks/ephemeral_sparsity.py`` (about a minute on one core); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import sparsedist.nn as snn


class Block(nn.Module):
    """``post(fc2(act(fc1(x))))``; ``grad_masks`` are applied to weight gradients after backward."""

    def __init__(self, fc1, act, fc2, post=None, grad_masks=()):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.post = post
        self.grad_masks = [(p, ~m) for p, m in grad_masks]  # (parameter, bool mask of pruned positions)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(x)))
        return self.post(y) if self.post is not None else y

    def after_backward(self):
        for p, pruned in self.grad_masks:
            p.grad.masked_fill_(pruned, 0)


def build_variants(d: int, args, gen: torch.Generator) -> dict[str, tuple[Block, str]]:
    h = 4 * d
    base1, base2 = nn.Linear(d, h), nn.Linear(h, d)
    m1 = torch.rand(h, d, generator=gen) < args.weight_density
    m2 = torch.rand(d, h, generator=gen) < args.weight_density

    def copy(lin, cls=nn.Linear, **kw):
        new = cls(lin.in_features, lin.out_features, **kw)
        new.load_state_dict(lin.state_dict())
        return new

    def masked(lin, m):
        new = copy(lin)
        with torch.no_grad():
            new.weight.mul_(m)
        return new

    k_act = math.ceil(args.act_keep * h)
    variants = {
        "dense": (Block(copy(base1), nn.GELU(), copy(base2)), "dense"),
        # an identical second copy: its ratio to dense measures this run's timing noise
        "dense-control": (Block(copy(base1), nn.GELU(), copy(base2)), "dense"),
    }
    f1, f2 = masked(base1, m1), masked(base2, m2)
    variants["weight-mask"] = (
        Block(f1, nn.GELU(), f2, grad_masks=[(f1.weight, m1), (f2.weight, m2)]),
        "dense (mask)",
    )
    variants["weight-csr"] = (
        Block(
            snn.CSRLinear.from_dense(base1.weight, m1, base1.bias),
            nn.GELU(),
            snn.CSRLinear.from_dense(base2.weight, m2, base2.bias),
        ),
        "CSR sparse",
    )
    variants["act-topk"] = (Block(copy(base1), snn.TopKActivation(k_act), copy(base2)), "dense (mask)")
    variants["act-threshold"] = (
        Block(copy(base1), snn.ThresholdActivation(args.threshold), copy(base2)),
        "dense (mask)",
    )
    variants["meprop"] = (
        Block(
            copy(base1, snn.SparseBackpropLinear, k=args.meprop_keep),
            nn.GELU(),
            copy(base2, snn.SparseBackpropLinear, k=args.meprop_keep),
        ),
        "bwd gathered",
    )
    variants["sparse-error"] = (
        Block(copy(base1), nn.GELU(), copy(base2), post=snn.SparseError(args.error_keep)),
        "dense (mask)",
    )
    return variants


def flops(name: str, n: int, d: int, args, act_kept: float) -> tuple[float, float]:
    """Estimated (forward, backward) FLOPs of one step if a kernel skipped every zero."""
    h = 4 * d
    one = 2.0 * n * d * h  # one d x h matmul over n tokens
    dense_f, dense_b = 2 * one, 4 * one  # fwd: fc1, fc2; bwd: dx and dW of each
    if name in ("dense", "dense-control"):
        return dense_f, dense_b
    if name in ("weight-mask", "weight-csr"):
        rho = args.weight_density
        return rho * dense_f, rho * dense_b
    if name in ("act-topk", "act-threshold"):
        a = act_kept  # fc2 reads a sparse input; in backward the error at the hidden layer is sparse too
        return one + a * one, a * dense_b
    if name == "meprop":
        g = math.ceil(args.meprop_keep * h) / h  # both layers keep the same fraction of output columns
        return dense_f, g * dense_b
    if name == "sparse-error":
        g = math.ceil(args.error_keep * d) / d  # fc2's dx and dW see the sparse error; fc1's error is dense again
        return dense_f, g * 2 * one + 2 * one
    raise KeyError(name)


def train_step(block: Block, x: torch.Tensor, g: torch.Tensor) -> None:
    for p in block.parameters():
        p.grad = None
    x.grad = None
    y = block(x)
    y.backward(g)
    block.after_backward()


def time_variants(variants, x, g, reps: int) -> dict[str, dict[str, float]]:
    """Best-of-``reps`` ms of a training step and of a no-grad forward, interleaving the variants.

    Returns ``{"step_wall": {variant: ms}, "step_cpu": ..., "fwd_wall": ..., "fwd_cpu": ...}``: wall-clock
    (``time.perf_counter``) and CPU time of this process (``time.process_time``; with one thread the
    autograd engine runs the CPU backward on the calling thread, so this is the work done, unaffected by
    other processes preempting this one).
    """
    keys = ("step_wall", "step_cpu", "fwd_wall", "fwd_cpu")
    acc = {k: {n: [] for n in variants} for k in keys}
    xin = x.detach()
    for n, (b, _) in variants.items():  # warm-up
        train_step(b, x, g)
        with torch.no_grad():
            b(xin)
    t0 = time.process_time()
    train_step(variants["dense"][0], x, g)
    dense_s = time.process_time() - t0
    # small sizes are cheap and noisier: repeat them more (up to 5x), about 1 s of dense steps
    reps = max(reps, min(5 * reps, int(1.0 / max(dense_s, 1e-6))))
    for _ in range(reps):
        for n, (b, _) in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            train_step(b, x, g)
            w1, c1 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                b(xin)
            w2, c2 = time.perf_counter(), time.process_time()
            acc["step_wall"][n].append(w1 - w0)
            acc["step_cpu"][n].append(c1 - c0)
            acc["fwd_wall"][n].append(w2 - w1)
            acc["fwd_cpu"][n].append(c2 - c1)
    return {k: {n: 1e3 * min(v) for n, v in acc[k].items()} for k in keys}


def peak_memory(variants, x, g) -> dict[str, float]:
    """Peak bytes allocated during one training step per variant, from torch.profiler memory events."""
    for b, _ in variants.values():  # free the previous gradients before the profiler starts
        for p in b.parameters():
            p.grad = None
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for n, (b, _) in variants.items():
            x.grad = None  # x is shared: every variant allocates its own input gradient
            with record_function(f"step::{n}"):
                y = b(x)
                y.backward(g)
                b.after_backward()
                del y
    events = list(prof.profiler.kineto_results.events())
    ranges = {e.name()[len("step::"):]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("step::")}
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    out = {}
    for n, (t0, t1) in ranges.items():
        cur = peak = 0
        for t, nb in mem:
            if t0 <= t <= t1:
                cur += nb
                peak = max(peak, cur)
        out[n] = peak / 2**20
    return out


def measured_activation_density(variants, x) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for n, (b, _) in variants.items():
            if n.startswith("act-"):
                with snn.ActivationSparsityMeter(b) as meter:
                    b(x)
                out[n] = 1.0 - meter.sparsity()["act"]
    return out


MECHANISM = {
    "weight-mask": "dense kernels; the mask only zeroes values, so no work is skipped",
    "weight-csr": "CSR sparse x dense matmuls forward and backward, SDDMM weight gradient",
    "act-topk": "dense matmuls; the per-token top-k selection is extra work",
    "act-threshold": "dense matmuls; the comparison is cheap",
    "meprop": "backward matmuls shrink to k of out columns (index_select), forward unchanged",
    "sparse-error": "dense matmuls below it; the per-token top-k of the error is extra work",
}


def verdict(ratio: float, tol: float) -> str:
    """Classify a time ratio against dense; ``tol`` is the noise band of that size (at least 10%)."""
    if ratio < 1 - tol:
        return f"faster x{ratio:.2f}"
    if ratio > 1 + tol:
        return f"slower x{ratio:.2f}"
    return f"same   x{ratio:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,1024", help="comma-separated model widths d (hidden = 4d)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step N (batch x sequence length)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (best reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--weight-density", type=float, default=0.1, help="fraction of weights kept (0.1 = 90%% sparse)")
    ap.add_argument("--act-keep", type=float, default=0.1, help="TopKActivation: fraction of hidden units kept")
    ap.add_argument("--threshold", type=float, default=0.5, help="ThresholdActivation threshold")
    ap.add_argument("--meprop-keep", type=float, default=0.1, help="meProp: k / out_features")
    ap.add_argument("--error-keep", type=float, default=0.1, help="sparse_error: fraction of errors kept per token")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    t_start, c_start = time.perf_counter(), time.process_time()
    print(
        f"MLP block fc1(d->4d) act fc2(4d->d), N={args.tokens} tokens, float32, CPU, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, best of >= {args.reps} interleaved reps"
    )
    if hasattr(os, "getloadavg"):
        print(
            f"machine: {os.cpu_count()} CPU(s), load average at start {os.getloadavg()[0]:.2f} "
            f"(other processes share the CPU)"
        )
    print(
        "x dense = variant / dense CPU time (or peak memory) measured in the same run (< 1 is better); wall-clock "
        "is shown too but includes time other processes took the CPU; FLOPs assume a kernel that skips zeros, "
        "'kernel' says what this run used"
    )
    step_ratios: dict[str, list[float]] = {}
    fwd_ratios: dict[str, list[float]] = {}
    for d in sizes:
        x = torch.randn(args.tokens, d, generator=gen).requires_grad_()
        g = torch.randn(args.tokens, d, generator=gen)
        variants = build_variants(d, args, gen)
        densities = measured_activation_density(variants, x.detach())
        t = time_variants(variants, x, g, args.reps)
        peak = peak_memory(variants, x, g)
        df, db = flops("dense", args.tokens, d, args, 1.0)
        print()
        print(f"d={d} hidden={4 * d}: dense step {df / 1e9:.2f} GFLOP forward + {db / 1e9:.2f} GFLOP backward")
        hdr = (
            f"{'variant':<14}{'kernel':<13}{'FLOP saved':>11}{'FLOP saved':>11}"
            f"{'forward ms':>21}{'training step ms':>26}{'peak MB':>14}"
        )
        sub = (
            f"{'':<14}{'':<13}{'fwd':>11}{'bwd':>11}"
            f"{'wall':>7}{'cpu':>7}{'x dense':>8}{'wall':>9}{'cpu':>8}{'x dense':>8}{'':>6}{'x dense':>8}"
        )
        print(hdr)
        print(sub)
        print("-" * len(sub))
        for n, (_, kernel) in variants.items():
            r_step = t["step_cpu"][n] / t["step_cpu"]["dense"]
            r_fwd = t["fwd_cpu"][n] / t["fwd_cpu"]["dense"]
            step_ratios.setdefault(n, []).append(r_step)
            fwd_ratios.setdefault(n, []).append(r_fwd)
            f, b = flops(n, args.tokens, d, args, densities.get(n, 1.0))
            print(
                f"{n:<14}{kernel:<13}{1 - f / df:>11.1%}{1 - b / db:>11.1%}"
                f"{t['fwd_wall'][n]:>7.1f}{t['fwd_cpu'][n]:>7.1f}{r_fwd:>8.2f}"
                f"{t['step_wall'][n]:>9.1f}{t['step_cpu'][n]:>8.1f}{r_step:>8.2f}"
                f"{peak[n]:>6.1f}{peak[n] / peak['dense']:>8.2f}"
            )
        acts = ", ".join(f"{n} keeps {v:.1%}" for n, v in densities.items())
        print(f"measured hidden activation density: {acts}")
    print()
    print(
        "measured verdict per variant and size, CPU time of a training step [forward only] against dense; 'same' "
        "means within the noise band of that size: max(10%, how far dense-control, an identical dense block, "
        "strayed from x1.00)"
    )
    bands = []
    for i, d in enumerate(sizes):
        tol_s = max(0.10, abs(step_ratios["dense-control"][i] - 1))
        tol_f = max(0.10, abs(fwd_ratios["dense-control"][i] - 1))
        bands.append((tol_s, tol_f))
    band_cells = [f"  d={d}: +-{ts:.0%} [+-{tf:.0%}]".ljust(40) for d, (ts, tf) in zip(sizes, bands)]
    print(f"  {'band':<14}" + "".join(band_cells))
    for n, why in MECHANISM.items():
        cells = [
            f"  d={d}: {verdict(step_ratios[n][i], ts)} [{verdict(fwd_ratios[n][i], tf)}]".ljust(40)
            for i, (d, (ts, tf)) in enumerate(zip(sizes, bands))
        ]
        print(f"  {n:<14}" + "".join(cells))
        print(f"  {'':<14}  why: {why}")
    print()
    load = f", load average at end {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"total benchmark time {time.perf_counter() - t_start:.1f} s wall, "
        f"{time.process_time() - c_start:.1f} s CPU{load}"
    )


if __name__ == "__main__":
    main()
