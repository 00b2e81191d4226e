"""Process-group set-up from whatever launched this process: torchrun, SLURM's srun, or an MPI launcher.

One call at the start and one at the end, the same in every script::

    rank, world_size, local_rank = sparsedist.dist.init()
    ...
    sparsedist.dist.shutdown()

:func:`init` reads the launcher's environment variables (see :func:`detect`), chooses the backend (``nccl``
when CUDA is usable, ``gloo`` otherwise), selects the local GPU, and calls
``torch.distributed.init_process_group``. Calling it again once initialised returns the same triple.

Launchers are recognised in this order (the first whose variables are present wins):

==========  =====================================================  ==========================================
launcher    rank / world size / local rank                         rendezvous address
==========  =====================================================  ==========================================
torchrun    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``               ``MASTER_ADDR``, ``MASTER_PORT`` (required)
openmpi     ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``     ``MASTER_ADDR``/``MASTER_PORT`` if set, else
mpich       ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``        rank 0 opens a store and broadcasts its
pmix        ``PMIX_RANK`` (size from SLURM or mpi4py)              address and port with mpi4py
slurm       ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``  ``MASTER_ADDR`` if set, else the first host
            (inside an srun step: ``SLURM_STEP_ID`` is set)
                                                                   of ``SLURM_STEP_NODELIST`` (or
                                                                   ``SLURM_JOB_NODELIST``); ``MASTER_PORT`` if
                                                                   set, else :func:`slurm_port` of the job id
==========  =====================================================  ==========================================

MPI variables win over SLURM's because ``mpirun`` inside an ``sbatch`` script inherits the batch step's
``SLURM_PROCID=0``. The parsing is pure and lives in :mod:`sparsedist.launchers` (:func:`detect` takes the
environment as a mapping; :func:`expand_hostlist` expands SLURM's compressed host lists without ``scontrol``).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from .collectives.backend import check_timeout
from .launchers import DistInfo, LaunchEnv, detect, expand_hostlist, opt_int, slurm_port

__all__ = ["init", "shutdown", "detect", "LaunchEnv", "DistInfo", "expand_hostlist", "slurm_port", "default_backend"]

DEFAULT_TIMEOUT_S = 600.0


def default_backend() -> str:
    """``"nccl"`` when CUDA is usable and torch has NCCL, else ``"gloo"``."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0 and dist.is_nccl_available():
        return "nccl"
    return "gloo"


# -- initialisation --------------------------------------------------------------------------------------

_NO_LAUNCHER = (
    "sparsedist.dist.init(): no launcher detected. Start the script with one of\n"
    "  torchrun --nproc_per_node=N script.py            (sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)\n"
    "  srun -n N python script.py                       (inside a SLURM allocation: SLURM_PROCID, SLURM_NTASKS)\n"
    "  mpirun -np N python script.py                    (Open MPI / MPICH / PMIx variables)\n"
    "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself; or pass standalone=True to run one process."
)


def _set_device(local_rank: int, backend: str) -> None:
    if not torch.cuda.is_available():
        if backend == "nccl":
            raise ValueError("backend='nccl' needs CUDA, which is not available here: use backend='gloo'")
        return
    count = torch.cuda.device_count()
    if count == 1:
        torch.cuda.set_device(0)  # one visible GPU per task (SLURM --gpus-per-task, CUDA_VISIBLE_DEVICES)
    elif local_rank < count:
        torch.cuda.set_device(local_rank)
    else:
        raise ValueError(
            f"local rank {local_rank} but only {count} CUDA devices are visible on this node: start at most "
            f"{count} processes per node, or give each process its own device with CUDA_VISIBLE_DEVICES"
        )


def _mpi_comm():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _this_host_address(all_hosts: list[str]) -> str:
    return "127.0.0.1" if len(set(all_hosts)) == 1 else socket.gethostname()


def _as_timedelta(timeout: float | timedelta) -> timedelta:
    return timedelta(seconds=check_timeout(timeout, allow_none=False))


def _no_launcher_message(env: Mapping[str, str]) -> str:
    if "SLURM_JOB_ID" in env:
        return (_NO_LAUNCHER + f"\nThis process runs inside SLURM job {env['SLURM_JOB_ID']} but not in an srun step "
                "(the batch script's shell is one process): start it with srun, e.g. srun python script.py")
    return _NO_LAUNCHER


