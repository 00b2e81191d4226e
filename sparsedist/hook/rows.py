"""Naturally sparse gradients (``nn.Embedding(sparse=True)``, ``EmbeddingBag(sparse=True)``): sent as they are.

DDP puts a parameter with a sparse (COO) gradient in a bucket of its own and hands the hook that gradient. Its
non-zero rows are already the selection a compressor would make, and there is nothing left over to keep: every
rank's rows go to every rank (:func:`~sparsedist.collectives.allgather.sparse_allgather`: a header with the byte
count and a "not finite" flag, then the padded payloads), and every rank coalesces the same gathered rows (in rank
order) into the same sparse sum, divided by the world size. Nothing is selected, nothing enters a residual, no compressor
state changes, and the values travel in the gradient's own dtype (``value_dtype`` does not apply: with no
residual to keep the rounding, it would be lost). DGC's momentum correction lives in its compressor, so a sparse
gradient gets none under DGC (the optimizer, which DGC requires to run without momentum, applies it as it is).
With ``compressor="none"`` DDP's own sparse allreduce runs instead, as in plain DDP.

A non-finite value on any rank sets the flag: every rank returns the gradient filled with NaN (GradScaler skips
the step). Cost per rank: ``(P-1) * 16`` header bytes, then ``(P-1) * r_max * (8 d + w b_v)`` bytes for
``r_max`` rows (the most any rank has after coalescing its own), ``d`` sparse dimensions and rows of ``w``
values; the sum is a sort of the ``P * r`` gathered rows.
"""

from __future__ import annotations

import math

import torch

from ..collectives.allgather import sparse_allgather
from ..collectives.backend import completed_future, ring_allreduce_bytes
from ..payload import all_finite
from .plan import Plan
from .units import BucketView

__all__ = ["rows_exchange"]


def rows_exchange(state, view: BucketView, plan: Plan) -> torch.futures.Future:
    """Average ``view``'s sparse gradient over ranks; a completed future of a new coalesced sparse tensor."""
    backend = state.backend
    grad = view.buffer.coalesce()
    before = (backend.bytes_sent, backend.bytes_received)
    finite = all_finite(grad.values())
    sparse_dims, row_shape = grad.sparse_dim(), tuple(grad.shape[grad.sparse_dim():])
    payload = _encode(grad) if finite else torch.empty(0, dtype=torch.uint8, device=grad.device)
    received, flags = sparse_allgather(backend, payload, 0 if finite else 1)
    ok = not any(flags)
    if ok:
        blocks = [_decode(b, sparse_dims, row_shape, grad.dtype) for b in received]
        indices = torch.cat([i for i, _ in blocks], dim=1)
        values = torch.cat([v for _, v in blocks])
        total = torch.sparse_coo_tensor(indices, values, grad.shape, check_invariants=True).coalesce()
        out = torch.sparse_coo_tensor(total.indices(), total.values() / backend.size, grad.shape,
                                      is_coalesced=True, check_invariants=False)
    else:
        out = torch.sparse_coo_tensor(grad.indices(), torch.full_like(grad.values(), float("nan")), grad.shape,
                                      is_coalesced=True, check_invariants=False)
    state.telemetry.record_finite(state.step, ok)
    state.telemetry.record_bucket(
        sent_bytes=backend.bytes_sent - before[0], received_bytes=backend.bytes_received - before[1],
        dense_bytes=ring_allreduce_bytes(view.numel, grad.element_size(), backend.size),
        elements_sent=grad.values().numel() if finite else 0, elements_total=view.numel,
        collective=plan.collective, overlapped=False)
    if state.second_moment is not None:
        for p in view.params:
            state.second_moment.pop(p)  # nothing is selected here: no statistics may linger
    state.planner.end_bucket(state, view)
    return completed_future(out)


def _encode(grad: torch.Tensor) -> torch.Tensor:
    """One rank's rows as bytes: the ``(nnz, sparse_dim)`` int64 indices, then the ``(nnz, ...)`` values."""
    idx = grad.indices().t().reshape(-1).contiguous().view(torch.uint8)
    val = grad.values().contiguous().view(torch.uint8).reshape(-1)
    return torch.cat([idx, val])


def _decode(buf: torch.Tensor, sparse_dims: int, row_shape: tuple, dtype: torch.dtype):
    """``(indices (sparse_dim, nnz) int64, values (nnz, *row_shape))`` from :func:`_encode`'s bytes."""
    esize = torch.empty(0, dtype=dtype).element_size()
    per_row = 8 * sparse_dims + math.prod(row_shape) * esize
    if buf.numel() % per_row:
        raise RuntimeError(f"sparsedist: corrupt sparse-gradient block: {buf.numel()} bytes is not a whole number "
                           f"of {per_row}-byte rows (do all ranks have the same embedding shape and dtype?)")
    nnz = buf.numel() // per_row
    split = nnz * 8 * sparse_dims
    idx = buf[:split].contiguous().view(torch.int64).view(nnz, sparse_dims).t()
    val = buf[split:].contiguous().view(dtype).view(nnz, *row_shape)
    return idx, val
