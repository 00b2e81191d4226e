"""Which launcher started this process, from its environment variables alone (no side effects).

:func:`detect` recognises torchrun, Open MPI, MPICH, PMIx and SLURM's srun (see :mod:`sparsedist.dist` for the
table) and returns a :class:`LaunchEnv`; :func:`expand_hostlist` expands SLURM's compressed host lists
(``node[01-03,07]``) without ``scontrol``; :func:`slurm_port` derives a rendezvous port from a job id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

__all__ = ["detect", "LaunchEnv", "DistInfo", "expand_hostlist", "slurm_port"]


class DistInfo(NamedTuple):
    """What :func:`init` returns: this process's global rank, the world size, and its rank on this node."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class LaunchEnv:
    """What :func:`detect` read from the environment.

    Attributes:
        launcher: ``"torchrun"``, ``"openmpi"``, ``"mpich"``, ``"pmix"`` or ``"slurm"``.
        rank: global rank.
        world_size: number of processes; ``None`` only for a bare PMIx launch, where :func:`init` asks mpi4py.
        local_rank: rank among the processes on this node (selects the GPU).
        master_addr: rendezvous host, or ``None`` when it must be agreed over MPI.
        master_port: rendezvous TCP port, or ``None`` when it must be agreed over MPI.
    """

    launcher: str
    rank: int
    world_size: int | None
    local_rank: int
    master_addr: str | None
    master_port: int | None


# -- pure parsing ----------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in SLURM host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM host list {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            out.append(item)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if not m:
            raise ValueError(f"bad range {item!r} in SLURM host list {whole!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM host list {whole!r}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM compressed host list into host names, in order.

    ``"node[01-03,07]"`` -> ``["node01", "node02", "node03", "node07"]``; ``"a1,b[1-2]"`` -> ``["a1", "b1",
    "b2"]``; several bracket groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> ``r1n1, r1n2, r2n1,
    r2n2``). Zero padding is kept. Raises ``ValueError`` on an empty or malformed list.
    """
    if not isinstance(hostlist, str) or not hostlist.strip():
        raise ValueError(f"empty SLURM host list {hostlist!r}")
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"empty host name in SLURM host list {hostlist!r}")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if body:
                names = [n + literal + x for n in names for x in _expand_range_set(body, hostlist)]
            elif literal:
                names = [n + literal for n in names]
        hosts.extend(names)
    return hosts


def slurm_port(job_id: int | str, step_id: int | str | None = None, base: int = 12000, span: int = 20000) -> int:
    """A rendezvous port derived from the SLURM job (and step) id, in ``[base, base + span)``.

    Every task of a step computes the same port without talking to the others; different jobs sharing a node
    get different ports unless their ids collide modulo ``span``. The default range stays below Linux's
    ephemeral ports (32768+). Set ``MASTER_PORT`` to override.
    """
    try:
        job = int(job_id)
    except (TypeError, ValueError):
        raise ValueError(f"SLURM job id must be an integer, got {job_id!r}") from None
    step = 0
    if step_id not in (None, ""):
        try:
            step = int(step_id)
        except (TypeError, ValueError):
            step = 0  # "batch", "extern", "interactive": not a numbered step
    return base + (job + 7919 * step) % span


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def opt_int(env: Mapping[str, str], *keys: str) -> int | None:
    for k in keys:
        if env.get(k, "") != "":
            return _int(env, k)
    return None


def _master(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = env.get("MASTER_ADDR") or None
    port = opt_int(env, "MASTER_PORT")
    return addr, port


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Read rank, world size, local rank and rendezvous address from launcher variables.

    Args:
        environ: the environment to read (default ``os.environ``); a plain dict in tests.

    Returns:
        A :class:`LaunchEnv`, or ``None`` when no launcher's variables are present.

    Raises:
        ValueError: a variable is not an integer, the rank is outside ``[0, world_size)``, torchrun's
            variables lack ``MASTER_ADDR``/``MASTER_PORT``, or a SLURM host list is malformed.
    """
    env = os.environ if environ is None else environ
    info: LaunchEnv | None = None
    if "RANK" in env and "WORLD_SIZE" in env:
        addr, port = _master(env)
        if addr is None or port is None:
            raise ValueError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: set both (torchrun sets "
                "them for you), e.g. MASTER_ADDR=127.0.0.1 MASTER_PORT=29500"
            )
        info = LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                         opt_int(env, "LOCAL_RANK") or 0, addr, port)
    elif "OMPI_COMM_WORLD_RANK" in env:
        addr, port = _master(env)
        info = LaunchEnv("openmpi", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                         opt_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, addr, port)
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        addr, port = _master(env)
        local = opt_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
        info = LaunchEnv("mpich", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), local or 0, addr, port)
    elif "PMIX_RANK" in env:
        addr, port = _master(env)
        size = opt_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        local = opt_int(env, "PMIX_LOCAL_RANK", "SLURM_LOCALID")
        info = LaunchEnv("pmix", _int(env, "PMIX_RANK"), size, local or 0, addr, port)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        # Only inside an srun step: the batch script's own shell also has SLURM_PROCID=0 and the job's
        # SLURM_NTASKS, but it is one process, not task 0 of N.
        size = opt_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        if size is None:
            raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not: start the job with srun -n N")
        addr, port = _master(env)
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is: "
                                 "export MASTER_ADDR=<first node> in the sbatch script")
            addr = expand_hostlist(nodelist)[0]
        if port is None:
            if env.get("SLURM_JOB_ID", "") == "":
                raise ValueError("SLURM_PROCID is set but neither MASTER_PORT nor SLURM_JOB_ID is: export "
                                 "MASTER_PORT in the sbatch script")
            port = slurm_port(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")))
        info = LaunchEnv("slurm", _int(env, "SLURM_PROCID"), size,
                         opt_int(env, "SLURM_LOCALID") or 0, addr, port)
    if info is None:
        return None
    if info.world_size is not None:
        if info.world_size < 1:
            raise ValueError(f"{info.launcher}: world size must be >= 1, got {info.world_size}")
        if not 0 <= info.rank < info.world_size:
            raise ValueError(f"{info.launcher}: rank {info.rank} is outside [0, {info.world_size})")
    if info.local_rank < 0:
        raise ValueError(f"{info.launcher}: local rank must be >= 0, got {info.local_rank}")
    if info.master_port is not None and not 0 < info.master_port < 65536:
        raise ValueError(f"MASTER_PORT must be in 1..65535, got {info.master_port}")
    return info
