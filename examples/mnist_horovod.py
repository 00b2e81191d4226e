"""MNIST under horovodrun with sparsedist's sparsifying Horovod optimizer.

    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor topk --density 0.01
    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor dgc --density 0.001
    horovodrun -np 2 -H localhost:2 --gloo python examples/mnist_horovod.py --compressor hvd   # plain Horovod
    NP=2 launch/horovodrun.sh examples/mnist_horovod.py --compressor topk                     # the same

The model, data, flags and evaluation are examples/mnist.py's (from examples/common.py). Horovod needs
``bash scripts/build_horovod.sh``. Rank 0 prints a progress bar, then one JSON line with the test accuracy and
the optimizer's ``stats()`` (bytes sent, compression ratio); ``--json FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import math
import time

import horovod.torch as hvd
import torch

import sparsedist.horovod
from sparsedist.integrations.tensorboard import StatsWriter
from common import (CNN, MLP, Progress, add_compressor_arguments, add_training_arguments, compressor_options,
                    epoch_order, evaluate, mnist_or_exit, report, train_step)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk",
                   choices=["hvd", "none", "topk", "threshold", "randk", "variance", "dgc"],
                   help="'hvd' = plain hvd.DistributedOptimizer (dense allreduce), for comparison")
    add_compressor_arguments(p)
    add_training_arguments(p)
    args = p.parse_args(argv)

    x_train, y_train, x_test, y_test = mnist_or_exit(args.data, "mnist_horovod.py")
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // max(1, hvd.local_size())))
    torch.manual_seed(args.seed)
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
    bar = Progress(total_steps, f"mnist horovod {args.compressor}", rank == 0 and not args.quiet)
    step = 0
    start = time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        order = epoch_order(x_train.shape[0], args.seed, epoch, rank, per_rank)
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss = train_step(model, optimizer, scheduler, x_train, y_train, idx, device)
            step += 1
            tb.log(step, loss=loss)
            bar.update(loss, None if stats is None or bar.bar is None else stats())
    elapsed = time.perf_counter() - start
    tb.close()
    bar.close()
    acc = evaluate(model, x_test, y_test, device)
    summary = {"launcher": "horovodrun", "compressor": args.compressor, "world_size": world, "steps": step,
               "test_accuracy": acc, "seconds": round(elapsed, 2), "seed": args.seed}
    return report(summary, None if stats is None else stats(), rank, args.json)


if __name__ == "__main__":
    main()