def elastic_store(addr: str, port: int, world_size: int, timeout: timedelta,
                  environ: Mapping[str, str] | None = None) -> dist.Store | None:
    """The store a torchrun worker should rendezvous through, or ``None`` for torch's own ``env://``.

    Since torch 2.5, torchrun's c10d rendezvous shares one TCPStore between the agent and every generation of
    workers (``TORCHELASTIC_USE_AGENT_STORE=True``), and keys of the process group's rendezvous are not scoped to
    the restart (pytorch/pytorch#135712). After ``--max-restarts`` restarts the group, a worker can read its peer's
    address from the *previous* attempt and wait on a dead listener until the process-group timeout: an
    intermittent hang in ``init_process_group``. With one agent (``GROUP_WORLD_SIZE == 1``) the restart count is
    the same in every worker, so the store is prefixed with it and each attempt rendezvouses in keys of its own.
    With several agents the counts are per agent and cannot be trusted to agree; then nothing is changed and a
    warning names torch's remedy: ``export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` before ``torchrun`` (the launch
    scripts in ``launch/`` and ``slurm/`` do), which gives every attempt a fresh store.
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or opt_int(env, "TORCHELASTIC_MAX_RESTARTS") in (None, 0):
        return None
    if (opt_int(env, "GROUP_WORLD_SIZE") or 1) != 1:
        warnings.warn(
            "sparsedist.dist.init: torchrun shares its rendezvous store with the workers and --max-restarts is set; "
            "with several nodes a restarted group can hang in init_process_group on keys left by the previous "
            "attempt (pytorch/pytorch#135712). Fix: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on "
            "every node.", RuntimeWarning, stacklevel=3)
        return None
    attempt = opt_int(env, "TORCHELASTIC_RESTART_COUNT") or 0
    client = dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    return dist.PrefixStore(f"sparsedist/attempt-{attempt}", client)


def init(
    backend: str | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT_S,
    *,
    standalone: bool = False,
) -> DistInfo:
    """Initialise ``torch.distributed`` from the launcher's environment; return ``(rank, world_size, local_rank)``.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... (default: :func:`default_backend`, nccl when CUDA is usable).
        timeout: seconds (or a ``timedelta``) for the rendezvous and for every collective of the process group.
        standalone: when no launcher is detected, start a one-process group on this machine instead of raising.

    Returns:
        :class:`DistInfo` ``(rank, world_size, local_rank)``. With CUDA, ``torch.cuda.set_device`` has been
        called for ``local_rank`` (or device 0 when each process sees one GPU).

    Raises:
        RuntimeError: no launcher was detected (the message lists how to start the script), or an MPI launch
            has no ``MASTER_ADDR``/``MASTER_PORT`` and mpi4py is not importable to agree on one.
        ValueError: malformed launcher variables, a non-positive timeout, nccl without CUDA, or more local
            ranks than visible GPUs.
        TypeError: ``backend`` is not a string.

    Side effect: ``MASTER_ADDR`` and ``MASTER_PORT`` are set in ``os.environ`` to the rendezvous address used.

    Idempotent: when ``torch.distributed`` is already initialised, nothing is changed and the current rank,
    world size and local rank (from the environment, 0 if unknown) are returned.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'gloo' or 'nccl', got {type(backend).__name__}")
    td = _as_timedelta(timeout)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        try:
            info = detect()
            local = info.local_rank if info is not None else 0
        except ValueError:
            local = 0
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)

    info = detect()
    if info is None:
        if not standalone:
            raise RuntimeError(_no_launcher_message(os.environ))
        info = LaunchEnv("standalone", 0, 1, 0, "127.0.0.1", None)
    backend = backend or default_backend()
    _set_device(info.local_rank, backend)

    store = None
    world_size = info.world_size
    rank = info.rank
    addr, port = info.master_addr, info.master_port
    if info.launcher in ("openmpi", "mpich", "pmix") and (addr is None or port is None or world_size is None):
        comm = _mpi_comm()
        if comm is None:
            raise RuntimeError(
                f"started by an MPI launcher ({info.launcher}) without MASTER_ADDR/MASTER_PORT, and mpi4py is not "
                f"installed to agree on them: pip install mpi4py, or export MASTER_ADDR=<host of rank 0> and "
                f"MASTER_PORT=<free port> (e.g. mpirun -x MASTER_ADDR=... -x MASTER_PORT=29500)"
            )
        if world_size is None:
            world_size = comm.Get_size()
        if comm.Get_size() != world_size or comm.Get_rank() != rank:
            raise RuntimeError(
                f"{info.launcher} variables say rank {rank} of {world_size} but MPI says "
                f"{comm.Get_rank()} of {comm.Get_size()}"
            )
        if addr is None or port is None:
            # Rank 0 opens the store on a free port (no race) and tells everyone where it is.
            hosts = comm.allgather(socket.gethostname())
            if rank == 0:
                addr = addr or _this_host_address(hosts)
                store = dist.TCPStore(addr, port or 0, world_size, True, timeout=td, wait_for_workers=False)
                port = store.port
                comm.bcast((addr, port), root=0)
            else:
                addr, port = comm.bcast(None, root=0)
                store = dist.TCPStore(addr, port, world_size, False, timeout=td)
    elif port is None:  # standalone
        store = dist.TCPStore(addr, 0, 1, True, timeout=td, wait_for_workers=False)
        port = store.port
    elif info.launcher == "torchrun":
        store = elastic_store(addr, port, world_size, td)

    # The rendezvous address is exported (env:// reads it; so can the user's code). RANK/WORLD_SIZE are not,
    # so that detect() still names the real launcher afterwards.
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=td)
    return DistInfo(rank, world_size, info.local_rank)


