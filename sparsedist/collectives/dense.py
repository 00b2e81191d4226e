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

    The future's callback does no communication (a nested wait would deadlock gloo).
    """
    if world_size == 1:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(tensor)
        return fut, 0
    # Scale by 1/P first, exactly as DDP's built-in reducer does, so the result is bit-identical to plain DDP
    # (PyTorch's own allreduce_hook divides instead and differs in the last bit at P = 3).
    tensor.mul_(1.0 / world_size)
    work = dist.all_reduce(tensor, group=group, async_op=True)
    fut = work.get_future().then(lambda f: f.value()[0])
    return fut, ring_allreduce_bytes(tensor.numel(), tensor.element_size(), world_size)


def values_allreduce(backend: Backend, values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` (``(k,)``, identical index set on every rank) over ranks, in place."""
    return backend.allreduce(values)
