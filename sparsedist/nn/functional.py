"""Ephemeral sparsity as pure functions: sparse activations and sparse back-propagated errors.

Everything here is a function of tensors (no modules, no state); :mod:`sparsedist.nn.activations` and
:mod:`sparsedist.nn.errors` wrap these in thin ``nn.Module`` classes (the nupic.torch split between
``functions/k_winners.py`` and ``modules/k_winners.py``).

"Example" and "row"
    Selection is per row over the last dimension: for ``x`` of shape ``(B, F)`` a row is one example;
    for ``(B, T, F)`` (a sequence model) a row is one position ``(b, t)``, i.e. each token's feature
    vector gets its own ``k`` winners. Any number of leading dimensions is accepted.

Tie-breaking
    Every selection keeps *exactly* ``k`` entries. Among equal values the lower index along the last
    dimension wins, on every device, so the result is deterministic (``torch.topk`` alone does not
    document which of several equal values it returns).

Papers
    * k-winners-take-all activations: Makhzani & Frey, "k-Sparse Autoencoders" (ICLR 2014);
      Ahmad & Scheinkman, "How Can We Be So Dense?" (2019, nupic.torch).
    * Threshold activations (FATReLU): Kurtz et al., "Inducing and Exploiting Activation Sparsity for
      Fast Neural Network Inference" (ICML 2020).
    * Sparse back-propagation (meProp, unified top-k): Sun, Ren, Ma & Wang, "meProp: Sparsified Back
      Propagation for Accelerated Deep Learning with Reduced Overfitting" (ICML 2017).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_nonnegative

__all__ = [
    "resolve_k",
    "topk_mask",
    "kwinners",
    "threshold_activation",
    "sparse_error",
    "unified_topk_columns",
    "sparse_backprop_linear",
]


def _check_k_spec(k, name: str = "k") -> None:
    """Validate a k specification without knowing the size it applies to."""
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, numbers.Real)):
        raise TypeError(
            f"{name} must be an int >= 1 (a count) or a float in (0, 1] (a fraction of the feature size), "
            f"got {type(k).__name__} {k!r}"
        )
    if isinstance(k, numbers.Integral):
        if int(k) < 1:
            raise ValueError(f"{name} must be >= 1 when given as an int (a count), got {k}")
    else:
        kf = float(k)
        if not math.isfinite(kf) or not 0.0 < kf <= 1.0:
            raise ValueError(
                f"{name} given as a float is a fraction and must lie in (0, 1], got {k!r}; "
                f"pass an int for an absolute count"
            )


def resolve_k(k, n: int, name: str = "k") -> int:
    """Turn a k specification into a count for a dimension of size ``n``.

    Args:
        k: an ``int >= 1`` (an absolute count, must be ``<= n``) or a ``float`` in ``(0, 1]`` (a fraction
            of ``n``; the count is ``max(1, ceil(k * n))``). ``bool`` is rejected.
        n: the size of the dimension the selection runs over (``>= 1``).
        name: the argument's name, used in error messages.

    Returns:
        The count, an ``int`` in ``[1, n]``.

    Raises:
        TypeError: ``k`` is neither an int nor a float.
        ValueError: ``k < 1``, a fraction outside ``(0, 1]``, or an int count larger than ``n``.
    """
    _check_k_spec(k, name)
    n = int(n)
    if n < 1:
        raise ValueError(f"cannot select {name} entries from an empty dimension (size {n})")
    if isinstance(k, numbers.Integral):
        k = int(k)
        if k > n:
            raise ValueError(
                f"{name}={k} is larger than the size of the dimension it selects from ({n}); "
                f"use {name} <= {n}, or a float fraction such as {name}=0.1"
            )
        return k
    return max(1, min(n, math.ceil(float(k) * n)))


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of every row (last dimension) of ``x``.

    Exactly ``k`` entries per row are ``True``; among equal values the lowest index wins. A row that
    contains NaN keeps its NaN positions (so a divergence stays visible downstream) and nothing else.

    Args:
        x: floating tensor of shape ``(..., F)``, any float dtype, any device.
        k: int in ``[1, F]``.

    Returns:
        ``torch.bool`` tensor with the shape of ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features to select from)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int (resolve fractions with resolve_k first), got {type(k).__name__}")
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}] (the size of the last dimension of x)")
    with torch.no_grad():
        if k == n:
            return torch.ones_like(x, dtype=torch.bool)
        # k-th largest value per row; topk puts NaN above everything, so a NaN row gives a NaN threshold.
        kth = torch.topk(x, k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        if x.device.type == "cpu":
            # Fast path: without ties at the k-th value, ">= kth" already selects exactly k per row. The
            # check needs a host sync, which is free on CPU; accelerators take the sync-free path below.
            mask = x >= kth
            if bool((mask.sum(dim=-1) == k).all()):
                return mask
        above = x > kth
        ties = x == kth
        missing = k - above.sum(dim=-1, keepdim=True)  # how many of the tied entries are still needed
        mask = above | (ties & (ties.cumsum(dim=-1) <= missing))
        if x.is_floating_point():
            mask |= torch.isnan(x)
        return mask


def kwinners(x: Tensor, k: int) -> Tensor:
    """k-winners-take-all: keep the ``k`` largest values of each row, zero the rest.

    ``out = x`` where ``x`` is among the row's ``k`` largest values (ties: lowest index first), else ``0``.
    The gradient flows to the winners only (``dx = dout * mask``). Differentiable to any order; works
    with ``torch.autograd.gradcheck``.

    Args:
        x: tensor of shape ``(..., F)`` (e.g. ``(B, F)`` or ``(B, T, F)``), any float dtype.
        k: int ``>= 1`` (count) or float in ``(0, 1]`` (fraction of ``F``); a count larger than ``F``
            raises ``ValueError``.

    Returns:
        Tensor with the shape and dtype of ``x`` holding exactly ``k`` (possibly zero-valued) winners per row.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features to select from)")
    k = resolve_k(k, x.shape[-1])
    if k == x.shape[-1]:
        return x
    return x.masked_fill(~topk_mask(x, k), 0)


