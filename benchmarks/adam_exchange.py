"""AdamW with a sparse gradient exchange: validation loss against steps and against bytes, on two transformers.

One command per figure (each runs what is missing, two runs at a time, then writes docs/adam_exchange_<model>.png,
.md and .json)::

    python benchmarks/adam_exchange.py figure --model chargpt     # examples/char_gpt.py's CharGPT
    python benchmarks/adam_exchange.py figure --model gpt2        # transformers' GPT-2, built from a config

One run (prints a JSON record; ``--out`` appends it to a file)::

    python benchmarks/adam_exchange.py run --model chargpt --method sparse-adamw --density 0.01 --steps 360 --seed 1

Methods (the same AdamW hyper-parameters everywhere: lr 3e-3, betas (0.9, 0.99), weight decay 0.1 on matrices,
gradient clipping at 1.0, linear warm-up over 5 % of the steps then cosine decay to 10 %):

* ``ddp``: dense averaged gradients, ``torch.optim.AdamW`` (clipping the averaged gradient);
* ``topk-grad``: sparsedist's top-k hook until now: top-k of the gradient with error feedback, averaged, clipped,
  then ``torch.optim.AdamW``;
* ``sparse-adamw``: :class:`sparsedist.optim.AdamW` with its defaults (each rank's own Adam update on the wire,
  noise-corrected second moment, beta1 0.5 in the sparse phase, one dense warm-up step), top-k with error
  feedback, ``max_grad_norm=1.0``;
* ``sparse-adamw-reset``: the same with ``error_reset=True`` (each rank's gradient at its local model, the
  consensus minus its residual: :mod:`sparsedist.optim.error_reset`). Evaluated is the mean of the local models
  (what ``optimizer.consolidate()`` makes every rank's parameters; computed on a copy, its allreduce not counted),
  and the run ends with one real consolidation, counted as a dense fp32 ring allreduce.

On real processes only (``--mode dist``; ``figure`` runs them with 2 ranks over loopback, for both models):

* ``fp16``: DDP with PyTorch's ``fp16_compress_hook`` (the ring allreduce of fp16 copies: half of DDP's bytes);
* ``powersgd-r2``, ``powersgd-r4``: DDP with PyTorch's ``powerSGD_hook`` at rank 2 / 4 (error feedback, warm
  start, 2 dense steps first; one DDP bucket); bytes from its own counters of the elements it allreduces (each
  compressed matrix's P and Q, the other tensors whole), as fp32 ring allreduces;
* ``sparse-adamw-hook``: ``sparse-adamw`` through sparsedist's DDP hook,
  ``sparsedist.register(ddp, "topk", density=..., value_dtype=..., optimizer=opt)`` (what a user writes; the
  same losses as ``ReferenceExchange``, tested), used by ``benchmarks/adam_cluster.py``.

Both sparse methods send values in ``--value-dtype`` (default float16, with int32 indices; error feedback keeps
the rounding): at 1 % and two workers that is about 65x fewer bytes than DDP's fp32 ring allreduce, where fp32
values give about 49x.

``--mode sim`` (default) runs ``--workers`` workers in one process (``benchmarks/adam_sim.py``, with the models
and the schedule), each with its own model replica, optimizer, error-feedback residuals and data stream; the
exchange is modelled exactly: each worker's top-k of its own accumulation, the sum of the sparse vectors divided
by P, bytes counted as sparsedist's allgather moves them (``(P-1) * (16 + k * (4 + value bytes))`` per parameter:
a 16-byte header, int32 indices; dense steps as a ring allreduce, ``2 (P-1)/P * n * 4``). ``--mode dist`` runs the same configuration on real processes
(``torchrun --nproc_per_node=P benchmarks/adam_exchange.py run --mode dist ...``): DDP for ``ddp``, DDP with
``sparsedist.register(ddp, "topk")`` for ``topk-grad``, and :class:`sparsedist.optim.ReferenceExchange` for
``sparse-adamw``; bytes are then the collectives' own counters.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sparsedist  # noqa: E402
import sparsedist.dist  # noqa: E402
import sparsedist.optim as so  # noqa: E402
from adam_report import write_report  # noqa: E402  (benchmarks/adam_report.py: the table and the plot)
from adam_sim import (BATCH, BLOCK, CLIP, METHODS, _VALUE_BYTES, build_model, make_optimizer,  # noqa: E402
                      run_sim, val_loss)
from char_gpt import CharData  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from sparsedist.collectives import ring_allreduce_bytes  # noqa: E402
from sparsedist.datasets import tinyshakespeare  # noqa: E402

# real processes only (--mode dist): PyTorch's own DDP hooks, and sparse-adamw through sparsedist's DDP hook
DIST_METHODS = ("fp16", "powersgd-r2", "powersgd-r4", "sparse-adamw-hook")
POWERSGD_START = 2  # PowerSGD's dense allreduce steps before it compresses (the least torch accepts with EF)


# -- real processes --------------------------------------------------------------------------------------------
def _dist_exchange(model: nn.Module, opt, cfg: dict, P: int):
    """What carries the gradients on real processes for ``cfg["method"]``: (the module to call, an exchange to
    call after backward or None, ``bytes_so_far(step)``: the bytes one rank sent in steps 1..step)."""
    method, params = cfg["method"], list(model.parameters())
    dense = sum(ring_allreduce_bytes(p.numel(), 4, P) for p in params)
    if method in ("sparse-adamw", "sparse-adamw-reset"):
        exchange = so.ReferenceExchange(model, opt, density=cfg["density"], value_dtype=cfg["value_dtype"])
        return model, exchange, lambda step: exchange.stats()["bytes_sent"]
    # PowerSGD's nested allreduces mismatch on gloo once DDP has 2+ buckets (even on loopback): one bucket for it
    net = DDP(model, bucket_cap_mb_list=[256]) if method.startswith("powersgd") else DDP(model)
    if method in ("topk-grad", "sparse-adamw-hook"):
        aware = {"optimizer": opt} if method == "sparse-adamw-hook" else {}
        hook = sparsedist.register(net, "topk", density=cfg["density"], value_dtype=cfg["value_dtype"], **aware)
        return net, None, lambda step: hook.stats()["bytes_sent"]
    if method == "fp16":  # the same ring allreduce on fp16 copies of the buckets
        net.register_comm_hook(None, fp16_compress_hook)
        half = sum(ring_allreduce_bytes(p.numel(), 2, P) for p in params)
        return net, None, lambda step: half * step
    if method.startswith("powersgd"):
        # PowerSGD's own counters: elements allreduced in fp32 per compressed step (each compressed matrix's P
        # and Q, every other tensor uncompressed); its first POWERSGD_START steps are plain allreduces
        state = powersgd.PowerSGDState(None, matrix_approximation_rank=int(method[-1]),
                                       start_powerSGD_iter=POWERSGD_START, use_error_feedback=True, warm_start=True)
        net.register_comm_hook(state, powersgd.powerSGD_hook)
        return net, None, lambda step: (dense * min(step, POWERSGD_START)
                                        + ring_allreduce_bytes(state.total_numel_after_compression, 4, P))
    return net, None, lambda step: dense * step


@torch.no_grad()
def _mean_local_model(model: nn.Module, residuals: dict, P: int) -> list[torch.Tensor]:
    """Error reset: make ``model`` the mean of the ranks' local models for an evaluation (a collective; the
    residuals stay); returns the consensus to put back."""
    kept = [p.detach().clone() for p in model.parameters()]
    for name, p in model.named_parameters():
        total = residuals[name].clone() if name in residuals else torch.zeros(p.numel())
        torch.distributed.all_reduce(total)
        p.sub_((total / P).view(p.shape))
    return kept


def run_dist(cfg: dict) -> dict | None:
    """The same configuration on real processes (torchrun); returns the record on rank 0, None elsewhere.

    ``cfg["target"]`` (optional): stop at the first evaluation whose loss is at most this. The record's
    ``train_seconds`` holds rank 0's training wall-clock at each evaluation, evaluations left out."""
    torch.set_num_threads(1)
    owns_group = not torch.distributed.is_initialized()  # else the caller's group (tests) is used and kept
    if owns_group:
        sparsedist.dist.init()
    rank, P, steps = torch.distributed.get_rank(), torch.distributed.get_world_size(), cfg["steps"]
    data = CharData(tinyshakespeare())
    model = build_model(cfg["model"], data.vocab_size, cfg["seed"])
    opt, sched = make_optimizer(model, cfg["method"].replace("-hook", ""), steps, cfg["warmup"])
    net, exchange, bytes_so_far = _dist_exchange(model, opt, cfg, P)
    clip = not cfg["method"].startswith("sparse-adamw")  # sparsedist.optim.AdamW clips itself
    reset = cfg["method"] == "sparse-adamw-reset"
    gen = torch.Generator().manual_seed(cfg["seed"] * 100 + rank)
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [data.batch("val", BATCH, BLOCK, vgen) for _ in range(cfg["eval_batches"])]
    dense_per_step = sum(ring_allreduce_bytes(p.numel(), 4, P) for p in model.parameters())
    history, times, train, start = [], [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = data.batch("train", BATCH, BLOCK, gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
        if exchange is not None:
            exchange()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        train += time.perf_counter() - t0
        if step % cfg["eval_every"] == 0 or step == steps:
            if reset and step == steps:
                opt.consolidate()  # the end of training: every rank gets the mean local model
            kept = _mean_local_model(model, exchange.residuals, P) if reset else []
            history.append([step, round(val_loss(model, val_batches), 4), bytes_so_far(step)])
            with torch.no_grad():
                for p, k in zip(model.parameters(), kept):
                    p.copy_(k)
            times.append(round(train, 2))
            if history[-1][1] <= cfg.get("target", -math.inf):
                break
    if owns_group:
        sparsedist.dist.shutdown()
    if rank:
        return None
    return {**cfg, "workers": P, "params": sum(p.numel() for p in model.parameters()), "history": history,
            "final": history[-1][1], "bytes_sent": history[-1][2], "bytes_dense": dense_per_step * steps,
            "seconds": round(time.perf_counter() - start, 1), "train_seconds": times}


# -- figures ---------------------------------------------------------------------------------------------------
DDP_STEPS = 300
# (method, density, step factor, seeds): DDP's steps, the targets' 1.2x (1 %) and 1.5x (0.1 %) with 3 seeds,
# error reset at DDP's steps, and longer runs per model (char-GPT: one seed, how many steps the sparse exchange needs
# to reach DDP's loss; GPT-2: error reset at 0.1 % in the target's 1.5x, 3 seeds)
FIGURE_RUNS = [("ddp", 1.0, 1.0, (0, 1, 2)), ("topk-grad", 0.01, 1.0, (0, 1, 2)),
               ("sparse-adamw", 0.01, 1.0, (0, 1, 2)), ("sparse-adamw", 0.01, 1.2, (0, 1, 2)),
               ("sparse-adamw", 0.001, 1.5, (0, 1, 2)), ("sparse-adamw-reset", 0.001, 1.0, (0, 1, 2)),
               ("sparse-adamw-reset", 0.01, 1.0, (0, 1, 2))]
LONGER_RUNS = {"chargpt": [("sparse-adamw", 0.01, 1.5, (0,)), ("sparse-adamw", 0.01, 2.0, (0,)),
                           ("sparse-adamw", 0.001, 2.0, (0,))],
               "gpt2": [("sparse-adamw-reset", 0.001, 1.5, (0, 1, 2))]}
# PyTorch's own compression hooks at DDP's steps, on real processes over loopback (--mode dist)
_PYTORCH_HOOKS = [("fp16", 1.0, 1.0, (0, 1, 2)), ("powersgd-r2", 1.0, 1.0, (0, 1, 2)),
                  ("powersgd-r4", 1.0, 1.0, (0, 1, 2))]
DIST_RUNS = {"chargpt": _PYTORCH_HOOKS, "gpt2": _PYTORCH_HOOKS}


def config(args, method, density, steps, seed) -> dict:
    return {"model": args.model, "method": method, "density": density, "steps": steps, "seed": seed,
            "workers": args.workers, "value_dtype": args.value_dtype, "warmup": args.warmup,
            "eval_every": args.eval_every, "eval_batches": args.eval_batches, "mode": "sim"}


def key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in ("model", "method", "density", "steps", "seed", "workers", "value_dtype", "warmup"))


def figure(args) -> None:
    """Run what ``args.json`` lacks (``args.jobs`` at a time, as subprocesses), then plot and tabulate."""
    path = Path(args.json or ROOT / "docs" / f"adam_exchange_{args.model}.json")
    records = json.loads(path.read_text()) if path.exists() else []
    have = {key(r) for r in records}
    runs = FIGURE_RUNS + LONGER_RUNS.get(args.model, []) + DIST_RUNS.get(args.model, [])
    if args.runs:  # e.g. sparse-adamw:0.01:1.2 (method:density:step factor)
        runs = [r for r in runs if f"{r[0]}:{r[1]:g}:{r[2]:g}" in args.runs]
    todo = [config(args, m, d, round(DDP_STEPS * f), s) for m, d, f, seeds in runs for s in seeds[:args.seeds]]
    todo = [{**c, "mode": "dist"} if c["method"] in DIST_METHODS else c for c in todo]
    todo = [c for c in todo if key(c) not in have]
    running: list[tuple[subprocess.Popen, dict]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            c = todo.pop(0)
            cmd = [sys.executable, __file__, "run", "--config", json.dumps(c)]
            if c["mode"] == "dist":
                cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={c['workers']}"]
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), c))
        proc, c = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"run {c} failed (exit {proc.returncode})")
        records.append(json.loads(out.strip().splitlines()[-1]))
        path.write_text(json.dumps(records, indent=1))
        print(f"{c['method']} {c['density']} {c['steps']} seed {c['seed']}: {records[-1]['final']}", flush=True)
    write_report(records, path.with_suffix(""), args.model, DDP_STEPS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "figure"])
    ap.add_argument("--model", default="chargpt", choices=["chargpt", "gpt2"])
    ap.add_argument("--method", default="sparse-adamw", choices=METHODS + DIST_METHODS)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=DDP_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="simulated workers (--mode sim)")
    ap.add_argument("--value-dtype", default="float16", choices=sorted(_VALUE_BYTES),
                    help="dtype of the values on the wire (indices are int32)")
    ap.add_argument("--warmup", type=int, default=1, help="sparse-adamw: dense warm-up steps")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--mode", default="sim", choices=["sim", "dist"])
    ap.add_argument("--config", help="a JSON configuration (what `figure` passes to its runs)")
    ap.add_argument("--out", type=Path, help="run: append the record to this JSON-lines file")
    ap.add_argument("--json", type=Path, help="figure: the results file (default docs/adam_exchange_<model>.json)")
    ap.add_argument("--jobs", type=int, default=2, help="figure: runs at a time")
    ap.add_argument("--seeds", type=int, default=3, help="figure: at most this many seeds per configuration")
    ap.add_argument("--runs", nargs="+", help="figure: only these METHOD:DENSITY:STEP_FACTOR (e.g. ddp:1:1)")
    args = ap.parse_args(argv)
    if args.command == "figure":
        return figure(args)
    cfg = json.loads(args.config) if args.config else {**config(args, args.method, args.density, args.steps,
                                                                args.seed), "mode": args.mode}
    rec = run_sim(cfg) if cfg["mode"] == "sim" else run_dist(cfg)
    if rec is not None:
        line = json.dumps(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
