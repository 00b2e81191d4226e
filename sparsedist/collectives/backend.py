"""The few communication primitives that sparsedist's collectives are written against.

Algorithms in :mod:`sparsedist.collectives` call a :class:`Backend`, never ``torch.distributed`` directly, so
the same code runs over a torch process group (gloo here, NCCL on GPU clusters) or over mpi4py
(:mod:`sparsedist.integrations.mpi`). A backend also keeps the byte accounting: ``bytes_sent`` and
``bytes_received`` count the bytes this rank put on / took off the wire for each primitive, using the cost of
the algorithm the primitive is implemented with (ring allreduce: ``2(P-1)/P * n * b`` each way; allgather:
``(P-1)`` blocks each way; point-to-point: the message).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["Backend", "TorchBackend", "ring_allreduce_bytes", "completed_future", "check_timeout"]

# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single; keep working on torch 2.3+.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_timeout(timeout: Any, name: str = "timeout", *, allow_none: bool = True) -> float | None:
    """Seconds from a number or a ``timedelta``; raises ``ValueError`` naming ``name`` unless finite and > 0.

    The one check of every timeout in sparsedist (hook, backends, launch helpers). ``None`` passes through when
    ``allow_none`` (no bound: the process group's own timeout applies).
    """
    if timeout is None and allow_none:
        return None
    value = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number of seconds > 0 (or a timedelta){' or None' if allow_none else ''}"
                         f", got {timeout!r}")
    return float(value)


def ring_allreduce_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring allreduce of ``numel`` elements: ``2(P-1)/P * n * b``."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * numel * element_size))


class Backend:
    """Interface of a communication backend. All tensors are 1-D and contiguous.

    Subclasses implement the ``_``-prefixed primitives; the public methods add byte accounting.
    """

    rank: int
    size: int
    #: True if :meth:`allreduce_async` and :meth:`allgather_async` are available (the hook then overlaps)
    supports_async: bool = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- public, accounted -------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.size > 1:
            n = ring_allreduce_bytes(tensor.numel(), tensor.element_size(), self.size)
            self.bytes_sent += n
            self.bytes_received += n
            self._allreduce(tensor)
        return tensor

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather equal-size tensors from all ranks; returns shape ``(size, numel)``, row r from rank r."""
        if self.size == 1:
            return tensor.reshape(1, -1).clone()
        n = tensor.numel() * tensor.element_size() * (self.size - 1)
        self.bytes_sent += n
        self.bytes_received += n
        return self._allgather(tensor)

    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Start summing ``tensor`` over all ranks, in place; a future of ``tensor``. Needs ``supports_async``."""
        if self.size > 1:
            n = ring_allreduce_bytes(tensor.numel(), tensor.element_size(), self.size)
            self.bytes_sent += n
            self.bytes_received += n
            return self._allreduce_async(tensor)
        return completed_future(tensor)

    def allgather_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Start gathering equal-size tensors; a future of shape ``(size, numel)``. Needs ``supports_async``."""
        if self.size > 1:
            n = tensor.numel() * tensor.element_size() * (self.size - 1)
            self.bytes_sent += n
            self.bytes_received += n
            return self._allgather_async(tensor)
        return completed_future(tensor.reshape(1, -1).clone())

    def allgather_v(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose lengths differ per rank (zero included); returns one tensor per rank.

        Lengths are exchanged first (one small allgather), so every rank issues the same collectives whatever
        its count and an empty rank never hangs.
        """
        if self.size == 1:
            return [tensor.clone()]
        count = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
        counts = self.allgather(count).view(-1).tolist()
        width = max(counts)
        if width == 0:
            return [tensor.new_empty(0) for _ in counts]
        padded = tensor.new_zeros(width)
        padded[: tensor.numel()] = tensor
        rows = self.allgather(padded)
        return [rows[r, : counts[r]] for r in range(self.size)]

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> torch.Tensor:
        """Send ``send`` to ``dst`` while receiving into ``recv`` from ``src``; returns ``recv``."""
        self.bytes_sent += send.numel() * send.element_size()
        self.bytes_received += recv.numel() * recv.element_size()
        self._sendrecv(send, dst, recv, src)
        return recv

    def alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        """Send ``chunks[r]`` to rank r; receive ``recv_counts[r]`` elements from rank r. Same dtype throughout."""
        if len(chunks) != self.size or len(recv_counts) != self.size:
            raise ValueError(f"alltoall_v needs one chunk and one receive count per rank ({self.size}), got "
                             f"{len(chunks)} chunks and {len(recv_counts)} counts")
        dtypes = {c.dtype for c in chunks}
        if len(dtypes) != 1:
            raise TypeError(f"alltoall_v: every chunk must have the same dtype, got {sorted(map(str, dtypes))}")
        es = chunks[0].element_size() if chunks else 1
        self.bytes_sent += es * sum(c.numel() for r, c in enumerate(chunks) if r != self.rank)
        self.bytes_received += es * sum(n for r, n in enumerate(recv_counts) if r != self.rank)
        return self._alltoall_v(chunks, recv_counts)

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        self._barrier()

    def reset_counters(self) -> tuple[int, int]:
        """Return ``(bytes_sent, bytes_received)`` and set both to zero."""
        out = (self.bytes_sent, self.bytes_received)
        self.bytes_sent = self.bytes_received = 0
        return out

    # -- to implement ------------------------------------------------------------------------------------
    def _allreduce(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def _allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        raise NotImplementedError

    def _alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _barrier(self) -> None:
        raise NotImplementedError

    def _allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous collectives (supports_async=False)")

    def _allgather_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous collectives (supports_async=False)")


def completed_future(value: torch.Tensor) -> torch.futures.Future:
    """A future that already holds ``value`` (on CUDA, one that knows ``value``'s device, as DDP requires)."""
    fut: torch.futures.Future = (torch.futures.Future(devices=[value.device]) if value.device.type == "cuda"
                                 else torch.futures.Future())
    fut.set_result(value)
    return fut


class TorchBackend(Backend):
    """A :class:`Backend` over a ``torch.distributed`` process group (gloo, NCCL, ...).

    Args:
        group: the process group (``None``: the default group).
        timeout: if given, every collective waits at most this long and raises ``RuntimeError`` naming the
            operation instead of hanging when a peer stops answering.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: timedelta | float | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group() "
                "(or sparsedist.dist.init()) before building a TorchBackend"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        seconds = check_timeout(timeout)
        self.timeout = None if seconds is None else timedelta(seconds=seconds)

    @property
    def supports_async(self) -> bool:
        """Asynchronous collectives are used only without a timeout (a future's wait cannot be bounded here)."""
        return self.timeout is None

    def __getstate__(self):  # process groups do not pickle
        state = self.__dict__.copy()
        state["group"] = None
        return state

    def _wait(self, work, what: str) -> None:
        if work is None:
            return
        if self.timeout is None:
            work.wait()
            return
        try:
            ok = work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            raise RuntimeError(
                f"sparsedist: {what} did not complete within {self.timeout.total_seconds():.1f} s on rank "
                f"{self.rank} of {self.size} (a peer stopped answering or issued a different collective): {exc}"
            ) from exc
        if ok is False:
            raise RuntimeError(
                f"sparsedist: {what} did not complete within {self.timeout.total_seconds():.1f} s on rank "
                f"{self.rank} of {self.size}"
            )

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _allreduce(self, tensor: torch.Tensor) -> None:
        self._wait(dist.all_reduce(tensor, group=self.group, async_op=True), "allreduce")

    def _allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_empty(self.size * tensor.numel())
        self._wait(_all_gather_single(out, tensor.contiguous(), group=self.group, async_op=True),
                   "allgather")
        return out.view(self.size, -1)

    def _sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), self._global(dst), self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self._global(src), self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                self._wait(work, f"send/recv with ranks {dst}/{src}")

    def _alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        send = torch.cat([c.reshape(-1) for c in chunks]) if chunks else torch.empty(0)
        out = send.new_empty(int(sum(recv_counts)))
        self._wait(
            dist.all_to_all_single(out, send, output_split_sizes=list(recv_counts),
                                   input_split_sizes=[c.numel() for c in chunks], group=self.group,
                                   async_op=True),
            "all_to_all",
        )
        return list(out.split(list(recv_counts)))

    def _barrier(self) -> None:
        self._wait(dist.barrier(group=self.group, async_op=True), "barrier")

    def _allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda f: f.value()[0])

    def _allgather_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        out = tensor.new_empty(self.size * tensor.numel())
        work = _all_gather_single(out, tensor.contiguous(), group=self.group, async_op=True)
        return work.get_future().then(lambda f: out.view(self.size, -1))
