"""Variance-based gradient compression (Tsuzuku, Imachi & Akiba, "Variance-based Gradient Compression for
Efficient Distributed Deep Learning", ICLR 2018 workshop, arXiv:1802.06058).

Delay each gradient element until it is *unambiguous*: large compared with its own sampling noise. Per element
i of a tensor, each rank keeps ``r_i`` (the accumulated, not yet sent gradient -- here the hook's error-feedback
residual) and ``v_i`` (the accumulated variance estimate, kept by this compressor). Each step::

    r_i <- r_i + g_i                         g: this step's local gradient   (hook: accumulate())
    v_i <- v_i + m2_i                        m2_i = sum over examples of (per-example gradient_i)^2
    if r_i^2 > alpha * v_i:  send r_i;  r_i <- 0;  v_i <- 0
    else:                    v_i <- zeta * v_i

With a mean-reduced loss the per-example gradient of the loss is ``grad_i f_z / B``, so ``m2_i`` is the paper's
``sum_z (grad_i f_z)^2 / B^2`` (:class:`sparsedist.second_moment.SecondMomentCollector` computes it, and
:func:`sparsedist.register` installs it). The rule compares squares with squares, so it does not depend on how
the loss is scaled or reduced, as long as ``m2`` comes from the same loss as ``g``.

Quantisation (``quantize=True``, the paper's 4-bit value format): each sent value becomes ``sign * 2^e``, the
nearest power of two, with ``e`` in the 8 exponents ``E-7 .. E`` below the tensor's largest sent exponent ``E``
(1 sign bit + 3 exponent bits, plus ``E`` once per tensor). Elements whose exponent falls below ``E-7`` are
not sent this step (they stay in ``r_i``; ``v_i`` decays as for any unsent element). Because the payload
carries the quantised values, the hook's ``residual = acc - sent`` keeps the quantisation error in ``r_i``
(error feedback). ``keep_quantization_error=False`` instead resets ``r_i`` to exactly 0 for every sent
element, the literal ``r_i <- 0`` of the algorithm, discarding the quantisation error.

Decided here rather than taken from the paper (whose full text could not be checked when this was written;
docs/variance.md lists what follows DESIGN.md and the paper and what was decided):

* nearest power of two in linear distance (``|r| >= 1.5 * 2^floor(log2|r|)`` rounds up), which minimises the
  error kept in ``r_i``; the range is anchored at the largest sent exponent of the tensor;
* the quantisation error is kept (error feedback, the project's convention); discarding it is an option;
* ``v`` is updated only once the exchange completed (:meth:`after_send`), so an abandoned step (non-finite
  gradient) leaves the state untouched: call :meth:`discard_pending`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..payload import SparseGrad
from .base import Compressor, SelectContext

__all__ = ["VarianceCompressor", "quantize_pow2", "EXPONENT_LEVELS"]

#: Number of exponents a sent value can take (3 exponent bits of the paper's 4-bit format).
EXPONENT_LEVELS = 8


def quantize_pow2(x: torch.Tensor, levels: int = EXPONENT_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Round each entry of ``x`` to ``sign * 2^e``, the nearest power of two, within ``levels`` exponents.

    The exponents allowed are ``E - levels + 1 .. E`` where ``E`` is the largest rounded exponent in ``x``.

    Args:
        x: 1-D floating tensor.
        levels: number of exponents representable (8 for the paper's sign + 3-bit exponent).

    Returns:
        ``(q, keep)``: ``q`` has ``x``'s shape and dtype and holds the quantised values (0 where not kept);
        ``keep`` is a bool mask, False for zeros and for entries below the representable range.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = x.detach().to(work).abs()
    mant, exp = torch.frexp(a)                       # a = mant * 2^exp, mant in [0.5, 1)
    e = exp - 1 + (mant >= 0.75).to(exp.dtype)      # nearest power of two: 2^(exp-1) or 2^exp
    finite_max = torch.finfo(x.dtype).max
    e = torch.clamp(e, max=math.floor(math.log2(finite_max)))   # never round up to inf in x's dtype
    keep = (a > 0) & torch.isfinite(a)
    if bool(keep.any()):
        top = e[keep].max()
        keep &= e >= top - (levels - 1)
    q = torch.ldexp(torch.sign(x.detach().to(work)), e.to(work))
    q = torch.where(keep, q, torch.zeros_like(q))
    return q.to(x.dtype), keep


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number > 0, got {alpha!r} of type {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (send when r^2 > alpha * v), got {alpha}; "
                         f"the paper uses alpha=2.0")
    return alpha


def _check_zeta(zeta: Any) -> float:
    if isinstance(zeta, bool) or not isinstance(zeta, numbers.Real):
        raise TypeError(f"zeta must be a number in [0, 1], got {zeta!r} of type {type(zeta).__name__}")
    zeta = float(zeta)
    if math.isnan(zeta) or not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must be in [0, 1] (decay of the variance of unsent elements), got {zeta}; "
                         f"the paper uses zeta=0.999")
    return zeta


class VarianceCompressor(Compressor):
    """Send the elements whose accumulated gradient is large compared with its accumulated variance.

    Args:
        alpha: threshold of the rule ``r^2 > alpha * v``, > 0 (default 2.0). Larger sends less.
        zeta: decay of ``v`` for unsent elements, in [0, 1] (default 0.999). Smaller lets stale elements go
            out sooner; 1 never forgets.
        quantize: send ``sign * 2^e`` (4 bits: sign + 3-bit exponent relative to the tensor's largest) instead
            of the exact fp values (default True, as in the paper's experiments).
        keep_quantization_error: with ``quantize``, keep ``r - sent`` in ``r`` (error feedback, default) or
            reset ``r`` to 0 for sent elements (discard the quantisation error).

    Needs ``ctx.second_moment`` (``needs_second_moment = True``). State per tensor key: ``v``, fp32, on the
    accumulator's device.
    """

    name = "variance"
    needs_second_moment = True

    def __init__(self, alpha: float = 2.0, zeta: float = 0.999, quantize: bool = True,
                 keep_quantization_error: bool = True):
        self.alpha = _check_alpha(alpha)
        self.zeta = _check_zeta(zeta)
        self.quantize = bool(quantize)
        self.keep_quantization_error = bool(keep_quantization_error)
        self._v: dict[str, torch.Tensor] = {}          # committed variance per key
        self._pending: dict[str, torch.Tensor] = {}    # v + m2 of the step being exchanged
        self._reset: dict[str, torch.Tensor] = {}      # indices whose residual must be zeroed (discard mode)

    # ----------------------------------------------------------------------------------------- hook API

    def accumulate(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext) -> torch.Tensor:
        """``r + g``; in discard mode ``r`` is first zeroed where the last step sent (``r_i <- 0``).

        Changes no state (the reset indices are replaced in :meth:`after_send`), so an abandoned step can be
        retried.
        """
        return super().accumulate(grad, self._kept_residual(ctx.key, residual), ctx)

    def _kept_residual(self, key: str, residual: torch.Tensor | None) -> torch.Tensor | None:
        """``residual``, or in discard mode a copy zeroed where the last step sent (the input is untouched)."""
        idx = self._reset.get(key)
        if idx is None or residual is None or idx.numel() == 0:
            return residual
        r = residual.clone()
        r.index_fill_(0, idx.to(r.device), 0)
        return r

    def compress(self, acc: torch.Tensor, ctx: SelectContext) -> SparseGrad:
        """Select (and quantise) the elements with ``acc^2 > alpha * (v + ctx.second_moment)``.

        Args:
            acc: flat accumulator ``r`` of shape ``(n,)``, any floating dtype.
            ctx: needs ``ctx.key`` and ``ctx.second_moment`` (``(n,)``, this step's sum over examples of
                squared per-example gradients, same units as ``acc`` squared). Optional
                ``ctx.extra["loss_scale"]``: the ``GradScaler`` scale ``S`` that ``acc`` and ``second_moment``
                carry (``S`` and ``S^2``); ``v`` is then kept in unscaled units, so a change of scale between
                steps does not skew the rule. Default 1.

        Returns:
            Payload with the selected indices (int64) and their values in ``acc.dtype`` (powers of two
            with ``quantize``).
        """
        m2 = ctx.second_moment
        if m2 is None:
            raise ValueError(
                "VarianceCompressor needs ctx.second_moment (the sum over examples of squared per-example "
                "gradients) but got None. Use sparsedist.register(ddp, 'variance', ...), which installs a "
                "sparsedist.second_moment.SecondMomentCollector, or pass the collector's pop(param) as "
                "SelectContext(second_moment=...); parameters the collector does not cover (see "
                "collector.uncovered(model)) must be sent with another compressor or dense"
            )
        n = acc.numel()
        if m2.numel() != n:
            raise ValueError(f"ctx.second_moment has {m2.numel()} elements but the accumulator has {n} "
                             f"(key {ctx.key}); they must describe the same tensor")
        v = self._v.get(ctx.key)
        if v is None:
            v = torch.zeros(n, dtype=torch.float32, device=acc.device)
        elif v.numel() != n:
            raise ValueError(f"key {ctx.key} had {v.numel()} elements in the variance state but now has {n}; "
                             f"keys must identify the same tensor every step (load the matching state_dict)")
        scale = float(ctx.extra.get("loss_scale", 1.0)) if ctx.extra else 1.0
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"ctx.extra['loss_scale'] must be a finite number > 0 (the GradScaler scale), "
                             f"got {scale}")
        m2 = m2.reshape(-1).to(device=acc.device, dtype=torch.float32)
        if scale != 1.0:
            m2 = m2 / (scale * scale)
        v = v.to(acc.device) + m2
        self._pending[ctx.key] = v
        r = acc.detach().reshape(-1).float()
        if scale != 1.0:
            r = r / scale
        idx = (r.square() > self.alpha * v).nonzero().view(-1)
        values = acc.reshape(-1)[idx]
        if self.quantize and idx.numel():
            values, keep = quantize_pow2(values)
            if not bool(keep.all()):
                idx, values = idx[keep], values[keep]
        return SparseGrad(idx, values, n)

    def after_send(self, key: str, payload: SparseGrad, finite: bool = True) -> None:
        """Commit ``v``: 0 where ``payload`` sent, ``zeta * v`` elsewhere (discard mode: mark ``r`` reset)."""
        v = self._pending.pop(key, None)
        if v is None:                       # this tensor was not selected by compress() (sent dense)
            return
        if payload.numel != v.numel():
            raise ValueError(
                f"after_send(key={key}) got a payload over {payload.numel} elements, but compress() selected "
                f"from {v.numel()} elements under that key. VarianceCompressor keeps its variance per tensor: "
                f"call compress() once per tensor (layer-wise granularity) -- the rule is elementwise, so a "
                f"whole-bucket selection gives the same result except for the quantisation exponent range"
            )
        v.mul_(self.zeta)
        if payload.nnz:
            idx = payload.indices.long().to(v.device)
            v.index_fill_(0, idx, 0.0)
        if self.quantize and not self.keep_quantization_error and payload.nnz:
            self._reset[key] = payload.indices.long().clone()
        else:
            self._reset.pop(key, None)
        self._v[key] = v

    def discard_pending(self, key: str) -> None:
        """Forget the variance computed for ``key`` in an exchange that was abandoned (state stays as before)."""
        self._pending.pop(key, None)

    @property
    def accumulates_plainly(self) -> bool:  # discard mode zeroes part of the residual first
        return not (self.quantize and not self.keep_quantization_error)

    def after_send_all(self, key: str) -> None:
        """Every entry of ``key`` was sent: its variance is that of an empty residual, 0 (dropped)."""
        self._pending.pop(key, None)
        self._v.pop(key, None)
        self._reset.pop(key, None)

    def dense_step(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext,
                   scale: float = 1.0) -> None:
        """``grad += scale * residual`` (zeroed first where discard mode says so); :meth:`after_send_all` drops
        the variance."""
        super().dense_step(grad, self._kept_residual(ctx.key, residual), ctx, scale)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """``{"variance": {key: v (n,) fp32}, "reset": {key: int64 indices}}`` (reset: discard mode only)."""
        return {"variance": {k: v.clone() for k, v in self._v.items()},
                "reset": {k: i.clone() for k, i in self._reset.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors keep their device)."""
        unknown = set(state) - {"variance", "reset"}
        if unknown:
            raise ValueError(f"VarianceCompressor state has unknown entries {sorted(unknown)}; "
                             f"expected 'variance' and 'reset' (from VarianceCompressor.state_dict())")
        variance = state.get("variance", {})
        for k, v in variance.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
                raise ValueError(f"variance state for key {k} must be a 1-D floating tensor, got {v!r:.60}")
        self._v = {k: v.detach().to(torch.float32).clone() for k, v in variance.items()}
        self._reset = {k: i.detach().long().clone() for k, i in state.get("reset", {}).items()}
        self._pending.clear()

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "zeta": self.zeta, "quantize": self.quantize,
                "keep_quantization_error": self.keep_quantization_error}
