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

On real processes only (``--mode dist``; ``figure --model chargpt`` runs them with 2 ranks over loopback):

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

``--mode sim`` (default) runs ``--workers`` workers in one process, each with its own model replica, optimizer,
error-feedback residuals and data stream; the exchange is modelled exactly: each worker's top-k of its own
accumulation, the sum of the sparse vectors divided by P, bytes counted as sparsedist's allgather moves them
(``(P-1) * (16 + k * (4 + value bytes))`` per parameter: a 16-byte header, int32 indices;
dense steps as a ring allreduce, ``2 (P-1)/P * n * 4``). ``--mode dist`` runs the same configuration on real processes
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
from char_gpt import CharData, CharGPT  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from sparsedist.collectives import ring_allreduce_bytes  # noqa: E402
from sparsedist.datasets import tinyshakespeare  # noqa: E402

METHODS = ("ddp", "topk-grad", "sparse-adamw", "sparse-adamw-reset")
# real processes only (--mode dist): PyTorch's own DDP hooks, and sparse-adamw through sparsedist's DDP hook
DIST_METHODS = ("fp16", "powersgd-r2", "powersgd-r4", "sparse-adamw-hook")
POWERSGD_START = 2  # PowerSGD's dense allreduce steps before it compresses (the least torch accepts with EF)
BLOCK, BATCH, LR, BETAS, WD, CLIP = 64, 32, 3e-3, (0.9, 0.99), 0.1, 1.0
_VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- models, data, schedule ------------------------------------------------------------------------------------
def build_model(name: str, vocab: int, seed: int) -> nn.Module:
    """The same initial weights for every worker and method of a seed. Both ~0.8M parameters."""
    torch.manual_seed(seed)
    if name == "chargpt":
        return CharGPT(vocab, width=128, layers=4, heads=4, block=BLOCK)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel  # optional dependency

        cfg = GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        return _Logits(GPT2LMHeadModel(cfg))
    raise ValueError(f"unknown model {name!r}; choose chargpt or gpt2")


class _Logits(nn.Module):
    """transformers' output object -> the logits tensor, so both models are called alike."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        return self.inner(input_ids=idx).logits


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norms, as GPT training scripts do."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], "param_names": [n for n, p in named if p.dim() >= 2]},
            {"params": [p for _, p in named if p.dim() < 2], "param_names": [n for n, p in named if p.dim() < 2],
             "weight_decay": 0.0}]


def lr_factor(step: int, steps: int) -> float:
    """Multiplier for optimizer step ``step`` (0-based) of ``steps``: 5 % linear warm-up, cosine to 10 %."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def make_optimizer(model: nn.Module, method: str, steps: int, warmup: int, workers: int | None = None):
    """The optimizer and its lr schedule; ``workers`` tells sparse-adamw P when there is no process group."""
    if method.startswith("sparse-adamw"):
        opt = so.AdamW(param_groups(model), lr=LR, betas=BETAS, weight_decay=WD, warmup_steps=warmup,
                       max_grad_norm=CLIP, world_size=workers, error_reset=method == "sparse-adamw-reset")
    else:
        opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, weight_decay=WD, foreach=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))


@torch.no_grad()
def val_loss(model: nn.Module, batches) -> float:
    model.eval()
    out = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)
    model.train()
    return out


def k_of(numel: int, density: float) -> int:
    return max(1, math.ceil(density * numel))