def _check_threshold(threshold) -> float:
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a scalar, got a tensor of shape {tuple(threshold.shape)}")
        threshold = threshold.item()
    return check_nonnegative(threshold, "threshold")


def threshold_activation(x: Tensor, threshold: float) -> Tensor:
    """FATReLU (Kurtz et al. 2020): ``out = x if x > threshold else 0``, element-wise.

    With ``threshold = 0`` this is ReLU. The gradient passes where the input was kept (``x > threshold``)
    and is zero elsewhere. NaN inputs are kept (they propagate).

    Args:
        x: tensor of any shape, any float dtype.
        threshold: finite real number ``>= 0``.

    Returns:
        Tensor with the shape and dtype of ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    t = _check_threshold(threshold)
    return x.masked_fill(x <= t, 0)


class _SparseError(torch.autograd.Function):
    """Identity forward; backward keeps the k largest-|grad| entries of every row."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:
            return None, None
        mask = topk_mask(grad.detach().abs(), ctx.k)
        # masked_fill is differentiable in grad, so double backward works.
        return grad.masked_fill(~mask, 0), None


def sparse_error(x: Tensor, k) -> Tensor:
    """Identity in the forward pass; in the backward pass keep the ``k`` largest-magnitude error entries.

    The back-propagated error ``d loss / d x`` is sparsified per row (last dimension): for ``(B, F)`` a row
    is one example, for ``(B, T, F)`` a row is one token position ``(b, t)``. Exactly ``k`` entries per row
    are kept (ties: lowest index first); the rest are set to zero before the error reaches the layers
    below. Placeable between any two layers (e.g. between transformer blocks). A generalisation of meProp's
    per-example top-k (Sun et al. 2017) to an arbitrary point of the network.

    Args:
        x: tensor of shape ``(..., F)``, any float dtype.
        k: int ``>= 1`` (count, ``<= F``) or float in ``(0, 1]`` (fraction of ``F``).

    Returns:
        ``x`` unchanged (a view), whose gradient will be sparsified. Do not modify it in place (autograd
        forbids in-place changes to a custom Function's view output); use ``y = y + ...``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features to select from)")
    k = resolve_k(k, x.shape[-1])
    if k == x.shape[-1] or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _SparseError.apply(x, k)


def unified_topk_columns(grad_output: Tensor, k: int) -> Tensor:
    """meProp's unified top-k: the ``k`` output columns with the largest summed ``|dy|``.

    The score of column ``j`` is ``sum_{all leading dims} |grad_output[..., j]|``, i.e. summed over the
    batch (and over time for sequences), so one set of columns is shared by the whole batch and the
    backward matmuls shrink from ``out`` to ``k`` columns. Ties: lowest index first.

    Args:
        grad_output: tensor of shape ``(..., out)``.
        k: int in ``[1, out]``.

    Returns:
        ``torch.int64`` tensor of shape ``(k,)`` with the selected column indices (in decreasing score).
    """
    out = grad_output.shape[-1]
    if not 1 <= k <= out:
        raise ValueError(f"k={k} must lie in [1, {out}] (the number of output columns)")
    with torch.no_grad():
        low = grad_output.dtype in (torch.float16, torch.bfloat16)
        scores = grad_output.reshape(-1, out).abs().sum(dim=0, dtype=torch.float32 if low else None)
        order = torch.sort(scores, descending=True, stable=True).indices
        return order[:k]


class _SparseBackpropLinear(torch.autograd.Function):
    """y = x W^T + b; backward restricted to the k unified-top-k output columns (meProp)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, k: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.k = k
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        k = ctx.k
        out_features, in_features = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dy = grad_output.reshape(-1, out_features)
        # Under autocast the forward ran in a lower precision: do the backward matmuls in dy's dtype and
        # return each gradient in its input's dtype.
        cdt = dy.dtype
        grad_x = grad_w = grad_b = None
        if need_b and ctx.has_bias:
            grad_b = dy.sum(dim=0).to(weight.dtype)  # the bias gets the full (dense) gradient
        if need_x or need_w:
            idx = unified_topk_columns(dy, k)
            dy_k = dy.index_select(1, idx)  # (N, k)
            if need_x:
                w_k = weight.index_select(0, idx).to(cdt)  # (k, in): only k rows of W are read
                grad_x = (dy_k @ w_k).to(x.dtype).reshape(x.shape)
            if need_w:
                x2 = x.reshape(-1, in_features).to(cdt)
                dw_k = dy_k.t() @ x2  # (k, in)
                grad_w = torch.zeros_like(weight)
                grad_w.index_copy_(0, idx, dw_k.to(weight.dtype))
        return grad_x, grad_w, grad_b, None


