"""Dense paths: a plain (asynchronous) allreduce of the bucket, and the values-only allreduce used when every
rank holds the same indices (shared-seed rand-k, identical model-sparsity masks), which needs no indices."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import Backend, ring_allreduce_bytes

__all__ = ["allreduce_mean_future", "values_allreduce"]


def allreduce_mean_future(tensor: torch.Tensor, group: dist.ProcessGroup | None,
                          world_size: int) -> tuple[torch.futures.Future, int]:
    """Start an asynchronous allreduce of ``tensor`` and return ``(future of the mean, bytes sent)``.

    The future's callback only divides (no second collective), which is safe on gloo and NCCL alike.
    """
    if world_size == 1:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(tensor)
        return fut, 0
    work = dist.all_reduce(tensor, group=group, async_op=True)

    def _mean(f: torch.futures.Future) -> torch.Tensor:
        return f.value()[0].div_(world_size)

    return work.get_future().then(_mean), ring_allreduce_bytes(tensor.numel(), tensor.element_size(), world_size)


def values_allreduce(backend: Backend, values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` (``(k,)``, identical index set on every rank) over ranks, in place."""
    return backend.allreduce(values)
