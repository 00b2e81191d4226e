"""Sharded checkpoints of everything stateful: model, optimizer, hook state, model sparsity, RNG.

Error-feedback residuals (and DGC momenta, variance accumulators) differ per rank, so each rank writes its own
shard; a checkpoint is a directory::

    ckpt/step-000600/rank00000-of00002.pt
    ckpt/step-000600/rank00001-of00002.pt
    ckpt/step-000600/COMPLETE            (JSON: world size, step; written by rank 0 after every shard exists)

Usage::

    sparsedist.checkpoint.save("ckpt/step-000600", model=ddp, optimizer=opt, state=hook_state, sparsity=rigl,
                               extra={"step": 600})
    extra = sparsedist.checkpoint.load(latest_checkpoint("ckpt"), model=ddp, optimizer=opt, state=hook_state,
                                       sparsity=rigl)

Loading on the same world size restores every rank exactly (RNG states included), so a resumed run is
bit-identical to an uninterrupted one on CPU. Loading on a different world size P' from P:

* ``reshard="mean"`` (default): model, optimizer and sparsity state (identical on every rank) are loaded, and
  every new rank's residual (and every per-tensor compressor state, e.g. DGC momentum) becomes the mean of the
  P saved ones. The pending update is ``(1/P) sum_r residual_r`` before and ``(1/P') sum_r' mean = mean``
  after: the same, so no gradient mass is lost or duplicated. RNG states are not restored (they are per rank).
* ``reshard="reset"``: residuals and per-tensor compressor state start from zero.
* ``reshard="error"``: raise.

Either of the first two emits a :class:`UserWarning` that says what was done: never silently.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save", "load", "latest_checkpoint", "shard_path"]

_MARKER = "COMPLETE"


def _rank_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_path(directory: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Path of rank ``rank``'s shard in a checkpoint directory written at ``world_size`` ranks."""
    return Path(directory) / f"rank{rank:05d}-of{world_size:05d}.pt"


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         state: Any = None, sparsity: Any = None, extra: dict[str, Any] | None = None,
         group: dist.ProcessGroup | None = None) -> Path:
    """Write this rank's shard of a checkpoint; collective (every rank must call it). Returns the shard's path.

    Args:
        directory: the checkpoint directory (created if missing).
        model: the model (DDP or plain); its ``state_dict()`` is saved.
        optimizer: optional optimizer.
        state: optional :class:`sparsedist.SparsifyState` (per-rank residuals, compressor state, telemetry).
        sparsity: optional model-sparsity object with ``state_dict()`` (e.g. ``sparsedist.sparsity.RigL``).
        extra: small picklable metadata (e.g. ``{"step": 600, "epoch": 3}``), returned by :func:`load`.
        group: process group (default: the global one).

    Each shard is written to a temporary file and renamed, and rank 0 writes the ``COMPLETE`` marker only after a
    barrier, so a job killed mid-save leaves no checkpoint that :func:`latest_checkpoint` would pick.
    """
    rank, world = _rank_world(group)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "rank": rank,
        "world_size": world,
        "model": _module(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "sparsedist": state.state_dict() if state is not None else None,
        "sparsity": sparsity.state_dict() if sparsity is not None else None,
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    path = shard_path(directory, rank, world)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    if world > 1:
        dist.barrier(group=group)
    if rank == 0:
        marker = directory / _MARKER
        tmp_marker = directory / f".{_MARKER}.tmp"
        tmp_marker.write_text(json.dumps({"world_size": world, "extra": _jsonable(extra or {})}))
        os.replace(tmp_marker, marker)
    if world > 1:
        dist.barrier(group=group)
    return path


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recent *complete* checkpoint directory under ``root`` (by name order), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(d for d in root.iterdir() if d.is_dir() and (d / _MARKER).exists())
    return done[-1] if done else None


def load(directory: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         state: Any = None, sparsity: Any = None, reshard: str = "mean", restore_rng: bool = True,
         map_location: str | torch.device | None = "cpu", group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Load this rank's part of a checkpoint written by :func:`save`; returns the ``extra`` metadata.

    Args:
        directory: the checkpoint directory.
        model, optimizer, state, sparsity: objects to restore (those given at save time).
        reshard: what to do with per-rank state when the world size changed: ``"mean"``, ``"reset"`` or
            ``"error"`` (see the module documentation).
        restore_rng: restore torch/Python/NumPy RNG states (same world size only).
        map_location: passed to ``torch.load``.
        group: process group (default: the global one).

    Raises:
        FileNotFoundError: the checkpoint is incomplete or missing (names the directory).
        ValueError: ``reshard="error"`` and the world size changed, or an unknown ``reshard``.
    """
    if reshard not in ("mean", "reset", "error"):
        raise ValueError(f"reshard must be 'mean', 'reset' or 'error', got {reshard!r}")
    directory = Path(directory)
    marker = directory / _MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{directory} is not a complete sparsedist checkpoint (no {_MARKER} marker: the "
                                f"save was interrupted or this is not a checkpoint directory)")
    saved_world = int(json.loads(marker.read_text())["world_size"])
    rank, world = _rank_world(group)
    same = saved_world == world
    if not same and reshard == "error":
        raise ValueError(f"checkpoint {directory} was written at {saved_world} ranks, this job has {world}; "
                         f"pass reshard='mean' (re-shard residuals) or reshard='reset' (drop them)")
    own = torch.load(shard_path(directory, rank if same else 0, saved_world), map_location=map_location,
                     weights_only=False)
    _module(model).load_state_dict(own["model"])
    if optimizer is not None:
        if own["optimizer"] is None:
            raise ValueError(f"checkpoint {directory} has no optimizer state; save it with optimizer=...")
        optimizer.load_state_dict(own["optimizer"])
    if sparsity is not None:
        if own["sparsity"] is None:
            raise ValueError(f"checkpoint {directory} has no sparsity state; save it with sparsity=...")
        sparsity.load_state_dict(own["sparsity"])
    if state is not None:
        if own["sparsedist"] is None:
            raise ValueError(f"checkpoint {directory} has no sparsedist hook state; save it with state=...")
        if same:
            state.load_state_dict(own["sparsedist"])
        else:
            shards = [torch.load(shard_path(directory, r, saved_world), map_location=map_location,
                                 weights_only=False)["sparsedist"] for r in range(saved_world)]
            state.load_state_dict(_reshard(shards, reshard))
            warnings.warn(
                f"checkpoint {directory} was written at {saved_world} ranks and is loaded at {world}: "
                + ("every rank's error-feedback residuals and per-tensor compressor state are the mean of the "
                   f"{saved_world} saved ones (the pending gradient mass is conserved)" if reshard == "mean" else
                   "error-feedback residuals and per-tensor compressor state were reset to zero")
                + "; per-rank RNG states were not restored", UserWarning, stacklevel=2)
    if restore_rng and same:
        _set_rng_state(own["rng"])
    return own["extra"]


def _mean_tensors(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        return torch.stack([v.to(first.dtype) for v in values]).mean(0)
    return first


def _reshard(shards: list[dict[str, Any]], how: str) -> dict[str, Any]:
    """Combine the hook states of every saved rank into one for a new rank."""
    base = dict(shards[0])
    residuals = base["feedback"]["residuals"]
    if how == "mean":
        names = residuals.keys()
        base["feedback"] = {"enabled": base["feedback"]["enabled"],
                            "residuals": {n: _mean_tensors([s["feedback"]["residuals"][n] for s in shards])
                                          for n in names if all(n in s["feedback"]["residuals"] for s in shards)}}
        comp = {}
        for field, value in base["compressor"].items():
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                comp[field] = {n: _mean_tensors([s["compressor"][field][n] for s in shards]) for n in value}
            else:
                comp[field] = value
        base["compressor"] = comp
    else:
        base["feedback"] = {"enabled": base["feedback"]["enabled"], "residuals": {}}
        base["compressor"] = {f: ({} if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor)
                                                                           for t in v.values()) else v)
                              for f, v in base["compressor"].items()}
    base["telemetry"] = {}
    return base
