"""``sparse_allreduce``: the dense sum over ranks of one sparse vector per rank, by a chosen algorithm.

The algorithms are SparCML's (:mod:`sparsedist.collectives.sparcml`), the sparse-allgather baseline and a
dense ring allreduce; ``"auto"`` picks one with the alpha-beta model of :mod:`sparsedist.collectives.choose`.
"""

from __future__ import annotations

import torch

from . import sparcml
from .backend import Backend, TorchBackend
from .choose import EXACT_ALGORITHMS, CostModel

__all__ = ["sparse_allreduce", "ALGORITHMS", "check_sparse_input"]

ALGORITHMS = ("allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather", "dense", "auto")


def check_sparse_input(indices, values, numel, *, where: str = "sparse_allreduce") -> int:
    """Validate one rank's sparse vector; returns ``numel`` as an int. Raises ``TypeError``/``ValueError``."""
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: indices and values must be torch.Tensors, got {type(indices).__name__} "
                        f"and {type(values).__name__}")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"{where}: indices must be an integer tensor (int32 or int64), got {indices.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{where}: values must be floating point (fp32, fp64, fp16, bf16), got {values.dtype}; "
                        f"cast them with values.float()")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{where}: indices and values must be 1-D, got shapes {tuple(indices.shape)} and "
                         f"{tuple(values.shape)}; flatten them (and offset the indices) first")
    if indices.numel() != values.numel():
        raise ValueError(f"{where}: {indices.numel()} indices but {values.numel()} values; they must pair up")
    if indices.device != values.device:
        raise ValueError(f"{where}: indices are on {indices.device} but values on {values.device}; move them "
                         f"to one device")
    if isinstance(numel, bool) or not isinstance(numel, int):
        try:
            import numpy as np  # numpy integers are fine
            ok = isinstance(numel, np.integer)
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise TypeError(f"{where}: numel must be an int, got {type(numel).__name__}")
    numel = int(numel)
    if numel < 0:
        raise ValueError(f"{where}: numel must be >= 0, got {numel}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: index {bad} is outside [0, numel={numel}); every index must address an "
                             f"element of the dense vector")
    return numel


def sparse_allreduce(indices: torch.Tensor, values: torch.Tensor, numel: int, algorithm: str = "auto",
                     group=None, backend: Backend | None = None, dense_threshold: float | None = None,
                     cost_model: CostModel | None = None, split_bounds=None) -> torch.Tensor:
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
            :func:`sparsedist.collectives.choose.probe`). Must be the same on every rank.
        split_bounds: the index ranges of the split algorithms (ignored by the others): None = equal lengths
            (SparCML), ``"balanced"`` = Ok-Topk's data-balanced ranges (one more small allreduce), or ``P + 1``
            boundaries from 0 to ``numel``, the same on every rank.

    Returns:
        ``(numel,)`` tensor, ``values.dtype``, on ``values.device``: the sum of every rank's vector, bitwise
        identical on every rank. fp16/bf16 partial sums are accumulated in fp32 and rounded to the values' dtype.
    """
    numel = check_sparse_input(indices, values, numel)
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
        out = torch.zeros(numel, dtype=values.dtype, device=values.device)
        if indices.numel():
            acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
            out = out.to(acc).index_add_(0, indices.to(torch.int64), values.to(acc)).to(values.dtype)
        return out
    if algorithm == "auto":
        algorithm = _auto(indices, values, numel, backend, dense_threshold, cost_model)
    if algorithm == "dense":
        return _dense(backend, indices, values, numel)
    if algorithm == "allgather":
        return sparcml.sparse_allgather_sum(backend, indices, values, numel)
    fn = {"ssar_recursive_double": sparcml.ssar_recursive_double,
          "ssar_split_allgather": sparcml.ssar_split_allgather,
          "dsar_split_allgather": sparcml.dsar_split_allgather}[algorithm]
    if algorithm == "ssar_recursive_double":
        return fn(backend, indices, values, numel, dense_threshold=dense_threshold)
    return fn(backend, indices, values, numel, dense_threshold=dense_threshold, split_bounds=split_bounds)


def _dense(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """Densify locally, then a ring allreduce of ``numel`` values."""
    acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = torch.zeros(numel, dtype=acc, device=values.device)
    if indices.numel():
        out.index_add_(0, indices.to(torch.int64), values.to(acc))
    out = out.to(values.dtype)
    return backend.allreduce(out)


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
