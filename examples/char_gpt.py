"""A small character-level GPT on tinyshakespeare, trained with DDP and a sparsifying communication hook.

The default demo (about a minute on two idle CPU cores): dense model, top-k gradient exchange at 1%::

    torchrun --nproc_per_node=2 examples/char_gpt.py

Longer or different runs::

    torchrun --nproc_per_node=2 examples/char_gpt.py --steps 2000 --compressor dgc --density 0.001
    torchrun --nproc_per_node=2 examples/char_gpt.py --compressor ddp     # plain DDP, the baseline

Fully sparse training (docs/fully_sparse.md): one flag makes weights, activations, back-propagated errors and
the gradient exchange sparse together; the dense baseline is the same command without it::

    torchrun --nproc_per_node=2 examples/char_gpt.py --compressor ddp --steps 1000 --lr 1e-2                 # dense
    torchrun --nproc_per_node=2 examples/char_gpt.py --compressor ddp --steps 1000 --lr 1e-2 --fully-sparse  # sparse

``--fully-sparse`` turns on, all at once (each part has its own flag, defaults in brackets):

* model sparsity: RigL with ERK layer densities over the Linear weights of the transformer blocks
  (``--weight-density`` [0.1], a mask update every ``--rigl-every`` [250] steps until 75% of training;
  ``--sparse-embeddings`` sparsifies the embeddings and the output head too);
* activation sparsity: in every MLP only the ``--act-k`` [0.5] largest GELU outputs of each token survive
  (``TopKActivation`` after the GELU);
* error sparsity: meProp in the blocks' ``--meprop-layers`` [fc], back-propagating at most
  ``--error-k`` [0.1] of the output error columns; optionally ``SparseError`` on the residual stream between
  blocks (``--error-between``);
* sparsified, mask-aware gradient exchange: only the active weights' gradients are considered, of which
  ``--grad-compressor`` [top-k, with error feedback] sends ``--grad-density`` [0.05], selected across each DDP
  bucket (``--grad-granularity`` [bucket]); the dense gradient
  travels only on RigL's mask-update steps, which also run a dense backward (meProp and SparseError off).

It replaces the gradient exchange chosen by ``--compressor``/``--density``; ``--compressor ddp`` (the dense
baseline's) is accepted with it, so the two runs above differ by the one flag.

The text ships inside the package (``sparsedist/data/tinyshakespeare.txt``, 1.1 MB, the char-rnn corpus); the
first 90% of characters train, the last 10% validate. Rank 0 prints a progress bar, the validation loss every
``--eval-every`` steps, and a summary: bytes exchanged against what dense DDP would have sent and, for every
run, the sparsity of weights, MLP activations, back-propagated errors and exchanged gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
import sparsedist.nn as snn
import sparsedist.optim
from sparsedist.collectives.backend import ring_allreduce_bytes
from sparsedist.datasets import tinyshakespeare
from sparsedist.hook import COLLECTIVES
from sparsedist.integrations.tensorboard import StatsWriter
from sparsedist.sparsity import RigL


def load_text(path: Path | None) -> str:
    if path is not None:
        return path.read_text(encoding="utf-8")
    return tinyshakespeare()


class CharData:
    """Character-level encoding and contiguous train/validation splits (90% / 10%)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut], data[cut:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block: int, generator: torch.Generator):
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - block - 1, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + block + 1] for i in ix])
        return x, y


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP (Linear -> GELU -> Linear)."""

    def __init__(self, width: int, heads: int, block: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(4 * width, width)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(self.act(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, width: int = 128, layers: int = 4, heads: int = 4, block: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads, block) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.between_blocks: nn.Module = nn.Identity()  # e.g. sparsedist.nn.SparseError for error sparsity

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = self.between_blocks(blk(x))
        return self.head(self.ln(x))


# -- fully sparse training ------------------------------------------------------------------------------------
BLOCK_LINEARS = ("qkv", "proj", "fc", "fc_out")


def make_ephemerally_sparse(model: CharGPT, act_k: float, error_k: float, error_between: float,
                            meprop_layers: tuple[str, ...] = BLOCK_LINEARS) -> dict:
    """Activation and error sparsity, in place (before DDP wrapping). Returns what was changed.

    * every MLP's GELU becomes ``Sequential(GELU, TopKActivation(act_k))``: the ``ceil(act_k * 4 * width)``
      largest GELU outputs of each token survive;
    * the blocks' ``nn.Linear`` layers named in ``meprop_layers`` (of qkv, proj, fc, fc_out) become meProp
      ``SparseBackpropLinear`` layers
      keeping ``k = max(1, floor(error_k * out_features))`` output columns of the error, so at most
      ``error_k`` of them;
    * ``error_between > 0``: a ``SparseError`` on the residual stream after every block keeps
      ``ceil(error_between * width)`` error entries per token.
    """
    swapped = snn.sparsify_activations(model, k=act_k, compose=True, filter=lambda n, m: n.startswith("blocks."))
    meprop: list[str] = []
    unknown = set(meprop_layers) - set(BLOCK_LINEARS)
    if unknown:
        raise ValueError(f"meprop_layers must name layers of a block, {BLOCK_LINEARS}; got unknown {sorted(unknown)}")

    def chosen(name: str, m: nn.Module) -> bool:
        return name.startswith("blocks.") and name.rsplit(".", 1)[-1] in meprop_layers

    widths = {m.out_features for n, m in model.named_modules() if type(m) is nn.Linear and chosen(n, m)}
    for out in sorted(widths):  # one integer k per output width: floor, never above error_k
        meprop += snn.convert_linear_to_sparse_backprop(
            model, max(1, int(error_k * out)), filter=lambda n, m, out=out: chosen(n, m) and m.out_features == out)
    if error_between > 0:
        model.between_blocks = snn.SparseError(error_between)
    return {"activations": swapped, "meprop": sorted(meprop)}


def mlp_activation_meter(model: nn.Module) -> snn.ActivationSparsityMeter:
    """Measures the zeros of every MLP's hidden activation: the TopKActivation if sparsified, else the GELU."""
    sparse = any(isinstance(m, snn.TopKActivation) for m in model.modules())
    return snn.ActivationSparsityMeter(model, types=(snn.TopKActivation,) if sparse else (nn.GELU,),
                                       filter=lambda n, m: n.startswith("blocks."))


