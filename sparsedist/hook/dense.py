"""The one dense path: the bucket buffer itself, averaged by one allreduce, as plain DDP does.

Taken when nothing is to be selected: no compressor and no masks (or RigL's dense step without error feedback),
and when ``collective="auto"`` sends a bucket whole (a fast link). Then each residual is first added into its
gradient in place (the compressor's :meth:`~sparsedist.compressors.Compressor.dense_step`: the accumulator it
would select from), the buffer is scaled by ``1/P`` and summed -- exactly DDP's arithmetic, so ``"none"`` is plain
DDP bit for bit. Asynchronous unless the plan says wait (overlapped with the backward pass like DDP's own
allreduce); residuals are dropped and compressor state committed afterwards, in the future's callback, only if
the sum is finite on every rank.
"""

from __future__ import annotations

import time

import torch

from ..collectives.backend import completed_future, ring_allreduce_bytes
from ..payload import all_finite
from .plan import Plan
from .units import BucketView

__all__ = ["dense_exchange"]


def dense_exchange(state, view: BucketView, plan: Plan) -> torch.futures.Future:
    """Average ``view``'s buffer over ranks (flushing residuals first when ``plan.flush``); a future of it."""
    backend, buffer = state.backend, view.buffer
    started = time.perf_counter()
    if plan.transform:  # an exchange-aware optimizer: its update takes the gradient's place, in the buffer
        for p, g in zip(view.params, view.grads):
            g.copy_(state.options.optimizer.to_wire(p, g.view(p.shape)).reshape(-1))
    flushed = _flush(state, view) if plan.flush else []
    before = (backend.bytes_sent, backend.bytes_received)
    step = state.step
    buffer.mul_(1.0 / backend.size)  # scale first, as DDP's reducer does (PyTorch's allreduce_hook divides after)

    def commit(out: torch.Tensor) -> torch.Tensor:
        ok = all_finite(out)
        if ok and plan.flush:
            for name in flushed:
                state.feedback.residuals.pop(name, None)
            for name in view.names:
                state.compressor.after_send_all(name)
        state.telemetry.record_finite(step, ok)
        return out

    if plan.wait:
        result = completed_future(commit(backend.allreduce(buffer)))
    else:
        result = backend.allreduce_async(buffer).then(lambda f: commit(f.value()))
    state.telemetry.record_bucket(sent_bytes=backend.bytes_sent - before[0],
                                  received_bytes=backend.bytes_received - before[1],
                                  dense_bytes=ring_allreduce_bytes(view.numel, buffer.element_size(), backend.size),
                                  elements_sent=view.numel, elements_total=view.numel, collective=plan.collective,
                                  overlapped=not plan.wait)
    if plan.collective == "dense":  # auto's dense choice: its time, when measured, feeds the tuner
        predicted = None if plan.choice is None else plan.choice.predictions["dense"].time
        elapsed = time.perf_counter() - started if plan.wait else 0.0
        if plan.wait and plan.choice is not None:
            state.planner.tuner.observe(view.layout, "dense", predicted, elapsed)
        state.telemetry.record_choice("dense", predicted, elapsed)
    state.planner.end_bucket(state, view)
    return result


def _flush(state, view: BucketView) -> list[str]:
    """Add each residual into its gradient in place (through the compressor's dense step); the names flushed.

    A bucket sent whole needs no per-example statistics either: this step's are dropped, so that they do not add
    to the next selection's.
    """
    comp, feedback = state.compressor, state.feedback
    scale = state.loss_scale()
    flushed = []
    for p, g, name, pos in zip(view.params, view.grads, view.names, view.positions):
        r = feedback.residuals.get(name) if feedback.enabled else None
        if r is not None and r.numel() != g.numel():
            r = None
        comp.dense_step(g, r, state.context(name, pos, scale), scale)
        if r is not None:
            flushed.append(name)
        if state.second_moment is not None and not state.second_moment.paused:
            state.second_moment.pop(p)
    return flushed
