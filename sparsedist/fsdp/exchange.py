"""One FSDP module's gradient reduce-scatter, sparse: plan -> accumulate -> select -> route -> commit.

:func:`reduce_scatter` is the body of :class:`~sparsedist.fsdp.state.SparseReduceScatter`, which ``fully_shard``
calls in backward with this rank's unsharded gradients of the module, flat (see :mod:`.layout`):

* **plan**: the step's route was decided once, at its first reduce-scatter: dense on RigL's mask-update steps
  (the mask provider's ``needs_dense_gradient()``) and during an exchange-aware optimizer's warm-up
  (``exchange_is_dense()``), sparse otherwise.
* **accumulate**: per parameter, its local gradient (packed to its active weights under masks) plus its
  error-feedback residual (:class:`~sparsedist.feedback.ErrorFeedback`, keyed by parameter name); with an
  exchange-aware optimizer (:mod:`.optimizer`) its update ``optimizer.to_wire(p, g)`` instead of the gradient.
* **select**: the compressor picks what to send from each accumulator (layer-wise).
* **route**: each selected entry goes to the rank owning its shard; owners sum in rank order (:mod:`.routing`).
* **commit**: residuals (``acc - sent``) and compressor state move on only if every rank's gradient was finite;
  otherwise every rank's output is NaN (a ``GradScaler`` skips the step) and nothing changes.

The dense route adds every residual into the gradient, reduce-scatters it with ``torch.distributed`` as FSDP
does, and drops the residuals once every rank's gradient is known to be finite (one 1-element allreduce).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..collectives.streams import Codec, coalesce, default_dense_threshold
from ..payload import SparseGrad, accumulator_dtype, all_finite
from .layout import ShardLayout, Slot
from .optimizer import announce, check_average, to_wire
from .routing import route_to_owners

__all__ = ["reduce_scatter", "reduce_scatter_bytes"]

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def reduce_scatter_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring reduce-scatter of ``numel`` elements: ``(P-1)/P * n * b``."""
    return (world_size - 1) * numel * element_size // world_size if world_size > 1 else 0


@dataclass
class Unit:
    """One parameter's accumulator: ``acc`` over its active weights (``active`` maps them to full positions)."""

    slot: Slot
    acc: torch.Tensor
    active: torch.Tensor | None
    payload: SparseGrad | None = None


def reduce_scatter(state, layout: ShardLayout, out: torch.Tensor, inp: torch.Tensor, group, op) -> None:
    """Sum ``inp`` (``(P * S,)``, this rank's gradients) over ranks into ``out`` (``(S,)``, this rank's shard),
    averaged when ``op`` is AVG, sparsely unless the step is dense."""
    layout.check(inp.numel(), out.numel(), "sparsedist.fsdp")
    average = _averages(op)
    if state.optimizer is not None:
        check_average(op)
    backend = state.backend_for(group, layout.world_size)
    state.begin_step()
    before = (backend.bytes_sent, backend.bytes_received)
    total = sum(s.numel for s in layout.slots)
    if state.dense_now:
        ok = _dense(state, layout, out, inp, group, op, backend)
        sent = total if ok else 0
    else:
        actives = [state.active_positions(s) for s in layout.slots]  # may gather masks: on every rank
        finite = all_finite(inp)
        units = accumulate(state, layout, inp, actives) if finite else []
        if not finite and state.optimizer is not None:
            announce(state, layout, inp)
        select(state, units)
        wire = state.options.value_dtype or inp.dtype
        idx, val = _positions(layout, units, wire, inp.device)
        codec = Codec(layout.numel, wire, inp.device)
        sums, ok, _ = route_to_owners(backend, codec, idx, val, layout.chunk, finite,
                                      default_dense_threshold(codec.bv, codec.bi))
        ok = state.agree(ok)
        commit(state, units, ok, wire)
        if ok:
            out.copy_(sums.div_(layout.world_size) if average else sums)
        else:
            out.fill_(float("nan"))  # every rank sees the overflow: a GradScaler skips the step
        sent = int(idx.numel())
    state.telemetry.record_bucket(
        sent_bytes=backend.bytes_sent - before[0], received_bytes=backend.bytes_received - before[1],
        dense_bytes=reduce_scatter_bytes(layout.numel, inp.element_size(), layout.world_size),
        elements_sent=sent, elements_total=total,
        collective="reduce_scatter" if state.dense_now else "sparse_reduce_scatter")
    state.telemetry.record_finite(state.step, ok)


