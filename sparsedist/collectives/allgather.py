"""Sparse allgather: every rank receives every other rank's payload and scatter-adds it, in rank order.

Two transports of the same algorithm:

* :class:`Allgather` (:meth:`~Allgather.reduce`, synchronous): counts differ per rank (threshold and variance
  selection send a variable number of entries, zero included) and gloo's allgather needs equal sizes, so a
  16-byte header ``[payload bytes, flag]`` is allgathered first and the payloads are padded to the largest.
  Every rank issues the same two collectives whatever its count, so an empty rank never hangs; the flag
  announces a non-finite gradient to every rank in the same header.
* :func:`launch_fixed` (asynchronous): when every rank's count is bounded by the configuration (top-k, DGC,
  mask-aware selection), payloads are padded to that bound, so one allgather of equal sizes needs no header and
  no host synchronisation; it returns a future whose callback decodes and sums (local work only). Padding
  entries carry ``-0.0`` at position 0, which adds nothing to any value; a rank whose gradient is not finite
  sends NaN values, which makes the sum non-finite on every rank.

Payloads use :mod:`sparsedist.collectives.wire` (int32 index + value, or Strom's packed 4-byte words).
Cost, per rank: a header allgather ``(P-1)*16`` bytes, then ``(P-1) * k_max * s`` bytes (``2(P-1)`` alphas), a
scatter-add of the ``P*k`` received entries into a zeroed ``n``-vector.
"""

from __future__ import annotations

import torch

from ..payload import accumulator_dtype, finite_flag
from .backend import Backend
from .base import Collective, CostSheet, CostTerms, Reduced
from .wire import decode, encode

__all__ = ["Allgather", "sparse_allgather", "scatter_add", "launch_fixed"]


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


def check_out(out: torch.Tensor | None, numel: int, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> None:
    """Refuse an ``out`` vector (to write a sum into) that is not ``(numel,)``, of ``dtype`` (any floating dtype
    when None) and on ``device`` (when given); None passes."""
    if out is None:
        return
    if out.shape != (numel,) or (out.dtype != dtype if dtype is not None else not out.is_floating_point()):
        raise ValueError(f"out must be a ({numel},) tensor of {dtype or 'a floating dtype'}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if device is not None and out.device != device:
        raise ValueError(f"out must live where the values do ({device}), got {out.device}")


def zeroed(out: torch.Tensor | None, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``out`` zeroed in place, or a new ``(numel,)`` zero vector of ``dtype`` on ``device``."""
    return torch.zeros(numel, dtype=dtype, device=device) if out is None else out.zero_()


def _sum_payloads(total: torch.Tensor, payloads, wire_dtype: torch.dtype,
                  constant: float | None = None) -> torch.Tensor | None:
    """Scatter-add each encoded payload into ``total``, in order (the same order on every rank); returns the
    positions received (int64, duplicates kept), or None when there were no payloads."""
    received = []
    for buf in payloads:
        idx, vals = decode(buf, wire_dtype, constant)
        scatter_add(total, idx, vals)
        received.append(idx)
    return torch.cat(received) if received else None


class Allgather(Collective):
    """Every rank's entries to every rank, summed in rank order (the exact sum; bytes grow as ``(P-1) k``)."""

    name = "allgather"

    def reduce(self, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, constant: float | None = None, dtype: torch.dtype | None = None,
               wire_dtype: torch.dtype | None = None, out: torch.Tensor | None = None, **kw) -> Reduced:
        """See :meth:`Collective.reduce`; ``constant``: every value is +/-constant (Strom's packed words);
        ``dtype``: the dtype of the sum (default: fp32 for half values, else the values' own); ``wire_dtype``:
        the dtype values travel in (default: theirs; they are cast once, while encoding); ``out``: a
        ``(numel,)`` tensor of the sum's dtype to zero and sum into (e.g. the bucket buffer), else a new one."""
        wire_dtype = wire_dtype or values.dtype
        dtype = dtype or accumulator_dtype(wire_dtype)
        check_out(out, numel, dtype)
        payload = encode(indices, values, wire_dtype, constant) if finite else \
            torch.empty(0, dtype=torch.uint8, device=values.device)
        received, flags = sparse_allgather(backend, payload, 0 if finite else 1)
        ok = not any(flags)
        total = zeroed(out, numel, dtype, values.device)
        support = _sum_payloads(total, received if ok else [], wire_dtype, constant)  # rank order
        entry = 4 if constant is not None else 4 + torch.empty(0, dtype=wire_dtype).element_size()
        return Reduced(total, ok, max_count=max(b.numel() for b in received) // entry, support=support)

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        sheet.step(c.P - 1, (c.P - 1) * 16, "allgather")
        if c.k_max > 0:
            sheet.step(c.P - 1, (c.P - 1) * c.k_max * c.s, "allgather")
        sheet.local("packed" if c.b_i == 0 else "sparse", c.k, ops=c.P)  # every payload decoded and added
        sheet.local("dense", c.n)


def launch_fixed(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int, count: int,
                 finite: bool | torch.Tensor, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.futures.Future:
    """Start the fixed-size allgather of this rank's entries; a future of the :class:`Reduced` sum.

    Args:
        backend: a backend with asynchronous primitives (``backend.supports_async``).
        indices: ``(m,)`` int64 bucket positions, ``m <= count``.
        values: ``(m,)`` values in the wire dtype.
        numel: length of the vector.
        count: the bound every rank pads to (the same on every rank; from the configuration).
        finite: whether this rank's gradient is finite: a bool, or a 0-d bool tensor (no host synchronisation).
        dtype: dtype of the sum.
        out: ``(numel,)`` tensor of ``dtype`` to sum into (zeroed and overwritten by the callback, so nothing may
            read it meanwhile), e.g. the bucket buffer: saves allocating a vector and copying it back (on a CPU a
            fresh one is page-faulted in). None: a new vector.

    The sum's finiteness is checked on the positions received (everything else is zero), and the
    :class:`Reduced` names them (``support``), so averaging can divide those alone.
    """
    pad = count - indices.numel()
    if pad < 0:
        raise RuntimeError(f"sparsedist: {indices.numel()} entries selected where at most {count} were configured")
    check_out(out, numel, dtype)
    if pad:
        indices = torch.cat([indices, indices.new_zeros(pad)])
        values = torch.cat([values, values.new_full((pad,), -0.0)])
    if finite is False:
        values = torch.full_like(values, float("nan"))
    elif finite is not True:
        values = torch.where(finite, values, values.new_tensor(float("nan")))
    wire_dtype = values.dtype

    def total(fut: torch.futures.Future) -> Reduced:
        rows = fut.value()
        summed = zeroed(out, numel, dtype, values.device)
        support = _sum_payloads(summed, rows.unbind(0), wire_dtype)  # one row per rank, in rank order
        return Reduced(summed, finite_flag(summed[support]), max_count=count, support=support)

    return backend.allgather_async(encode(indices, values, wire_dtype)).then(total)
