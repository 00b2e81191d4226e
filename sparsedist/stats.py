"""Telemetry of a sparsifying hook: what went through the collectives, and what dense DDP would have sent.

The keys of :meth:`Telemetry.as_dict` are public API:

``steps``
    number of completed gradient exchanges (optimizer steps that communicated; ``no_sync`` steps excluded).
``bytes_sent`` / ``bytes_received``
    cumulative bytes this rank put on / took off the wire in collectives, counted with the cost of the
    algorithm each primitive uses (ring allreduce ``2(P-1)/P * n * b`` each way; allgather ``(P-1)`` padded
    blocks each way), headers and padding included.
``bytes_dense``
    cumulative bytes this rank would have sent with a dense ring allreduce of the same gradients in their own
    dtype, ``2(P-1)/P * n * element_size``.
``compression_ratio``
    ``bytes_dense / bytes_sent`` (inf when nothing was sent).
``density``
    fraction of gradient elements this rank sent, mean over steps.
``last_density``
    the same, for the last step only.
``residual_norm``
    L2 norm of all error-feedback residuals of this rank (unscaled units), computed when asked.
``overflow_steps``
    steps on which some rank had a non-finite gradient (the result was NaN, residuals untouched).
``collectives``
    how many times each exchange path was used, e.g. ``{"allgather": 120, "allreduce": 3}``. Under
    ``collective="auto"``, ``"dense"`` counts buckets that auto sent in full (no selection, residual flushed);
    ``"sparse_rows"`` counts buckets of sparse gradients (``nn.Embedding(sparse=True)``) exchanged as they are.
``buckets`` / ``overlapped``
    bucket exchanges so far, and how many of them ran asynchronously, overlapped with the rest of the backward
    pass (plain DDP's dense allreduce; fixed-count sparse exchanges: top-k, DGC, rand-k and mask-aware selection
    with ``collective="allgather"``, without a ``timeout``). The others (variable counts: threshold, variance,
    Wangni's rand-k; the multi-round SparCML algorithms and the global top-k; ``collective="auto"``, which
    measures) run synchronously inside the hook.
``collective_time``
    per sparse collective algorithm: ``{"calls", "measured_s", "predicted_s"}``, the summed measured seconds
    of the bucket's exchange (error-feedback accumulation and selection included) and, when the algorithm was
    picked by the cost model (``collective="auto"``), the summed predicted seconds of those calls (else None).
    A bucket that auto sends through the asynchronous allreduce (dense, no residual left) counts a call with 0
    measured seconds: its time overlaps the backward pass and is not measured per bucket.
``auto_ratios``
    ``collective="auto"`` only: per bucket (``"index:numel"``) whose trials are done, the measured/predicted
    time ratio of each collective tried, averaged over ranks (:class:`sparsedist.collectives.AutoTuner`);
    the choice minimises ratio x predicted time. Empty otherwise.
``step_check``
    ``collective="auto"`` with a compressor only (else None): the whole-step check of auto's sparse choices
    against dense steps (:class:`sparsedist.collectives.StepCheck`): ``{"verdict": "sparse" | "dense",
    "next_check": step, "checks": [{"step", "sparse_step_s", "dense_step_s", "verdict"}, ...]}`` with the
    median step seconds of each mode, averaged over ranks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

__all__ = ["Telemetry"]


class Telemetry:
    """Counters accumulated by the hook, per rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_dense = 0
        self.overflow_steps = 0
        self.density_sum = 0.0
        self.last_density = 0.0
        self.collectives: Counter[str] = Counter()
        self.buckets = 0
        self.overlapped = 0
        self.collective_time: dict[str, dict[str, Any]] = {}
        self._step_sent = 0
        self._step_total = 0
        self._overflowed: set[int] = set()          # recent steps already counted as overflow steps
        self._device_flags: list[tuple[int, torch.Tensor]] = []  # (step, 0-d "finite" flag) read when asked

    def record_bucket(self, *, sent_bytes: int, received_bytes: int, dense_bytes: int, elements_sent: int,
                      elements_total: int, collective: str, overlapped: bool = False) -> None:
        self.bytes_sent += int(sent_bytes)
        self.bytes_received += int(received_bytes)
        self.bytes_dense += int(dense_bytes)
        self._step_sent += int(elements_sent)
        self._step_total += int(elements_total)
        self.collectives[collective] += 1
        self.buckets += 1
        self.overlapped += int(overlapped)

    def record_choice(self, algorithm: str, predicted_s: float | None, measured_s: float) -> None:
        entry = self.collective_time.setdefault(algorithm, {"calls": 0, "measured_s": 0.0, "predicted_s": None})
        entry["calls"] += 1
        entry["measured_s"] += measured_s
        if predicted_s is not None:
            entry["predicted_s"] = (entry["predicted_s"] or 0.0) + predicted_s

    def end_step(self) -> None:
        self.last_density = self._step_sent / self._step_total if self._step_total else 0.0
        self.density_sum += self.last_density
        self.steps += 1
        self._step_sent = self._step_total = 0

    def record_finite(self, step: int, finite: bool | torch.Tensor) -> None:
        """Count ``step`` as an overflow step (once, however many buckets overflowed) unless ``finite``.

        ``finite`` may be a 0-d device tensor (an overlapped exchange on an accelerator): it is read only when
        the telemetry is asked for, so the exchange needs no host synchronisation. May be called from the
        communication thread.
        """
        if isinstance(finite, torch.Tensor):
            self._device_flags.append((step, finite))
        elif not finite and step not in self._overflowed:
            self._overflowed.add(step)
            self.overflow_steps += 1
            if len(self._overflowed) > 64:
                self._overflowed = {s for s in self._overflowed if s > step - 32}

    def as_dict(self, residual_norm: float) -> dict[str, Any]:
        flags, self._device_flags = self._device_flags, []
        for step, finite in flags:
            self.record_finite(step, bool(finite))
        return {
            "steps": self.steps,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_dense": self.bytes_dense,
            "compression_ratio": (self.bytes_dense / self.bytes_sent) if self.bytes_sent else float("inf"),
            "density": self.density_sum / self.steps if self.steps else 0.0,
            "last_density": self.last_density,
            "residual_norm": residual_norm,
            "overflow_steps": self.overflow_steps,
            "collectives": dict(self.collectives),
            "buckets": self.buckets,
            "overlapped": self.overlapped,
            "collective_time": {k: dict(v) for k, v in self.collective_time.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        self.as_dict(0.0)  # reads any pending device flags
        return {k: (dict(v) if isinstance(v, (Counter, dict)) else v) for k, v in self.__dict__.items()
                if k not in ("_overflowed", "_device_flags")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for k, v in state.items():
            if k not in ("_overflowed", "_device_flags"):
                setattr(self, k, Counter(v) if k == "collectives" else v)
