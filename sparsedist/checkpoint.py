"""Sharded checkpoints of everything stateful: model, optimizer, hook state, model sparsity, RNG.

Error-feedback residuals (and DGC momenta, variance accumulators) differ per rank, so each rank writes its own
shard; a checkpoint is a directory::

    ckpt/step-000600/rank00000-of00002.pt
    ckpt/step-000600/rank00001-of00002.pt
    ckpt/step-000600/COMPLETE            (JSON: world size, extra, each shard's size and SHA-256; written by
                                          rank 0 after every shard exists)

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

A damaged checkpoint is never taken for a good one: :func:`latest_checkpoint` skips (with a warning naming the
shard) a checkpoint whose shards are missing, or differ in size or SHA-256 from what the marker recorded, and
:func:`load` checks the shards against the marker, reads them, and agrees with every other rank before anything
is restored, so a damaged shard fails every rank with a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save", "load", "latest_checkpoint", "shard_path", "verify", "CheckpointError"]

_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint's files are missing, truncated, damaged or unreadable; the message names them."""


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
    mine = {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    shards = [mine]
    if world > 1:  # (every shard exists once this returns)
        shards = [None] * world
        dist.all_gather_object(shards, mine, group=group)
    if rank == 0:
        marker = directory / _MARKER
        tmp_marker = directory / f".{_MARKER}.tmp"
        tmp_marker.write_text(json.dumps({"format": 2, "world_size": world, "extra": _jsonable(extra or {}),
                                          "shards": {s["file"]: {"bytes": s["bytes"], "sha256": s["sha256"]}
                                                     for s in shards}}))
        os.replace(tmp_marker, marker)
    if world > 1:
        dist.barrier(group=group)
    return path


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _marker(directory: Path) -> dict[str, Any]:
    """The parsed marker; ``CheckpointError`` if it cannot be read."""
    marker = directory / _MARKER
    try:
        info = json.loads(marker.read_text())
        int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint marker {marker} is damaged ({exc}); this checkpoint cannot be "
                              f"trusted: load an earlier one") from exc
    return info


def verify(directory: str | os.PathLike, ranks: list[int] | None = None, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint in ``directory``: one sentence per missing, truncated or damaged file
    (empty: it is intact). Sizes are checked for every shard; SHA-256 checksums (reading the files) for the
    shards of ``ranks`` (default: all), unless ``checksums=False``. Checkpoints written before the marker
    recorded sizes and checksums are checked for the presence of every shard only."""
    directory = Path(directory)
    if not (directory / _MARKER).exists():
        return [f"{directory} has no {_MARKER} marker (the save was interrupted, or it is not a checkpoint)"]
    try:
        info = _marker(directory)
    except CheckpointError as exc:
        return [str(exc)]
    world = int(info["world_size"])
    recorded = info.get("shards") or {shard_path(directory, r, world).name: None for r in range(world)}
    problems = []
    for r in range(world):
        path = shard_path(directory, r, world)
        want = recorded.get(path.name)
        if not path.exists():
            problems.append(f"shard {path} is missing")
        elif want is not None and path.stat().st_size != want["bytes"]:
            problems.append(f"shard {path} has {path.stat().st_size} bytes where the marker recorded "
                            f"{want['bytes']} (truncated or overwritten)")
        elif want is not None and checksums and (ranks is None or r in ranks) and _sha256(path) != want["sha256"]:
            problems.append(f"shard {path} does not match the SHA-256 checksum the marker recorded (damaged)")
    return problems


def latest_checkpoint(root: str | os.PathLike, checksums: bool = True) -> Path | None:
    """The most recent intact checkpoint directory under ``root`` (by name order), or None.

    A directory without the ``COMPLETE`` marker is passed over silently (a save that did not finish); one whose
    shards are missing or do not match the sizes and SHA-256 checksums the marker recorded is passed over with a
    ``UserWarning`` naming the shard. ``checksums=False`` checks sizes only (no file is read).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted((d for d in root.iterdir() if d.is_dir() and (d / _MARKER).exists()), reverse=True)
    for d in done:
        problems = verify(d, checksums=checksums)
        if not problems:
            return d
        warnings.warn(f"skipping damaged checkpoint {d}: " + "; ".join(problems), UserWarning, stacklevel=2)
    return None


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

    Collective when ``torch.distributed`` is initialised (every rank of ``group`` calls it, as for :func:`save`):
    the shards are checked against the marker's sizes and checksums and read first, and the ranks agree before
    anything is restored, so a damaged checkpoint fails every rank alike.

    Raises:
        FileNotFoundError: the checkpoint is incomplete or missing (names the directory).
        CheckpointError: a shard is missing, truncated, damaged or unreadable (on every rank; names the files).
        ValueError: ``reshard="error"`` and the world size changed, or an unknown ``reshard``.
    """
    if reshard not in ("mean", "reset", "error"):
        raise ValueError(f"reshard must be 'mean', 'reset' or 'error', got {reshard!r}")
    directory = Path(directory)
    marker = directory / _MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{directory} is not a complete sparsedist checkpoint (no {_MARKER} marker: the "
                                f"save was interrupted or this is not a checkpoint directory)")
    saved_world = int(_marker(directory)["world_size"])
    rank, world = _rank_world(group)
    same = saved_world == world
    if not same and reshard == "error":
        raise ValueError(f"checkpoint {directory} was written at {saved_world} ranks, this job has {world}; "
                         f"pass reshard='mean' (re-shard residuals) or reshard='reset' (drop them)")
    wanted = [rank if same else 0] + ([] if same or state is None else list(range(1, saved_world)))
    shards = _read_agreed(directory, saved_world, wanted, map_location, group)
    own = shards[0]
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
            state.load_state_dict(_reshard([s["sparsedist"] for s in shards], reshard))
            warnings.warn(
                f"checkpoint {directory} was written at {saved_world} ranks and is loaded at {world}: "
                + ("every rank's error-feedback residuals and per-tensor compressor state are the mean of the "
                   f"{saved_world} saved ones (the pending gradient mass is conserved)" if reshard == "mean" else
                   "error-feedback residuals and per-tensor compressor state were reset to zero")
                + "; per-rank RNG states were not restored", UserWarning, stacklevel=2)
    if restore_rng and same:
        _set_rng_state(own["rng"])
    return own["extra"]


def _read_agreed(directory: Path, saved_world: int, ranks: list[int], map_location: Any,
                 group: dist.ProcessGroup | None) -> list[dict[str, Any]]:
    """The shards of ``ranks``, read after checking them against the marker; every rank raises
    :class:`CheckpointError` if any rank found a problem (one collective when distributed)."""
    problems = verify(directory, ranks=ranks)
    shards = []
    if not problems:
        for r in ranks:
            path = shard_path(directory, r, saved_world)
            try:
                shards.append(torch.load(path, map_location=map_location, weights_only=False))
            except Exception as exc:  # noqa: BLE001 - any failure to read is reported with the file's name
                problems.append(f"shard {path} cannot be read ({type(exc).__name__}: {exc})")
                break
    rank, world = _rank_world(group)
    everyone = [problems]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, problems, group=group)
    found = list(dict.fromkeys(p for ps in everyone for p in ps))
    if found:
        raise CheckpointError(f"checkpoint {directory} is damaged, so no rank loads it: " + "; ".join(found)
                              + ". Load an earlier checkpoint (latest_checkpoint() skips damaged ones)")
    return shards


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
