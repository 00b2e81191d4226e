"""A :class:`~sparsedist.collectives.backend.Backend` over mpi4py, for jobs started by ``mpirun``.

The sparse collectives (allgather, SparCML) are written against :class:`Backend`; with :class:`MPIBackend` they
run over MPI without torch's own MPI process-group backend (which pip builds of torch do not have)::

    from sparsedist.integrations.mpi import MPIBackend
    backend = MPIBackend()               # MPI.COMM_WORLD, duplicated so our traffic cannot meet yours
    backend.allreduce(torch.ones(10))    # sums over all ranks, in place

Buffers travel through host memory: a tensor on another device (CUDA) is copied to the CPU, exchanged with
mpi4py's buffer-based (upper-case) calls on numpy views, and copied back to its device. Allreduce sums
float16/bfloat16 in float32 (MPI has no half-precision type) and rounds once at the end; bool reduces with
logical or. The other primitives move raw bytes, so every dtype works.

Byte accounting is the base class's: the same formulas as :class:`~sparsedist.collectives.backend.TorchBackend`,
so ``bytes_sent``/``bytes_received`` compare across backends.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from sparsedist.collectives.backend import Backend, check_timeout

__all__ = ["MPIBackend"]

_INT_MAX = 2**31 - 1
# Allreduce is element-wise, so it is split into pieces that fit MPI's int counts.
_ALLREDUCE_CHUNK = 2**30

_NUMPY_REDUCE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "sparsedist.integrations.mpi needs mpi4py: pip install mpi4py (and an MPI library such as "
            "Open MPI: apt-get install openmpi-bin libopenmpi-dev, or scripts/install_system.sh)"
        ) from exc
    return MPI


class MPIBackend(Backend):
    """Communication primitives over an mpi4py communicator, with the base class's byte accounting.

    Args:
        comm: an ``mpi4py.MPI.Intracomm`` (default ``MPI.COMM_WORLD``). It is duplicated (``comm.Dup()``, a
            collective call: every rank must construct the backend) so that this backend's messages never
            match a user's receives on the same communicator.
        timeout: seconds. ``None`` (default) uses blocking MPI calls. A number uses non-blocking calls and
            raises ``RuntimeError`` naming the operation when one has not completed in time, instead of
            hanging; MPI cannot cancel a collective, so the job should then abort
            (``MPI.COMM_WORLD.Abort()``).

    Attributes:
        rank, size: this process's rank and the communicator's size.
        comm: the duplicated communicator.

    Pickling keeps the counters and drops the communicator (communicators do not travel between processes);
    an unpickled backend uses ``MPI.COMM_WORLD`` of the process that unpickled it.
    """

    def __init__(self, comm=None, timeout: float | None = None):
        super().__init__()
        MPI = _import_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py.MPI.Intracomm, got {type(comm).__name__}")
        self.timeout = check_timeout(timeout)
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._byte_types: dict[int, object] = {}

    # -- pickling ------------------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["comm"] = None
        state["_byte_types"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.comm = _import_mpi().COMM_WORLD

    # -- helpers -------------------------------------------------------------------------------------------
    def _call(self, name: str, *args, what: str, **kwargs) -> None:
        """``comm.<name>(...)`` blocking without a timeout, else ``comm.I<name>(...)`` waited on with one.

        Blocking collectives are kept for the no-timeout case: MPI libraries tune them better than the
        non-blocking ones.
        """
        if self.timeout is None:
            getattr(self.comm, name)(*args, **kwargs)
        else:
            nonblocking = "I" + name[0].lower() + name[1:]  # Allreduce -> Iallreduce
            self._wait(getattr(self.comm, nonblocking)(*args, **kwargs), what)

    def _wait(self, request, what: str) -> None:
        if self.timeout is None:
            request.Wait()
            return
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not request.Test():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"sparsedist MPIBackend: {what} did not complete within {self.timeout:.1f} s on rank "
                    f"{self.rank} of {self.size} (a peer stopped answering or issued a different operation); "
                    f"MPI cannot cancel it: abort the job with MPI.COMM_WORLD.Abort()"
                )
            spins += 1
            if spins > 1000:
                time.sleep(1e-4)

    def _element_type(self, element_size: int):
        """An MPI datatype of ``element_size`` bytes, so counts are in elements (2**31 of them, not bytes)."""
        t = self._byte_types.get(element_size)
        if t is None:
            MPI = _import_mpi()
            t = MPI.BYTE if element_size == 1 else MPI.BYTE.Create_contiguous(element_size).Commit()
            self._byte_types[element_size] = t
        return t

    @staticmethod
    def _host(tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor holding ``tensor``'s data (``tensor`` itself when it already is one)."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous()

    @staticmethod
    def _bytes(t: torch.Tensor) -> np.ndarray:
        """A uint8 numpy view of a contiguous CPU tensor's memory (any dtype, zero elements included)."""
        flat = t.reshape(-1)
        if flat.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        return flat.view(torch.uint8).numpy()

    @staticmethod
    def _check_count(n: int, what: str) -> None:
        if n > _INT_MAX:
            raise ValueError(
                f"sparsedist MPIBackend: {what} of {n} elements exceeds MPI's 2**31-1 count limit; "
                f"split the exchange into smaller pieces"
            )

    # -- primitives ----------------------------------------------------------------------------------------
    def _allreduce(self, tensor: torch.Tensor) -> None:
        MPI = _import_mpi()
        if tensor.is_complex():
            raise TypeError(f"MPIBackend.allreduce does not support {tensor.dtype}; use a real dtype")
        if tensor.dtype in (torch.float16, torch.bfloat16):
            work = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        elif tensor.dtype in _NUMPY_REDUCE:
            work = self._host(tensor)
        else:
            raise TypeError(f"MPIBackend.allreduce does not support {tensor.dtype}")
        op = MPI.LOR if work.dtype == torch.bool else MPI.SUM
        arr = work.reshape(-1).numpy()
        for start in range(0, arr.size, _ALLREDUCE_CHUNK):
            piece = arr[start:start + _ALLREDUCE_CHUNK]
            self._call("Allreduce", MPI.IN_PLACE, piece, op=op, what="allreduce")
        if work.data_ptr() != tensor.data_ptr() or work.dtype != tensor.dtype:
            tensor.copy_(work)

    def _allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        host = self._host(tensor)
        n = host.numel()
        self._check_count(n, "allgather")
        out = torch.empty(self.size * n, dtype=host.dtype)
        etype = self._element_type(host.element_size())
        self._call("Allgather", [self._bytes(host), n, etype], [self._bytes(out), n, etype], what="allgather")
        return out.to(tensor.device).view(self.size, n)

    def _sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        MPI = _import_mpi()
        for r, name in ((dst, "dst"), (src, "src")):
            if not 0 <= int(r) < self.size:
                raise ValueError(f"sendrecv: {name}={r} is not a rank of this {self.size}-rank communicator")
        if send.numel() and recv.numel() and send.dtype != recv.dtype:
            raise TypeError(f"sendrecv: send is {send.dtype} but recv is {recv.dtype}; use one dtype")
        host_send = self._host(send)
        host_recv = torch.empty(recv.shape, dtype=recv.dtype)
        self._check_count(max(send.numel(), recv.numel()), "sendrecv")
        requests = []
        # Like TorchBackend: an empty message is not sent, and an empty receive is not posted.
        if recv.numel():
            requests.append(self.comm.Irecv([self._bytes(host_recv), recv.numel(),
                                             self._element_type(recv.element_size())], source=int(src), tag=7))
        if send.numel():
            requests.append(self.comm.Isend([self._bytes(host_send), send.numel(),
                                             self._element_type(send.element_size())], dest=int(dst), tag=7))
        if requests:
            self._wait(_RequestGroup(MPI, requests), f"send/recv with ranks {dst}/{src}")
        if recv.numel():
            recv.copy_(host_recv.view_as(recv))

    def _alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        dtype = chunks[0].dtype
        device = chunks[0].device
        recv_counts = [int(n) for n in recv_counts]
        if any(n < 0 for n in recv_counts):
            raise ValueError(f"alltoall_v: receive counts must be >= 0, got {recv_counts}")
        send_counts = [c.numel() for c in chunks]
        self._check_count(max(sum(send_counts), sum(recv_counts)), "alltoall_v")
        send = torch.cat([self._host(c).reshape(-1) for c in chunks])
        out = torch.empty(sum(recv_counts), dtype=dtype)
        etype = self._element_type(send.element_size())
        sdispl = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).astype(np.int64).tolist()
        rdispl = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(np.int64).tolist()
        self._call("Alltoallv", [self._bytes(send), (send_counts, sdispl), etype],
                   [self._bytes(out), (recv_counts, rdispl), etype], what="alltoall_v")
        return list(out.to(device).split(recv_counts))

    def _barrier(self) -> None:
        self._call("Barrier", what="barrier")


class _RequestGroup:
    """``Wait``/``Test`` over several requests, so :meth:`MPIBackend._wait` treats them as one."""

    def __init__(self, MPI, requests):
        self._MPI = MPI
        self._requests = requests

    def Wait(self):
        self._MPI.Request.Waitall(self._requests)

    def Test(self):
        return self._MPI.Request.Testall(self._requests)
