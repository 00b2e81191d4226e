"""Does the sparse exchange hide behind the backward pass? Step times of top-k with and without overlap.

    sudo python launch/emulate_cluster.py -n 2 --rate 100mbit -- python benchmarks/overlap.py \
        --json docs/overlap_100mbit.json
    torchrun --nproc_per_node=2 benchmarks/overlap.py --json docs/overlap_loopback.json   # loopback
    torchrun --nproc_per_node=2 benchmarks/overlap.py --width 256 --depth 4 --steps 5     # loopback, small
    torchrun --nproc_per_node=1 benchmarks/overlap.py --device cuda    # one GPU: the exchange's local work alone

With ``--device cuda`` the model, batches and gradients live on the GPU and the group uses NCCL; at one rank
nothing crosses a wire, so ``exchange`` is the hook's local work on the device (selection, encoding, decoding,
the commit) and ``overlapped`` the step with it: how much a GPU step pays for that work.

A deep MLP, 784 -> W -> ... -> W -> 10 with ``--depth`` hidden layers (12 x 1450: 25.2M parameters; synthetic
inputs, the shapes are what matter), batch 32 per rank, SGD, DDP buckets of ``--bucket-mb`` (4 MB: about one
layer each). Overlap needs layers whose gradients arrive one after another: a bucket's exchange can hide only
behind the backward pass of the layers before it (the first layer's bucket comes last and cannot hide at all), so
the tail of the step is the last bucket's exchange. Measured in one run, per selection mode (``--modes``: exact
and sampled) and density (1 % and 0.1 % by default), the median over ``--steps`` steps of the slowest rank:

* ``compute``: a training step whose hook returns the local gradient at once (no exchange at all);
* ``exchange``: the hook's exchange of the same gradients alone, bucket after bucket, each waited for
  (accumulation, top-k selection, the collective, decoding, the commit) -- no backward pass to hide behind;
* ``overlapped``: the training step with ``sparsedist.register(ddp, "topk", density=d)``: one fixed-size allgather
  per bucket launched asynchronously, decoded in its future's callback while the backward pass goes on;
* ``synchronous``: the same hook forced to run each exchange inside the hook body (``timeout=600``), as every
  sparse exchange did before: the backward pass waits for each bucket's exchange.

Printed: the four times, ``overlapped / max(compute, exchange)`` (1.0: fully hidden) and ``synchronous /
(compute + exchange)`` (1.0: nothing hidden).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
from sparsedist.collectives.backend import completed_future
from sparsedist.hook import FlatBucket


class MLP(torch.nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        sizes = [784] + [width] * depth
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = torch.nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def _local_hook(state, bucket):
    return completed_future(bucket.buffer())


def _slowest(seconds: list[float], device: torch.device) -> float:
    """Median over steps of the slowest rank's time (one allreduce of the per-step times)."""
    t = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(ddp, opt, batches, warmup: int, device: torch.device) -> float:
    times = []
    for i, (x, y) in enumerate(batches):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _slowest(times, device)


def _exchange_alone(args, density: float, mode: str, batches, bucket_elements: int, device: torch.device) -> float:
    """The hook's exchange of real gradients, bucket after bucket, with nothing to overlap."""
    torch.manual_seed(0)
    model = MLP(args.width, args.depth).to(device)
    params = [p for p in model.parameters()][::-1]  # DDP's bucket order: the last layers' gradients first
    buckets, current = [], []
    for p in params:
        current.append(p)
        if sum(q.numel() for q in current) >= bucket_elements:
            buckets.append(current)
            current = []
    if current:
        buckets.append(current)
    state = sparsedist.SparsifyState(list(model.named_parameters()), "topk", density=density, mode=mode)
    times = []
    for i, (x, y) in enumerate(batches):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        flats = [torch.cat([p.grad.reshape(-1) for p in b]) for b in buckets]
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for j, (flat, b) in enumerate(zip(flats, buckets)):
            state.exchange(FlatBucket(flat, b, j, j == len(buckets) - 1)).wait()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return _slowest(times, device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1450, help="hidden width")
    ap.add_argument("--depth", type=int, default=12, help="hidden layers (12 x 1450: 25.2M parameters)")
    ap.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each configuration")
    ap.add_argument("--densities", default="0.01,0.001")
    ap.add_argument("--modes", default="exact,sampled", help="top-k selection: torch.topk, or DGC's sampled "
                    "threshold (a fraction of the local work)")
    ap.add_argument("--bucket-mb", type=float, default=4.0, help="DDP's bucket_cap_mb")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--json", type=Path, help="rank 0 writes the rows here")
    args = ap.parse_args(argv)
    rank, world, _ = sparsedist.dist.init("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, 784, generator=g).to(device),
                torch.randint(0, 10, (args.batch,), generator=g).to(device))
               for _ in range(args.warmup + args.steps)]
    numel = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    bucket_elements = int(args.bucket_mb * 2**20 / 4)

    def build(**register):
        torch.manual_seed(0)
        ddp = DDP(MLP(args.width, args.depth).to(device), bucket_cap_mb=args.bucket_mb,
                  device_ids=[device.index] if device.type == "cuda" else None)
        if register:
            sparsedist.register(ddp, "topk", **register)
        else:
            ddp.register_comm_hook(None, _local_hook)
        return ddp, torch.optim.SGD(ddp.parameters(), lr=0.01)

    compute = _steps(*build(), batches, args.warmup, device)
    rows = []
    for mode in args.modes.split(","):
        for d in (float(x) for x in args.densities.split(",")):
            exchange = _exchange_alone(args, d, mode, batches, bucket_elements, device)
            overlapped = _steps(*build(density=d, mode=mode), batches, args.warmup, device)
            synchronous = _steps(*build(density=d, mode=mode, timeout=600.0), batches, args.warmup, device)
            row = {"density": d, "mode": mode, "parameters": numel, "ranks": world, "device": str(device),
                   "compute_s": compute,
                   "exchange_s": exchange, "overlapped_s": overlapped, "synchronous_s": synchronous,
                   "overlapped_vs_max": overlapped / max(compute, exchange),
                   "synchronous_vs_sum": synchronous / (compute + exchange)}
            rows.append(row)
            if rank == 0:
                print(f"top-k {d:.3%} ({mode}): compute {compute:.3f} s, exchange {exchange:.3f} s, overlapped "
                      f"step {overlapped:.3f} s ({row['overlapped_vs_max']:.2f}x max), synchronous step "
                      f"{synchronous:.3f} s ({row['synchronous_vs_sum']:.2f}x sum)", flush=True)
    if rank == 0 and args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sparsedist.dist.shutdown()
    return rows


if __name__ == "__main__":
    main()
