"""AdamW whose sparse exchange carries each rank's own Adam update, with error feedback.

Warm-up (``warmup_steps`` optimizer steps): the exchange averages the raw gradients densely and this is exactly
``torch.optim.AdamW`` (same operations, same rounding as its single-tensor path), so every rank holds the same
moments when the warm-up ends.

Sparse phase: each rank advances its *own* moments with its *own* gradient ``g_r`` (t counts optimizer steps;
``b1`` is ``sparse_beta1``, 0.5 by default, see below; ``w`` the first moment's total weight, 1 - prod(beta1))::

    m_r <- b1 m_r + (1 - b1) g_r                        v_r <- beta2 v_r + (1 - beta2) g_r^2
    m^ = m_r / w                                        v^ = v_r / (1 - beta2^t)
    v~ = v^ / P + (1 - 1/P) m^^2                        (noise correction, P ranks; v~ = v^ without it)
    u_r = m^ / (sqrt(v~) + eps)

and puts ``lr * u_r`` on the wire. The exchange adds its error-feedback residual, selects (top-k), sums over
ranks and divides by P; every rank then applies ``p <- p * (1 - lr * weight_decay) - mean_r C(lr u_r + e_r)``.
Weight decay never travels: the parameters are identical on every rank, so each applies it itself.

Why the update and not the gradient: error feedback preserves the *sum* of what is compressed, which is what
matters only if the update is linear in it. Adam divides by ``sqrt(v)``; a coordinate sent once in a hundred
steps with a hundred steps' mass moves one normalised step (Tang et al. 2021, 1-bit Adam, Sec. 3). Here the
compressed quantity *is* the parameter update, so a residual delays it but loses none of it, and it keeps the
learning rate and the preconditioner it was produced with (mass kept in gradient units would later be divided by
a different ``sqrt(v)``, and ``v`` shrinks by orders of magnitude early in training). 1-bit Adam instead freezes
``v`` after a dense warm-up and compresses the momentum; both it and a 0/1-Adam-like variant (Lu et al. 2022:
the gradient compressed into a shared momentum) were measured against this with top-k (docs/adam_exchange.md).

Noise correction: dense Adam normalises by the second moment of the gradient averaged over P ranks,
``mu^2 + sigma^2 / P`` per coordinate (mean ``mu``, per-rank noise ``sigma^2``), but a rank's own ``v^``
estimates ``mu^2 + sigma^2``: noisy coordinates would move up to ``sqrt(P)`` times less than under DDP. With
``m^ ~ mu`` (the momentum averages the noise out) and ``v^ - m^^2 ~ sigma^2``, ``v~`` estimates the former. On
the char-GPT at P = 2 with everything sent (density 1), plain per-rank moments ended 0.034 above DDP's loss, the
corrected ones 0.005 below it (docs/adam_exchange.md). ``noise_correction=False`` turns it off.

Smaller momentum in the sparse phase: error feedback holds each coordinate's update back for about
1/density steps and then applies it at once. Delayed updates act as momentum (Mitliagkas et al. 2016,
"Asynchrony begets momentum"); on top of Adam's own ``beta1 = 0.9`` the run overshoots. On the char-GPT at
1 % density, ``beta1`` 0.9 / 0.7 / 0.5 / 0.3 / 0.0 in the sparse phase ended at the losses listed in
docs/adam_exchange.md (0.5 best). The warm-up keeps ``betas[0]``; the bias correction follows the change.

The wire is in parameter units. The learning rate is read from ``param_groups`` when :meth:`to_wire` runs,
i.e. during backward: set it before backward (torch's schedulers do, in ``scheduler.step()`` after the previous
``optimizer.step()``). ``stats()["lr_changed_after_backward"]`` counts sparse steps where it changed in between.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .base import ExchangeOptimizer, is_sharded

__all__ = ["AdamW"]


class AdamW(ExchangeOptimizer):
    """Drop-in ``torch.optim.AdamW`` for a sparse exchange (see the module documentation and
    :mod:`sparsedist.optim` for the contract with the exchange).

    Args:
        params: parameters or named parameters (``model.named_parameters()``), or parameter groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, default 1e-2).
        warmup_steps: optimizer steps with a dense exchange of raw gradients first (default 1: the first step
            fills the moments with the averaged gradient; a longer warm-up did not help in our measurements).
        sparse_beta1: the first moment's beta in the sparse phase (default 0.5; None: ``betas[0]``). Error
            feedback already delays each coordinate's update by about 1/density steps, which acts as momentum
            (see above); ``betas[0]`` on top of it overshoots.
        noise_correction: estimate the second moment of the P-rank mean gradient (see above; default True).
        world_size: P for the noise correction (default: torch.distributed's world size, 1 without one).
        max_grad_norm, grad_scaler, error_reset, sync_every: see
            :class:`~sparsedist.optim.base.ExchangeOptimizer` (error reset: :mod:`sparsedist.optim.error_reset`).

    ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable`` and ``differentiable`` are not supported.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, warmup_steps: int = 1, sparse_beta1: float | None = 0.5,
                 noise_correction: bool = True, world_size: int | None = None, max_grad_norm: float | None = None,
                 grad_scaler: Any = None, error_reset: bool = False, sync_every: int | None = None):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            raise ValueError(f"world_size must be an int >= 1 or None (torch.distributed's), got {world_size!r}")
        if sparse_beta1 is not None and not 0.0 <= sparse_beta1 < 1.0:
            raise ValueError(f"sparse_beta1 must be in [0, 1) or None (use betas[0]), got {sparse_beta1!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "sparse_beta1": sparse_beta1}
        super().__init__(params, defaults, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                         grad_scaler=grad_scaler, error_reset=error_reset, sync_every=sync_every)
        self.noise_correction = bool(noise_correction)
        self._world_size = world_size

    @property
    def world_size(self) -> int:
        """P, the ranks whose updates are averaged: the ``world_size`` given, else torch.distributed's (1 if it
        is not initialised)."""
        if self._world_size is not None:
            return self._world_size
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @staticmethod
    def _state(p: torch.Tensor, state: dict, local: torch.Tensor | None = None) -> dict:
        """``state`` with its moments, created at zero: like ``p``, except in the sparse phase of a sharded
        (FSDP2) parameter, whose moments have the full size of ``local`` (this rank's unsharded gradient)."""
        if not state:
            like = local if local is not None and is_sharded(p) else p
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return state

    def _dense_update(self, p, grad, state, group) -> None:
        # torch.optim.AdamW's single-tensor path, operation for operation
        state = self._state(p, state)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)

    @staticmethod
    def _first_moment(state, group) -> tuple[float, float]:
        """The sparse phase's beta1 and the first moment's new total weight ``1 - prod(beta1)`` (its bias
        correction, exact also when beta1 changed at the end of the warm-up)."""
        beta1 = group["betas"][0] if group["sparse_beta1"] is None else group["sparse_beta1"]
        weight = state.get("exp_avg_weight")
        if weight is None:  # first sparse step: the warm-up's steps, all at betas[0]
            weight = 1.0 - group["betas"][0] ** state["step"].item()
        return beta1, beta1 * weight + (1.0 - beta1)

    def _direction(self, p, grad, state, group) -> torch.Tensor:
        state = self._state(p, state, grad)
        beta2 = group["betas"][1]
        step = state["step"].item() + 1
        beta1, weight = self._first_moment(state, group)
        m = state["exp_avg"].lerp(grad, 1 - beta1).mul_(1 / weight)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2).mul_(1 / (1 - beta2 ** step))
        size = self.world_size
        if self.noise_correction and size > 1:  # estimate of the second moment of the P-rank mean gradient
            v.mul_(1 / size).addcmul_(m, m, value=1 - 1 / size)
        return m.div_(v.sqrt_().add_(group["eps"]))

    def _commit(self, p, grad, state, group) -> None:
        beta1, state["exp_avg_weight"] = self._first_moment(state, group)
        beta2 = group["betas"][1]
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    def _apply(self, p, update, group) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(update)
