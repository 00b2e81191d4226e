"""A plain, slow, obviously correct exchange that applies the optimizer contract outside DDP.

Call it after ``backward()`` and before ``optimizer.step()``; every rank must call it at the same point::

    opt = sparsedist.optim.AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    exchange = sparsedist.optim.ReferenceExchange(model, opt, density=0.01)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()       # a plain model: no DDP, no hook
        exchange()                            # p.grad <- the averaged gradient (warm-up) or update (sparse phase)
        opt.step()

Per parameter, in a fixed order (the optimizer's), one collective at a time:

* warm-up (``optimizer.exchange_is_dense()``): ``p.grad <- allreduce(p.grad) / P``;
* sparse phase: ``w = optimizer.to_wire(p, p.grad)``; ``acc = w + residual``; the ``k = ceil(density * n)``
  largest ``|acc|`` are sent (values rounded to ``value_dtype``); ``residual <- acc - sent``;
  ``p.grad <- sparse_allreduce(sent) / P``.

If any summed value is not finite (some rank overflowed), every ``p.grad`` keeps the non-finite sums, so
``GradScaler`` skips the step, and no residual changes. It is what the DDP hook does, one parameter at a time and
without overlap; :func:`local_selection` and :func:`commit_residual` are the per-rank half, shared with the
in-process simulation of ``benchmarks/adam_sim.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..collectives import TorchBackend, ring_allreduce_bytes, sparse_allreduce
from ..payload import all_finite
from .base import ExchangeOptimizer

__all__ = ["ReferenceExchange", "local_selection", "commit_residual"]

_DTYPES = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def local_selection(wire: torch.Tensor, residual: torch.Tensor | None, k: int,
                    value_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's top-k with error feedback.

    Args:
        wire: this rank's quantity, any shape (flattened here).
        residual: ``(n,)`` fp32 residual or None (no error feedback).
        k: entries to send, ``1 <= k <= n``.
        value_dtype: dtype the values travel in (None: fp32).

    Returns:
        ``(indices, values, acc)``: int64 ``(k,)`` positions of the largest ``|acc|``, their values in
        ``value_dtype`` (all NaN if ``acc`` has a non-finite entry, so the sum shows the overflow everywhere),
        and ``acc = wire + residual`` in fp32.
    """
    acc = wire.detach().reshape(-1).to(torch.float32, copy=True)
    if residual is not None:
        acc.add_(residual)
    idx = torch.topk(acc.abs(), k, sorted=False).indices
    values = acc[idx].to(value_dtype or torch.float32)
    if not all_finite(acc):
        values.fill_(float("nan"))
    return idx, values, acc


