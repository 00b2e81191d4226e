"""``sparse_allreduce``: the dense sum over ranks of one sparse vector per rank, by a chosen algorithm.

The algorithms are SparCML's (:mod:`sparsedist.collectives.sparcml`), the sparse-allgather baseline and a
dense ring allreduce; ``"auto"`` picks one with the alpha-beta model of :mod:`sparsedist.collectives.choose`.
"""

from __future__ import annotations

import torch

from ..payload import accumulator_dtype
from .allgather import Allgather, check_out
from .backend import Backend, TorchBackend
from .base import check_sparse_input
from .choose import EXACT_ALGORITHMS, CostModel
from .dense import dense_sum
from .sparcml import dsar_split_allgather, ssar_recursive_double, ssar_split_allgather

__all__ = ["sparse_allreduce", "ALGORITHMS"]

#: what :func:`sparse_allreduce` accepts: the exact algorithms, or ``"auto"``
ALGORITHMS = EXACT_ALGORITHMS + ("auto",)


def sparse_allreduce(indices: torch.Tensor, values: torch.Tensor, numel: int, algorithm: str = "auto",
                     group=None, backend: Backend | None = None, dense_threshold: float | None = None,
                     cost_model: CostModel | None = None, split_bounds=None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum one sparse vector per rank; every rank gets the dense result.

    Args:
        indices: ``(nnz,)`` int32 or int64 positions in ``[0, numel)``, any order; ``nnz`` may differ per rank and
            be zero. Duplicates are summed (as in :meth:`SparseGrad.to_dense`).
        values: ``(nnz,)`` fp32/fp64/fp16/bf16 values, on the same device as ``indices``. The same dtype on every
            rank.
        numel: length of the dense vector, the same on every rank.
        algorithm: ``"allgather"``, ``"ssar_recursive_double"``, ``"ssar_split_allgather"``,
            ``"dsar_split_allgather"``, ``"dense"`` or ``"auto"`` (the alpha-beta model picks, after one small
            allgather of the per-rank counts). Every rank must pass the same value.
        group: the ``torch.distributed`` process group (default group if None); ignored when ``backend`` is given.
        backend: a :class:`~sparsedist.collectives.backend.Backend` (e.g. the mpi4py one); default
            ``TorchBackend(group)``. Its byte counters record what this call sent and received.
        dense_threshold: SparCML's delta: a stream (or block) switches to dense once
            ``nnz > dense_threshold * length``. Default ``value_bytes / (index_bytes + value_bytes)``, where the
            sparse encoding outgrows the dense one. ``float("inf")`` never switches.
        cost_model: link parameters for ``"auto"`` (default :class:`CostModel()`; measure one with
            :func:`sparsedist.collectives.probe`). Must be the same on every rank.
        split_bounds: the index ranges of the split algorithms (ignored by the others): None = equal lengths
            (SparCML), ``"balanced"`` = Ok-Topk's data-balanced ranges (one more small allreduce), or ``P + 1``
            boundaries from 0 to ``numel``, the same on every rank.
        out: a ``(numel,)`` tensor of ``values.dtype`` on ``values.device`` to write the sum into (what the DDP
            hook does with its bucket buffer: no fresh vector per call), or None for a new one. Its contents are
            overwritten; it must not alias ``indices`` or ``values``.

    Returns:
        ``(numel,)`` tensor, ``values.dtype``, on ``values.device`` (``out`` when given): the sum of every rank's
        vector, bitwise identical on every rank. fp16/bf16 partial sums are accumulated in fp32 and rounded to the
        values' dtype.
    """
    numel = check_sparse_input(indices, values, numel)
    check_out(out, numel, values.dtype, values.device)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"sparse_allreduce: unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if dense_threshold is not None:
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, (int, float)) \
                or not dense_threshold >= 0:
            raise ValueError(f"sparse_allreduce: dense_threshold must be a number >= 0 (a density), got "
                             f"{dense_threshold!r}")
    if backend is None:
        backend = TorchBackend(group)
    elif not isinstance(backend, Backend):
        raise TypeError(f"sparse_allreduce: backend must be a sparsedist Backend, got {type(backend).__name__}")
    if backend.size == 1 or numel == 0:
        acc = accumulator_dtype(values.dtype)
        total = torch.zeros(numel, dtype=acc, device=values.device)
        if indices.numel():
            total.index_add_(0, indices.to(torch.int64), values.to(acc))
        return _into(out, total.to(values.dtype))
    if algorithm == "auto":
        algorithm = _auto(indices, values, numel, backend, dense_threshold, cost_model)
    if algorithm == "dense":
        return _into(out, dense_sum(backend, indices, values, numel))
    if algorithm == "allgather":
        direct = out is not None and accumulator_dtype(values.dtype) == values.dtype  # no rounding to do
        total = Allgather().reduce(indices.to(torch.int64), values, numel, backend, out=out if direct else None)
        return total.total if direct else _into(out, total.total.to(values.dtype))
    if algorithm == "ssar_recursive_double":
        return ssar_recursive_double(backend, indices, values, numel, dense_threshold=dense_threshold, out=out)
    split = ssar_split_allgather if algorithm == "ssar_split_allgather" else dsar_split_allgather
    return split(backend, indices, values, numel, dense_threshold=dense_threshold, split_bounds=split_bounds,
                 out=out)


def _into(out: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor:
    """``total``, copied into ``out`` when one is given."""
    return total if out is None else out.copy_(total)


def _auto(indices, values, numel, backend, dense_threshold, cost_model) -> str:
    """Agree on the per-rank counts (one allgather of ``[nnz, numel]``) and let the model pick."""
    head = torch.tensor([indices.numel(), numel], dtype=torch.int64, device=values.device)
    rows = backend.allgather(head).tolist()
    numels = {r[1] for r in rows}
    if len(numels) != 1:
        raise ValueError(f"sparse_allreduce: ranks disagree on numel ({sorted(numels)}); every rank must pass the "
                         f"length of the same dense vector")
    counts = [r[0] for r in rows]
    model = cost_model if cost_model is not None else CostModel()
    choice = model.choose(numel, sum(counts) / len(counts), backend.size, nnz_max=max(counts),
                          value_bytes=values.element_size(), dense_threshold=dense_threshold,
                          candidates=EXACT_ALGORITHMS)
    return choice.algorithm
