"""MNIST with DistributedDataParallel and a sparsifying communication hook.

    torchrun --nproc_per_node=2 examples/mnist.py --compressor topk --density 0.01
    torchrun --nproc_per_node=2 examples/mnist.py --compressor dgc --density 0.001 --warmup-epochs 1
    torchrun --nproc_per_node=2 examples/mnist.py --compressor ddp          # plain DDP, no hook
    torchrun --nproc_per_node=2 examples/mnist.py --compressor fp16         # PyTorch's fp16_compress_hook
    torchrun --nproc_per_node=2 examples/mnist.py --compressor topk --collective auto --eval-every 100

Works under any launcher sparsedist.dist.init() recognises (torchrun, srun, mpirun). Data: ../shared/data/mnist.npz
beside the project by default (``--data`` to point elsewhere). Rank 0 prints a progress bar, the test accuracy and
the compression ratio from ``state.stats()``; ``--json FILE`` writes the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
from sparsedist.hook import COLLECTIVES
from sparsedist.integrations.tensorboard import StatsWriter

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist.npz"


def load_mnist(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (60000, 1, 28, 28) float32 in [0, 1], y_train int64, x_test, y_test)."""
    if not path.exists():
        raise SystemExit(f"MNIST not found at {path}; pass --data /path/to/mnist.npz")
    with np.load(path) as d:
        def x(a):
            return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
        return x(d["x_train"]), torch.from_numpy(d["y_train"].astype(np.int64)), x(d["x_test"]), \
            torch.from_numpy(d["y_test"].astype(np.int64))


class MLP(nn.Module):
    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
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


def compressor_options(args: argparse.Namespace, steps_per_epoch: int, optimizer) -> dict:
    c = args.compressor
    opts: dict = {"error_feedback": not args.no_error_feedback}
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
        opts.update(momentum=args.momentum, warmup_steps=args.warmup_epochs * steps_per_epoch,
                    optimizer=optimizer)
        if args.clip_norm:
            opts["clip_norm"] = args.clip_norm
    if c == "none":
        opts = {}
    if getattr(args, "collective", None):  # examples/mnist_horovod.py shares this function without the flag
        opts["collective"] = args.collective
    return opts


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], 1000):
        correct += int((model(x[i:i + 1000].to(device)).argmax(1) == y[i:i + 1000].to(device)).sum())
    model.train()
    return 100.0 * correct / x.shape[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk",
                   choices=["ddp", "fp16", "none", "topk", "threshold", "randk", "variance", "dgc"],
                   help="'ddp' = plain DDP without a hook; 'fp16' = PyTorch's fp16_compress_hook")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.005)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--zeta", type=float, default=0.999)
    p.add_argument("--sampled", action="store_true", help="top-k with a sampled threshold")
    p.add_argument("--wangni", action="store_true", help="rand-k: Wangni et al.'s unbiased variant")
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--value-dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--granularity", choices=["layer", "bucket"])
    p.add_argument("--warmup-epochs", type=int, default=1, help="DGC density warm-up")
    p.add_argument("--clip-norm", type=float, default=0.0, help="DGC local gradient clipping (0: off)")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule over the whole run (same for every compressor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--comm", choices=["torch", "mpi"], default="torch",
                   help="sparse collectives over torch.distributed or over mpi4py (MPIBackend; under mpirun)")
    p.add_argument("--collective", choices=COLLECTIVES, help="how sparse payloads are summed (default: allgather; "
                   "'auto' measures and picks per bucket)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also measure test accuracy every this many steps, recorded with the training seconds "
                        "so far (evaluation time excluded) in the summary's 'history'")
    p.add_argument("--target-accuracy", type=float,
                   help="with --eval-every: stop after the first evaluation at or above this test accuracy (%%)")
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="write stats() and the loss as TensorBoard scalars (rank 0)")
    args = p.parse_args(argv)
    if args.target_accuracy is not None and not args.eval_every:
        p.error("--target-accuracy needs --eval-every N (how often to measure the accuracy)")
    if args.collective and args.compressor in ("ddp", "fp16"):
        p.error(f"--collective applies to sparsedist's hooks; --compressor {args.compressor} has no sparse exchange")

    rank, world, local_rank = sparsedist.dist.init()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // max(1, world)))
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_mnist(args.data)
    model = (MLP() if args.model == "mlp" else CNN()).to(device)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    momentum = 0.0 if args.compressor == "dgc" else args.momentum
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=momentum)

    per_rank = x_train.shape[0] // world
    steps_per_epoch = per_rank // args.batch_size
    total_steps = steps_per_epoch * args.epochs if args.steps <= 0 else args.steps
    state = None
    if args.compressor == "fp16":  # PyTorch's own baseline: fp16 values, dense allreduce
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif args.compressor != "ddp":
        opts = compressor_options(args, steps_per_epoch, optimizer)
        if args.comm == "mpi":
            from sparsedist.integrations.mpi import MPIBackend

            opts["backend"] = MPIBackend()
        state = sparsedist.register(ddp, args.compressor, **opts)

    tb = StatsWriter(args.tensorboard, state)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    bar = None
    if rank == 0 and not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, desc=f"mnist {args.compressor}", unit="step")
        except ImportError:
            bar = None
    warm_steps = args.warmup_epochs * steps_per_epoch if args.compressor == "dgc" else 0
    after_warmup = None
    step = 0
    start = time.perf_counter()
    eval_seconds = 0.0
    history = []
    loss_value = float("nan")
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(x_train.shape[0], generator=g)[rank * per_rank:(rank + 1) * per_rank]
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            if state is not None and step == warm_steps:
                s = state.stats()
                after_warmup = (s["bytes_sent"], s["bytes_dense"])
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            tb.log(step, loss=loss)
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                t_eval = time.perf_counter()
                acc_now = evaluate(model, x_test, y_test, device)
                history.append({"step": step, "test_accuracy": acc_now,
                                "train_seconds": round(t_eval - start - eval_seconds, 3)})
                eval_seconds += time.perf_counter() - t_eval
                if args.target_accuracy is not None:
                    # any rank's view decides, with one small allreduce, so that every rank stops at the same step
                    flag = torch.tensor([float(acc_now >= args.target_accuracy)], device=device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    if flag.item():
                        total_steps = step
            if bar is not None:
                loss_value = 0.9 * loss_value + 0.1 * loss.item() if math.isfinite(loss_value) else loss.item()
                postfix = {"loss": f"{loss_value:.3f}"}
                if state is not None:
                    postfix["ratio"] = f"{state.stats()['compression_ratio']:.0f}x"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    elapsed = time.perf_counter() - start - eval_seconds
    if bar is not None:
        bar.close()
    acc = evaluate(model, x_test, y_test, device)
    summary = {"compressor": args.compressor, "world_size": world, "steps": step, "test_accuracy": acc,
               "seconds": round(elapsed, 2), "seed": args.seed, "history": history}
    if state is not None:
        s = state.stats()
        summary.update({k: s[k] for k in ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio",
                                           "density", "residual_norm", "collectives")})
        if s.get("step_check"):  # collective="auto": the whole-step checks against dense steps
            summary["step_check"] = s["step_check"]
        if after_warmup is not None and s["bytes_sent"] > after_warmup[0]:
            summary["ratio_after_warmup"] = (s["bytes_dense"] - after_warmup[1]) / (s["bytes_sent"] - after_warmup[0])
    if rank == 0:
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    tb.close()
    sparsedist.dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