@torch.no_grad()
def sparsity_report(model: CharGPT, rigl: RigL | None, meter: snn.ActivationSparsityMeter, state, steps: int,
                    world: int, dense_steps: int, value_bytes: int = 4) -> dict:
    """Every sparsity level of the run, measured on this rank (docs/fully_sparse.md defines each figure).

    ``weights``: RigL's masks (per layer and overall), the non-zeros found outside them, and the zeros actually
    present in all weight matrices (every Linear and Embedding weight) and in all parameters. ``activations``:
    the measured fraction of zeros of each MLP's hidden units over every forward pass of the run.
    ``errors``: the fraction of output error columns each meProp layer back-propagates, and of error entries
    kept between blocks (1.0 = dense). ``gradients``: the hook's telemetry (bytes against a dense ring
    allreduce of the same gradients, fraction of gradient elements sent) with the density of ordinary steps,
    RigL's dense-gradient steps left out. Without a sparsedist hook the bytes are those of a ring allreduce of
    every gradient with ``value_bytes`` per value (4: plain DDP; 2: ``fp16_compress_hook``).
    """
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    matrices = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    weights: dict = {
        "parameters": total,
        "zero_fraction_all_parameters": sum(int((p == 0).sum()) for p in params.values()) / total,
        "matrix_weights": sum(w.numel() for w in matrices),
        "zero_fraction_matrix_weights": sum(int((w == 0).sum()) for w in matrices) / sum(w.numel() for w in matrices),
        "sparsified_weights": 0, "sparsity": 0.0,
    }
    if rigl is not None:
        layers, active, numel, outside = {}, 0, 0, 0
        for name, mask in rigl.masks.items():
            name = name.removeprefix("module.")
            layers[name] = round(1.0 - int(mask.sum()) / mask.numel(), 4)
            active, numel = active + int(mask.sum()), numel + mask.numel()
            outside += int((params[name][~mask] != 0).sum())
        weights.update(sparsified_weights=numel, active_weights=active, sparsity=1.0 - active / numel,
                       layers=layers, nonzero_outside_masks=outside, mask_updates=dense_steps)
    errors = {n: round(m.error_density, 4) for n, m in model.named_modules() if isinstance(m, snn.SparseBackpropLinear)}
    between = model.between_blocks
    width = model.ln.normalized_shape[0]
    report = {
        "weights": weights,
        "activations": {name: round(s, 4) for name, s in meter.sparsity().items()},
        "errors": {"meprop_layers": errors, "meprop_max": max(errors.values()) if errors else 1.0,
                   "between_blocks": snn.functional.resolve_k(between.k, width) / width if isinstance(between, snn.SparseError)
                   else 1.0},
    }
    if state is not None:
        s = state.stats()
        g = {k: s[k] for k in ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio", "density",
                               "collectives")}
        if s.get("step_check"):  # collective="auto": the whole-step checks against dense steps
            g["step_check"] = s["step_check"]
        ordinary = s["steps"] - dense_steps  # RigL's update steps send every element (density 1)
        g["density_ordinary_steps"] = (s["density"] * s["steps"] - dense_steps) / ordinary if ordinary else 0.0
    else:  # plain DDP (or fp16_compress_hook): every step allreduces every gradient
        dense = ring_allreduce_bytes(total, 4, world) * steps
        sent = ring_allreduce_bytes(total, value_bytes, world) * steps
        g = {"bytes_sent": sent, "bytes_dense": dense, "compression_ratio": dense / sent if sent else 1.0,
             "density": 1.0, "density_ordinary_steps": 1.0}
    g["dense_steps"] = dense_steps if state is not None else steps
    report["gradients"] = g
    return report


