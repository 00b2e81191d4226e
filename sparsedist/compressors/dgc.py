"""Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018).

Per tensor, each step (N = world size, m = momentum)::

    g  <- clip(g, clip_norm * N^-1/2)     local gradient clipping (L2 norm of the tensor), optional
    u  <- m * u + g                       momentum correction: accumulate the velocity, not the gradient
    v  <- v + u                           v is the error-feedback residual (kept by the hook)
    send the top-k of |v| (sampled threshold, exact top-k only when the sample overshoots)
    v[sent] <- 0 ; u[sent] <- 0           momentum factor masking (v by the hook, u here)

Warm-up (the paper's exponential schedule): over ``warmup_steps`` the density falls in ``warmup_stages``
equal stages as ``density ** ((s + 1) / (warmup_stages + 1))``; with density 0.001 and 4 stages that is
25%, 6.3%, 1.6%, 0.4%, then 0.1% — the paper's 75%, 93.75%, 98.4375%, 99.6%, 99.9% sparsity.

Because DGC applies momentum itself, the optimizer must run *without* momentum:
:func:`sparsedist.register` refuses an optimizer with momentum when given one, and
:func:`check_optimizer` is the check.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..payload import SparseGrad
from .base import Compressor, SelectContext, Workspace, check_density, check_nonnegative, count_for_density
from .topk import sampled_topk_indices, topk_indices

__all__ = ["DGCCompressor", "check_optimizer"]


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if any parameter group of ``optimizer`` uses momentum (or Adam-style betas).

    DGC's momentum correction already applies momentum to the exchanged gradient; a second momentum in the
    optimizer would compound it silently.
    """
    for i, group in enumerate(optimizer.param_groups):
        if group.get("momentum", 0):
            raise ValueError(
                f"DGC applies momentum itself (momentum correction), but optimizer param group {i} has "
                f"momentum={group['momentum']}. Build the optimizer with momentum=0 and pass the momentum to "
                f"DGC instead: sparsedist.register(ddp, 'dgc', momentum={group['momentum']}, ...)"
            )
        if "betas" in group:
            raise ValueError(
                f"DGC's momentum correction is derived for momentum SGD; {type(optimizer).__name__} keeps its "
                f"own moment estimates (betas={group['betas']}). Use torch.optim.SGD(momentum=0) with DGC, or "
                f"choose compressor='topk' for adaptive optimizers"
            )


