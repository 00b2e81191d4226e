"""The exchange of one bucket, top to bottom: plan -> accumulate -> select -> reduce -> commit.

:func:`exchange` is the whole hook body. The planner decides (:mod:`.plan`); a dense plan takes the one dense
path (:mod:`.dense`); a sparse plan accumulates each parameter's gradient with its residual (error feedback),
lets the compressor select, sums with one collective of the registry and commits residuals and compressor state
only if the sum is finite on every rank. A plan whose payload size is fixed by the configuration launches its
one collective and returns its future: decoding, averaging and the commit run in the future's callback, which
issues and waits on no collective, while the backward pass goes on.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..collectives.allgather import Allgather, launch_fixed
from ..collectives.backend import completed_future, ring_allreduce_bytes
from ..collectives.base import Reduced
from ..collectives.dense import ValuesAllreduce
from ..collectives.wire import MAX_PACKED_NUMEL
from ..payload import SparseGrad, accumulator_dtype, all_finite, finite_flag
from .dense import dense_exchange
from .plan import DENSE, ROWS, Plan
from .rows import rows_exchange
from .units import BucketView, Unit

__all__ = ["exchange"]


def exchange(state, bucket: dist.GradBucket, synchronous: bool = False) -> torch.futures.Future:
    """Average ``bucket``'s gradients across ranks; a future of the bucket buffer."""
    view = BucketView(bucket, state.params)
    if not state.in_step:
        state.in_step = True
        state.planner.begin_step(state, view)
    if state.usage is not None and not view.sparse:  # DDP's find_unused_parameters: see .usage
        view = state.usage.only_used(view, state.backend)
    plan = state.planner.plan(state, view, synchronous)
    try:
        if plan.route == DENSE:
            return dense_exchange(state, view, plan)
        if plan.route == ROWS:
            return rows_exchange(state, view, plan)
        scale = state.loss_scale()
        finite = finite_flag(view.buffer) if plan.overlap else all_finite(view.buffer)
        before = (state.backend.bytes_sent, state.backend.bytes_received)
        started = time.perf_counter()  # an exchange's measured time includes accumulation and selection
        units = accumulate(state, view, plan, finite, scale)
        select(state, view, units, plan, scale)
        if plan.overlap:
            reduced = launch(state, view, units, plan, finite)
            step = state.step
            _record(state, view, plan, before, sum(u.payload.nnz for u in units) if finite is not False else 0)
            return reduced.then(lambda f: commit(state, view, units, f.value(), plan, scale, step))
        reduced = reduce(state, view, units, plan, finite, started)
        out = commit(state, view, units, reduced, plan, scale, state.step)
        _record(state, view, plan, before, sum(u.payload.nnz for u in units) if finite else 0)
        return completed_future(out)
    except RuntimeError as exc:
        raise RuntimeError(f"sparsedist: exchange of DDP bucket {view.layout[0]} ({len(view.params)} parameters, "
                           f"{view.numel} elements) failed at step {state.step}: {exc}") from exc


def accumulate(state, view: BucketView, plan: Plan, finite, scale: float) -> list[Unit]:
    """Error feedback: each parameter's gradient plus its residual (packed to the active set of a masked one).

    A rank whose gradient is not finite (known on the CPU) accumulates nothing; with shared indices it takes part
    with zeros, since the indices are known without the values.
    """
    comp, feedback, masks = state.compressor, state.feedback, state.options.masks
    units: list[Unit] = []
    if finite is False:
        if plan.transform:  # the optimizer learns of every parameter this step (a skipped step discards them)
            for p, g in zip(view.params, view.grads):
                state.options.optimizer.to_wire(p, g.view(p.shape))
        if not plan.shared:
            return units
        for p, g, off, name, pos in zip(view.params, view.grads, view.offsets, view.names, view.positions):
            mask = None if masks is None or plan.mask_dense else masks.mask_of(p)
            index_map = state.active_indices(name, mask) if mask is not None else None
            n = index_map.numel() if index_map is not None else g.numel()
            units.append(Unit(name, pos, torch.zeros(n, dtype=accumulator_dtype(g.dtype), device=g.device), off,
                              index_map))
        return units
    for p, g, off, name, pos in zip(view.params, view.grads, view.offsets, view.names, view.positions):
        if plan.transform:  # an exchange-aware optimizer: its update takes the gradient's place
            g = state.options.optimizer.to_wire(p, g.view(p.shape)).reshape(-1)
        mask = None if masks is None else masks.mask_of(p)
        index_map = None
        if mask is not None and not plan.mask_dense:
            index_map = state.active_indices(name, mask)
            g = g[index_map]
            residual = feedback.get(name, g, scale)
        elif mask is not None:
            # RigL's update step: the residual was kept on the active set only; spread it back out so the dense
            # exchange carries it (nothing is lost when the mask changes afterwards)
            active = state.active_indices(name, mask)
            packed = feedback.get(name, g.new_empty(active.numel()), scale)
            residual = None
            if packed is not None:
                residual = torch.zeros(g.numel(), dtype=packed.dtype, device=g.device)
                residual[active] = packed
        else:
            residual = feedback.get(name, g, scale)
        if comp is None or plan.mask_dense:
            acc = g.to(accumulator_dtype(g.dtype)) if residual is None else residual + g
        else:
            acc = comp.accumulate(g, residual, state.context(name, pos, scale))
        units.append(Unit(name, pos, acc, off, index_map))
    return units