def sparse_backprop_linear(x: Tensor, weight: Tensor, bias, k: int) -> Tensor:
    """A linear layer with meProp's sparsified back-propagation (Sun et al. 2017, unified top-k).

    Forward: exactly ``F.linear(x, weight, bias)``. Backward: with ``dy = d loss / d y`` reshaped to
    ``(N, out)`` (``N`` = product of the leading dimensions), the ``k`` columns with the largest
    ``sum_n |dy[n, j]|`` are kept (:func:`unified_topk_columns`); then

    * ``dx = dy[:, idx] @ weight[idx]`` (a ``(N, k) x (k, in)`` matmul: only those ``k`` rows of ``W`` are read),
    * ``dW[idx] = dy[:, idx]^T @ x`` and every other row of ``dW`` is zero (``k`` non-zero rows),
    * ``db = dy.sum(0)``, the full bias gradient.

    The backward matmuls really are ``k / out`` of the dense ones (gathered with ``index_select``), not a
    masked dense product. When ``k == out`` this is plain ``F.linear``.

    Args:
        x: input of shape ``(..., in)``, float dtype.
        weight: ``(out, in)``.
        bias: ``(out,)`` or ``None``.
        k: int ``>= 1`` (count, ``<= out``) or float in ``(0, 1]`` (fraction of ``out``).

    Returns:
        ``(..., out)``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor of shape (out_features, in_features)")
    k = resolve_k(k, weight.shape[0])
    if k == weight.shape[0]:
        return F.linear(x, weight, bias)
    return _SparseBackpropLinear.apply(x, weight, bias, k)
