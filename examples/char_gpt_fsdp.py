"""The character-level GPT of examples/char_gpt.py, sharded with FSDP2 (``fully_shard``), dense or sparse.

Dense FSDP2 (AdamW), and the same run with sparse weights, sparse optimizer state and a sparse gradient
exchange -- one flag apart::

    torchrun --nproc_per_node=2 examples/char_gpt_fsdp.py                # dense FSDP2
    torchrun --nproc_per_node=2 examples/char_gpt_fsdp.py --sparse       # RigL + packed AdamW + sparse RS

``--sparse`` turns on, together (each part has its own flag, defaults in brackets):

* RigL with sharded masks (:class:`sparsedist.fsdp.ShardedRigL`) over the Linear weights of the transformer
  blocks, ERK layer densities, ``--weight-density`` [0.1], a mask update every ``--rigl-every`` [100] steps until
  75 % of training (the exchange sends the dense gradient on those steps);
* optimizer state on the active weights only (:class:`sparsedist.optim.PackedAdamW`; ``--optimizer sgd``:
  ``PackedSGD`` with momentum), masked gradients packed as soon as they are ready;
* the sparse reduce-scatter (:func:`sparsedist.fsdp.register_fsdp`): top-k of ``--grad-density`` [0.01] of each
  parameter's (active) gradient with error feedback, each entry sent to the rank that owns its shard;
  ``--residual-dtype bfloat16`` halves the residuals' memory.

``--exchange topk`` gives the sparse reduce-scatter alone (dense weights, torch's AdamW). ``--optimizer adamx``
(dense weights, the top-k reduce-scatter) is the exchange-aware :class:`sparsedist.optim.AdamW`: each rank sends
its own Adam update through the sparse reduce-scatter, with full-size per-rank moments
(:mod:`sparsedist.fsdp.optimizer`). Every step's learning rate is set before its backward pass, where that
optimizer computes the update it sends. Rank 0 prints a
progress bar, the validation loss every ``--eval-every`` steps, and a summary: this rank's memory by kind
(weights, gradients, optimizer state, residuals, masks: :func:`sparsedist.fsdp.training_memory`) and the bytes
its reduce-scatters sent against FSDP2's dense reduce-scatter (FSDP's parameter all-gathers are dense in every
run and counted apart).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from char_gpt import CharData, CharGPT, estimate_val_loss, load_text, lr_factor
from torch.distributed.fsdp import fully_shard

import sparsedist.dist
from sparsedist.fsdp import ShardedRigL, ShardLayout, register_fsdp, training_memory
from sparsedist.fsdp.exchange import reduce_scatter_bytes
from sparsedist.optim import AdamW, PackedAdamW, PackedSGD

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - optional
    tqdm = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparse", action="store_true", help="RigL weights + packed optimizer state + sparse exchange")
    p.add_argument("--exchange", choices=["dense", "topk", "dgc"], help="the gradient exchange (default: topk with "
                   "--sparse, else dense: FSDP2's own reduce-scatter); dgc: Lin et al.'s momentum correction, with "
                   "--optimizer sgd (the momentum moves into the exchange)")
    p.add_argument("--grad-density", type=float, default=0.01, help="fraction of each gradient sent (top-k)")
    p.add_argument("--residual-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--weight-density", type=float, default=0.1, help="fraction of block Linear weights kept")
    p.add_argument("--rigl-every", type=int, default=100, help="steps between RigL mask updates")
    p.add_argument("--optimizer", choices=["adamw", "sgd", "adamx"], default="adamw",
                   help="adamx: the exchange-aware sparsedist.optim.AdamW (dense weights, a sparse exchange)")
    for flag, default in (("--steps", 300), ("--batch-size", 16), ("--block", 64), ("--width", 128),
                          ("--layers", 4), ("--heads", 4)):  # the model and its data, as in examples/char_gpt.py
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, help="train on this text file instead of the bundled tinyshakespeare")
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true")
    return p


def block_weight(name: str, p: torch.Tensor) -> bool:
    """RigL sparsifies the transformer blocks' Linear weights; embeddings, head, norms and biases stay dense."""
    return name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        lr = args.lr * 30  # momentum SGD needs a larger step than Adam
        momentum = 0.0 if args.exchange == "dgc" else 0.9  # DGC applies the momentum itself
        if args.sparse:
            return PackedSGD(model.parameters(), lr=lr, momentum=momentum)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=False)
    if args.optimizer == "adamx":
        if args.sparse or args.exchange in ("dense", "dgc"):
            raise SystemExit("--optimizer adamx sends each rank's Adam update through the top-k reduce-scatter: use it "
                             "with dense weights (no --sparse) and --exchange topk (the default for it)")
        return AdamW(model.named_parameters(), lr=args.lr, weight_decay=0.0)
    if args.sparse:
        return PackedAdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, foreach=False)


