"""Sparse back-propagated errors as modules: meProp linear layers and a generic sparse-error op.

* :class:`SparseBackpropLinear` — an ``nn.Linear`` whose backward keeps only ``k`` output columns
  (meProp's unified top-k, Sun et al. 2017).
* :class:`SparseError` / :func:`sparse_error` — identity forward, per-row top-k of the error backward.
* :func:`convert_linear_to_sparse_backprop` — swap a model's ``nn.Linear`` layers in place.

The math lives in :mod:`sparsedist.nn.functional`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional as SF
from .functional import sparse_error

__all__ = [
    "SparseBackpropLinear",
    "SparseError",
    "sparse_error",
    "convert_linear_to_sparse_backprop",
    "dense_backward",
]


class SparseBackpropLinear(nn.Linear):
    """``nn.Linear`` with meProp's sparsified backward pass (Sun et al. 2017, unified top-k).

    The forward pass, the parameters (``weight`` ``(out, in)``, ``bias`` ``(out,)``), their initialisation
    and the ``state_dict`` keys are exactly those of ``nn.Linear``: a checkpoint of one loads into the
    other. In the backward pass, with ``dy`` of shape ``(..., out)`` flattened to ``(N, out)``, only the
    ``k`` output columns with the largest ``sum_n |dy[n, j]|`` are back-propagated: ``dx = dy_k W_k``
    (a ``(N, k) x (k, in)`` matmul), ``k`` non-zero rows in ``weight.grad``, the bias gets its full gradient.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        k: int in ``[1, out_features]`` (columns kept), or float in ``(0, 1]`` (fraction of
            ``out_features``, rounded up). Stored as the resolved int in ``self.k``.

    Attributes:
        sparse_backward: ``True`` (default) for the meProp backward; ``False`` makes the layer a plain
            ``nn.Linear`` (see :func:`dense_backward`).

    Input ``(..., in_features)``, output ``(..., out_features)``, any float dtype (autocast included).
    """

    def __init__(self, in_features: int, out_features: int, k, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = SF.resolve_k(k, out_features)
        self.sparse_backward = True

    @property
    def error_density(self) -> float:
        """Fraction of output columns whose error is back-propagated, ``k / out_features``."""
        return self.k / self.out_features

    def forward(self, x: Tensor) -> Tensor:
        if not self.sparse_backward:
            return F.linear(x, self.weight, self.bias)
        return SF.sparse_backprop_linear(x, self.weight, self.bias, self.k)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, k) -> "SparseBackpropLinear":
        """A :class:`SparseBackpropLinear` that *shares* ``linear``'s parameters (same ``Parameter`` objects,
        so an optimizer built on the old layer keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        if parametrize.is_parametrized(linear):
            raise ValueError(
                "this Linear has parametrizations (torch.nn.utils.parametrize); convert to SparseBackpropLinear "
                "before registering them"
            )
        new = cls(linear.in_features, linear.out_features, k, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new


class SparseError(nn.Module):
    """Identity forward; backward keeps the ``k`` largest-magnitude error entries of each row.

    Rows are the last dimension: one example for ``(B, F)``, one token position for ``(B, T, F)``. Place
    it between any two layers, e.g. between transformer blocks, to sparsify the error that reaches the
    layers below. See :func:`sparsedist.nn.functional.sparse_error`.

    Args:
        k: int ``>= 1`` (count; must be ``<= F``, checked at forward) or float in ``(0, 1]`` (fraction of ``F``).

    Attributes:
        sparse_backward: ``True`` (default); ``False`` makes the module a plain identity (see :func:`dense_backward`).
    """

    def __init__(self, k) -> None:
        super().__init__()
        SF._check_k_spec(k, "k")
        self.k = k
        self.sparse_backward = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.sparse_backward:
            return x
        return sparse_error(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def convert_linear_to_sparse_backprop(
    model: nn.Module,
    k,
    *,
    filter: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace a model's ``nn.Linear`` layers, in place, by :class:`SparseBackpropLinear` sharing their parameters.

    Only modules whose class is exactly ``nn.Linear`` are converted: subclasses are skipped, notably
    ``nn.MultiheadAttention.out_proj``, whose weight MHA uses directly without calling the layer (converting
    it would silently change nothing). Convert before wrapping in DDP, before registering parametrizations,
    and before registering hooks on these layers (the module objects are replaced; the ``Parameter`` objects
    are kept, so an existing optimizer still works and ``state_dict`` keys do not change).

    Args:
        model: the model to modify (not itself an ``nn.Linear``).
        k: int (columns kept per layer; must be ``<= out_features`` of every converted layer) or float in
            ``(0, 1]`` (fraction of each layer's ``out_features``, rounded up) — e.g. ``k=0.1`` keeps 10%.
        filter: optional ``filter(qualified_name, linear) -> bool`` choosing the layers (e.g. leave the
            output head dense: ``filter=lambda n, m: n != "head"``).

    Returns:
        The qualified names of the converted layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    SF._check_k_spec(k, "k")
    if type(model) is nn.Linear:
        raise ValueError(
            "model is itself an nn.Linear and cannot be replaced in place; use SparseBackpropLinear.from_linear"
        )
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name and type(m) is nn.Linear and (filter is None or filter(name, m))
    ]
    # Validate every layer before changing anything.
    for name, m in targets:
        try:
            SF.resolve_k(k, m.out_features)
        except ValueError as e:
            raise ValueError(
                f"layer {name!r} (out_features={m.out_features}): {e}; or exclude it with filter="
            ) from None
        if parametrize.is_parametrized(m):
            raise ValueError(
                f"layer {name!r} has parametrizations; convert to SparseBackpropLinear before registering them"
            )
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseBackpropLinear.from_linear(m, k))
    return [name for name, _ in targets]


@contextmanager
def dense_backward(model: nn.Module) -> Iterator[list[str]]:
    """Temporarily turn off error sparsity in every :class:`SparseBackpropLinear` and :class:`SparseError` of ``model``.

    For steps that need the true dense gradient, e.g. RigL's mask-update steps (growth is scored by the
    dense weight gradient, which meProp would leave zero outside ``k`` rows). The choice is made in the
    forward pass, so run both forward and backward inside the block::

        with dense_backward(model):
            loss_fn(model(x), y).backward()

    Yields the names of the affected modules; restores each module's previous ``sparse_backward`` on exit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseBackpropLinear, SparseError))]
    saved = [m.sparse_backward for _, m in mods]
    for _, m in mods:
        m.sparse_backward = False
    try:
        yield [n for n, _ in mods]
    finally:
        for (_, m), flag in zip(mods, saved):
            m.sparse_backward = flag
