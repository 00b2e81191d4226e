#!/usr/bin/env python
"""Pruning on MNIST: gradual magnitude pruning, prune-retrain, one-shot, structured pruning, export.

One process, or data-parallel under torchrun (gloo on CPU, NCCL with CUDA)::

    python examples/mnist_prune.py --data data/mnist.npz --model mlp --method dense --oneshot 0.9 0.95
    python examples/mnist_prune.py --model cnn --method gmp --sparsity 0.9 --budget global
    python examples/mnist_prune.py --model mlp --method prune-retrain --sparsity 0.9 --rounds 3 --weights keep
    python examples/mnist_prune.py --model cnn --method structured --flops 0.5 --export out/cnn_half.pt
    torchrun --nproc_per_node=2 examples/mnist_prune.py --method gmp --mask-aware   # sparse gradient exchange

Methods (every one trains ``--steps`` steps in all, SGD with momentum 0.9 and a cosine learning rate):

* ``dense``: the baseline. ``--oneshot S ...`` then prunes copies of the trained model to each sparsity S
  without retraining (global magnitude, uniform magnitude, and random) and reports their accuracies.
* ``gmp``: Zhu & Gupta's gradual pruning from ``--begin`` to ``--end`` (fractions of the steps), every
  ``--frequency`` steps, ``--budget`` uniform/erk/global, ``--score`` magnitude/taylor/random.
* ``prune-retrain``: Han et al.: ``--rounds`` prunings, the first after ``steps / (rounds + 1)`` dense steps,
  each followed by as many retraining steps; ``--weights`` keep/rewind/reinit; the learning rate replays
  the cosine (learning-rate rewinding). The accuracy right after each pruning (before retraining) is reported.
* ``structured``: Li et al.: train dense for half the steps, remove the lowest-L1 neurons/filters so that
  ``--flops`` of the forward FLOPs remain (or ``--fraction`` of them per layer), retrain the smaller model.

Models: ``mlp`` LeNet-300-100 (784-300-100-10); ``cnn`` conv5x5(16)-BN-ReLU-pool-conv5x5(32)-BN-ReLU-pool-
fc(1568,128)-fc(128,10). ``--width S`` scales every hidden width (a small dense model with as many weights as
a pruned large one). Only Linear/Conv weights are pruned. Data: ``--data`` (default ``$SPARSEDIST_MNIST`` or
``./data/mnist.npz``). The last line printed is ``RESULT {json}``; ``--json FILE`` appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
import sparsedist.sparsity as sp
from sparsedist.datasets import load_mnist

METHODS = ("dense", "gmp", "prune-retrain", "structured")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--method", choices=METHODS, default="gmp")
    p.add_argument("--width", type=float, default=1.0, help="scale of every hidden width (1: the full model)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final fraction of Linear/Conv weights pruned")
    p.add_argument("--budget", choices=["global", "uniform", "erk"], default="global")
    p.add_argument("--score", choices=["magnitude", "taylor", "random"], default="magnitude")
    p.add_argument("--begin", type=float, default=0.1, help="gmp: first pruning step, fraction of --steps")
    p.add_argument("--end", type=float, default=0.6, help="gmp: last pruning step, fraction of --steps")
    p.add_argument("--frequency", type=int, default=50, help="gmp: steps between pruning steps")
    p.add_argument("--rounds", type=int, default=1, help="prune-retrain: number of prunings (1: one-shot)")
    p.add_argument("--weights", choices=sp.prune_retrain.WEIGHT_RESETS, default="keep",
                   help="prune-retrain: surviving weights keep their values, rewind, or are re-initialised")
    p.add_argument("--rewind-at", type=float, default=0.0, help="prune-retrain --weights rewind: the step rewound "
                   "to, as a fraction of the dense training phase")
    p.add_argument("--no-dead", action="store_true", help="prune-retrain: keep dead neurons")
    p.add_argument("--flops", type=float, default=0.5, help="structured: fraction of forward FLOPs kept")
    p.add_argument("--fraction", type=float, default=None, help="structured: fraction of neurons removed per "
                   "layer (instead of --flops)")
    p.add_argument("--ranking", choices=["layer", "global"], default="layer", help="structured: L1 ranking")
    p.add_argument("--round-to", type=int, default=1, help="structured: keep a multiple of this many neurons/filters "
                   "per layer (8 suits CPU and GPU kernels)")
    p.add_argument("--oneshot", type=float, nargs="*", default=[], help="dense: evaluate one-shot pruning at "
                   "these sparsities (no retraining)")
    p.add_argument("--steps", type=int, default=None, help="training steps in all (default: mlp 3000, cnn 1500)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step over all ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST, ./data)")
    p.add_argument("--mask-aware", action="store_true",
                   help="exchange only active weights' gradients: sparsedist.register(ddp, 'none', masks=...)")
    p.add_argument("--export", default=None, help="write the pruned model as TorchScript (CSR for unstructured)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    args.steps = args.steps or (3000 if args.model == "mlp" else 1500)
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1)")
    if args.mask_aware and args.method not in ("gmp", "prune-retrain"):
        p.error("--mask-aware needs a masked method (gmp or prune-retrain)")
    return args


def build_model(kind: str, width: float = 1.0) -> nn.Module:
    def w(n):
        return max(1, round(n * width))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, w(300)), nn.ReLU(), nn.Linear(w(300), w(100)), nn.ReLU(),
                             nn.Linear(w(100), 10))
    return nn.Sequential(
        nn.Conv2d(1, w(16), 5, padding=2), nn.BatchNorm2d(w(16)), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w(16), w(32), 5, padding=2), nn.BatchNorm2d(w(32)), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(w(32) * 49, w(128)), nn.ReLU(), nn.Linear(w(128), 10))


def cosine(steps: int):
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return 100.0 * correct / len(x)


def weight_stats(model: nn.Module) -> dict:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in ws)
    nonzero = sum(int((w != 0).sum()) for w in ws)
    return {"weights": total, "nonzero_weights": nonzero, "sparsity": 1.0 - nonzero / total}


class Trainer:
    """Data-parallel SGD on MNIST: every rank takes its slice of each global batch (same order everywhere)."""

    def __init__(self, args, data, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.x, self.y = data.x_train.sub(0.1307).div(0.3081), data.y_train
        self.x_test, self.y_test = data.x_test.sub(0.1307).div(0.3081), data.y_test
        self.per_rank = args.batch_size // world
        self.per_epoch = len(self.x) // args.batch_size
        self.step_no, self.perm = 0, None

    def wrap(self, model: nn.Module):
        """(module to train, optimizer) for ``model``; DDP when there are several ranks or --mask-aware."""
        net = DDP(model) if self.world > 1 or self.args.mask_aware else model
        opt = torch.optim.SGD(net.parameters(), lr=self.args.lr, momentum=0.9, weight_decay=self.args.weight_decay)
        return net, opt

    def batch(self):
        epoch, pos = divmod(self.step_no, self.per_epoch)
        if pos == 0 or self.perm is None:
            gen = torch.Generator().manual_seed(self.args.seed * 100003 + epoch)
            self.perm = torch.randperm(len(self.x), generator=gen)
        start = pos * self.args.batch_size + self.rank * self.per_rank
        idx = self.perm[start:start + self.per_rank]
        return self.x[idx], self.y[idx]

    def train(self, net, opt, steps: int, sparse=None, lr=None):
        """``steps`` SGD steps; ``lr(t)`` sets the factor of the initial learning rate (unless ``sparse`` does)."""
        for t in range(steps):
            if lr is not None:
                for g in opt.param_groups:
                    g["lr"] = self.args.lr * lr(t)
            x, y = self.batch()
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            if sparse is not None:
                sparse.step()
            self.step_no += 1

    def test(self, model) -> float:
        return accuracy(model.module if isinstance(model, DDP) else model, self.x_test, self.y_test)


def oneshot_table(model: nn.Module, trainer: Trainer, sparsities) -> dict:
    """Accuracy of copies of the trained model pruned once (no retraining), per sparsity and rule."""
    out = {}
    for s in sparsities:
        row = {}
        for label, budget, score in (("global", "global", "magnitude"), ("uniform", "uniform", "magnitude"),
                                     ("erk", "erk", "magnitude"), ("random", "uniform", "random")):
            pruned = copy.deepcopy(model)
            sp.prune_model(pruned, 1.0 - s, budget=budget, score=score, seed=trainer.args.seed)
            row[label] = trainer.test(pruned)
        out[str(s)] = row
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    under_launcher = "WORLD_SIZE" in os.environ
    if under_launcher or args.mask_aware:
        sparsedist.dist.init(standalone=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
    data = load_mnist(args.data)
    trainer = Trainer(args, data, rank, world)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.width)
    example = data.x_test[:1]
    result = {"model": args.model, "method": args.method, "width": args.width, "seed": args.seed,
              "steps": args.steps, "world_size": world, "batch_size": args.batch_size, "lr": args.lr,
              "flops": sp.count_flops(model, example)}
    started = time.time()
    net, opt = trainer.wrap(model)
    sparse, state, T = None, None, args.steps
    if args.method == "dense":
        trainer.train(net, opt, T, lr=cosine(T))
        if args.oneshot:
            result["oneshot"] = oneshot_table(model, trainer, args.oneshot)
    elif args.method == "gmp":
        sparse = sp.GradualMagnitudePruning(net, opt, args.sparsity, begin_step=int(args.begin * T),
                                            end_step=int(args.end * T), frequency=args.frequency,
                                            budget=args.budget, score=args.score, seed=args.seed)
    elif args.method == "prune-retrain":
        phase = T // (args.rounds + 1)
        first = T - args.rounds * phase
        sparse = sp.PruneRetrain(net, opt, args.sparsity, train_steps=first, retrain_steps=phase,
                                 rounds=args.rounds, budget=args.budget, score=args.score, weights=args.weights,
                                 rewind_step=int(args.rewind_at * first), lr_schedule=cosine(phase), seed=args.seed,
                                 remove_dead=not args.no_dead)
    if sparse is not None:
        if args.mask_aware:
            state = sparsedist.register(net, "none", masks=sparse)
        if args.method == "gmp":
            trainer.train(net, opt, T, sparse, lr=cosine(T))
        else:  # evaluate right after each pruning, before retraining
            result["after_pruning"] = []
            for r, at in enumerate(sparse.prune_steps()):
                trainer.train(net, opt, at - trainer.step_no, sparse)
                if r == 0:
                    result["dense_before_pruning"] = trainer.test(net)
                trainer.train(net, opt, 1, sparse)  # the pruning step (no weight update)
                result["after_pruning"].append(trainer.test(net))
            trainer.train(net, opt, T - trainer.step_no, sparse)
            result["dead_neurons"] = sparse.dead_neurons
        result["mask_density"] = sparse.active_fraction
    if args.method == "structured":
        half = T // 2
        trainer.train(net, opt, half, lr=cosine(half))
        result["dense_before_pruning"] = trainer.test(net)
        model.eval()
        fraction = args.fraction if args.fraction is not None else \
            sp.fraction_for_flops(model, example, args.flops, ranking=args.ranking, round_to=args.round_to)
        model, kept = sp.structured_prune(model, fraction, ranking=args.ranking, round_to=args.round_to)
        result.update(fraction=fraction, kept={k: int(v.numel()) for k, v in kept.items()},
                      pruned_flops=sp.count_flops(model, example), after_pruning=[trainer.test(model)])
        model.train()
        net, opt = trainer.wrap(model)
        trainer.train(net, opt, T - half, lr=cosine(T - half))
    result["train_seconds"] = round(time.time() - started, 1)
    result["test_accuracy"] = trainer.test(net)
    result.update(weight_stats(model))
    if state is not None:
        stats = state.stats()
        result["comm"] = {"bytes_sent": stats["bytes_sent"], "bytes_dense": stats["bytes_dense"],
                          "collectives": stats["collectives"]}
    if args.export and rank == 0:
        final = model.module if isinstance(model, DDP) else model
        exported = sp.to_sparse_csr(final, min_sparsity=0.5) if sparse is not None else sp.export_dense(final)
        sp.save_inference(exported, args.export)
        result["export"] = {"path": args.export, "bytes": os.path.getsize(args.export)}
    if rank == 0:
        print(f"test accuracy {result['test_accuracy']:.2f}% ({args.model}, {args.method}, weight sparsity "
              f"{result['sparsity']:.3f}, {result['train_seconds']} s, {world} rank(s))")
        print("RESULT " + json.dumps(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    if dist.is_initialized():
        sparsedist.dist.shutdown()
    return result


if __name__ == "__main__":
    run(parse_args())
