"""Consistency checks across ranks: identical parameters, identical configuration.

Checksums are exact integer sums of each tensor's bit patterns (the floats viewed as integers), so two ranks
agree if and only if (with overwhelming probability) their tensors are bit-identical, independent of summation
order or hardware.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import torch

from .collectives.backend import Backend, TorchBackend

__all__ = ["tensor_checksum", "check_parameters", "check_same_on_all_ranks", "fingerprint"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers identifying ``t``'s bits: the sum of its bit patterns and a position-weighted sum."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        bits = flat.to(torch.int64)
    elif flat.is_floating_point() or flat.is_complex():
        bits = flat.view(_INT_VIEW[flat.element_size()] if not flat.is_complex() else torch.int32).to(torch.int64)
    else:
        bits = flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 1_000_003
    return torch.stack([bits.sum(), (bits * weights).sum()])


def check_same_on_all_ranks(named: Iterable[tuple[str, torch.Tensor]], backend: Backend | None = None,
                            what: str = "parameter") -> None:
    """Raise ``RuntimeError`` on every rank if any named tensor differs between ranks.

    The error names the first diverging tensor and the ranks that disagree with rank 0. Collective: every rank
    must call it with the same names in the same order.
    """
    backend = backend or TorchBackend()
    named = list(named)
    if backend.size == 1 or not named:
        return
    local = torch.stack([tensor_checksum(t).cpu() for _, t in named]).reshape(-1)
    device = named[0][1].device
    rows = backend.allgather(local.to(device)).cpu().view(backend.size, len(named), 2)
    for i, (name, _) in enumerate(named):
        differ = [r for r in range(1, backend.size) if not torch.equal(rows[r, i], rows[0, i])]
        if differ:
            raise RuntimeError(f"sparsedist: {what} {name!r} differs between rank 0 and rank(s) {differ} "
                               f"(checked on rank {backend.rank}); the replicas have diverged")


def check_parameters(model: torch.nn.Module, backend: Backend | None = None) -> None:
    """Check that every parameter and buffer of ``model`` is bit-identical on all ranks (collective)."""
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    check_same_on_all_ranks(list(module.named_parameters()) + list(module.named_buffers()), backend)


def fingerprint(config: dict[str, Any]) -> torch.Tensor:
    """One int64 per entry of ``config`` (sorted by key), hashing its JSON form; for cross-rank comparison."""
    out = []
    for key in sorted(config):
        blob = json.dumps(config[key], sort_keys=True, default=str).encode()
        out.append(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)
