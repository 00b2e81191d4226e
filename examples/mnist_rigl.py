#!/usr/bin/env python
"""Dense vs static sparsity vs SET vs RigL on MNIST, data-parallel (DDP), optionally with mask-aware exchange.

Run with torchrun (gloo on CPU, NCCL when CUDA is available), or as a plain single process::

    torchrun --nproc_per_node=2 examples/mnist_rigl.py --model mlp --method rigl --sparsity 0.9 --optimizer sgd
    torchrun --nproc_per_node=2 examples/mnist_rigl.py --model cnn --method static --sparsity 0.95 --optimizer adam
    torchrun --nproc_per_node=2 examples/mnist_rigl.py --method rigl --mask-aware   # sparse gradient exchange
    python examples/mnist_rigl.py --method set --steps 500

Models: ``mlp`` is LeNet-300-100 (784-300-100-10, 266,200 weights); ``cnn`` is conv5x5(16)-pool-conv5x5(32)-pool-
fc(1568, 128)-fc(128, 10) (215,184 weights). Only the weights of Conv/Linear layers are sparsified (ERK
layer densities by default); biases stay dense. Each rank gets a disjoint slice of every global batch
(``--batch-size`` per rank). The last line printed by rank 0 is ``RESULT {json}`` with the test accuracy.

Data: MNIST from ``--data PATH`` (an ``.npz`` with x_train/y_train/x_test/y_test, uint8 pixels, or torchvision's
MNIST/raw IDX folder), else ``$SPARSEDIST_MNIST``, else ``./data/mnist.npz`` (sparsedist/datasets.py says how to get it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import sparsedist.dist  # noqa: E402
import sparsedist.sparsity as sparsity  # noqa: E402
from common import Progress, add_data_argument, evaluate, mnist_or_exit  # noqa: E402
from sparsedist.integrations.tensorboard import StatsWriter  # noqa: E402

DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--method", choices=["dense", "static", "set", "rigl"], default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of Conv/Linear weights that are zero")
    p.add_argument("--distribution", choices=["erk", "uniform"], default="erk")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd: SGD with momentum 0.9; adam: Adam")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, cosine-decayed to 0 (default: 0.1 sgd, 3e-3 adam)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3000, help="training steps (the same for every method)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per rank per step")
    p.add_argument("--update-every", type=int, default=100, help="RigL/SET: steps between mask updates")
    p.add_argument("--drop-fraction", type=float, default=0.3, help="RigL/SET: initial drop fraction alpha")
    p.add_argument("--stop-at", type=float, default=0.75, help="RigL/SET: fraction of training with updates")
    p.add_argument("--seed", type=int, default=0)
    add_data_argument(p)
    p.add_argument("--mask-aware", action="store_true",
                   help="exchange only the active weights' gradients (sparsedist.register(ddp, 'none', masks=...))")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="write stats() and the loss as TensorBoard scalars (rank 0)")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.mask_aware and args.method == "dense":
        p.error("--mask-aware needs a sparse method (static, set or rigl)")
    return args


def build_model(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = mnist_or_exit(args.data, "mnist_rigl.py")
    rank, world, local_rank = sparsedist.dist.init(timeout=300, standalone=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mean, std = 0.1307, 0.3081
    x_train, y_train = ((data.x_train - mean) / std).to(device), data.y_train.to(device)
    x_test, y_test = ((data.x_test - mean) / std).to(device), data.y_test.to(device)

    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(ddp.parameters(), lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps)))

    density = 1.0 - args.sparsity
    common = dict(density=density, distribution=args.distribution, seed=args.seed)
    dynamic = dict(update_every=args.update_every, drop_fraction=args.drop_fraction, stop_at=args.stop_at,
                   total_steps=args.steps)
    sparse = {
        "dense": lambda: None,
        "static": lambda: sparsity.StaticSparsity(ddp, opt, **common),
        "set": lambda: sparsity.SET(ddp, opt, **common, **dynamic),
        "rigl": lambda: sparsity.RigL(ddp, opt, **common, **dynamic),
    }[args.method]()

    state = None
    if args.mask_aware:
        state = sparsedist.register(ddp, "none", masks=sparse)

    tb = StatsWriter(args.tensorboard, state)
    n_train = x_train.shape[0]
    global_batch = args.batch_size * world
    per_epoch = n_train // global_batch
    progress = Progress(args.steps, f"{args.model}/{args.method}/{args.optimizer}", rank == 0 and not args.no_progress)
    perm = None
    t0 = time.time()
    loss_ema = None
    for step in range(args.steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:  # the same permutation on every rank; each takes its own slice
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        idx = perm[pos * global_batch + rank * args.batch_size: pos * global_batch + (rank + 1) * args.batch_size]
        idx = idx.to(device)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        if sparse is not None:
            sparse.step()
        sched.step()
        tb.log(step + 1, loss=loss)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        progress.update(loss)
    progress.close()
    train_time = time.time() - t0
    tb.close()

    test_acc = evaluate(model, x_test, y_test, device) / 100
    result = {
        "model": args.model, "method": args.method, "optimizer": args.optimizer, "sparsity": args.sparsity,
        "distribution": args.distribution, "seed": args.seed, "steps": args.steps, "world_size": world,
        "batch_per_rank": args.batch_size, "lr": lr, "test_acc": test_acc, "train_loss_ema": loss_ema,
        "train_seconds": round(train_time, 2), "mask_aware": args.mask_aware,
    }
    if sparse is not None:
        params = dict(ddp.named_parameters())
        total = sum(m.numel() for m in sparse.masks.values())
        nonzero = sum(int((params[n] != 0).sum()) for n in sparse.masks)
        result["weight_density"] = sum(int(m.sum()) for m in sparse.masks.values()) / total
        result["nonzero_weight_fraction"] = nonzero / total
        result["mask_updates"] = sparse.mask_version
    if state is not None and hasattr(state, "stats"):
        stats = state.stats()
        result["comm"] = {k: stats[k] for k in ("steps", "bytes_sent", "bytes_dense", "compression_ratio",
                                                  "collectives") if k in stats}
        if stats.get("bytes_dense"):
            result["comm"]["bytes_fraction_of_dense"] = stats["bytes_sent"] / stats["bytes_dense"]
    if rank == 0:
        print(f"test accuracy {100 * test_acc:.2f}%  ({args.model}, {args.method}, {args.optimizer}, "
              f"sparsity {args.sparsity}, seed {args.seed}, {args.steps} steps, {world} ranks, {train_time:.1f} s)")
        if "comm" in result:
            c = result["comm"]
            print(f"gradient exchange: {c.get('bytes_sent')} bytes sent vs {c.get('bytes_dense')} dense "
                  f"({100 * c.get('bytes_fraction_of_dense', float('nan')):.1f}% of dense) over {c.get('steps')} "
                  f"steps; collectives {c.get('collectives')}")
        print("RESULT " + json.dumps(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    sparsedist.dist.shutdown()
    return result


if __name__ == "__main__":
    main()
