"""Training job for the kill-and-resume test (run by torchrun with --max-restarts).

Checkpoints every ``--every`` steps; with ``--kill-at S`` rank 1 SIGKILLs itself at step S on the first attempt
only (TORCHELASTIC_RESTART_COUNT == 0). On every (re)start the job resumes from the latest complete checkpoint.
Rank 0 writes the final parameters to ``--out``.
"""

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.dist
from sparsedist import checkpoint


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=-1)
    args = p.parse_args()

    rank, world, _ = sparsedist.dist.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 8))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = sparsedist.register(ddp, "topk", density=0.05, mode="sampled")
    start = 0
    latest = checkpoint.latest_checkpoint(args.ckpt)
    if latest is not None:
        start = checkpoint.load(latest, model=ddp, optimizer=opt, state=state)["step"]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for step in range(start, args.steps):
        if step == args.kill_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        # per-rank data from the global RNG, restored by the checkpoint
        x = torch.randn(32, 20)
        y = torch.randint(0, 8, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if (step + 1) % args.every == 0:
            checkpoint.save(args.ckpt / f"step-{step + 1:06d}", model=ddp, optimizer=opt, state=state,
                            extra={"step": step + 1})
    if rank == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "attempt": attempt,
                    "started_at": start}, args.out)
    sparsedist.dist.shutdown()


if __name__ == "__main__":
    main()