def print_report(report: dict, label: str) -> None:
    w, a, e, g = report["weights"], report["activations"], report["errors"], report["gradients"]
    print(f"[{label}] sparsity summary (rank 0)")
    zeros = (f"{w['zero_fraction_matrix_weights']:.2%} of all {w['matrix_weights']:,} Linear/Embedding weights "
             f"and {w['zero_fraction_all_parameters']:.2%} of all {w['parameters']:,} parameters are zero")
    if w["sparsified_weights"]:
        print(f"  weights      RigL keeps {w['active_weights']:,} of {w['sparsified_weights']:,} sparsified weights: "
              f"{w['sparsity']:.2%} sparse, {w['mask_updates']} mask updates, {w['nonzero_outside_masks']} "
              f"non-zeros outside the masks; {zeros}")
        print("               per layer: " + ", ".join(f"{n.removesuffix('.weight')} {s:.1%}"
                                                     for n, s in w["layers"].items()))
    else:
        print(f"  weights      dense: {zeros}")
    print("  activations  zeros among MLP hidden units (measured): " + ", ".join(f"{n} {s:.1%}" for n, s in a.items()))
    between = f"{e['between_blocks']:.2%} of the residual-stream error entries kept between blocks"
    if e["meprop_layers"]:
        kinds: dict[str, float] = {}
        for n, d in e["meprop_layers"].items():
            kinds[n.rsplit(".", 1)[-1]] = max(d, kinds.get(n.rsplit(".", 1)[-1], 0.0))
        print(f"  errors       meProp back-propagates at most {e['meprop_max']:.2%} of the output error columns in "
              f"{len(e['meprop_layers'])} block layers (" + ", ".join(f"{k} {d:.2%}" for k, d in kinds.items())
              + f"), other layers 100%; {between}")
    else:
        print(f"  errors       every layer back-propagates 100% of its error (no meProp); {between}")
    print(f"  gradients    {g['density']:.3%} of gradient elements sent (mean over all steps; "
          f"{g['density_ordinary_steps']:.3%} on ordinary steps, 100% on {g['dense_steps']} dense steps); "
          f"sent {g['bytes_sent'] / 1e6:.2f} MB where dense DDP sends {g['bytes_dense'] / 1e6:.2f} MB "
          f"({g['compression_ratio']:.1f}x less)")


