"""One file per rank for the hook state, beside a framework's own checkpoint.

Lightning, Accelerate and the Hugging Face Trainer write a checkpoint from rank 0 (model, optimizer, their own
state); error-feedback residuals and compressor state (DGC momenta, variance accumulators) differ per rank, so
each rank writes its :meth:`sparsedist.SparsifyState.state_dict` to its own shard in a directory beside or inside
that checkpoint, named as :func:`sparsedist.checkpoint.shard_path` names them (``rank00001-of00002.pt``). ``meta``
(e.g. the global step) is stored with the shard and checked on load, so a shard left from another save is never
loaded silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import shard_path

__all__ = ["save_shard", "load_shard"]

_FORMAT = 1


def save_shard(directory: str | os.PathLike, state: Any, *, rank: int, world_size: int,
               meta: dict[str, Any] | None = None) -> Path:
    """Write ``state.state_dict()`` of rank ``rank`` to its shard in ``directory`` (created); returns the path.

    The shard is written to a temporary file and renamed, so a crash mid-save leaves no half-written shard.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = shard_path(directory, rank, world_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": _FORMAT, "rank": rank, "world_size": world_size, "meta": dict(meta or {}),
                "state": state.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_shard(directory: str | os.PathLike, *, rank: int, world_size: int, meta: dict[str, Any] | None = None,
               map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read rank ``rank``'s hook state from ``directory``; returns the dict for ``state.load_state_dict``.

    Args:
        directory: where :func:`save_shard` wrote.
        rank, world_size: this process's rank and the job's number of processes.
        meta: values the shard must have been saved with (e.g. ``{"global_step": 600}``).
        map_location: where the tensors go (the device of the model's parameters).

    Raises:
        FileNotFoundError: no shard for this rank (names the path and the likely cause).
        ValueError: the shards were written at another world size, or ``meta`` does not match.
    """
    directory = Path(directory)
    path = shard_path(directory, rank, world_size)
    if not path.exists():
        others = sorted(p.name for p in directory.glob("rank*-of*.pt")) if directory.is_dir() else []
        if others:
            raise ValueError(f"{directory} holds sparsedist hook state saved by a job with another number of "
                             f"processes ({others[0]}, ...); this job has {world_size}. Resume with the number of "
                             f"processes it was saved with (error-feedback residuals are per rank)")
        raise FileNotFoundError(f"no sparsedist hook state for rank {rank} at {path}: the checkpoint was saved "
                                f"without the sparsedist integration, or the save did not finish on this rank")
    if map_location is not None and torch.device(map_location).type == "cpu":
        map_location = "cpu"  # torch.load cannot restore to "cpu:0", which some frameworks report as their device
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if payload.get("format") != _FORMAT or payload.get("rank") != rank:
        raise ValueError(f"{path} is not rank {rank}'s sparsedist shard (format {payload.get('format')}, rank "
                         f"{payload.get('rank')})")
    for key, want in (meta or {}).items():
        got = payload["meta"].get(key)
        if got != want:
            raise ValueError(f"{path} was saved at {key}={got!r} but the checkpoint being resumed is at "
                             f"{key}={want!r}: this shard belongs to another save; nothing was loaded")
    return payload["state"]
