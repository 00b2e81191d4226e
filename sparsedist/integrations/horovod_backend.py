"""sparsedist's communication primitives over Horovod's collectives (:class:`HorovodBackend`).

Needs Horovod built with PyTorch support (``bash scripts/build_horovod.sh``); importing this module without it
raises ``ImportError`` saying so. :mod:`sparsedist.integrations.horovod` builds the optimizer on it.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

import torch

try:
    import horovod.torch as hvd
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        f"sparsedist.horovod needs Horovod built with PyTorch support, and `import horovod.torch` failed ({exc}). "
        f"Install it with `bash scripts/build_horovod.sh` (builds Horovod 0.28.1 with the C++17 change it needs "
        f"for torch >= 2.1, Gloo and MPI controllers; about 4 minutes), then start jobs with "
        f"`horovodrun -np N python train.py`"
    ) from exc

from sparsedist.collectives.backend import Backend, check_timeout

__all__ = ["HorovodBackend", "check_initialized", "hvd"]

# dtypes Horovod 0.28.1 reduces (others are summed in a wider type) and moves (others travel as raw bytes)
_REDUCE_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int32, torch.int64}
_MOVE_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                torch.float64}

# Horovod matches operations across ranks by name; names must be unique among the operations in flight and
# identical on every rank. Every rank issues sparsedist's collectives in the same order, so a process-wide
# counter gives the same name to the same operation everywhere.
_op_counter = itertools.count()

def check_initialized() -> None:
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call hvd.init() (import horovod.torch as hvd) first, in a "
                           "job started by horovodrun")


class HorovodBackend(Backend):
    """sparsedist's communication primitives over Horovod's collectives (all Horovod ranks).

    Args:
        timeout: seconds. ``None`` (default) waits for each operation as Horovod does (its stall inspector warns
            after 60 s). A number polls the operation and raises ``RuntimeError`` naming it when it has not
            completed in time (a peer stopped answering or issued a different operation). Horovod cannot cancel
            an operation, so the job should then end.

    Primitives: ``allreduce`` is ``hvd.allreduce_`` with ``op=hvd.Sum`` (in place; float16/32/64 and int32/64
    natively; bfloat16 is summed in float32 and rounded once, bool reduces with logical or, other integers are
    summed in int64); ``allgather`` is ``hvd.allgather`` of a ``(1, n)`` view; ``alltoall_v`` is ``hvd.alltoall``
    with split sizes; dtypes Horovod cannot move (bfloat16, bool) travel as raw bytes. Horovod has no
    point-to-point messages, so ``sendrecv`` is an ``hvd.alltoall`` in which this rank sends only to ``dst`` and
    receives only from ``src``: it is a *collective* call, and every rank must call it, in the same order. That
    holds for rings and pairwise rounds (SparCML's ring allgatherv and split-allgather algorithms, recursive
    doubling on a power-of-two number of ranks), not for patterns in which some ranks stay idle (SparCML's
    recursive doubling folds the ranks beyond the largest power of two with messages only some ranks take part
    in; over Horovod that fails with a receive-count error or waits until ``timeout``, and
    :class:`DistributedOptimizer` refuses ``collective="ssar_recursive_double"``/``"auto"`` at such sizes). With the
    default ``collective="allgather"`` the exchange uses only allreduce and allgather. Byte accounting is the base
    class's, so counts compare with ``TorchBackend``'s.
    """

    def __init__(self, timeout: float | None = None):
        super().__init__()
        check_initialized()
        self.timeout = check_timeout(timeout)
        self.rank = hvd.rank()
        self.size = hvd.size()

    # -- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _name(op: str) -> str:
        return f"sparsedist.{op}.{next(_op_counter)}"

    def _wait(self, handle, what: str):
        """``hvd.synchronize(handle)``, bounded by the timeout when one is set; returns the operation's output."""
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout
            pause = 1e-5
            while not hvd.poll(handle):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sparsedist HorovodBackend: {what} did not complete within {self.timeout:.1f} s on rank "
                        f"{self.rank} of {self.size} (a peer stopped answering or issued a different operation); "
                        f"Horovod cannot cancel it: end the job")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        try:
            return hvd.synchronize(handle)
        except RuntimeError as exc:  # HorovodInternalError is a RuntimeError
            raise RuntimeError(f"sparsedist HorovodBackend: {what} failed on rank {self.rank} of {self.size}: "
                               f"{exc}") from exc

    @staticmethod
    def _movable(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``t`` itself, or a uint8 view of its bytes when Horovod cannot move its dtype; and the byte factor."""
        if t.dtype in _MOVE_DTYPES:
            return t, 1
        if t.is_complex():
            raise TypeError(f"HorovodBackend does not move {t.dtype} tensors; use a real dtype")
        return t.view(torch.uint8), t.element_size()

    # -- primitives ----------------------------------------------------------------------------------------
    def _allreduce(self, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:  # every rank has the same shape, so every rank skips
            return
        if tensor.is_complex():
            raise TypeError(f"HorovodBackend.allreduce does not support {tensor.dtype}; use a real dtype")
        if tensor.dtype in _REDUCE_DTYPES and tensor.is_contiguous():
            work = tensor
        elif tensor.dtype in _REDUCE_DTYPES:
            work = tensor.contiguous()
        elif tensor.is_floating_point():
            work = tensor.to(torch.float32)
        elif tensor.dtype == torch.bool:
            work = tensor.to(torch.int32)
        else:
            work = tensor.to(torch.int64)
        name = self._name("allreduce")
        self._wait(hvd.allreduce_async_(work, name=name, op=hvd.Sum), f"allreduce {name}")
        if work is not tensor:
            tensor.copy_(work != 0 if tensor.dtype == torch.bool else work)

    def _allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        row = tensor.contiguous().reshape(1, -1)
        moved, factor = self._movable(row)
        name = self._name("allgather")
        out = self._wait(hvd.allgather_async(moved, name=name), f"allgather {name}")
        if factor != 1:
            out = out.view(tensor.dtype)
        return out.reshape(self.size, tensor.numel())

    def _alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        recv_counts = [int(n) for n in recv_counts]
        if any(n < 0 for n in recv_counts):
            raise ValueError(f"alltoall_v: receive counts must be >= 0, got {recv_counts}")
        dtype = chunks[0].dtype
        send = torch.cat([c.reshape(-1) for c in chunks])
        moved, factor = self._movable(send)
        splits = torch.tensor([c.numel() * factor for c in chunks], dtype=torch.int32)
        name = self._name("alltoall")
        out, received = self._wait(hvd.alltoall_async(moved, splits=splits, name=name), f"alltoall {name}")
        got = [int(n) // factor for n in received.tolist()]
        if got != recv_counts:
            raise RuntimeError(f"sparsedist HorovodBackend: alltoall {name} on rank {self.rank} expected "
                               f"{recv_counts} elements from ranks 0..{self.size - 1} but received {got}")
        if factor != 1:
            out = out.view(dtype)
        return list(out.split(recv_counts))

    def _sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        for r, label in ((dst, "dst"), (src, "src")):
            if not 0 <= int(r) < self.size:
                raise ValueError(f"sendrecv: {label}={r} is not a rank of this {self.size}-rank Horovod job")
        # Bytes, so that ranks sending different dtypes (or nothing) still agree on the alltoall's dtype.
        payload = send.detach().contiguous().reshape(-1).view(torch.uint8) if send.numel() else \
            torch.empty(0, dtype=torch.uint8, device=recv.device if recv.numel() else send.device)
        empty = payload.new_empty(0)
        chunks = [payload if r == int(dst) else empty for r in range(self.size)]
        counts = [recv.numel() * recv.element_size() if r == int(src) else 0 for r in range(self.size)]
        try:
            got = self._alltoall_v(chunks, counts)[int(src)]
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}. Over Horovod, sendrecv is collective (an alltoall): every rank must call it, in the same "
                f"order. Algorithms in which some ranks stay idle, such as SparCML's recursive doubling on a "
                f"non-power-of-two number of ranks, cannot run over HorovodBackend: use 'ssar_split_allgather', "
                f"'dsar_split_allgather' or 'allgather'") from exc
        if recv.numel():
            recv.copy_(got.view(recv.dtype).view(recv.shape))

    def _barrier(self) -> None:
        if self.timeout is None:
            hvd.barrier()
        else:
            self._allreduce(torch.zeros(1, dtype=torch.int32))
