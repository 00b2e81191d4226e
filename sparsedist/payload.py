"""The one type that compressors produce and collectives consume.

A :class:`SparseGrad` is a sparse view of a flat (1-D) gradient of ``numel`` elements: ``indices`` (int64 or
int32, shape ``(nnz,)``, each in ``[0, numel)``, unique) and ``values`` (floating point, shape ``(nnz,)``).
Its dense form is ``zeros(numel).index_put_(indices, values)``.

Compressors may attach two optional pieces of information that change how the payload travels:

* ``shared_indices=True``: every rank selected the *same* indices (shared-seed rand-k, a model-sparsity mask),
  so the values alone can be summed with a plain allreduce, no indices on the wire.
* ``constant`` (a float): every value equals ``+constant`` or ``-constant`` (Strom's +/-tau), so the wire
  format may pack index and sign into one 32-bit word and drop the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseGrad", "accumulator_dtype", "all_finite", "finite_flag"]


@dataclass
class SparseGrad:
    """Sparse form of a flat gradient.

    Attributes:
        indices: ``(nnz,)`` integer tensor of positions in ``[0, numel)``, unique, any order.
        values: ``(nnz,)`` floating tensor, the values at those positions (the gradient's dtype or the wire dtype).
        numel: length of the dense vector.
        shared_indices: True when all ranks hold identical ``indices`` (values-only allreduce is valid).
        constant: if not None, every value is ``+constant`` or ``-constant`` (Strom 2015 packing is valid).
    """

    indices: torch.Tensor
    values: torch.Tensor
    numel: int
    shared_indices: bool = False
    constant: float | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError(
                f"SparseGrad needs 1-D indices and values, got shapes {tuple(self.indices.shape)} "
                f"and {tuple(self.values.shape)}"
            )
        if self.indices.numel() != self.values.numel():
            raise ValueError(
                f"SparseGrad has {self.indices.numel()} indices but {self.values.numel()} values"
            )

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """``nnz / numel`` (0.0 for an empty vector)."""
        return self.nnz / self.numel if self.numel else 0.0

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``(numel,)`` tensor with the stored values (duplicate indices are summed)."""
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        if self.nnz:
            out.index_add_(0, self.indices.long(), self.values.to(out.dtype))
        return out

    @staticmethod
    def empty(numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> "SparseGrad":
        """A payload with no entries."""
        return SparseGrad(
            torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=dtype, device=device), numel
        )

    @staticmethod
    def from_mask(flat: torch.Tensor, mask: torch.Tensor) -> "SparseGrad":
        """The entries of ``flat`` where the boolean ``mask`` is True."""
        idx = mask.nonzero().view(-1)
        return SparseGrad(idx, flat[idx], flat.numel())


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and residuals are kept in: fp32 for fp16/bf16 values, else the values' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def all_finite(x: torch.Tensor) -> bool:
    """True if no entry of ``x`` is NaN or infinite; exact, and one reduction in the common case.

    A finite sum implies finite entries (a NaN or an inf entry makes the sum NaN or inf), so the elementwise
    check runs only when the sum is not finite (a NaN/inf, or finite entries whose sum overflows). On a CPU,
    ``torch.isfinite(x).all()`` over 21M fp32 elements took 111 ms here, ``x.sum()`` 3.6 ms.
    """
    if x.numel() == 0:
        return True
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def finite_flag(x: torch.Tensor) -> bool | torch.Tensor:
    """Whether every entry of ``x`` is finite, without a host synchronisation on an accelerator.

    On the CPU a bool (:func:`all_finite`, exact). Elsewhere a 0-d bool tensor on ``x``'s device, computed from
    the sum, so that finite entries whose sum overflows count as not finite (a GradScaler then skips the step).
    """
    if x.device.type == "cpu":
        return all_finite(x)
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.isfinite(x.sum(dtype=accumulator_dtype(x.dtype)))