def commit_residual(acc: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The new residual: ``acc`` minus what was sent, as it went on the wire (its rounding stays behind)."""
    out = acc.clone()
    out[indices] -= values.to(torch.float32)
    return out


class ReferenceExchange:
    """The contract of :mod:`sparsedist.optim`, applied over ``torch.distributed`` without DDP.

    Args:
        model: the (plain, not DDP) module whose parameters ``optimizer`` updates; names key the residuals.
        optimizer: a :class:`~sparsedist.optim.base.ExchangeOptimizer`.
        density: fraction of each parameter's elements sent per step, in (0, 1].
        value_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the values on the wire.
        error_feedback: keep what was not sent (default True).
        algorithm: how the sparse vectors are summed (:func:`sparsedist.collectives.sparse_allreduce`).
        group: the process group (default: the global one).
    """

    def __init__(self, model: torch.nn.Module, optimizer: ExchangeOptimizer, *, density: float = 0.01,
                 value_dtype: str | None = None, error_feedback: bool = True, algorithm: str = "allgather",
                 group: Any = None):
        if not isinstance(optimizer, ExchangeOptimizer):
            raise TypeError(f"optimizer must be a sparsedist.optim optimizer (AdamW, SGD), got "
                            f"{type(optimizer).__name__}")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError("ReferenceExchange replaces DDP's gradient exchange: pass the plain module (DDP's "
                            "own allreduce would average the gradients a second time)")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if value_dtype not in _DTYPES:
            raise ValueError(f"value_dtype must be one of {sorted(k for k in _DTYPES if k)}, got {value_dtype!r}")
        if optimizer.error_reset and not error_feedback:
            raise ValueError("error_reset=True computes gradients at the consensus minus the error-feedback "
                             "residual: it needs error_feedback=True")
        if optimizer.error_reset and optimizer.grad_scaler is not None:
            raise ValueError("ReferenceExchange keeps residuals in loss-scaled units, which error_reset would "
                             "subtract from the parameters: with a GradScaler use the DDP hook (it keeps them "
                             "unscaled), or error_reset=False")
        owned = {p for g in optimizer.param_groups for p in g["params"]}
        self.named = [(n, p) for n, p in model.named_parameters() if p in owned]
        missing = len(owned) - len(self.named)
        if missing:
            raise ValueError(f"{missing} of the optimizer's parameters are not parameters of the model")
        self.optimizer = optimizer
        self.density = float(density)
        self.value_dtype = _DTYPES[value_dtype]
        self.error_feedback = bool(error_feedback)
        self.algorithm = algorithm
        self.backend = TorchBackend(group)
        self.residuals: dict[str, torch.Tensor] = {}
        self._telemetry = {"steps": 0, "dense_steps": 0, "overflow_steps": 0, "bytes_dense": 0}
        if optimizer.error_reset:
            optimizer.attach_exchange(self.named, lambda: self.residuals, lambda: self.backend, model)

    def k(self, numel: int) -> int:
        """Entries sent for a parameter of ``numel`` elements: ``ceil(density * numel)``."""
        return max(1, math.ceil(self.density * numel))

    @torch.no_grad()
    def __call__(self) -> None:
        """Exchange every parameter's gradient; collective (all ranks call it after backward)."""
        size = self.backend.size
        live = [(n, p) for n, p in self.named if p.grad is not None]
        for n, p in live:
            self._telemetry["bytes_dense"] += ring_allreduce_bytes(p.numel(), 4, size)
        self._telemetry["steps"] += 1
        if self.optimizer.exchange_is_dense():
            self._telemetry["dense_steps"] += 1
            for _, p in live:
                p.grad.copy_(self.backend.allreduce(p.grad.detach().reshape(-1).clone()).view_as(p.grad) / size)
            return
        pending = []
        finite = True
        for name, p in live:
            wire = self.optimizer.to_wire(p, p.grad)
            residual = self.residuals.get(name) if self.error_feedback else None
            idx, values, acc = local_selection(wire, residual, self.k(p.numel()), self.value_dtype)
            total = sparse_allreduce(idx, values, p.numel(), algorithm=self.algorithm, backend=self.backend)
            finite = finite and all_finite(total)  # the same on every rank: the sum is identical everywhere
            p.grad.copy_((total.to(torch.float32) / size).view_as(p.grad))
            pending.append((name, idx, values, acc))
        self.optimizer.restore_consensus()  # error reset: every gradient was taken at the local model
        if not finite:
            self._telemetry["overflow_steps"] += 1
            return
        if self.error_feedback:
            for name, idx, values, acc in pending:
                self.residuals[name] = commit_residual(acc, idx, values)

    def stats(self) -> dict[str, Any]:
        """``bytes_sent``/``bytes_received`` (this rank, every collective), ``bytes_dense`` (a dense ring
        allreduce of the same gradients in fp32), ``compression_ratio``, ``steps``, ``dense_steps``,
        ``overflow_steps``, ``residual_norm``, and the optimizer's own ``stats()`` under ``optimizer``."""
        t = dict(self._telemetry)
        sent = self.backend.bytes_sent
        norm = math.sqrt(sum(float(r.square().sum()) for r in self.residuals.values()))
        return {**t, "bytes_sent": sent, "bytes_received": self.backend.bytes_received,
                "compression_ratio": t["bytes_dense"] / sent if sent else 1.0, "residual_norm": norm,
                "optimizer": self.optimizer.stats()}

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals (by parameter name) and counters; they differ per rank. The layout is the DDP
        hook's (``feedback``/``compressor``/``telemetry``), so ``sparsedist.checkpoint`` can re-shard it onto
        a different world size."""
        return {"feedback": {"enabled": self.error_feedback,
                             "residuals": {n: r.clone() for n, r in self.residuals.items()}},
                "compressor": {}, "telemetry": {**self._telemetry, "bytes_sent": self.backend.bytes_sent,
                                                "bytes_received": self.backend.bytes_received}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residuals = state["feedback"]["residuals"]
        unknown = set(residuals) - {n for n, _ in self.named}
        if unknown:
            raise ValueError(f"residuals for parameters this model does not have: {sorted(unknown)[:5]}")
        self.residuals = {n: r.clone() for n, r in residuals.items()}
        telemetry = dict(state.get("telemetry") or {})  # empty after re-sharding: counting starts again
        self.backend.bytes_sent = telemetry.pop("bytes_sent", 0)
        self.backend.bytes_received = telemetry.pop("bytes_received", 0)
        self._telemetry = {k: telemetry.get(k, 0) for k in self._telemetry}
