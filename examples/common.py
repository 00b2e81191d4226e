"""What the examples share: MNIST models and data, the compressor flags, evaluation, the progress bar, the summary.

Imported by the example scripts next to it (``python examples/X.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsedist.datasets import MNIST, load_mnist

#: the keys of state.stats() the examples report
STATS_KEYS = ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio", "density", "residual_norm",
              "collectives", "overlapped", "buckets")


class MLP(nn.Module):
    """784 -> hidden -> hidden/2 -> 10, ReLU (535,818 parameters at hidden=512)."""

    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """conv5x5(16)-pool-conv5x5(32)-pool-fc(1568, 128)-fc(128, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mnist_or_exit(path: str | None, prog: str) -> MNIST:
    """:func:`sparsedist.datasets.load_mnist`, or exit with its message (where it looked, how to get MNIST)."""
    try:
        return load_mnist(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{prog}: {e}")


def add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST or ./data/mnist.npz)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Model, schedule, data and output flags of the MNIST data-parallel examples."""
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule over the whole run (same for every compressor)")
    p.add_argument("--seed", type=int, default=0)
    add_data_argument(p)
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="write stats() and the loss as TensorBoard scalars (rank 0)")


def add_compressor_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every MNIST example takes for sparsedist's compressors (see :func:`compressor_options`)."""
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.005)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--zeta", type=float, default=0.999)
    p.add_argument("--sampled", action="store_true", help="top-k with a sampled threshold")
    p.add_argument("--wangni", action="store_true", help="rand-k: Wangni et al.'s unbiased variant")
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--value-dtype", choices=["float32", "float16", "bfloat16"], help="dtype values travel in")
    p.add_argument("--granularity", choices=["layer", "bucket"])
    p.add_argument("--warmup-epochs", type=int, default=1, help="DGC density warm-up")
    p.add_argument("--clip-norm", type=float, default=0.0, help="DGC local gradient clipping (0: off)")


def compressor_options(args: argparse.Namespace, steps_per_epoch: int, optimizer) -> dict:
    """``sparsedist.register()`` keywords from the flags of :func:`add_compressor_arguments`."""
    c = args.compressor
    if c == "none":
        return {"collective": args.collective} if getattr(args, "collective", None) else {}
    opts: dict = {"error_feedback": False} if args.no_error_feedback else {}  # else the compressor's default
    if args.value_dtype:
        opts["value_dtype"] = args.value_dtype
    if args.granularity:
        opts["granularity"] = args.granularity
    if c in ("topk", "randk", "dgc"):
        opts["density"] = args.density
    if c == "topk" and args.sampled:
        opts["mode"] = "sampled"
    if c == "randk" and args.wangni:
        opts["variant"] = "wangni"
    if c == "threshold":
        opts["threshold"] = args.threshold
    if c == "variance":
        opts.update(alpha=args.alpha, zeta=args.zeta)
    if c == "dgc":
        opts.update(momentum=args.momentum, warmup_steps=args.warmup_epochs * steps_per_epoch, optimizer=optimizer)
        if args.clip_norm:
            opts["clip_norm"] = args.clip_norm
    if getattr(args, "collective", None):  # examples/mnist_horovod.py has no --collective
        opts["collective"] = args.collective
    return opts


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 1000) -> float:
    """Accuracy (%) of ``model`` on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch].to(device)).argmax(1) == y[i:i + batch].to(device)).sum())
    model.train()
    return 100.0 * correct / x.shape[0]


def epoch_order(n: int, seed: int, epoch: int, rank: int, per_rank: int) -> torch.Tensor:
    """This rank's slice of the epoch's permutation (the same permutation on every rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)[rank * per_rank:(rank + 1) * per_rank]


def train_step(model: nn.Module, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
               device: torch.device) -> torch.Tensor:
    """One optimizer step on the examples ``idx`` (cross-entropy); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss


class Progress:
    """A tqdm bar on rank 0 (when tqdm is installed and not ``quiet``), showing a smoothed loss and the ratio."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        self.loss = float("nan")
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="step")

    def update(self, loss: torch.Tensor, stats: dict | None = None) -> None:
        if self.bar is None:
            return
        value = loss.item()
        self.loss = 0.9 * self.loss + 0.1 * value if math.isfinite(self.loss) else value
        postfix = {"loss": f"{self.loss:.3f}"}
        if stats is not None:
            postfix["ratio"] = f"{stats['compression_ratio']:.0f}x"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report(summary: dict[str, Any], stats: dict | None, rank: int, json_path: Path | None) -> dict[str, Any]:
    """Add the telemetry to ``summary``; rank 0 prints it as one JSON line (and writes ``json_path``)."""
    if stats is not None:
        summary.update({k: stats[k] for k in STATS_KEYS if k in stats})
    if rank == 0:
        print(json.dumps(summary), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(summary, indent=2))
    return summary