def accumulate(state, layout: ShardLayout, inp: torch.Tensor, actives: list) -> list[Unit]:
    """Each parameter's local gradient (packed to its active weights ``actives[i]``) plus its residual; with an
    exchange-aware optimizer its update ``optimizer.to_wire(p, g)`` takes the gradient's place."""
    comp, scale = state.compressor, state.loss_scale()
    units = []
    for i, (slot, active) in enumerate(zip(layout.slots, actives)):
        g = layout.gradient(inp, slot)
        if state.optimizer is not None:
            g = to_wire(state, slot, g)
        if active is not None:
            g = g[active]
        residual = state.feedback.get(slot.name, g, scale)
        if comp is None:
            acc = g.to(accumulator_dtype(g.dtype)) if residual is None else residual + g
        else:
            acc = comp.accumulate(g, residual, state.context(slot.name, i, scale))
        units.append(Unit(slot, acc, active))
    return units


def select(state, units: list[Unit]) -> None:
    """Fill each unit's payload: the compressor's selection, or everything for small tensors / no compressor."""
    comp, scale = state.compressor, state.loss_scale()
    for i, u in enumerate(units):
        n = u.acc.numel()
        if comp is None or n < state.options.dense_below:
            u.payload = SparseGrad(torch.arange(n, device=u.acc.device), u.acc, n)
        else:
            u.payload = comp.compress(u.acc, state.context(u.slot.name, i, scale))


def commit(state, units: list[Unit], ok: bool, wire: torch.dtype) -> None:
    """Residuals and compressor state move on only if every rank's gradient was finite."""
    comp, scale = state.compressor, state.loss_scale()
    for u in units:
        if not ok:
            if comp is not None:
                comp.discard_pending(u.slot.name)
            continue
        p = u.payload
        sent_all = p.nnz == u.acc.numel()
        state.feedback.update(u.slot.name, u.acc, SparseGrad(p.indices, p.values.to(wire), p.numel), scale,
                              sent_all=sent_all)
        if comp is not None:
            comp.after_send(u.slot.name, p)


def _positions(layout: ShardLayout, units: list[Unit], wire: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All payloads as sorted flat input positions (int64) and their values in the wire dtype."""
    if not units:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=wire, device=device)
    idx, val = [], []
    for u in units:
        q = u.payload.indices.long()
        if u.active is not None:
            q = u.active[q].long()
        idx.append(layout.positions(u.slot, q))
        val.append(u.payload.values.to(wire))
    pos, values, _ = coalesce(torch.cat(idx), torch.cat(val))
    return pos, values


def _dense(state, layout: ShardLayout, out: torch.Tensor, inp: torch.Tensor, group, op, backend) -> bool:
    """Residuals flushed into the gradient, then FSDP's own dense reduce-scatter; True if all were finite."""
    scale = state.loss_scale()
    flushed = []
    if state.feedback.enabled:
        for slot in layout.slots:
            active = state.active_positions(slot)  # may gather masks: on every rank, residual or not
            r = state.feedback.residuals.get(slot.name)
            if r is None:
                continue
            full = r.new_zeros(slot.numel) if active is not None else None
            if full is not None:
                full[active.long()] = r
            layout.add_into(inp, slot, (r if full is None else full).float() * scale)
            flushed.append(slot.name)
    _reduce_scatter_single(out, inp, op=op, group=group)
    n = reduce_scatter_bytes(layout.numel, inp.element_size(), layout.world_size)
    backend.bytes_sent += n
    backend.bytes_received += n
    # with residuals kept, every rank must agree whether they are spent (a collective: decided by the
    # configuration, the same on every rank); without, FSDP's own semantics
    ok = state.agree(all_finite(inp), group=group) if state.feedback.enabled else all_finite(out)
    if ok:
        for name in flushed:
            state.feedback.residuals.pop(name, None)
            if state.compressor is not None:
                state.compressor.after_send_all(name)
    elif state.feedback.enabled:
        out.fill_(float("nan"))
    return ok


def _averages(op) -> bool:
    if op == dist.ReduceOp.AVG:
        return True
    if op == dist.ReduceOp.SUM:
        return False
    raise ValueError(f"sparsedist.fsdp: FSDP asked for a reduce-scatter with {op!r}; only SUM and AVG are supported "
                     f"(set_gradient_divide_factor() makes a pre-multiplied sum: call "
                     f"set_force_sum_reduction_for_comms(True) with it, so that FSDP divides after the exchange)")

