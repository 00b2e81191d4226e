"""``collective="auto"``'s per-bucket choice: the cost model's prediction, corrected by measured times."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from .backend import Backend
from .choose import Choice

__all__ = ["AutoTuner", "BucketTrials"]


class AutoTuner:
    """The per-bucket choice of ``collective="auto"``: the cost model's prediction, corrected by measured times.

    An alpha-beta model fitted to allreduce timings misses fixed costs of each algorithm on a real host (its
    Python-level calls, densifying the result, merges); measured on loopback the sparse algorithms took 2-6x
    their predicted time while dense took 1.3-2x, enough to pick a collective 1.7-3x slower than the best one.
    The tuner measures instead of trusting: the first ``trials * len(plausible)`` calls of each bucket run every
    *plausible* candidate (predicted within ``explore_factor`` of the best prediction) ``trials`` times,
    interleaved; each rank keeps, per candidate, the smallest ratio of measured to predicted time (the fastest
    of the trials: warm-up and contention only add time); one allreduce averages the ratios over ranks. Once,
    candidates left out are then tried too if even their bare prediction is within ``explore_factor`` of the
    best *measured* time (the model underprices sparse collectives, so dense can be left out at first on a fast
    link); their ratios are agreed the same way. From then on the bucket uses the candidate with the smallest
    ``ratio * predicted time``. The model keeps the
    scaling with the count (a density schedule, a changing union), the ratios supply what it misses; candidates
    never tried take the largest measured ratio. Every rank calls in the same order with the same arguments and
    ends with the same ratios, so choices are identical everywhere.

    Args:
        trials: calls of each plausible candidate per bucket before choosing (0: the model alone).
        explore_factor: candidates predicted more than this many times slower than the best are not tried.
        dense_margin: a *measured* dense sum is chosen when it is at most this fraction slower than the best
            candidate (default 0.25). The trials time each bucket's exchange synchronously, but in the hook an
            uncompressed bucket runs plain DDP's allreduce, overlapped with the rest of the backward pass, and
            leaves no residual behind; neither shows in a per-bucket measurement. (Measured on loopback, P = 2,
            0.1 %, without the margin: one bucket kept allgather and the step took 1.59x plain DDP's.)
        refresh_every: after the trials, every this many calls of a bucket the ratio of each collective that ran
            is replaced by the median of its recent measured ratios (its last ``max(4, refresh_every // 2)``
            calls, which may span several periods), averaged over ranks (one small allreduce), and the choice is
            made again (0: never). Two trials per candidate are noisy; measured at 100 Mbit/s with 4 ranks on 2
            cores, a bucket once kept a collective 1.23x slower than the best without this. A runner-up whose
            estimate is within 25 % of the best runs once per period, so that it is re-measured as well.

    ``state_dict()``/``load_state_dict()`` carry every bucket's whole state (trials, agreed ratios, recent samples),
    so a resumed run chooses as the uninterrupted one would.
    """

    def __init__(self, trials: int = 2, explore_factor: float = 4.0, dense_margin: float = 0.25,
                 refresh_every: int = 16):
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
            raise ValueError(f"AutoTuner: trials must be an int >= 0, got {trials!r}")
        if isinstance(explore_factor, bool) or not isinstance(explore_factor, (int, float)) or not explore_factor >= 1:
            raise ValueError(f"AutoTuner: explore_factor must be a number >= 1, got {explore_factor!r}")
        if isinstance(dense_margin, bool) or not isinstance(dense_margin, (int, float)) or not dense_margin >= 0:
            raise ValueError(f"AutoTuner: dense_margin must be a number >= 0, got {dense_margin!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"AutoTuner: refresh_every must be an int >= 0, got {refresh_every!r}")
        self.trials = trials
        self.explore_factor = float(explore_factor)
        self.dense_margin = float(dense_margin)
        self.refresh_every = refresh_every
        self.explore_margin = 0.25  # a runner-up within this fraction of the best is re-measured once per refresh
        self._buckets: dict[str, BucketTrials] = {}

    @property
    def history(self) -> int:
        """Measured ratios per collective kept from one refresh to the next."""
        return max(4, self.refresh_every // 2)

    @staticmethod
    def _key(bucket) -> str:
        return ":".join(str(x) for x in bucket) if isinstance(bucket, tuple) else str(bucket)

    def tuning(self, bucket) -> bool:
        """True while ``bucket``'s trials are running (its next call will be measured)."""
        st = self._buckets.get(self._key(bucket))
        return self.trials > 0 and (st is None or st.ratios is None)

    def choose(self, bucket, choice: Choice, backend: Backend) -> str:
        """The collective for this call of ``bucket``, given the model's :class:`Choice` over the candidates.

        A collective call (one small allreduce) on the call after the bucket's last trial, and at each refresh;
        otherwise local.
        """
        if self.trials == 0:
            return choice.algorithm
        preds = choice.predictions
        key = self._key(bucket)
        st = self._buckets.get(key)
        if st is None:
            best = min(p.time for p in preds.values())
            plausible = [a for a in preds if preds[a].time <= self.explore_factor * best] or [choice.algorithm]
            st = self._buckets[key] = BucketTrials(plan=[a for _ in range(self.trials) for a in plausible])
        while st.ratios is None:
            if st.next < len(st.plan):
                st.next += 1
                return st.plan[st.next - 1]
            self._agree(st, preds, choice, backend)
        st.calls += 1
        if self.refresh_every and st.calls % self.refresh_every == 0:
            runner_up = self._refresh(st, preds, backend)
            if runner_up is not None:
                return runner_up
        ratios = st.ratios
        worst = max(ratios.values())
        order = list(preds)
        est = {a: ratios.get(a, worst) * preds[a].time for a in order}
        best = min(order, key=lambda a: (est[a], a != "dense", order.index(a)))
        if "dense" in ratios and est["dense"] <= (1.0 + self.dense_margin) * est[best]:
            return "dense"  # measured as close as makes no difference: the uncompressed, overlappable sum
        return best

    def _agree(self, st: "BucketTrials", preds: dict, choice: Choice, backend: Backend) -> None:
        """The trials are over: average this rank's best ratios over ranks (one allreduce), then take a second
        look, once, or settle the ratios."""
        tried = [a for a in dict.fromkeys(st.plan) if a not in st.agreed]
        local = torch.tensor([st.best.get(a, math.nan) for a in tried], dtype=torch.float64)
        agreed = backend.allreduce(local) / backend.size
        st.agreed.update({a: float(r) for a, r in zip(tried, agreed.tolist()) if math.isfinite(r)})
        if not st.agreed:  # nothing was measured (e.g. no prediction): trust the model
            st.agreed = {choice.algorithm: 1.0}
        # A second look, once: a candidate not tried because the model priced it far above the best *prediction*
        # is tried if even its bare prediction is within explore_factor of the best *measured* time (e.g. dense,
        # whose prediction is honest, against sparse collectives that cost far more than predicted once selection
        # and densifying are counted).
        best = min(r * preds[a].time for a, r in st.agreed.items() if a in preds)
        extra = [a for a in preds if a not in st.agreed and preds[a].time <= self.explore_factor * best]
        if extra and not st.extended:
            st.extended = True
            st.plan += [a for _ in range(self.trials) for a in extra]
        else:
            st.ratios = dict(st.agreed)

    def _refresh(self, st: "BucketTrials", preds: dict, backend: Backend) -> str | None:
        """Keep measuring: the ratio of what actually ran is refreshed from its recent calls (median per rank,
        averaged over ranks), so a choice made on a few noisy trials is corrected once it proves slower than a
        competitor's estimate (which then runs and is refined in turn). Returns a close runner-up to run now
        (to be measured again), or None."""
        names = list(preds)  # the same candidates in the same order on every rank
        recent = st.recent
        local = [statistics.median(recent[a]) if recent.get(a) else 0.0 for a in names]
        seen = [1.0 if recent.get(a) else 0.0 for a in names]
        both = backend.allreduce(torch.tensor(local + seen, dtype=torch.float64)).tolist()
        for a, total, n in zip(names, both[:len(names)], both[len(names):]):
            if n == backend.size:  # every rank measured it
                st.ratios[a] = total / n
        # each collective keeps its last few samples across periods: the runner-up runs once per period, so its
        # estimate is the median of its last runs, not one sample (one lucky call flipped the choice: 41 of 138
        # calls at 100 Mbit/s went to a collective 8 % slower than the best)
        st.recent = {a: r[-self.history:] for a, r in recent.items()}
        # ... and the runner-up, if close, runs once per period, so that its estimate is refreshed too
        # (otherwise a competitor misjudged by its trials would never be measured again)
        tried = sorted(st.ratios, key=lambda a: st.ratios[a] * preds[a].time if a in preds else math.inf)
        if len(tried) > 1 and tried[1] in preds and tried[0] in preds and (
                st.ratios[tried[1]] * preds[tried[1]].time
                <= (1.0 + self.explore_margin) * st.ratios[tried[0]] * preds[tried[0]].time):
            return tried[1]
        return None

    def observe(self, bucket, algorithm: str, predicted_s: float | None, measured_s: float) -> None:
        """Record one measured call of ``algorithm`` on ``bucket`` (trials, then the refresh of what runs)."""
        st = self._buckets.get(self._key(bucket))
        if st is None or predicted_s is None or not predicted_s > 0 or not math.isfinite(measured_s):
            return
        ratio = measured_s / predicted_s
        if st.ratios is None:
            st.best[algorithm] = min(ratio, st.best.get(algorithm, math.inf))
        else:
            st.recent.setdefault(algorithm, []).append(ratio)

    def ratios(self) -> dict:
        """``{bucket: {algorithm: measured/predicted}}`` for the buckets whose trials are done."""
        return {k: dict(v.ratios) for k, v in self._buckets.items() if v.ratios is not None}

    def state_dict(self) -> dict:
        return {"trials": self.trials, "explore_factor": self.explore_factor, "dense_margin": self.dense_margin,
                "refresh_every": self.refresh_every, "buckets": {k: v.state_dict() for k, v in self._buckets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.trials = int(state.get("trials", self.trials))
        self.explore_factor = float(state.get("explore_factor", self.explore_factor))
        self.dense_margin = float(state.get("dense_margin", self.dense_margin))
        self.refresh_every = int(state.get("refresh_every", self.refresh_every))
        self._buckets = {k: BucketTrials.from_state(v) for k, v in state.get("buckets", {}).items()}


@dataclass
class BucketTrials:
    """The tuner's state for one bucket.

    Attributes:
        plan: the trial schedule (each plausible candidate ``trials`` times, interleaved).
        next: trials run so far.
        best: this rank's fastest measured/predicted ratio per candidate, during the trials.
        agreed: the ratios averaged over ranks, per candidate tried.
        extended: the second look (candidates the model priced out at first) has happened.
        ratios: the ratios in force once the trials are over (None while they run).
        calls: calls since the trials ended (a refresh every ``refresh_every``).
        recent: measured ratios per collective since the trials, the last ``history`` kept at each refresh.
    """

    plan: list[str]
    next: int = 0
    best: dict[str, float] = field(default_factory=dict)
    agreed: dict[str, float] = field(default_factory=dict)
    extended: bool = False
    ratios: dict[str, float] | None = None
    calls: int = 0
    recent: dict[str, list[float]] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"plan": list(self.plan), "next": self.next, "best": dict(self.best), "agreed": dict(self.agreed),
                "extended": self.extended, "calls": self.calls,
                "recent": {a: list(r) for a, r in self.recent.items()},
                "ratios": None if self.ratios is None else dict(self.ratios)}

    @classmethod
    def from_state(cls, v: dict) -> "BucketTrials":
        return cls(plan=list(v["plan"]), next=int(v["next"]), best=dict(v["best"]), agreed=dict(v.get("agreed", {})),
                   extended=bool(v.get("extended", False)), ratios=None if v["ratios"] is None else dict(v["ratios"]),
                   calls=int(v.get("calls", 0)), recent={a: list(r) for a, r in v.get("recent", {}).items()})
