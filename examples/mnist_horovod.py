"""MNIST under horovodrun with sparsedist's sparsifying Horovod optimizer.

    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor topk --density 0.01
    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor dgc --density 0.001
    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor hvd   # plain Horovod
    NP=2 launch/horovodrun.sh examples/mnist_horovod.py --compressor topk                     # the same

The model, data and evaluation are examples/mnist.py's (imported from it). Horovod needs
``bash scripts/build_horovod.sh``. Rank 0 prints a progress bar, then one JSON line with the test accuracy and
the optimizer's ``stats()`` (bytes sent, compression ratio); ``--json FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import sparsedist.horovod
from sparsedist.integrations.tensorboard import StatsWriter
from mnist import CNN, DEFAULT_DATA, MLP, compressor_options, evaluate, load_mnist


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk",
                   choices=["hvd", "none", "topk", "threshold", "randk", "variance", "dgc"],
                   help="'hvd' = plain hvd.DistributedOptimizer (dense allreduce), for comparison")
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
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, help="write the summary here (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="write stats() and the loss as TensorBoard scalars (rank 0)")
    args = p.parse_args(argv)

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // max(1, hvd.local_size())))
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_mnist(args.data)
    model = (MLP() if args.model == "mlp" else CNN()).to(device)

    # Every rank starts from rank 0's weights and optimizer state: Horovod's own helpers, called with the
    # plain torch optimizer (before wrapping it).
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    momentum = 0.0 if args.compressor == "dgc" else args.momentum  # DGC applies momentum itself
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum)
    hvd.broadcast_optimizer_state(base, root_rank=0)

    per_rank = x_train.shape[0] // world
    steps_per_epoch = per_rank // args.batch_size
    total_steps = steps_per_epoch * args.epochs if args.steps <= 0 else args.steps
    if args.compressor == "hvd":
        optimizer = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    else:
        opts = compressor_options(args, steps_per_epoch, base)
        opts.pop("optimizer", None)  # the wrapper passes its optimizer to DGC's momentum check itself
        named = model if args.compressor == "variance" else model.named_parameters()
        optimizer = sparsedist.horovod.DistributedOptimizer(base, named_parameters=named,
                                                            compressor=args.compressor, **opts)

    scheduler = None
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    stats = getattr(optimizer, "stats", None)
    tb = StatsWriter(args.tensorboard, optimizer if stats is not None else None, rank=rank)
    bar = None
    if rank == 0 and not args.quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, desc=f"mnist horovod {args.compressor}", unit="step")
        except ImportError:
            bar = None
    step = 0
    loss_value = float("nan")
    start = time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(x_train.shape[0], generator=g)[rank * per_rank:(rank + 1) * per_rank]
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            tb.log(step, loss=loss)
            if bar is not None:
                loss_value = 0.9 * loss_value + 0.1 * loss.item() if math.isfinite(loss_value) else loss.item()
                postfix = {"loss": f"{loss_value:.3f}"}
                if stats is not None:
                    postfix["ratio"] = f"{stats()['compression_ratio']:.0f}x"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    elapsed = time.perf_counter() - start
    tb.close()
    if bar is not None:
        bar.close()
    acc = evaluate(model, x_test, y_test, device)
    summary = {"launcher": "horovodrun", "compressor": args.compressor, "world_size": world, "steps": step,
               "test_accuracy": acc, "seconds": round(elapsed, 2), "seed": args.seed}
    if stats is not None:
        s = stats()
        summary.update({k: s[k] for k in ("bytes_sent", "bytes_received", "bytes_dense", "compression_ratio",
                                           "density", "residual_norm", "collectives")})
    if rank == 0:
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
