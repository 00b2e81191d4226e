"""Sparse allgather: every rank receives every other rank's encoded payload and scatter-adds it.

Counts differ per rank (threshold and variance selection send a variable number of entries, zero included),
and gloo's allgather needs equal sizes, so a small header ``[payload bytes, flag]`` is allgathered first and
the payloads are padded to the largest. Every rank issues the same two collectives whatever its count, so an
empty rank never hangs. The flag lets a rank announce a non-finite gradient to all others in the same header.
"""

from __future__ import annotations

import torch

from .backend import Backend

__all__ = ["sparse_allgather", "scatter_add"]


def sparse_allgather(backend: Backend, payload: torch.Tensor, flag: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """Allgather one uint8 payload per rank.

    Args:
        backend: the communicator.
        payload: this rank's encoded payload, ``(nbytes,)`` uint8 (may be empty).
        flag: a small integer announced to every rank (e.g. 1 = "my gradient is not finite").

    Returns:
        ``(payloads, flags)``: rank r's payload (uint8, unpadded) and flag, for every rank r.
    """
    if backend.size == 1:
        return [payload], [int(flag)]
    header = torch.tensor([payload.numel(), int(flag)], dtype=torch.int64, device=payload.device)
    headers = backend.allgather(header).tolist()
    sizes = [h[0] for h in headers]
    flags = [h[1] for h in headers]
    width = max(sizes)
    if width == 0:
        return [payload.new_empty(0) for _ in sizes], flags
    padded = payload.new_zeros(width)
    padded[: payload.numel()] = payload
    rows = backend.allgather(padded)
    return [rows[r, : sizes[r]] for r in range(backend.size)], flags


def scatter_add(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices] += values`` (duplicates summed), in ``out``'s dtype; returns ``out``."""
    if indices.numel():
        out.index_add_(0, indices.to(out.device, torch.int64), values.to(out.device, out.dtype))
    return out
