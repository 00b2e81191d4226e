"""A small character-level GPT on tinyshakespeare, trained with DDP and a sparsifying communication hook.

The default demo (about a minute on two CPU cores)::

    torchrun --nproc_per_node=2 examples/char_gpt.py

Longer or different runs::

    torchrun --nproc_per_node=2 examples/char_gpt.py --steps 2000 --compressor dgc --density 0.001
    torchrun --nproc_per_node=2 examples/char_gpt.py --compressor ddp     # plain DDP, the baseline

The text ships inside the package (``sparsedist/data/tinyshakespeare.txt``, 1.1 MB, the char-rnn corpus); the
first 90% of characters train, the last 10% validate. Rank 0 prints a progress bar, the validation loss every
``--eval-every`` steps, and a summary of the bytes exchanged against what dense DDP would have sent.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist


def load_text(path: Path | None) -> str:
    if path is not None:
        return path.read_text(encoding="utf-8")
    return resources.files("sparsedist").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")


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
    p.add_argument("--compressor", default="topk",
                   choices=["ddp", "none", "topk", "threshold", "randk", "variance", "dgc"])
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.001)
    p.add_argument("--warmup-steps", type=int, default=50, help="DGC density warm-up")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, help="train on this text file instead of the bundled tinyshakespeare")
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    rank, world, local_rank = sparsedist.dist.init()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)
    data = CharData(load_text(args.text))
    model = CharGPT(data.vocab_size, args.width, args.layers, args.heads, args.block).to(device)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compressor == "dgc":  # DGC applies momentum itself: plain SGD underneath
        optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr * 100)
    else:
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0)
    state = None
    if args.compressor != "ddp":
        opts: dict = {}
        if args.compressor in ("topk", "randk", "dgc"):
            opts["density"] = args.density
        if args.compressor == "threshold":
            opts["threshold"] = args.threshold
        if args.compressor == "dgc":
            opts.update(momentum=0.9, warmup_steps=args.warmup_steps, optimizer=optimizer)
        state = sparsedist.register(ddp, args.compressor, **opts)

    bar = None
    if rank == 0 and not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, desc=f"char-gpt {args.compressor}", unit="step")
        except ImportError:
            pass
    gen = torch.Generator().manual_seed(args.seed * 100 + rank)
    history = []
    smooth = float("nan")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = data.batch("train", args.batch_size, args.block, gen)
        logits = ddp(x.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smooth = loss.item() if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            val = estimate_val_loss(model, data, args.eval_batches, args.batch_size, args.block, device)
            history.append({"step": step, "train_loss": round(smooth, 4), "val_loss": round(val, 4),
                            "seconds": round(time.perf_counter() - start, 2)})
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
    summary = {"compressor": args.compressor, "world_size": world, "steps": args.steps,
               "val_loss": history[-1]["val_loss"], "seconds": round(time.perf_counter() - start, 2),
               "history": history}
    if state is not None:
        s = state.stats()
        summary.update({k: s[k] for k in ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio",
                                           "density")})
    if rank == 0:
        if state is not None:
            saved = summary["bytes_dense"] - summary["bytes_sent"]
            print(f"[{args.compressor}] val loss {summary['val_loss']:.3f} after {args.steps} steps on {world} ranks; "
                  f"this rank sent {summary['bytes_sent'] / 1e6:.2f} MB where dense DDP would send "
                  f"{summary['bytes_dense'] / 1e6:.2f} MB: {saved / 1e6:.2f} MB saved "
                  f"({summary['compression_ratio']:.1f}x less), density {summary['density']:.4f}")
        else:
            print(f"[ddp] val loss {summary['val_loss']:.3f} after {args.steps} steps on {world} ranks")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