# -- the in-process simulation ---------------------------------------------------------------------------------
class SimExchange:
    """P workers' exchange in one process: ``__call__()`` leaves the averaged result in every replica's p.grad
    and returns the bytes one rank sent."""

    def __init__(self, method: str, models: list[nn.Module], opts: list, density: float, value_dtype: str):
        self.method, self.models, self.opts, self.density = method, models, opts, density
        self.dtype = getattr(torch, value_dtype)
        self.vbytes = _VALUE_BYTES[value_dtype]
        self.residuals = [dict() for _ in models]  # per worker: parameter name -> residual
        self.names = [n for n, _ in models[0].named_parameters()]

    def __call__(self) -> int:
        P = len(self.models)
        columns = list(zip(*[list(m.parameters()) for m in self.models]))  # one tuple of replicas per parameter
        dense = self.method == "ddp" or (self.method != "topk-grad" and self.opts[0].exchange_is_dense())
        sent_bytes, pending, finite = 0, [], True
        for i, ps in enumerate(columns):
            n = ps[0].numel()
            if dense:
                avg = sum(p.grad for p in ps) / P
                for p in ps:
                    p.grad = avg.clone()
                sent_bytes += ring_allreduce_bytes(n, 4, P)
                continue
            k = k_of(n, self.density)
            total = torch.zeros(n)
            for r, p in enumerate(ps):
                wire = p.grad if self.method == "topk-grad" else self.opts[r].to_wire(p, p.grad)
                idx, values, acc = so.local_selection(wire, self.residuals[r].get(self.names[i]), k, self.dtype)
                total.index_add_(0, idx, values.float())
                pending.append((r, i, idx, values, acc))
            total = total.to(self.dtype).float()  # the collective accumulates in fp32, rounds to the value dtype
            finite = finite and bool(torch.isfinite(total).all())
            for p in ps:
                p.grad = (total / P).view_as(p).clone()
            sent_bytes += (P - 1) * (16 + k * (4 + self.vbytes))
        if finite:
            for r, i, idx, values, acc in pending:
                self.residuals[r][self.names[i]] = so.commit_residual(acc, idx, values)
        return sent_bytes

    def bind(self) -> None:
        """Error reset: each worker's optimizer localises its replica by that worker's residuals."""
        for r, (m, opt) in enumerate(zip(self.models, self.opts)):
            opt.attach_exchange(list(m.named_parameters()), lambda r=r: self.residuals[r], lambda: None, m)

    @torch.no_grad()
    def mean_local_model(self, apply: bool) -> list[torch.Tensor] | None:
        """Subtract the workers' mean residual from every replica (the consensus becomes the mean local model).
        ``apply``: for good (residuals cleared, as ``optimizer.consolidate()``); else returns the consensus."""
        kept = [p.detach().clone() for p in self.models[0].parameters()]
        P = len(self.models)
        for name, p0 in zip(self.names, self.models[0].parameters()):
            parts = [res[name] for res in self.residuals if name in res]
            if parts:
                mean = (sum(parts) / P).view(p0.shape)
                for m in (self.models if apply else self.models[:1]):
                    dict(m.named_parameters())[name].sub_(mean)
        if apply:
            for res in self.residuals:
                res.clear()
            return None
        return kept


def run_sim(cfg: dict) -> dict:
    if cfg["method"] not in METHODS:
        raise ValueError(f"method {cfg['method']!r} runs on real processes only: torchrun --nproc_per_node=2 "
                         f"benchmarks/adam_exchange.py run --mode dist --method {cfg['method']}")
    torch.set_num_threads(1)
    data = CharData(tinyshakespeare())
    P, steps = cfg["workers"], cfg["steps"]
    models = [build_model(cfg["model"], data.vocab_size, cfg["seed"]) for _ in range(P)]
    built = [make_optimizer(m, cfg["method"], steps, cfg["warmup"], P) for m in models]
    opts, scheds = [b[0] for b in built], [b[1] for b in built]
    exchange = SimExchange(cfg["method"], models, opts, cfg["density"], cfg["value_dtype"])
    reset = cfg["method"] == "sparse-adamw-reset"
    if reset:
        exchange.bind()
    gens = [torch.Generator().manual_seed(cfg["seed"] * 100 + r) for r in range(P)]
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [data.batch("val", BATCH, BLOCK, vgen) for _ in range(cfg["eval_batches"])]
    n = sum(p.numel() for p in models[0].parameters())
    dense_per_step = sum(ring_allreduce_bytes(p.numel(), 4, P) for p in models[0].parameters())
    sent, history, start = 0, [], time.perf_counter()
    for step in range(1, steps + 1):
        for r, (m, opt) in enumerate(zip(models, opts)):
            x, y = data.batch("train", BATCH, BLOCK, gens[r])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
        sent += exchange()
        for m, opt, sched in zip(models, opts, scheds):
            if not cfg["method"].startswith("sparse-adamw"):  # the user's clipping, on the averaged gradient
                torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
            sched.step()
        if step % cfg["eval_every"] == 0 or step == steps:
            ref = torch.cat([p.detach().reshape(-1) for p in models[0].parameters()])
            for m in models[1:]:
                if not torch.equal(ref, torch.cat([p.detach().reshape(-1) for p in m.parameters()])):
                    raise RuntimeError(f"workers' parameters differ at step {step}")
            if reset and step == steps:  # the end of training: consolidate for real, one dense allreduce
                exchange.mean_local_model(apply=True)
                sent += dense_per_step
            kept = exchange.mean_local_model(apply=False) if reset else None
            history.append([step, round(val_loss(models[0], val_batches), 4), sent])
            if kept is not None:
                with torch.no_grad():
                    for p, k in zip(models[0].parameters(), kept):
                        p.copy_(k)
    return {**cfg, "params": n, "history": history, "final": history[-1][1], "bytes_sent": sent,
            "bytes_dense": dense_per_step * steps, "seconds": round(time.perf_counter() - start, 1)}


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
DIST_RUNS = {"chargpt": [("fp16", 1.0, 1.0, (0, 1, 2)), ("powersgd-r2", 1.0, 1.0, (0, 1, 2)),
                         ("powersgd-r4", 1.0, 1.0, (0, 1, 2))]}


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