# -- the run ------------------------------------------------------------------------------------------------
def reached(flag: bool, device: torch.device) -> bool:
    """True when any rank reports ``flag``: one small allreduce, so every rank stops at the same step."""
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def estimate_val_loss(model, data: CharData, batches: int, batch_size: int, block: int, device) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        x, y = data.batch("val", batch_size, block, g)
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default=None,
                   choices=["ddp", "fp16", "none", "topk", "threshold", "randk", "variance", "dgc"],
                   help="gradient exchange without --fully-sparse (default: topk); 'ddp' is plain DDP, 'fp16' "
                        "PyTorch's fp16_compress_hook")
    p.add_argument("--collective", choices=COLLECTIVES,
                   help="how sparse payloads are summed (default: allgather; 'auto' measures and picks per bucket)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.001)
    p.add_argument("--warmup-steps", type=int, default=50, help="DGC density warm-up")
    p.add_argument("--clip-norm", type=float, default=1.0,
                   help="DGC's local gradient clipping (Lin et al. 2018 clip before accumulating; 0: off); with "
                        "--sparse-adamw its max_grad_norm")
    p.add_argument("--dgc-lr-factor", type=float, default=30.0,
                   help="DGC trains with momentum SGD (momentum inside DGC): its learning rate is --lr times this")
    p.add_argument("--granularity", choices=["layer", "bucket"],
                   help="selection per parameter (layer, the default) or per DDP bucket")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sparse-adamw", action="store_true",
                   help="sparsedist.optim.AdamW: the hook sends each rank's AdamW update (docs/adam_exchange.md)")
    p.add_argument("--error-reset", action="store_true",
                   help="with --sparse-adamw: gradients at each rank's local model; the mean local model is "
                        "consolidated before every evaluation (sparsedist.optim.error_reset)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: linear warm-up over the first 5%% of the steps, then cosine decay to 10%% of --lr")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--target-val-loss", type=float,
                   help="stop after the first evaluation whose validation loss is at or below this (time-to-loss runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, help="train on this text file instead of the bundled tinyshakespeare")
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tensorboard", metavar="DIR", help="write stats() and the losses as TensorBoard scalars (rank 0)")
    fs = p.add_argument_group("fully sparse training (docs/fully_sparse.md)")
    fs.add_argument("--fully-sparse", action="store_true",
                    help="RigL weights + top-k MLP activations + meProp errors + mask-aware sparsified exchange")
    fs.add_argument("--weight-density", type=float, default=0.1,
                    help="fraction of Linear/Embedding weights kept by RigL (ERK layer densities)")
    fs.add_argument("--sparse-embeddings", action="store_true",
                    help="let RigL sparsify the token/position embeddings and the output head too (default: only "
                         "the Linear weights of the transformer blocks; embeddings and head stay dense)")
    fs.add_argument("--rigl-every", type=int, default=250,
                    help="steps between RigL mask updates (until 75%% of training); each sends the dense gradient")
    fs.add_argument("--rigl-drop", type=float, default=0.3, help="RigL's initial drop fraction (cosine-decayed)")
    fs.add_argument("--act-k", type=float, default=0.5,
                    help="fraction of each MLP's hidden units kept per token (top-k of the GELU outputs)")
    fs.add_argument("--error-k", type=float, default=0.1,
                    help="at most this fraction of output error columns back-propagated in block Linears (meProp)")
    fs.add_argument("--meprop-layers", default="fc",
                    help="comma-separated block Linears that get meProp (of qkv, proj, fc, fc_out)")
    fs.add_argument("--error-between", type=float, default=0.0,
                    help="fraction of the residual-stream error kept per token between blocks (0: off)")
    fs.add_argument("--grad-compressor", default="topk", choices=["topk", "dgc", "none"],
                    help="selection applied to the active weights' gradients")
    fs.add_argument("--grad-density", type=float, default=0.05,
                    help="fraction of the active weights' gradient entries sent per step")
    fs.add_argument("--grad-granularity", default="bucket", choices=["layer", "bucket"],
                    help="top-k per parameter tensor, or across each DDP bucket (the budget goes where gradients are "
                         "largest)")
    fs.add_argument("--grad-value-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype gradient values travel in (error feedback keeps the rounding error)")
    return p


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at (1-based) ``step`` of ``steps``."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, steps // 20)
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_exchange(args: argparse.Namespace) -> tuple[str, dict]:
    """The hook's compressor name (or 'ddp' for no hook) and its options, from the command line."""
    if args.collective and (args.compressor in ("ddp", "fp16") or (args.fully_sparse and args.grad_compressor == "none")):
        raise ValueError("--collective applies to sparsedist's hooks; this run has no sparse exchange")
    if args.error_reset and not args.sparse_adamw:
        raise ValueError("--error-reset is an option of --sparse-adamw")
    if args.sparse_adamw and (args.fully_sparse or args.compressor in ("ddp", "fp16", "dgc", "variance")):
        raise ValueError("--sparse-adamw runs with the topk, randk or threshold hook, without --fully-sparse")
    if args.fully_sparse:
        if args.compressor not in (None, "ddp"):
            raise ValueError(f"--fully-sparse sets the gradient exchange itself (mask-aware, on the active weights): "
                             f"choose it with --grad-compressor/--grad-density instead of --compressor "
                             f"{args.compressor}")
        name, density = args.grad_compressor, args.grad_density
        opts: dict = {"value_dtype": args.grad_value_dtype, "granularity": args.grad_granularity}
    else:
        name, density = args.compressor or "topk", args.density
        opts = {"granularity": args.granularity} if args.granularity else {}
    if name in ("topk", "randk", "dgc"):
        opts["density"] = density
    if name == "threshold":
        opts["threshold"] = args.threshold
    if name == "dgc":
        opts.update(momentum=0.9, warmup_steps=args.warmup_steps)
        if args.clip_norm:
            opts["clip_norm"] = args.clip_norm
    if args.collective:
        opts["collective"] = args.collective
    return name, opts