def dense_reduce_scatter_bytes(model, world: int) -> int:
    """Bytes per rank of one step of FSDP2's dense reduce-scatters of ``model``'s gradients (fp32)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layouts = [ShardLayout.of(m, names, world) for m in model.modules() if hasattr(m, "set_custom_reduce_scatter")]
    return sum(reduce_scatter_bytes(lay.numel, 4, world) for lay in layouts)


def train(args) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    exchange = args.exchange or ("topk" if args.sparse or args.optimizer == "adamx" else "dense")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every variant
    data = CharData(load_text(args.text))
    model = CharGPT(data.vocab_size, args.width, args.layers, args.heads, args.block)
    n_params = sum(p.numel() for p in model.parameters())
    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)
    optimizer = make_optimizer(args, model)
    rigl = None
    if args.sparse:
        rigl = ShardedRigL(model, optimizer, density=args.weight_density, distribution="erk",
                           update_every=args.rigl_every, stop_at=0.75, total_steps=args.steps, include=block_weight,
                           seed=args.seed)
        optimizer.attach_masks(rigl)
    state = None
    if exchange != "dense":
        extra = {"momentum": 0.9, "optimizer": optimizer} if exchange == "dgc" else {}
        if args.optimizer == "adamx":
            extra = {"optimizer": optimizer}  # the exchange sends its update
        state = register_fsdp(model, exchange, density=args.grad_density, masks=rigl,
                              residual_dtype=args.residual_dtype, **extra)
    label = ("sparse " if args.sparse else "dense ") + f"FSDP2 {args.optimizer}, exchange {exchange}"
    bar = tqdm(total=args.steps, desc=label, unit="step") if tqdm is not None and rank == 0 and not args.quiet \
        else None
    gen = torch.Generator().manual_seed(args.seed * 100 + rank)
    base = [g["lr"] for g in optimizer.param_groups]
    history, smooth, memory = [], float("nan"), {}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = data.batch("train", args.batch_size, args.block, gen)
        optimizer.zero_grad(set_to_none=True)
        for g, lr in zip(optimizer.param_groups, base):  # before backward: adamx's update is computed there
            g["lr"] = lr * lr_factor(step, args.steps, args.lr_schedule)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if step == args.steps or step == 2:  # between backward and step: everything a step keeps is alive
            memory = training_memory(model, optimizer, state, rigl)
        optimizer.step()
        if rigl is not None:
            rigl.step()
        smooth = loss.item() if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            val = estimate_val_loss(model, data, args.eval_batches, args.batch_size, args.block, "cpu")
            history.append({"step": step, "train_loss": round(smooth, 4), "val_loss": round(val, 4),
                            "seconds": round(time.perf_counter() - start, 1)})
            if rank == 0 and not args.quiet:
                (bar.write if bar is not None else print)(f"step {step}: train loss {smooth:.3f}, val loss {val:.3f}")
        if bar is not None:
            bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    dense_rs = dense_reduce_scatter_bytes(model, world) * args.steps
    mine = torch.tensor([state.stats()["bytes_sent"] if state is not None else dense_rs], dtype=torch.float64)
    per_rank = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(per_rank, mine)
    sent = max(int(t) for t in per_rank)  # the busiest rank: owners are fixed, so ranks may send unequal amounts
    summary = {"label": label, "world_size": world, "parameters": n_params, "steps": args.steps,
               "val_loss": history[-1]["val_loss"], "seconds": round(time.perf_counter() - start, 1),
               "history": history, "memory_bytes": memory, "reduce_scatter_bytes_sent": sent,
               "reduce_scatter_bytes_sent_per_rank": [int(t) for t in per_rank],
               "dense_reduce_scatter_bytes": dense_rs, "reduce_scatter_ratio": dense_rs / sent if sent else math.inf,
               "all_gather_bytes": 2 * (world - 1) * n_params * 4 // world * args.steps,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if state is not None:
        s = state.stats()
        summary["exchange"] = {k: s[k] for k in ("steps", "bytes_sent", "bytes_received", "bytes_dense",
                                                  "compression_ratio", "density", "collectives", "residual_bytes")}
    if rigl is not None:
        summary["weight_sparsity"] = 1 - sum(rigl.layer_counts.values()) / sum(
            p.numel() for n, p in model.named_parameters() if n in rigl.layer_counts)
    return summary


def print_summary(s: dict) -> None:
    mb = 1e6
    m = s["memory_bytes"]
    print(f"[{s['label']}] val loss {s['val_loss']:.3f} after {s['steps']} steps on {s['world_size']} ranks "
          f"({s['parameters']:,} parameters, {s['seconds']:.0f} s)")
    print(f"  memory (rank 0, between backward and step): weights {m['weights'] / mb:.2f} MB, gradients "
          f"{m['gradients'] / mb:.2f} MB, optimizer state {m['optimizer'] / mb:.2f} MB (positions "
          f"{m['optimizer_index'] / mb:.2f}), residuals {m['residuals'] / mb:.2f} MB, masks {m['masks'] / mb:.2f} MB;"
          f" total {m['total'] / mb:.2f} MB")
    print(f"  reduce-scatter: the busiest rank sent {s['reduce_scatter_bytes_sent'] / mb:.2f} MB (per rank: "
          + ", ".join(f"{b / mb:.2f}" for b in s["reduce_scatter_bytes_sent_per_rank"])
          + f") where FSDP2's dense reduce-scatter "
          f"sends {s['dense_reduce_scatter_bytes'] / mb:.2f} MB ({s['reduce_scatter_ratio']:.1f}x less); FSDP2's "
          f"parameter all-gathers (dense in every run) {s['all_gather_bytes'] / mb:.2f} MB")
    if "weight_sparsity" in s:
        print(f"  weights: RigL keeps {1 - s['weight_sparsity']:.1%} of the block Linear weights")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    sparsedist.dist.init()
    try:
        torch.set_num_threads(1)
        summary = train(args)
        if torch.distributed.get_rank() == 0:
            print_summary(summary)
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
    except BaseException:
        sparsedist.dist.shutdown(drain=False)
        raise
    sparsedist.dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
