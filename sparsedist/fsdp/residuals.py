"""Error-feedback residuals under FSDP, and what they cost.

A residual is what this rank selected but did not send, so it has the size of the *unsharded* parameter, on every
rank: ``n`` values per rank for a model of ``n`` parameters, while FSDP keeps only ``n / P`` weights per rank.
In fp32 that is ``4 n`` bytes per rank whatever ``P`` is -- at 10B parameters, 40 GB on every rank. Two bounds:

* **masks**: under a model-sparsity mask the residual is kept on the active weights only (``density * n``
  values, plus their int32 positions: 8 bytes per active weight), as the DDP hook's mask-aware exchange does.
* **a narrower dtype**: :class:`CompactFeedback` stores residuals in bfloat16 (2 bytes per value) and computes in
  fp32; each step rounds the residual to bf16's 8 significant bits (round to nearest even), which loses up to
  ``2**-9`` of it relative. docs/fsdp.md measures what this does to the loss.
"""

from __future__ import annotations

import torch

from ..feedback import ErrorFeedback
from ..options import parse_dtype
from ..payload import SparseGrad, accumulator_dtype

__all__ = ["CompactFeedback", "residual_dtype_of"]


def residual_dtype_of(value) -> torch.dtype:
    """``torch.float32`` (None), or a floating dtype by name (``"bfloat16"``, ``"float16"``) or object."""
    dtype = parse_dtype(value) if value is not None else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"residual_dtype must be float32, bfloat16, float16 or float64, got {value!r}")
    return dtype


class CompactFeedback(ErrorFeedback):
    """:class:`~sparsedist.feedback.ErrorFeedback` whose residuals are stored in ``dtype`` (computed in fp32).

    Args:
        enabled: as for :class:`~sparsedist.feedback.ErrorFeedback`.
        dtype: storage dtype of the residuals (default fp32: exactly ``ErrorFeedback``).
    """

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(enabled)
        self.dtype = dtype

    def get(self, key: str, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
        r = super().get(key, like, scale)
        return None if r is None else r.to(accumulator_dtype(like.dtype))

    def update(self, key: str, acc: torch.Tensor, sent: SparseGrad, scale: float = 1.0, *,
               sent_all: bool = False, finite: bool | torch.Tensor = True) -> None:
        super().update(key, acc, sent, scale, sent_all=sent_all, finite=finite)
        stored = self.residuals.get(key)
        if stored is not None and stored.dtype != self.dtype:
            self.residuals[key] = stored.to(self.dtype)

    def nbytes(self) -> int:
        """Bytes the residuals occupy on this rank."""
        return sum(r.numel() * r.element_size() for r in self.residuals.values())

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.residuals = {k: v.to(self.dtype) for k, v in self.residuals.items()}