def select(state, view: BucketView, units: list[Unit], plan: Plan, scale: float) -> None:
    """Fill each unit's payload: the compressor's selection (layer-wise, or across the bucket), or everything."""
    comp, opts = state.compressor, state.options
    moments = [state.moment(p, u) for p, u in zip(view.params, units)]  # popped even if unused: none may linger
    if comp is None or not plan.select:
        for u in units:
            u.send_all()
        return
    whole = [u.numel < opts.dense_below or u.key in state.full_keys for u in units]
    if opts.granularity == "layer":
        for u, moment, sent_whole in zip(units, moments, whole):
            if sent_whole:
                u.send_all()
            else:
                u.payload = comp.compress(u.acc, state.context(u.key, u.index, scale, moment))
        return
    big = [i for i, w in enumerate(whole) if not w]
    for i in (i for i, w in enumerate(whole) if w):
        units[i].send_all()
    if big:
        first = units[big[0]]
        acc = torch.cat([units[i].acc for i in big])
        moment = torch.cat([moments[i] for i in big]) if moments[big[0]] is not None else None
        payload = comp.compress(acc, state.context(first.key, first.index, scale, moment))
        starts = torch.tensor([0] + [units[i].numel for i in big], device=acc.device).cumsum(0)
        owner = torch.bucketize(payload.indices.long(), starts[1:], right=True)
        for j, i in enumerate(big):
            mine = owner == j
            units[i].payload = SparseGrad(payload.indices[mine].long() - starts[j], payload.values[mine],
                                          units[i].numel, payload.shared_indices, payload.constant)


def reduce(state, view: BucketView, units: list[Unit], plan: Plan, finite: bool, started: float) -> Reduced:
    """Sum the payloads over ranks with the plan's collective, synchronously."""
    backend, planner, layout = state.backend, state.planner, view.layout
    wire, dtype = state.wire_dtype(view.buffer), accumulator_dtype(view.buffer.dtype)
    sends_all = not plan.select and not plan.mask_dense
    if plan.shared:
        in_order = sends_all and _contiguous(units, view.numel)  # every entry, in bucket order: no scatter
        values = _values(units, view.buffer.device, wire)
        indices = None if in_order else _bucket_indices(units, view.buffer.device)
        reduced = ValuesAllreduce().reduce(indices, values, view.numel, backend, finite=finite, dtype=dtype,
                                           out=_sum_into(view, units, dtype))
        if sends_all:
            _record_time(state, layout, plan.collective, plan.choice, plan.timed, started, reduced.total)
        return reduced
    idx = _bucket_indices(units, view.buffer.device)
    vals = _values(units, view.buffer.device) if finite else view.buffer.new_empty(0, dtype=wire)
    if plan.collective == "allgather":
        reduced = Allgather().reduce(idx, vals, view.numel, backend, finite=finite, dtype=dtype, wire_dtype=wire,
                                     constant=_packed_constant(units, view.numel), out=_sum_into(view, units, dtype))
        planner.last_max_count[layout] = reduced.max_count
    else:
        reduced = planner.collective_for(plan.collective, layout).reduce(
            idx, vals.to(wire), view.numel, backend, finite=finite, dtype=dtype, k=plan.count,
            out=_sum_into(view, units, dtype))
        if finite and reduced.kept is not None:  # what did not survive a global top-k returns to the residuals
            _keep_only(units, reduced.kept)
    if state.options.collective == "auto":  # the union's size feeds auto's cost model (a pass over the sum)
        planner.last_union[layout] = int(torch.count_nonzero(reduced.total))
    _record_time(state, layout, plan.collective, plan.choice, plan.timed, started, reduced.total)
    return reduced


def launch(state, view: BucketView, units: list[Unit], plan: Plan, finite) -> torch.futures.Future:
    """Start the plan's one fixed-size collective; a future of the :class:`Reduced` sum (no host sync)."""
    wire, dtype = state.wire_dtype(view.buffer), accumulator_dtype(view.buffer.dtype)
    device = view.buffer.device
    idx = _bucket_indices(units, device)
    vals = _values(units, device, wire)
    into = _sum_into(view, units, dtype)
    if plan.shared:
        return ValuesAllreduce().launch(idx, vals, view.numel, state.backend, finite=finite, dtype=dtype, out=into)
    return launch_fixed(state.backend, idx, vals, view.numel, plan.count, finite, dtype, out=into)


