"""The models, the schedule and the in-process simulation behind benchmarks/adam_exchange.py (its ``--mode sim``):
P workers in one process, each with its own model replica, optimizer, error-feedback residuals and data stream; the
exchange modelled exactly (each worker's top-k of its own accumulation, the sum of the sparse vectors divided by P).
Bytes are counted as sparsedist's allgather moves them (``(P-1) * (16 + k * (4 + value bytes))`` per parameter);
dense steps as a ring allreduce (``2 (P-1)/P * n * 4``). ``tests/test_optim_benchmark.py`` checks it against real
processes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import sparsedist.optim as so  # noqa: E402
from char_gpt import CharData, CharGPT  # noqa: E402
from sparsedist.collectives import ring_allreduce_bytes  # noqa: E402
from sparsedist.datasets import tinyshakespeare  # noqa: E402

METHODS = ("ddp", "topk-grad", "sparse-adamw", "sparse-adamw-reset")
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
