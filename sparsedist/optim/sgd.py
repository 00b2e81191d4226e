"""SGD (with momentum, Nesterov, dampening, weight decay) whose sparse exchange carries each rank's own update.

The same rule as :mod:`sparsedist.optim.adamw`: each rank runs the update rule on its own gradient with its own
momentum buffer, and what travels (with error feedback) is its parameter update ``lr * d_r``::

    d_r = g_r + weight_decay * p          b_r <- momentum * b_r + (1 - dampening) * d_r   (b_r = d_r at first)
    direction = d_r + momentum * b_r  (nesterov)  |  b_r  (momentum > 0)  |  d_r  (no momentum)

For momentum SGD this is DGC's momentum correction (Lin et al. 2018: accumulate the local velocity, not the
gradient, into the residual), without its other parts (momentum factor masking, local clipping at
``threshold * N^-1/2``, density warm-up), which stay in the ``"dgc"`` compressor as the paper's method. Weight
decay is L2 as in ``torch.optim.SGD`` (inside the gradient, so it travels with it). Without momentum the wire is
``lr * g_r``: classic error-feedback SGD.

Warm-up steps are exactly ``torch.optim.SGD`` on the averaged gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ExchangeOptimizer

__all__ = ["SGD"]


class SGD(ExchangeOptimizer):
    """Drop-in ``torch.optim.SGD`` for a sparse exchange (see :mod:`sparsedist.optim`).

    Args:
        params: parameters, named parameters or parameter groups.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        warmup_steps: optimizer steps with a dense exchange first (default 0).
        max_grad_norm, grad_scaler, error_reset, sync_every: see
            :class:`~sparsedist.optim.base.ExchangeOptimizer` (error reset: :mod:`sparsedist.optim.error_reset`).

    ``maximize``, ``foreach``, ``fused`` and ``differentiable`` are not supported.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, warmup_steps: int = 0,
                 max_grad_norm: float | None = None, grad_scaler: Any = None, error_reset: bool = False,
                 sync_every: int | None = None):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov}
        super().__init__(params, defaults, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                         grad_scaler=grad_scaler, error_reset=error_reset, sync_every=sync_every)

    @staticmethod
    def _rule(p, grad, state, group, commit: bool, decay: bool = True) -> torch.Tensor:
        """torch.optim.SGD's single-tensor rule; the momentum buffer changes only if ``commit``; ``decay=False``:
        ``grad`` already holds the L2 term."""
        d_p = grad if group["weight_decay"] == 0 or not decay else grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum == 0:
            return d_p
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = torch.clone(d_p).detach()
            if commit:
                state["momentum_buffer"] = buf
        else:
            buf = (buf.mul_(momentum) if commit else buf.mul(momentum)).add_(d_p, alpha=1 - group["dampening"])
        return d_p.add(buf, alpha=momentum) if group["nesterov"] else buf

    def _dense_update(self, p, grad, state, group) -> None:
        p.add_(self._rule(p, grad, state, group, commit=True), alpha=-group["lr"])

    def _gradient_at(self, p, grad, group) -> torch.Tensor:
        # the L2 term at the point of the gradient (the local model under error reset), as torch.optim.SGD adds it
        return grad if group["weight_decay"] == 0 else grad.add_(p, alpha=group["weight_decay"])

    def _direction(self, p, grad, state, group) -> torch.Tensor:
        d = self._rule(p, grad, state, group, commit=False, decay=False)
        return d.clone() if d is grad else d

    def _commit(self, p, grad, state, group) -> None:
        if group["momentum"] != 0:
            self._rule(p, grad, state, group, commit=True, decay=False)

    def _apply(self, p, update, group) -> None:
        p.sub_(update)