def commit(state, view: BucketView, units: list[Unit], reduced: Reduced, plan: Plan, scale: float,
           step: int) -> torch.Tensor:
    """Residuals and compressor state move on only if the sum is finite on every rank; then average into the
    bucket buffer. May run in a future's callback: local work only."""
    comp, wire = state.compressor, state.wire_dtype(view.buffer)
    sends_all = not plan.select and not plan.mask_dense
    out, ok = reduced.total, reduced.finite  # a bool, or a 0-d device tensor (no host synchronisation)
    if ok is False:
        out.fill_(float("nan"))  # every rank sees the overflow: GradScaler skips the step, nothing is lost
        for u in units:
            if comp is not None:
                comp.discard_pending(u.key)
    else:
        for u in units:
            sent = SparseGrad(u.payload.indices, u.payload.values.to(wire), u.numel)
            state.feedback.update(u.key, u.acc, sent, scale, sent_all=sends_all, finite=ok)
            if comp is not None and sends_all:
                comp.after_send_all(u.key)
            elif comp is not None and not plan.mask_dense:
                comp.after_send(u.key, u.payload, finite=ok)
    if reduced.support is not None and ok is not False:  # zero elsewhere: divide only where something arrived
        out[reduced.support] = out[reduced.support].div_(state.backend.size)
    else:
        out.div_(state.backend.size)
    if out is not view.buffer:
        view.buffer.copy_(out)
    state.telemetry.record_finite(step, ok)
    return view.buffer


def _record(state, view: BucketView, plan: Plan, before: tuple[int, int], elements_sent: int) -> None:
    backend = state.backend
    state.telemetry.record_bucket(
        sent_bytes=backend.bytes_sent - before[0], received_bytes=backend.bytes_received - before[1],
        dense_bytes=ring_allreduce_bytes(view.numel, view.buffer.element_size(), backend.size),
        elements_sent=elements_sent, elements_total=view.numel, collective=plan.collective,
        overlapped=plan.overlap)
    state.planner.end_bucket(state, view)


def _record_time(state, layout: tuple, collective: str, choice, timed: bool, started: float,
                 out: torch.Tensor) -> None:
    """Telemetry of one exchange's time (selection included) and, for auto, the tuner's sample."""
    if timed and out.device.type == "cuda":
        torch.cuda.synchronize(out.device)  # time the collective, not its launch
    elapsed = time.perf_counter() - started
    predicted = None if choice is None else choice.predictions[collective].time
    if choice is not None:  # the trials, then the periodic refresh of what runs
        state.planner.tuner.observe(layout, collective, predicted, elapsed)
    state.telemetry.record_choice(collective, predicted, elapsed)


def _bucket_indices(units: list[Unit], device: torch.device) -> torch.Tensor:
    if not units:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat([u.bucket_indices(u.payload.indices) for u in units])


def _values(units: list[Unit], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The units' payload values in order (cast to ``dtype`` if given); empty when there are no units."""
    if not units:
        return torch.empty(0, dtype=dtype or torch.float32, device=device)
    return torch.cat([u.payload.values if dtype is None else u.payload.values.to(dtype) for u in units])


def _sum_into(view: BucketView, units: list[Unit], dtype: torch.dtype) -> torch.Tensor | None:
    """The bucket buffer, if the sum may go straight into it: of the sum's dtype, and nothing still to be
    committed (an accumulator, a payload) lives in it. Saves a fresh vector and its copy into the buffer."""
    buffer = view.buffer
    if buffer.dtype != dtype:
        return None
    ptr = buffer.untyped_storage().data_ptr()
    shared = any(t.untyped_storage().data_ptr() == ptr for u in units for t in (u.acc, u.payload.values))
    return None if shared else buffer


def _contiguous(units: list[Unit], numel: int) -> bool:
    """True if the units tile the bucket buffer in order (no packed active sets)."""
    offset = 0
    for u in units:
        if u.index_map is not None or u.offset != offset:
            return False
        offset += u.numel
    return offset == numel


def _packed_constant(units: list[Unit], numel: int) -> float | None:
    """The shared +/-constant if every payload of the bucket is Strom-quantised (4-byte packed wire format)."""
    constants = {u.payload.constant for u in units if u.payload is not None}
    if numel < MAX_PACKED_NUMEL and units and len(constants) == 1 and None not in constants:
        return constants.pop()
    # (A rank without payloads has a non-finite gradient: it sends nothing and no rank decodes this step.)
    return None


def _keep_only(units: list[Unit], kept: torch.Tensor) -> None:
    """Shrink each unit's payload to the entries that survived (``kept``: one bool per entry, in order)."""
    start = 0
    for u in units:
        n = u.payload.nnz
        sel = kept[start:start + n]
        start += n
        u.payload = SparseGrad(u.payload.indices[sel], u.payload.values[sel], u.numel, u.payload.shared_indices,
                               u.payload.constant)
