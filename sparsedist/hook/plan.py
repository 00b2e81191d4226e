"""The planner: every per-step and per-bucket decision of the exchange, made before any data moves.

For each bucket it returns a :class:`Plan` -- which route, which collective, whether to select, whether to run
asynchronously -- from the configuration and from results every rank shares (never from local counts), so every
rank plans the same. It owns what those decisions need: ``collective="auto"``'s cost model, tuner and whole-step
check, the mask provider's dense steps (RigL), the second-moment collector's pause, the per-bucket collectives
that keep state (global top-k), and the consistency checks at the start of a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..collectives.choose import Choice, CostModel
from ..collectives.base import Collective
from ..collectives.measure import probe
from ..collectives.registry import EXACT_ALGORITHMS, make
from ..collectives.tuner import AutoTuner
from ..compressors.base import count_for_density
from ..guard import check_parameters, fingerprint
from ..options import exchange_aware
from ..payload import accumulator_dtype
from .units import BucketView

__all__ = ["Plan", "Planner", "DENSE", "SPARSE", "ROWS"]

DENSE, SPARSE, ROWS = "dense", "sparse", "rows"


@dataclass(frozen=True)
class Plan:
    """How one bucket is exchanged.

    Attributes:
        route: ``DENSE`` -- the bucket buffer itself is averaged by one allreduce (residuals flushed into it first
            when ``flush``); ``SPARSE`` -- accumulate, select, sum with ``collective``, commit; ``ROWS`` -- a
            sparse (COO) gradient, whose rows are sent as they are (:mod:`.rows`).
        collective: what runs, as telemetry names it: ``"allreduce"`` (dense by configuration), ``"dense"``
            (auto's dense choice), ``"values_allreduce"`` (shared indices), or an algorithm of the registry.
        choice: auto's model choice (its predictions), or None.
        select: SPARSE: the compressor selects (False: every entry is sent).
        mask_dense: the mask provider wants the dense gradient this step (RigL's update step).
        shared: SPARSE: every rank sends the same indices (values only).
        flush: DENSE: add each residual into the buffer first (the compressor's dense step).
        wait: run synchronously (a timeout, a backend without asynchronous collectives, ``exchange_flat``, or
            auto's timing); otherwise the collective is launched and its future returned.
        timed: auto's tuner times this call (synchronous, measured).
        overlap: SPARSE and asynchronous: the payload has a size fixed by the configuration, so one collective is
            launched and decoding and the commit run in its callback (the backward pass continues meanwhile).
        transform: an exchange-aware optimizer's sparse phase: each gradient is replaced by
            ``optimizer.to_wire(p, grad)`` (its update) before anything else.
        count: SPARSE: the entries each rank sends at most (from the configuration), or None when it varies.
    """

    route: str
    collective: str
    choice: Choice | None = None
    select: bool = True
    mask_dense: bool = False
    shared: bool = False
    flush: bool = False
    wait: bool = True
    timed: bool = False
    overlap: bool = False
    count: int | None = None
    transform: bool = False


class Planner:
    """Decides each bucket's :class:`Plan`; one per :class:`~sparsedist.SparsifyState`."""

    def __init__(self, options, compressor) -> None:
        self.options = options
        self.compressor = compressor
        self.cost_model: CostModel | None = options.cost_model
        self.tuner = AutoTuner(options.auto_trials)
        self.step_check = options.step_check(compressor)
        self.collectives: dict[tuple, Collective] = {}  # stateful collectives, one per bucket layout
        self.last_union: dict[tuple, int] = {}         # support of the last sum (auto's fill-in estimate)
        self.last_max_count: dict[tuple, int] = {}     # largest count of the last allgather (variable counts)
        self.moments_paused = False                    # the second-moment collector skipped this step's backward
        self.verified = False
        self._layouts_now: set = set()                 # bucket layouts auto decided this step / the step before
        self._layouts_before: set = set()

    # -- the start of a step --------------------------------------------------------------------------------
    def begin_step(self, state, view: BucketView) -> None:
        """First bucket of a step: the configuration check (once), ``check_every``, auto's whole-step clock."""
        backend = state.backend
        try:
            if not self.verified:
                self._verify_configuration(state, view.buffer)
            every = self.options.check_every
            if every and state.step and state.step % every == 0 and state.module is not None:
                check_parameters(state.module, backend)
        except RuntimeError as exc:
            raise RuntimeError(f"sparsedist: consistency check before DDP bucket {view.layout[0]} failed at step "
                               f"{state.step}: {exc}") from exc
        if self.step_check is None:
            return
        settled = state.step > 0 and not any(self.tuner.tuning(layout)
                                             for layout in self._layouts_now | self._layouts_before)
        self._layouts_before, self._layouts_now = self._layouts_now, set()
        try:
            self.step_check.begin_step(state.step, settled, backend)
        except RuntimeError as exc:
            raise RuntimeError(f"sparsedist: auto's step check before DDP bucket {view.layout[0]} failed at step "
                               f"{state.step}: {exc}") from exc

    def _verify_configuration(self, state, buffer: torch.Tensor) -> None:
        """Compare the configuration across ranks once, at the first exchange; raise on every rank if it differs."""
        config = state.configuration(buffer)
        rows = state.backend.allgather(fingerprint(config).to(buffer.device)).cpu()
        self.verified = True
        differ = {key: [r for r in range(rows.shape[0]) if rows[r, i] != rows[0, i]]
                  for i, key in enumerate(sorted(config))}
        what = [f"{key!r} on rank {state.backend.rank} is {config[key]!r} and differs between rank 0 and rank(s) "
                f"{ranks}" for key, ranks in differ.items() if ranks]
        if what:
            raise ValueError("sparsedist: the hook is configured differently across ranks: " + "; ".join(what)
                             + ". Every rank must call register() with the same compressor and options")

    # -- one bucket -----------------------------------------------------------------------------------------
    def plan(self, state, view: BucketView, synchronous: bool) -> Plan:
        opts, comp = self.options, self.compressor
        masks = opts.masks
        mask_dense = masks is not None and bool(masks.needs_dense_gradient())
        asynchronous = state.backend.supports_async and not synchronous
        if view.sparse and not (comp is None and masks is None):  # "none" stays plain DDP's sparse allreduce
            return Plan(ROWS, "sparse_rows")
        transform = exchange_aware(opts.optimizer)
        if transform and opts.optimizer.exchange_is_dense():  # its warm-up: raw gradients, averaged densely
            return Plan(DENSE, "allreduce", wait=not asynchronous)
        if comp is None and masks is None or (mask_dense and not state.feedback.enabled):
            return Plan(DENSE, "allreduce", mask_dense=mask_dense, wait=not asynchronous, transform=transform)
        shared = mask_dense or comp is None or comp.shared_indices
        step_dense = not mask_dense and self.step_check is not None and (
            self.step_check.mode(state.step) == "dense" or self.moments_paused)
        wire = opts.value_dtype or view.buffer.dtype
        decided = ("dense", None) if step_dense else None if shared else self.algorithm(state, view, wire)
        choice = None if decided is None else decided[1]
        timed = choice is not None and self.tuner.tuning(view.layout)
        sends_all = (decided is not None and decided[0] == "dense" and opts.collective == "auto"
                     and comp is not None and comp.dense_fallback)
        if sends_all:
            # the dense path adds residuals into the buffer in place: the buffer must hold the accumulator exactly,
            # and a compressor that transforms the gradient (DGC's momentum) does so only on the asynchronous path
            # at loss scale 1 (its dense_step); otherwise everything goes through the sparse path unselected
            flushable = (masks is None and opts.value_dtype in (None, view.buffer.dtype)
                         and accumulator_dtype(view.buffer.dtype) == view.buffer.dtype)
            in_place = comp.accumulates_plainly or (asynchronous and not timed and state.loss_scale() == 1.0)
            if flushable and in_place:
                return Plan(DENSE, "dense", choice=choice, flush=True, wait=not asynchronous or timed, timed=timed,
                            transform=transform)
        shared = shared or sends_all
        if shared:
            collective = "allreduce" if mask_dense else "dense" if sends_all else "values_allreduce"
        else:
            collective = decided[0]
        count = None if shared else self.expected_count(state, view)
        fixed = shared or (count is not None and comp.count_bounded)  # shared indices: the same count everywhere
        overlap = asynchronous and opts.collective != "auto" and fixed and (shared or collective == "allgather")
        return Plan(SPARSE, collective, choice=choice, select=not (mask_dense or sends_all), mask_dense=mask_dense,
                    shared=shared, wait=not overlap, timed=timed, overlap=overlap, count=count, transform=transform)

    def algorithm(self, state, view: BucketView, wire_dtype: torch.dtype) -> tuple[str, Choice | None]:
        """The collective for this bucket and step; identical on every rank (it depends on configuration and on
        results every rank shares, never on local counts)."""
        if self.options.collective != "auto":
            return self.options.collective, None
        layout = view.layout
        self._layouts_now.add(layout)
        nnz = self.expected_count(state, view)
        # A variable-count compressor's count comes from its last allgather; it is counted afresh at the first
        # step of each whole-step check too (dense choices leave the last count as it was, so a count from a
        # dense early phase would otherwise keep auto dense)
        if nnz is None and not (self.step_check is not None and self.step_check.window_begins(state.step)):
            nnz = self.last_max_count.get(layout)
        if nnz is None:  # count it with the allgather
            return "allgather", None
        if self.cost_model is None:
            self.cost_model = probe(state.backend)
        choice = self.cost_model.choose(view.numel, float(nnz), state.backend.size, candidates=EXACT_ALGORITHMS,
                                        value_bytes=torch.empty(0, dtype=wire_dtype).element_size(),
                                        union_nnz=self.last_union.get(layout))
        return self.tuner.choose(layout, choice, state.backend), choice

    def expected_count(self, state, view: BucketView) -> int | None:
        """Entries each rank sends for this bucket, from the configuration alone (None for variable counts)."""
        comp = self.compressor
        density = None if comp is None else comp.density_at(state.step)
        if density is None:
            return None
        sizes = [(state.active_count(p, name), name) for p, name in zip(view.params, view.names)]
        whole = [n for n, name in sizes if n < self.options.dense_below or name in state.full_keys]
        selected = [n for n, name in sizes if not (n < self.options.dense_below or name in state.full_keys)]
        if self.options.granularity == "bucket":
            return sum(whole) + count_for_density(sum(selected), density)
        return sum(whole) + sum(count_for_density(n, density) for n in selected)

    def collective_for(self, name: str, layout: tuple) -> Collective:
        """The collective ``name`` for the bucket ``layout`` (one instance per bucket when it keeps state)."""
        if (name, layout) not in self.collectives:
            self.collectives[(name, layout)] = make(name)
        return self.collectives[(name, layout)]

    # -- the end of a bucket --------------------------------------------------------------------------------
    def end_bucket(self, state, view: BucketView) -> None:
        """Count the step at its last bucket; pause the second-moment collector on steps sent densely."""
        if not view.bucket.is_last():
            return
        state.in_step = False
        if state.usage is not None:
            state.usage.end_step()
        state.telemetry.end_step()
        state.step += 1
        collector = state.second_moment
        if collector is not None and self.step_check is not None:
            # per-example statistics cost a backward-pass's worth of work: skip them on steps that will be sent
            # densely (a verdict that turns sparse at the next step finds them missing and waits a step)
            if self.moments_paused or self.step_check.mode(state.step - 1) == "dense":
                collector.reset()  # nothing of a dense step may leak into the next selection
            self.moments_paused = self.step_check.mode(state.step) == "dense"
            collector.paused = self.moments_paused

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def key(layout: tuple) -> str:
            return ":".join(str(x) for x in layout)

        return {"cost_model": None if self.cost_model is None else self.cost_model.state_dict(),
                "tuner": self.tuner.state_dict(),
                "step_check": None if self.step_check is None else self.step_check.state_dict(),
                "last_union": {key(k): v for k, v in self.last_union.items()},
                "last_max_count": {key(k): v for k, v in self.last_max_count.items()},
                "collectives": {f"{name}@{key(layout)}": c.state_dict()
                                for (name, layout), c in self.collectives.items()}}

    def load_state_dict(self, auto: dict[str, Any]) -> None:
        def layout(key: str) -> tuple:
            return tuple(int(x) for x in key.split(":"))

        if auto.get("cost_model") is not None:
            self.cost_model = CostModel()
            self.cost_model.load_state_dict(auto["cost_model"])
        self.tuner.load_state_dict(auto.get("tuner", {}))
        if self.step_check is not None and auto.get("step_check") is not None:
            self.step_check.load_state_dict(auto["step_check"])
        self.last_union = {layout(k): int(v) for k, v in auto.get("last_union", {}).items()}
        self.last_max_count = {layout(k): int(v) for k, v in auto.get("last_max_count", {}).items()}
        for key, st in auto.get("collectives", {}).items():
            name, where = key.split("@")
            self.collective_for(name, layout(where)).load_state_dict(st)
