"""Dense sums: the ``"dense"`` algorithm (densify locally, ring allreduce) and the values-only allreduce used when
every rank holds the same indices (shared-seed rand-k, identical model-sparsity masks), which needs no indices.

Cost of ``"dense"``, per rank: ``2(P-1)`` alphas and ``2(P-1)/P * n * b_v`` bytes (ring allreduce), zero-fill and
scatter of ``n + k`` elements. The values-only allreduce costs the same with ``k`` in place of ``n``.
"""

from __future__ import annotations

import torch

from ..payload import accumulator_dtype, all_finite
from .allgather import check_out, scatter_add, zeroed
from .backend import Backend, ring_allreduce_bytes
from .base import Collective, CostSheet, CostTerms, Reduced

__all__ = ["DenseSum", "ValuesAllreduce", "dense_sum"]


def dense_sum(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """Densify locally (duplicates summed in the accumulation dtype), then a ring allreduce of ``numel`` values in
    ``values.dtype``; returns the ``(numel,)`` sum in ``values.dtype``."""
    acc = accumulator_dtype(values.dtype)
    out = torch.zeros(numel, dtype=acc, device=values.device)
    if indices.numel():
        out.index_add_(0, indices.to(torch.int64), values.to(acc))
    return backend.allreduce(out.to(values.dtype))


class DenseSum(Collective):
    """The sparse vector densified, then summed by a ring allreduce (the exact sum; bytes independent of k)."""

    name = "dense"

    def reduce(self, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               **kw) -> Reduced:
        """See :meth:`Collective.reduce`; ``out``: a ``(numel,)`` tensor of the sum's dtype to sum into (e.g. the
        bucket buffer), else a new one."""
        dtype = dtype or accumulator_dtype(values.dtype)
        check_out(out, numel, dtype, values.device)
        if not finite:  # one NaN entry: the sum is not finite on every rank
            indices = torch.zeros(1, dtype=torch.int64, device=values.device)
            values = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
        total = dense_sum(backend, indices, values, numel)
        out = zeroed(out, numel, dtype, values.device).add_(total)
        return Reduced(out, all_finite(out))

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        sheet.step(2 * (c.P - 1), ring_allreduce_bytes(c.n, c.b_v, c.P), "allreduce")
        sheet.local("dense", c.n)  # zero-fill and scatter: element-wise work, no sort
        sheet.local("dense", c.k)


class ValuesAllreduce(Collective):
    """Every rank holds the same indices: allreduce the values alone, with one more element that flags a rank
    whose gradient is not finite. ``indices=None`` means the values cover positions ``0 .. numel-1`` in order
    (no scatter). Synchronous (:meth:`reduce`) or asynchronous (:meth:`launch`), with the same arithmetic."""

    name = "values_allreduce"

    def reduce(self, indices: torch.Tensor | None, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               **kw) -> Reduced:
        """See :meth:`Collective.reduce`; ``out``: a ``(numel,)`` tensor of the sum's dtype to zero and scatter
        the sum into (used only with ``indices``), else a new one."""
        if indices is not None:
            check_out(out, numel, dtype or accumulator_dtype(values.dtype), values.device)
        vals = self._with_flag(values, finite)
        return self._total(backend.allreduce(vals), indices, numel, dtype, out)

    def launch(self, indices: torch.Tensor | None, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool | torch.Tensor = True, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.futures.Future:
        """Start the allreduce; a future of the :class:`Reduced` sum (its callback does local work only).
        ``out``: as in :func:`~.allgather.launch_fixed`, a ``(numel,)`` tensor the callback zeroes and scatters
        the sum into (used only with ``indices``)."""
        if indices is not None:
            check_out(out, numel, dtype or accumulator_dtype(values.dtype), values.device)
        vals = self._with_flag(values, finite)
        return backend.allreduce_async(vals).then(lambda f: self._total(f.value(), indices, numel, dtype, out))

    @staticmethod
    def _with_flag(values: torch.Tensor, finite: bool | torch.Tensor) -> torch.Tensor:
        if isinstance(finite, bool):
            flag = torch.tensor([0.0 if finite else 1.0], dtype=values.dtype, device=values.device)
        else:  # a device flag: no host synchronisation
            flag = (~finite).to(values.dtype).reshape(1)
        return torch.cat([values, flag])

    @staticmethod
    def _total(vals: torch.Tensor, indices: torch.Tensor | None, numel: int, dtype: torch.dtype | None,
               out: torch.Tensor | None = None) -> Reduced:
        dtype = dtype or accumulator_dtype(vals.dtype)
        ok = not bool(vals[-1] != 0) and all_finite(vals[:-1]) if vals.device.type == "cpu" else \
            (vals[-1] == 0) & torch.isfinite(vals[:-1].sum(dtype=dtype))
        if indices is None:
            return Reduced(vals[:-1].to(dtype), ok)
        return Reduced(scatter_add(zeroed(out, numel, dtype, vals.device), indices, vals[:-1]), ok, support=indices)

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        sheet.step(2 * (c.P - 1), ring_allreduce_bytes(int(c.k) + 1, c.b_v, c.P), "allreduce")
