"""A short DDP training run on MNIST, to check that a launcher works end to end.

Started under any launcher that :func:`sparsedist.dist.init` understands (torchrun, srun, mpirun, the emulated
cluster)::

    torchrun --nproc_per_node=2 launch/mnist_smoke.py --steps 30
    srun -n 2 python launch/mnist_smoke.py --steps 30
    mpirun -np 2 python launch/mnist_smoke.py --steps 30 --comm mpi

Each rank trains a small MLP (784-64-10) on its own shard of MNIST with DistributedDataParallel and a
communication hook: torch's ``allreduce_hook`` (``--comm torch``) or an allreduce through
:class:`sparsedist.integrations.mpi.MPIBackend` (``--comm mpi``, under mpirun). Rank 0 then prints one line
``RESULT {json}`` with the launcher's view of the world, the first training loss and the mean of the last five,
the test accuracy on 2,000 test images, whether the parameters are identical on every rank (they must be after
DDP), and the bytes the hook sent. The exit status is non-zero if any check fails.

MNIST comes from ``--data PATH``, else ``$SPARSEDIST_MNIST``, else ``./data/mnist.npz`` (sparsedist/datasets.py says
how to get it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsedist.dist  # noqa: E402
from sparsedist.datasets import read_mnist_arrays  # noqa: E402



def backend_allreduce_hook(backend, bucket):
    """DDP hook: average the bucket with ``backend.allreduce`` (synchronous), return a completed Future."""
    buf = bucket.buffer()
    backend.allreduce(buf)
    buf.div_(backend.size)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size (default 64)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--data", help="MNIST .npz or IDX folder (default: $SPARSEDIST_MNIST or ./data/mnist.npz)")
    p.add_argument("--comm", choices=("torch", "mpi"), default="torch",
                   help="gradient exchange: torch's allreduce_hook, or an allreduce over mpi4py (MPIBackend)")
    p.add_argument("--timeout", type=float, default=300, help="seconds for rendezvous and each collective")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rank, world, local_rank = sparsedist.dist.init(timeout=args.timeout)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    data = read_mnist_arrays(args.data)
    x = torch.from_numpy(data["x_train"][rank::world].reshape(-1, 784)).float().div_(255)
    y = torch.from_numpy(data["y_train"][rank::world]).long()
    xt = torch.from_numpy(data["x_test"][:2000].reshape(-1, 784)).float().div_(255).to(device)
    yt = torch.from_numpy(data["y_test"][:2000]).long().to(device)

    torch.manual_seed(0)  # the same initial model everywhere (DDP broadcasts rank 0's anyway)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    backend = None
    if args.comm == "mpi":
        from sparsedist.integrations.mpi import MPIBackend

        backend = MPIBackend(timeout=args.timeout)
        ddp.register_comm_hook(backend, backend_allreduce_hook)
    else:
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    gen = torch.Generator().manual_seed(1234 + rank)
    losses = []
    for _ in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen)
        loss = F.cross_entropy(ddp(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat)
    same = all(torch.equal(rows[0], r) for r in rows)
    last = sum(losses[-5:]) / min(5, len(losses))
    ok = same and last < losses[0]
    if rank == 0:
        info = sparsedist.dist.detect()
        os.write(1, ("RESULT " + json.dumps({
            "launcher": info.launcher if info else None, "world_size": world, "backend": dist.get_backend(),
            "steps": args.steps, "first_loss": round(losses[0], 4), "last_loss": round(last, 4),
            "test_accuracy": round(acc, 4), "params_identical": same, "comm": args.comm,
            "hook_bytes_sent": backend.bytes_sent if backend is not None else None, "seconds": round(time.perf_counter() - t0, 2),
        }) + "\n").encode())  # one write: lines of several ranks never interleave
    sparsedist.dist.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
