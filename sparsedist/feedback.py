"""Error-feedback memory (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019).

The residual of a tensor is what its compressor selected but did not send: after each exchange
``residual = acc - sent``, where ``acc = grad + residual`` (or the compressor's own accumulation, e.g. DGC's
momentum correction) and ``sent`` holds the values *as they went on the wire* (so rounding to fp16 or Strom's
+/-tau quantisation is kept, not lost). Residuals are keyed by the parameter's name and stored in fp32 for
fp16/bf16 gradients.

Under automatic mixed precision the gradients are multiplied by the loss scale, which changes over time; give
:class:`ErrorFeedback` the current scale (``scale=``) and it stores residuals in unscaled units, so a change of
scale does not mis-weight what was kept.
"""

from __future__ import annotations

from typing import Any

import torch

from .payload import SparseGrad, accumulator_dtype

__all__ = ["ErrorFeedback", "check_resumable"]


class ErrorFeedback:
    """Residual memory keyed by parameter name.

    Args:
        enabled: if False, :meth:`get` returns None and nothing is stored (plain sparsification).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self.residuals: dict[str, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
        """The residual for ``key`` (zeros on first use) in loss-scaled units, or None if disabled.

        Without loss scaling this is the stored tensor itself, not a copy (a copy of every residual per step
        costs a memory pass and, for large tensors on a CPU, page faults): callers must not modify it; the
        hook only reads it (``Compressor.accumulate`` returns a new tensor) and replaces it in :meth:`update`.

        Args:
            key: the parameter's name.
            like: the flat gradient it will be added to (gives shape, device and dtype).
            scale: current loss scale (1.0 without AMP).
        """
        if not self.enabled:
            return None
        r = self.residuals.get(key)
        if r is None or r.numel() != like.numel():
            return torch.zeros(like.numel(), dtype=accumulator_dtype(like.dtype), device=like.device)
        return r * scale if scale != 1.0 else r

    def update(self, key: str, acc: torch.Tensor, sent: SparseGrad, scale: float = 1.0, *,
               sent_all: bool = False, finite: bool | torch.Tensor = True) -> None:
        """Store ``acc - sent`` (``acc`` is consumed) as the residual of ``key``, in unscaled units.

        ``sent_all``: ``sent`` carried every entry of ``acc``; the residual is zero and is dropped (no arithmetic).
        ``finite``: a 0-d bool tensor makes the update conditional on the device (the old residual stays where it
        is False), for an exchange that must not synchronise with the host.
        """
        if not self.enabled:
            return
        if sent_all and finite is True:
            self.residuals.pop(key, None)
            return
        if sent_all:
            acc.zero_()
        elif sent.nnz:
            values = sent.values.to(acc.dtype)
            if values.untyped_storage().data_ptr() == acc.untyped_storage().data_ptr():
                values = values.clone()  # e.g. a tensor sent in full: its payload *is* the accumulator
            acc.index_add_(0, sent.indices.long(), values, alpha=-1)
        if scale != 1.0:
            acc.div_(scale)
        if finite is not True:
            old = self.residuals.get(key)
            acc = torch.where(finite, acc, old if old is not None and old.shape == acc.shape else 0.0)
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
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}


def check_resumable(compressor: Any, feedback_state: dict[str, Any]) -> None:
    """Refuse saved error-feedback residuals for a compressor that runs without error feedback because it is not a
    contraction (``compressor.contractive`` False: Wangni's rand-k), e.g. a checkpoint from when error feedback
    was on by default for it: resuming them would switch it back on, and they grow without bound."""
    if feedback_state.get("enabled") and feedback_state.get("residuals") and compressor is not None \
            and not compressor.contractive:
        raise ValueError(f"state holds error-feedback residuals of {compressor.name}, which runs without error "
                         f"feedback (its rescaled values made them grow without bound); drop them to resume: "
                         f"state['feedback'] = {{'enabled': False, 'residuals': {{}}}}")
