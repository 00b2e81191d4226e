"""Time dense allreduces of a known size and count their bytes: a probe for launchers and emulated links.

    python launch/emulate_cluster.py -n 4 --rate 100mbit -- python launch/allreduce_probe.py --numel 1000000
    torchrun --nproc_per_node=2 launch/allreduce_probe.py

Every rank initialises with :func:`sparsedist.dist.init`, runs ``--repeats`` allreduces of ``--numel`` float32
values through :class:`sparsedist.collectives.backend.TorchBackend` (whose counters give the ring-allreduce
bytes ``2(P-1)/P * n * 4`` per rank each way), checks the sums, and prints one line
``RESULT {json}`` with its rank, the seconds the allreduces took (after one warm-up), the achieved bus
bandwidth, and the backend's byte counters for the timed allreduces. ``--numel 0`` measures only the start-up traffic (rendezvous,
connection set-up), which is what interface counters show beyond the collectives' payload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsedist.dist  # noqa: E402
from sparsedist.collectives.backend import TorchBackend  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1_000_000, help="float32 elements per allreduce (default 1e6)")
    p.add_argument("--repeats", type=int, default=1, help="timed allreduces (default 1)")
    p.add_argument("--warmup", type=int, default=0, help="untimed, uncounted allreduces before (default 0)")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    rank, world, _ = sparsedist.dist.init(timeout=args.timeout)
    backend = TorchBackend(timeout=args.timeout)
    t = torch.empty(args.numel, dtype=torch.float32)
    for _ in range(args.warmup):
        t.fill_(1.0)
        backend.allreduce(t)
    backend.barrier()
    backend.reset_counters()  # count only the timed allreduces
    start = time.perf_counter()
    for i in range(args.repeats):
        t.fill_(float(rank + 1 + i))
        backend.allreduce(t)
        expected = world * (world + 1) / 2 + world * i
        if args.numel and not bool((t == expected).all()):
            raise SystemExit(f"rank {rank}: allreduce gave {t[:4].tolist()}, expected {expected}")
    seconds = time.perf_counter() - start
    backend.barrier()
    payload = args.numel * 4
    os.write(1, ("RESULT " + json.dumps({
        "rank": rank, "world_size": world, "numel": args.numel, "repeats": args.repeats, "warmup": args.warmup,
        "seconds": round(seconds, 4),
        "busbw_gbit_s": round(2 * (world - 1) / world * payload * args.repeats * 8 / seconds / 1e9, 4)
        if seconds > 0 and payload else 0.0,
        "bytes_sent": backend.bytes_sent, "bytes_received": backend.bytes_received,
    }) + "\n").encode())  # one write: lines of several ranks never interleave
    sparsedist.dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
