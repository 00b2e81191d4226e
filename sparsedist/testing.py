"""Run a function on several real processes joined by a gloo process group.

This is what sparsedist's own tests use for multi-process behaviour, and it is public so that users can
test their own hooks the same way::

    def check(rank, world_size, scale):
        t = torch.ones(3) * (rank + 1) * scale
        torch.distributed.all_reduce(t)
        return t

    results = sparsedist.testing.run_distributed(check, world_size=3, args=(2.0,))
    # results[r] is rank r's return value

Every wait is bounded: if any rank fails, the others are killed and the first failure is raised with its
rank and traceback; if the group does not finish within ``timeout`` seconds, every rank is killed and
:class:`TimeoutError` is raised. Nothing is left running.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError"]


class DistributedTestError(RuntimeError):
    """A rank raised an exception; the message holds its rank and traceback."""


def _worker(fn, rank, world_size, args, init_file, backend, collective_timeout, env, results):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        out = fn(rank, world_size, *args)
        # Plain pickle (bytes), not torch's shared-memory tensor transfer: the worker may exit before
        # the parent reads the queue.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 120.0,
    backend: str = "gloo",
    collective_timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    Args:
        fn: a module-level (picklable) function. It runs after ``torch.distributed`` is initialised.
        world_size: number of processes, >= 1.
        args: extra picklable arguments.
        timeout: seconds for the whole group, start-up included.
        backend: process-group backend ("gloo" here; "nccl" on GPU machines).
        collective_timeout: the process group's own timeout in seconds (default: ``timeout``).
        env: extra environment variables for the workers.

    Returns:
        A list with rank r's return value at index r (values must be picklable).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker_env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "OMP_NUM_THREADS": "1"}
    worker_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="sparsedist-pg-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, tuple(args), init_file, backend,
                      collective_timeout or timeout, worker_env, results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(
                        f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s "
                        f"(a hang in a collective, or a rank that died); all ranks were killed"
                    )
                try:
                    rank, status, value = results.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                    if dead and all(p.exitcode not in (0, None) for p in (procs[r] for r in dead)):
                        # A rank died without reporting (segfault, SIGKILL, os._exit); drain once more.
                        try:
                            rank, status, value = results.get(timeout=1.0)
                        except queue.Empty:
                            codes = {r: procs[r].exitcode for r in dead}
                            raise DistributedTestError(f"ranks died without a result: exit codes {codes}")
                    else:
                        continue
                if status == "error":
                    raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            results.close()
    return [out[r] for r in range(world_size)]