# -- shutdown --------------------------------------------------------------------------------------------

def shutdown(drain: bool = True, timeout: float | timedelta = 60.0, grace: float = 0.05) -> None:
    """End this process's use of ``torch.distributed``: drain the backend's threads, then destroy the group.

    Why not ``destroy_process_group()`` alone: once a process has built a ``DistributedDataParallel``, the
    process group stays referenced until the interpreter exits (torch 2.x; ``destroy_process_group`` does
    not free it), and so do gloo's worker threads. A worker that finishes a collective drops its reference to
    the collective's tensors after the caller's ``wait()`` returned, and for a tensor Python once saw that
    needs the GIL; if the interpreter is already finalising by then, the thread is unwound and the process
    aborts ("terminate called without an active exception", SIGABRT) after a successful run. It happens to a
    rank that exits right after its last collective (measured here: 3 of 99 runs of ``examples/char_gpt.py``
    stopping early at a target loss, each reported as a failure by torchrun).

    Args:
        drain: ``True`` at the normal end of a run. It is a collective: every rank of the default group
            must call it. One small allreduce that every rank joins (so no rank tears down while a peer still
            talks to it), then this thread sleeps, with the GIL released, until the backend has let go of that
            allreduce's tensor. ``False`` after an error on this rank: no collective (the other ranks may be
            gone or stuck).
        timeout: seconds (or a ``timedelta``) to wait for the closing allreduce, and again for the backend to
            let go of its tensor (past that: a warning, and the group is destroyed anyway).
        grace: seconds this thread spends asleep, at least, between the closing allreduce (or the call, with
            ``drain=False``) and the destruction, so that a worker still finishing an earlier collective gets
            the GIL while the interpreter is alive.

    Raises:
        TimeoutError: the closing allreduce failed or did not complete within ``timeout`` (a rank did not call
            ``shutdown()``, or called it with ``drain=False``). The group is destroyed all the same.
        ValueError: a non-positive ``timeout`` or a negative ``grace``.

    Does nothing when ``torch.distributed`` is not initialised.
    """
    seconds = _as_timedelta(timeout).total_seconds()
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise ValueError(f"grace must be a number of seconds >= 0, got {grace!r}")
    if not dist.is_available() or not dist.is_initialized():
        return
    token = None
    failed = False
    try:
        if drain:
            token = torch.ones(1, device=_backend_device())
            _closing_allreduce(token, seconds)
    except TimeoutError:
        failed = True
        raise
    finally:
        # asleep, the GIL released, until the backend has let go of `token` (at most `timeout`, or 1 s after a
        # failed allreduce, whose work may stay in flight) and for `grace` seconds at least: a worker still
        # finishing a collective gets the GIL while the interpreter is alive
        _let_go(token, 1.0 if failed else seconds, grace)
        dist.destroy_process_group()


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _closing_allreduce(token: torch.Tensor, seconds: float) -> None:
    work = dist.all_reduce(token, async_op=True)
    error = None
    try:
        work.wait(timeout=timedelta(seconds=seconds))
    except RuntimeError as exc:
        error = str(exc)
    del work  # not kept alive by a traceback: its reference to `token` must go with the backend's
    if error is not None:
        raise TimeoutError(
            f"sparsedist.dist.shutdown(): the closing allreduce failed or did not complete within {seconds:g} s "
            f"({error}); every rank must call shutdown() at the end of a run, and a rank that hit an error "
            f"shutdown(drain=False)")
    if token.is_cuda:
        torch.cuda.synchronize(token.device)


def _let_go(token: torch.Tensor | None, seconds: float, grace: float) -> None:
    start = time.monotonic()
    use_count = getattr(token, "_use_count", lambda: 1)  # 1: our own reference is the only one left
    while time.monotonic() - start < grace or use_count() > 1:
        if time.monotonic() - start > max(seconds, grace):
            warnings.warn(f"sparsedist.dist.shutdown(): the {dist.get_backend()} backend still held the closing "
                          f"allreduce's tensor after {seconds:g} s; destroying the process group anyway",
                          RuntimeWarning, stacklevel=3)
            return
        time.sleep(0.002)
