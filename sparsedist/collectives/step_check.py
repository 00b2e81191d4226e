"""auto's whole-step check: are the sparse choices faster than plain dense DDP, measured end to end?

The per-bucket choice of ``collective="auto"`` (:class:`~sparsedist.collectives.choose.AutoTuner`) compares
collectives by the time of one bucket's exchange, measured synchronously. Two costs escape that measurement:
plain DDP's dense allreduce runs *asynchronously*, overlapped with the rest of the backward pass, so its cost to
the step is less than its exchange time; and a sparse step pays for work outside the exchange (per-example
statistics for variance-based selection during the backward pass). On a fast link the sum of these decides, and
only a whole-step measurement sees it: measured on loopback (2 ranks, 0.92M parameters), per-bucket choices
that each looked faster made the step 1.88x slower than plain DDP.

:class:`StepCheck` measures it. Every training step is timed from the first bucket of the step to the first
bucket of the next (backward, exchange, optimizer step, forward: the whole iteration). In a check window, steps
alternate between auto's choices ("sparse") and sending every bucket densely ("dense": residuals flushed into
the gradient, then plain DDP's asynchronous allreduce), ``window`` steps each. The medians of each mode, averaged
over ranks with one small allreduce, decide: the sparse choices stay only if their steps are more than
``margin`` faster than dense ones. The check repeats after ``every`` steps; each time the verdict is confirmed
the period doubles (up to ``max_every``), and it falls back to ``every`` when the verdict changes. The first
window starts once the per-bucket trials are over.

``margin`` (default 0.1) leans towards dense because sparsification has a cost the clock does not see: with
error feedback a sparse run needs more steps to the same loss (measured on the char-level GPT with AdamW: about
1.85x the steps of dense DDP at density 1%).

Every rank runs the same schedule (it depends on step numbers and agreed values only), so modes and verdicts
are identical everywhere. ``state_dict()``/``load_state_dict()`` carry the schedule and verdict.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from .backend import Backend

__all__ = ["StepCheck"]

SPARSE, DENSE = "sparse", "dense"


class StepCheck:
    """Whole-step comparison of ``collective="auto"``'s sparse choices against sending everything densely.

    Args:
        window: steps of each mode per check (the verdict compares two medians of this many step times).
        every: steps between the end of one check and the start of the next, at first.
        max_every: the longest period (it doubles each time a check confirms the verdict).
        margin: the sparse choices are kept only if ``sparse_median < (1 - margin) * dense_median``.
        start: the earliest step of the first window (DDP rebuilds its buckets after the first iteration).

    Units: step times in seconds (wall clock, ``time.perf_counter``).
    """

    def __init__(self, window: int = 4, every: int = 100, max_every: int = 1600, margin: float = 0.1,
                 start: int = 2):
        for name, v, low in (("window", window, 1), ("every", every, 1), ("max_every", max_every, 1),
                             ("start", start, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"StepCheck: {name} must be an int >= {low} (steps), got {v!r}")
        if max_every < every:
            raise ValueError(f"StepCheck: max_every ({max_every}) must be >= every ({every})")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise ValueError(f"StepCheck: margin must be a fraction in [0, 1), got {margin!r}")
        self.window, self.every, self.max_every, self.margin, self.start = window, every, max_every, float(margin), start
        self.verdict = SPARSE          # the mode outside check windows
        self.window_start: int | None = None  # first step of the running (or next) check window
        self.period = every
        self.checks: list[dict] = []   # one record per finished check
        self._times: dict[int, float] = {}    # step -> seconds of that step (check window only)
        self._last: tuple[int, float] | None = None  # (step, perf_counter at its first bucket)

    # -- schedule ------------------------------------------------------------------------------------------
    def _in_window(self, step: int) -> bool:
        return self.window_start is not None and self.window_start <= step < self.window_start + 2 * self.window

    def mode(self, step: int) -> str:
        """``"sparse"`` (auto's per-bucket choices) or ``"dense"`` (every bucket sent in full) at ``step``."""
        if self._in_window(step):
            return SPARSE if (step - self.window_start) % 2 == 0 else DENSE
        return self.verdict

    def window_begins(self, step: int) -> bool:
        """True if ``step`` is the first step of a check window."""
        return self.window_start == step

    # -- the clock -----------------------------------------------------------------------------------------
    def begin_step(self, step: int, settled: bool, backend: Backend, now: float | None = None) -> None:
        """Call at the first bucket of every step (every rank, same order), before anything of the step runs.

        ``settled``: the per-bucket trials are over (identical on every rank). Schedules the first window, keeps
        the time of the previous step if it was in a window, and at the end of a window agrees on the verdict
        (one allreduce of two numbers). ``now``: the clock reading (default ``time.perf_counter()``).
        """
        now = time.perf_counter() if now is None else float(now)
        if self._last is not None and self._last[0] == step - 1 and self._in_window(step - 1):
            self._times[step - 1] = now - self._last[1]
        self._last = (step, now)
        if self.window_start is None:
            if settled and step >= self.start:
                self.window_start = step
            return
        end = self.window_start + 2 * self.window
        if step == end:
            self._decide(backend, step)

    def _decide(self, backend: Backend, step: int) -> None:
        ws = self.window_start
        sparse = [t for s, t in self._times.items() if (s - ws) % 2 == 0]
        dense = [t for s, t in self._times.items() if (s - ws) % 2 == 1]
        local = [statistics.median(sparse) if sparse else math.nan, statistics.median(dense) if dense else math.nan]
        agreed = backend.allreduce(torch.tensor(local, dtype=torch.float64)) / backend.size
        sparse_s, dense_s = (float(x) for x in agreed.tolist())
        before = self.verdict
        if math.isfinite(sparse_s) and math.isfinite(dense_s):
            self.verdict = SPARSE if sparse_s < (1.0 - self.margin) * dense_s else DENSE
        self.period = min(self.max_every, 2 * self.period) if self.verdict == before and self.checks else self.every
        self.checks.append({"step": ws, "sparse_step_s": sparse_s, "dense_step_s": dense_s, "verdict": self.verdict})
        self._times = {}
        self.window_start = step + self.period

    # -- reports and state ---------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The configuration (what every rank must agree on)."""
        return {"window": self.window, "every": self.every, "max_every": self.max_every, "margin": self.margin,
                "start": self.start}

    def report(self) -> dict[str, Any]:
        """``{"verdict", "next_check", "checks": [{"step", "sparse_step_s", "dense_step_s", "verdict"}, ...]}``."""
        return {"verdict": self.verdict, "next_check": self.window_start, "checks": [dict(c) for c in self.checks]}

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "every": self.every, "max_every": self.max_every, "margin": self.margin,
                "start": self.start, "verdict": self.verdict, "window_start": self.window_start,
                "period": self.period, "checks": [dict(c) for c in self.checks], "times": dict(self._times)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("window", "every", "max_every", "start", "period"):
            setattr(self, key, int(state[key]))
        self.margin = float(state["margin"])
        if state["verdict"] not in (SPARSE, DENSE):
            raise ValueError(f"StepCheck state: verdict must be {SPARSE!r} or {DENSE!r}, got {state['verdict']!r}")
        self.verdict = state["verdict"]
        self.window_start = None if state["window_start"] is None else int(state["window_start"])
        self.checks = [dict(c) for c in state.get("checks", [])]
        self._times = {int(k): float(v) for k, v in state.get("times", {}).items()}
        self._last = None  # the clock restarts: the interrupted step's time is not measured
