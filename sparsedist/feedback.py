"""Error-feedback memory (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019).

The residual of a tensor is what its compressor selected but did not send: after each exchange
``residual = acc - sent``, where ``acc = grad + residual`` (or the compressor's own accumulation, e.g. DGC's
momentum correction) and ``sent`` holds the values *as they went on the wire* (so rounding to fp16 or Strom's
+/-tau quantisation is kept, not lost). Residuals are keyed by the parameter's stable key and stored in fp32
for fp16/bf16 gradients.

Under automatic mixed precision the gradients are multiplied by the loss scale, which changes over time; give
:class:`ErrorFeedback` the current scale (``scale=``) and it stores residuals in unscaled units, so a change of
scale does not mis-weight what was kept.
"""

from __future__ import annotations

from typing import Any

import torch

from .payload import SparseGrad

__all__ = ["ErrorFeedback", "accumulator_dtype", "all_finite"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision gradients, else the gradient's own dtype."""
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


class ErrorFeedback:
    """Residual memory keyed by parameter key.

    Args:
        enabled: if False, :meth:`get` returns None and nothing is stored (plain sparsification).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self.residuals: dict[int, torch.Tensor] = {}

    def get(self, key: int, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
        """The residual for ``key`` (zeros on first use) in loss-scaled units, or None if disabled.

        Without loss scaling this is the stored tensor itself, not a copy (a copy of every residual per step
        costs a memory pass and, for large tensors on a CPU, page faults): callers must not modify it; the
        hook only reads it (``Compressor.accumulate`` returns a new tensor) and replaces it in :meth:`update`.

        Args:
            key: the parameter's stable key.
            like: the flat gradient it will be added to (gives shape, device and dtype).
            scale: current loss scale (1.0 without AMP).
        """
        if not self.enabled:
            return None
        r = self.residuals.get(key)
        if r is None or r.numel() != like.numel():
            return torch.zeros(like.numel(), dtype=accumulator_dtype(like.dtype), device=like.device)
        return r * scale if scale != 1.0 else r

    def update(self, key: int, acc: torch.Tensor, sent: SparseGrad, scale: float = 1.0, *,
               sent_all: bool = False) -> None:
        """Store ``acc - sent`` (``acc`` is consumed) as the residual of ``key``, in unscaled units.

        ``sent_all``: ``sent`` carried every entry of ``acc``; the residual is zero and is dropped (no arithmetic).
        """
        if not self.enabled:
            return
        if sent_all:
            self.residuals.pop(key, None)
            return
        if sent.nnz:
            values = sent.values.to(acc.dtype)
            if values.untyped_storage().data_ptr() == acc.untyped_storage().data_ptr():
                values = values.clone()  # e.g. a tensor sent in full: its payload *is* the accumulator
            acc.index_add_(0, sent.indices.long(), values, alpha=-1)
        if scale != 1.0:
            acc.div_(scale)
        self.residuals[key] = acc

    def norm(self) -> float:
        """L2 norm of all residuals together (unscaled units)."""
        if not self.residuals:
            return 0.0
        sq = sum(float(torch.linalg.vector_norm(r.float()) ** 2) for r in self.residuals.values())
        return sq ** 0.5

    def clear(self) -> None:
        """Drop every residual."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "residuals": {k: v.detach().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state.get("enabled", self.enabled))
        self.residuals = {int(k): v.clone() for k, v in state.get("residuals", {}).items()}
