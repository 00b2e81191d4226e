"""MNIST with DistributedDataParallel and a sparsifying communication hook.

    torchrun --nproc_per_node=2 examples/mnist.py --compressor topk --density 0.01
    torchrun --nproc_per_node=2 examples/mnist.py --compressor dgc --density 0.001 --warmup-epochs 1
    torchrun --nproc_per_node=2 examples/mnist.py --compressor ddp          # plain DDP, no hook
    torchrun --nproc_per_node=2 examples/mnist.py --compressor fp16         # PyTorch's fp16_compress_hook
    torchrun --nproc_per_node=2 examples/mnist.py --compressor topk --collective auto --eval-every 100

Works under any launcher sparsedist.dist.init() recognises (torchrun, srun, mpirun). Data: MNIST from ``--data PATH``
(an ``.npz`` with x_train/y_train/x_test/y_test, or torchvision's MNIST/raw IDX folder), else ``$SPARSEDIST_MNIST``,
else ``./data/mnist.npz``; see ``sparsedist/datasets.py`` for how to get it. Rank 0 prints a progress bar, the test
accuracy and the compression ratio from ``state.stats()``; ``--json FILE`` writes the summary.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
from common import (CNN, MLP, Progress, add_compressor_arguments, add_training_arguments, compressor_options,
                    epoch_order, evaluate, mnist_or_exit, report, train_step)
from sparsedist.hook import COLLECTIVES
from sparsedist.integrations.mpi import MPIBackend
from sparsedist.integrations.tensorboard import StatsWriter


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk",
                   choices=["ddp", "fp16", "none", "topk", "threshold", "randk", "variance", "dgc"],
                   help="'ddp' = plain DDP without a hook; 'fp16' = PyTorch's fp16_compress_hook")
    add_compressor_arguments(p)
    add_training_arguments(p)
    p.add_argument("--comm", choices=["torch", "mpi"], default="torch",
                   help="sparse collectives over torch.distributed or over mpi4py (MPIBackend; under mpirun)")
    p.add_argument("--collective", choices=COLLECTIVES, help="how sparse payloads are summed (default: allgather; "
                   "'auto' measures and picks per bucket)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also measure test accuracy every this many steps, recorded with the training seconds "
                        "so far (evaluation time excluded) in the summary's 'history'")
    p.add_argument("--target-accuracy", type=float,
                   help="with --eval-every: stop after the first evaluation at or above this test accuracy (%%)")
    args = p.parse_args(argv)
    if args.target_accuracy is not None and not args.eval_every:
        p.error("--target-accuracy needs --eval-every N (how often to measure the accuracy)")
    if args.collective and args.compressor in ("ddp", "fp16"):
        p.error(f"--collective applies to sparsedist's hooks; --compressor {args.compressor} has no sparse exchange")

    x_train, y_train, x_test, y_test = mnist_or_exit(args.data, "mnist.py")
    rank, world, local_rank = sparsedist.dist.init()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // max(1, world)))
    torch.manual_seed(args.seed)
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
            opts["backend"] = MPIBackend()
        state = sparsedist.register(ddp, args.compressor, **opts)

    tb = StatsWriter(args.tensorboard, state)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    bar = Progress(total_steps, f"mnist {args.compressor}", rank == 0 and not args.quiet)
    warm_steps = args.warmup_epochs * steps_per_epoch if args.compressor == "dgc" else 0
    after_warmup = None
    step = 0
    start = time.perf_counter()
    eval_seconds = 0.0
    history = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        order = epoch_order(x_train.shape[0], args.seed, epoch, rank, per_rank)
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            if state is not None and step == warm_steps:
                s = state.stats()
                after_warmup = (s["bytes_sent"], s["bytes_dense"])
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss = train_step(ddp, optimizer, scheduler, x_train, y_train, idx, device)
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
            bar.update(loss, None if state is None or bar.bar is None else state.stats())
    elapsed = time.perf_counter() - start - eval_seconds
    bar.close()
    acc = evaluate(model, x_test, y_test, device)
    summary = {"compressor": args.compressor, "world_size": world, "steps": step, "test_accuracy": acc,
               "seconds": round(elapsed, 2), "seed": args.seed, "history": history}
    s = None if state is None else state.stats()
    if s is not None:
        if s.get("step_check"):  # collective="auto": the whole-step checks against dense steps
            summary["step_check"] = s["step_check"]
        if after_warmup is not None and s["bytes_sent"] > after_warmup[0]:
            summary["ratio_after_warmup"] = (s["bytes_dense"] - after_warmup[1]) / (s["bytes_sent"] - after_warmup[0])
    report(summary, s, rank, args.json)
    tb.close()
    sparsedist.dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