def train(args: argparse.Namespace) -> tuple[dict, CharGPT, RigL | None]:
    """Train in the current process group; returns (summary, the inner model, the RigL object or None)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    exchange, opts = resolve_exchange(args)
    torch.manual_seed(args.seed)  # same initial weights for every rank and every variant
    data = CharData(load_text(args.text))
    model = CharGPT(data.vocab_size, args.width, args.layers, args.heads, args.block).to(device)
    changed = make_ephemerally_sparse(model, args.act_k, args.error_k, args.error_between,
                                      tuple(x for x in args.meprop_layers.split(",") if x)) if args.fully_sparse else {}
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if exchange == "dgc":  # DGC applies momentum itself: plain SGD underneath
        optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr * args.dgc_lr_factor)
    elif args.sparse_adamw:  # it clips the local gradients itself (max_grad_norm)
        optimizer = sparsedist.optim.AdamW(model.named_parameters(), lr=args.lr, weight_decay=0.0,
                                           max_grad_norm=args.clip_norm or None, error_reset=args.error_reset)
        opts["optimizer"] = optimizer
    else:
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0)
    rigl = None
    if args.fully_sparse:
        include = None if args.sparse_embeddings else \
            (lambda n, p: n.startswith("module.blocks.") and n.endswith(".weight") and p.dim() == 2)
        rigl = RigL(ddp, optimizer, density=args.weight_density, distribution="erk", update_every=args.rigl_every,
                    drop_fraction=args.rigl_drop, stop_at=0.75, total_steps=args.steps, include=include,
                    seed=args.seed)
    state = None
    if exchange == "fp16":  # PyTorch's own baseline: fp16 values, dense allreduce
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif exchange != "ddp":
        if exchange == "dgc":
            opts["optimizer"] = optimizer
        if rigl is not None:
            opts["masks"] = rigl
        state = sparsedist.register(ddp, exchange, **opts)
    tb = StatsWriter(args.tensorboard, state)
    label = ("fully-sparse " if args.fully_sparse else "") + exchange
    meter = mlp_activation_meter(model)

    bar = None
    if rank == 0 and not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, desc=f"char-gpt {label}", unit="step")
        except ImportError:
            pass
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    gen = torch.Generator().manual_seed(args.seed * 100 + rank)
    history, train_losses = [], []
    smooth = float("nan")
    dense_steps = 0
    eval_seconds = 0.0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = data.batch("train", args.batch_size, args.block, gen)
        for group, base in zip(optimizer.param_groups, base_lrs):  # before backward: sparse-adamw's wire reads it
            group["lr"] = base * lr_factor(step, args.steps, args.lr_schedule)
        # RigL's mask-update steps grow by the dense gradient: error sparsity off for that forward and backward
        dense_grad = rigl is not None and rigl.needs_dense_gradient()
        dense_steps += dense_grad
        with snn.dense_backward(model) if dense_grad else contextlib.nullcontext():
            logits = ddp(x.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if rigl is not None:
            rigl.step()
        train_losses.append(loss.item())
        tb.log(step, loss=train_losses[-1])
        smooth = train_losses[-1] if math.isnan(smooth) else 0.9 * smooth + 0.1 * train_losses[-1]
        if step % args.eval_every == 0 or step == args.steps:
            if args.error_reset:  # the mean of the ranks' local models becomes every rank's (one dense allreduce)
                optimizer.consolidate()
            t_eval = time.perf_counter()
            val = estimate_val_loss(model, data, args.eval_batches, args.batch_size, args.block, device)
            # train_seconds: wall-clock of training alone (evaluations excluded), for time-to-loss comparisons
            history.append({"step": step, "train_loss": round(smooth, 4), "val_loss": round(val, 4),
                            "seconds": round(t_eval - start, 2),
                            "train_seconds": round(t_eval - start - eval_seconds, 3)})
            eval_seconds += time.perf_counter() - t_eval
            tb.log(step, force=True, val_loss=val)
            if args.target_val_loss is not None and reached(val <= args.target_val_loss, device):
                break
            if rank == 0:
                msg = f"step {step}: train loss {smooth:.3f}, val loss {val:.3f}"
                if bar is not None:
                    bar.write(msg)
                elif not args.quiet:
                    print(msg, flush=True)
        if bar is not None:
            bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    meter.remove()
    tb.close()
    summary = {"label": label, "fully_sparse": args.fully_sparse, "compressor": exchange, "world_size": world,
               "steps": step, "val_loss": history[-1]["val_loss"],
               "seconds": round(time.perf_counter() - start, 2),
               "train_seconds": round(time.perf_counter() - start - eval_seconds, 2), "history": history,
               "train_losses": train_losses,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "sparse_modules": changed,
               "sparsity": sparsity_report(model, rigl, meter, state, step, world, dense_steps,
                                           value_bytes=2 if exchange == "fp16" else 4)}
    if state is not None:
        s = state.stats()
        summary.update({k: s[k] for k in ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio",
                                           "density")})
    return summary, model, rigl


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_exchange(args)  # reject conflicting flags before any work
    except ValueError as exc:
        parser.error(str(exc))
    sparsedist.dist.init()
    try:
        summary, _, _ = train(args)
        if torch.distributed.get_rank() == 0:
            world, label = summary["world_size"], summary["label"]
            if "bytes_sent" in summary:
                saved = summary["bytes_dense"] - summary["bytes_sent"]
                print(f"[{label}] val loss {summary['val_loss']:.3f} after {summary['steps']} steps on {world} ranks; "
                      f"this rank sent {summary['bytes_sent'] / 1e6:.2f} MB where dense DDP would send "
                      f"{summary['bytes_dense'] / 1e6:.2f} MB: {saved / 1e6:.2f} MB saved "
                      f"({summary['compression_ratio']:.1f}x less), density {summary['density']:.4f}")
            else:
                print(f"[{label}] val loss {summary['val_loss']:.3f} after {summary['steps']} steps on {world} ranks")
            print_report(summary["sparsity"], label)
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
    except BaseException:
        sparsedist.dist.shutdown(drain=False)  # the other ranks may be gone: no closing collective
        raise
    sparsedist.dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