class DGCCompressor(Compressor):
    """Deep Gradient Compression.

    Args:
        density: final fraction of entries sent, in (0, 1] (paper: 0.001).
        momentum: momentum factor m of the momentum correction (paper: 0.9). The optimizer must have none.
        nesterov: Nesterov variant of the correction (``u = m(u + g)``, ``v += u + g``).
        clip_norm: local gradient clipping threshold (global-norm units), > 0; each tensor's L2 norm is clipped at
            ``clip_norm * world_size ** -0.5`` (the world size comes from the selection context). None disables
            clipping.
        warmup_steps: number of exchange steps of the exponential density warm-up (0: none).
        warmup_stages: number of warm-up stages (paper: 4 epochs).
        sample_ratio: fraction of entries sampled to estimate the top-k threshold (paper: 0.1%-1%).
        momentum_masking: zero u where v was sent (paper: yes).
    """

    name = "dgc"
    # auto's dense choice sends the whole v = r + u and keeps u unmasked: no entry is delayed, so that step is
    # exactly momentum SGD (factor masking exists for delayed entries; applied to all it would zero the momentum)
    dense_fallback = True
    accumulates_plainly = False
    count_bounded = True

    def __init__(self, density: float = 0.001, momentum: float = 0.9, nesterov: bool = False,
                 clip_norm: float | None = None, warmup_steps: int = 0, warmup_stages: int = 4,
                 sample_ratio: float = 0.01, momentum_masking: bool = True):
        self.density = check_density(density)
        self.momentum = check_nonnegative(momentum, "momentum")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.nesterov = bool(nesterov)
        self.clip_norm = None if clip_norm is None else check_nonnegative(clip_norm, "clip_norm")
        if self.clip_norm == 0:
            raise ValueError("clip_norm must be > 0 (0 would clip every gradient to zero, so nothing would ever "
                             "move); pass clip_norm=None to switch local clipping off")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0 (number of exchange steps), got {warmup_steps!r}")
        if isinstance(warmup_stages, bool) or not isinstance(warmup_stages, int) or warmup_stages < 1:
            raise ValueError(f"warmup_stages must be an int >= 1, got {warmup_stages!r}")
        self.warmup_steps = warmup_steps
        self.warmup_stages = warmup_stages
        self.sample_ratio = check_density(sample_ratio, "sample_ratio")
        self.momentum_masking = bool(momentum_masking)
        self._u: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}  # dense steps' output buffers (see dense_step)
        self._generator = torch.Generator().manual_seed(0)
        self._workspace = Workspace()  # selection's scratch buffers, reused between calls

    def density_at(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.density
        stage = step * self.warmup_stages // self.warmup_steps
        return max(self.density, self.density ** ((stage + 1) / (self.warmup_stages + 1)))

    def accumulate(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext) -> torch.Tensor:
        key = ctx.key
        g = grad.to(residual.dtype) if residual is not None else grad.float()
        if self.clip_norm is not None:
            g = g * self._clip_factor(g, ctx.world_size)
        u = self._u.get(key)
        if u is None or u.shape != g.shape:
            u = torch.zeros_like(g)
        # The new momentum is only committed in after_send(), so a step whose exchange is abandoned
        # (a non-finite gradient on some rank) leaves the state exactly as it was.
        if self.nesterov:
            u_new = (u + g) * self.momentum
            step = u_new + g
        else:
            u_new = u * self.momentum + g
            step = u_new
        self._pending[key] = u_new
        return step.clone() if residual is None else residual + step

    def _clip_factor(self, g: torch.Tensor, world_size: int) -> torch.Tensor:
        """Local gradient clipping: the factor (0-d tensor, <= 1) that brings ``g``'s L2 norm to at most
        ``clip_norm * world_size ** -0.5``."""
        limit = self.clip_norm / math.sqrt(max(1, world_size))
        return torch.clamp(limit / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)

    def compress(self, acc: torch.Tensor, ctx: SelectContext) -> SparseGrad:
        k = count_for_density(acc.numel(), self.density_at(ctx.step))
        if self.sample_ratio < 1.0:
            idx = sampled_topk_indices(acc, k, self.sample_ratio, generator=self._generator,
                                       workspace=self._workspace)
        else:
            idx = topk_indices(acc, k, self._workspace)
        return SparseGrad(idx, acc[idx], acc.numel())

    def after_send(self, key: str, payload: SparseGrad, finite: bool | torch.Tensor = True) -> None:
        u = self._pending.pop(key, None)
        if u is None:
            return
        if self.momentum_masking and payload.nnz:
            u.index_fill_(0, payload.indices.long(), 0)
        if finite is not True:  # a device flag: keep the old momentum where some rank overflowed
            old = self._u.get(key)
            u = torch.where(finite, u, old if old is not None and old.shape == u.shape else 0.0)
        self._u[key] = u

    def discard_pending(self, key: str) -> None:
        """Forget the momentum computed for ``key`` in an exchange that was abandoned."""
        self._pending.pop(key, None)

    def after_send_all(self, key: str) -> None:
        """Every entry of ``key`` was sent: commit the new momentum without factor masking."""
        u = self._pending.pop(key, None)
        if u is not None:
            old = self._u.get(key)
            self._u[key] = u
            if old is not None and old is not u and old.shape == u.shape:
                self._spare[key] = old  # the next dense step writes into it

    def dense_step(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext,
                   scale: float = 1.0) -> None:
        """In place: clip ``grad``, ``grad <- u_new (+ residual)`` with ``u_new = m u + g``; ``u_new`` is committed
        by :meth:`after_send_all` (unmasked: every entry was sent). ``u_new`` is written into a spare buffer kept
        per tensor (the previous momentum's, recycled at commit), so a dense step allocates nothing: on a CPU a
        fresh 21M-element tensor costs more than the pass that fills it (page faults)."""
        key = ctx.key
        if self.clip_norm is not None:
            grad.mul_(self._clip_factor(grad, ctx.world_size))
        u = self._u.get(key)
        spare = self._spare.pop(key, None)
        if spare is None or spare.shape != grad.shape or spare.dtype != torch.float32 or spare.device != grad.device:
            spare = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
        if u is None or u.shape != grad.shape:
            spare.copy_(grad)
            if self.nesterov:
                spare.mul_(self.momentum)
        elif self.nesterov:
            torch.add(u, grad, out=spare).mul_(self.momentum)
        else:
            torch.add(grad, u, alpha=self.momentum, out=spare)
        if self.nesterov:
            grad.add_(spare)
        else:
            grad.copy_(spare)
        if residual is not None:
            grad.add_(residual, alpha=scale)
        self._pending[key] = spare

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_spare"] = {}  # scratch, rebuilt on the next dense step
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": {k: v.clone() for k, v in self._u.items()}, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._u = {k: v.clone() for k, v in state.get("momentum", {}).items()}
        if "generator" in state:
            self._generator.set_state(state["generator"])

    def options(self) -> dict[str, Any]:
        return {"density": self.density, "momentum": self.momentum, "nesterov": self.nesterov,
                "clip_norm": self.clip_norm, "warmup_steps": self.warmup_steps,
                "warmup_stages": self.warmup_stages, "sample_ratio": self.sample_ratio,
                "momentum_masking": self.momentum_masking}
