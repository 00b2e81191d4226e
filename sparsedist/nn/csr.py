"""A linear layer stored and computed as a ``torch.sparse`` CSR matrix, for fixed weight masks.

Model sparsity (RigL, static masks) normally keeps a dense weight with zeros in it: the matmuls stay
dense and cost the same time as without the mask. :class:`CSRLinear` stores only the active weights
(``nnz`` values plus CSR indices) and runs sparse x dense kernels, so the work scales with the number of
active weights:

* forward ``y = x W^T + b`` as ``(W_csr @ x^T)^T`` (sparse x dense),
* backward ``dx = dy W`` as ``(W^T_csr @ dy^T)^T`` (the transposed pattern is precomputed),
* ``d values = (dy^T x)`` sampled at the active positions only, with ``torch.sparse.sampled_addmm``
  (an SDDMM; the dense ``dW`` is never formed).

Whether this is faster than the dense matmul depends on the sparsity, the sizes and the backend: run
``benchmarks/ephemeral_sparsity.py`` (it prints the measured ratio). The mask is fixed: to change the
pattern (a RigL update) rebuild the layer with :meth:`CSRLinear.from_dense` and :meth:`to_dense`.
On CPU the sparse kernels support float32 and float64 only (not float16/bfloat16).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

__all__ = ["CSRLinear"]


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # The indices are built by this module and valid by construction: skip the invariant checks, and keep
    # torch's one-time "CSR support is in beta" notice out of users' logs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _CSRLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, crow, col, crow_t, col_t, perm_t, out_features, in_features):
        w = _csr(crow, col, values, (out_features, in_features))
        x2 = x.reshape(-1, in_features)
        y = (w @ x2.t()).t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, values, crow, col, crow_t, col_t, perm_t)
        ctx.shapes = (out_features, in_features, x.shape)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2, values, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
        out_features, in_features, x_shape = ctx.shapes
        dy = grad_out.reshape(-1, out_features)
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            wt = _csr(crow_t, col_t, values[perm_t], (in_features, out_features))
            dx = (wt @ dy.t()).t().reshape(x_shape)
        if ctx.needs_input_grad[1]:
            pattern = _csr(crow, col, torch.zeros_like(values), (out_features, in_features))
            dvalues = torch.sparse.sampled_addmm(pattern, dy.t(), x2, beta=0.0, alpha=1.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=0)
        return dx, dvalues, dbias, None, None, None, None, None, None, None


class CSRLinear(nn.Module):
    """Linear layer whose weight is a fixed-pattern sparse CSR matrix with trainable values.

    Build it from a dense weight and a boolean mask (:meth:`from_dense`) or from an ``nn.Linear``
    (:meth:`from_linear`). Positions where the mask is ``True`` are stored even if their value is 0.

    Attributes:
        values: ``nn.Parameter`` of shape ``(nnz,)``, the active weights in row-major (CSR) order.
        bias: ``nn.Parameter`` ``(out_features,)`` or ``None``.
        crow_indices, col_indices: int64 buffers, the CSR pattern of ``W`` ``(out_features, in_features)``.
        crow_indices_t, col_indices_t, perm_t: int64 buffers, the pattern of ``W^T`` and the permutation
            with ``values[perm_t]`` in ``W^T``'s CSR order (used by the backward pass).

    Input ``(..., in_features)``, output ``(..., out_features)``; float32/float64 on CPU.
    """

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError("weight must be a floating 2-D tensor of shape (out_features, in_features)")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(
                f"mask must be a torch.bool tensor of the weight's shape {tuple(weight.shape)}, "
                f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
            )
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
        out_features, in_features = weight.shape
        self.out_features, self.in_features = int(out_features), int(in_features)
        weight = weight.detach()
        mask = mask.to(weight.device)
        crow, col = self._pattern(mask)
        crow_t, col_t = self._pattern(mask.t())
        # position of every active entry in row-major order, read in W^T's row-major order
        pos = torch.full(mask.shape, -1, dtype=torch.int64, device=weight.device)
        pos[mask] = torch.arange(int(mask.sum()), device=weight.device)
        perm_t = pos.t()[mask.t()]
        self.values = nn.Parameter(weight[mask].clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("crow_indices_t", crow_t)
        self.register_buffer("col_indices_t", col_t)
        self.register_buffer("perm_t", perm_t)

    @staticmethod
    def _pattern(mask: Tensor) -> tuple[Tensor, Tensor]:
        counts = mask.sum(dim=1)
        crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        crow[1:] = counts.cumsum(0)
        col = mask.nonzero()[:, 1].contiguous()
        return crow, col

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> "CSRLinear":
        """Build from a dense ``(out, in)`` weight, a ``torch.bool`` mask of the same shape and an optional bias."""
        return cls(weight, mask, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None) -> "CSRLinear":
        """Build from an ``nn.Linear``; ``mask`` defaults to ``linear.weight != 0``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        return cls(w, (w != 0) if mask is None else mask, linear.bias)

    @property
    def nnz(self) -> int:
        """Number of stored (active) weights."""
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """``nnz / (out_features * in_features)``."""
        return self.nnz / (self.out_features * self.in_features)

    def weight_csr(self) -> Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` (shares ``values``' storage)."""
        return _csr(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))

    def to_dense(self) -> tuple[Tensor, Tensor]:
        """``(weight, mask)``: the dense ``(out, in)`` weight (zeros off the pattern) and the boolean mask."""
        w = self.weight_csr().detach().to_dense()
        ones = torch.ones_like(self.values, dtype=torch.float32).detach()
        mask = _csr(self.crow_indices, self.col_indices, ones, (self.out_features, self.in_features)).to_dense().bool()
        return w, mask

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        return _CSRLinearFn.apply(
            x, self.values, self.bias, self.crow_indices, self.col_indices,
            self.crow_indices_t, self.col_indices_t, self.perm_t, self.out_features, self.in_features,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pattern is state: a checkpoint with a different nnz resizes values and the index buffers
        # before loading (this replaces the ``values`` Parameter, so rebuild optimizers afterwards).
        for name in ("values", "crow_indices", "col_indices", "crow_indices_t", "col_indices_t", "perm_t"):
            saved = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape != cur.shape:
                fresh = torch.empty(saved.shape, dtype=cur.dtype, device=cur.device)
                if name == "values":
                    self.values = nn.Parameter(fresh, requires_grad=cur.requires_grad)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density:.4f}, bias={self.bias is not None}"
        )
