"""``register_fsdp``: sparse gradient exchange for ``fully_shard`` (FSDP2) models, and the state it keeps.

Usage (after ``fully_shard`` has been applied to the layers and the root, before the first backward)::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = sparsedist.fsdp.register_fsdp(model, "topk", density=0.01)
    ...train as usual...
    print(state.stats())          # the DDP hook's keys; bytes_dense = FSDP's dense reduce-scatter

Every ``fully_shard`` module gets a :class:`SparseReduceScatter` through FSDP2's public
``FSDPModule.set_custom_reduce_scatter``; FSDP calls it in backward with this rank's unsharded gradients of the
module and the buffer of this rank's shard, and :func:`~sparsedist.fsdp.exchange.reduce_scatter` fills it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..collectives.backend import TorchBackend
from ..compressors.base import Compressor, SelectContext
from ..compressors.dgc import check_optimizer
from ..feedback import check_resumable
from ..optim.packed import repack
from ..options import exchange_aware, split_options
from ..stats import Telemetry
from .exchange import reduce_scatter
from .hsdp import install_replicate_hooks
from .layout import ShardLayout, Slot, managed_parameters
from .optimizer import check_optimizer as check_exchange_optimizer
from .residuals import CompactFeedback, residual_dtype_of

try:  # FSDP2's comm interface (torch >= 2.8); duck typing suffices where it is absent
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatter
except ImportError:  # pragma: no cover - old torch
    _ReduceScatter = object  # type: ignore[assignment,misc]
try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]

__all__ = ["FSDPSparsifyState", "SparseReduceScatter", "register_fsdp"]

#: exchange options the FSDP bridge does not take, and why
_REFUSED = {
    "granularity": "selection is per parameter ('layer'); a whole FSDP module is not one bucket here",
    "collective": "entries are routed to the rank owning their shard (SparCML's split phase), nothing else",
    "cost_model": "there is no collective to choose", "auto_trials": "there is no collective to choose",
    "auto_step_check": "there is no collective to choose",
    "check_every": "FSDP ranks hold different shards; compare checkpoints instead",
    "process_group": "the group is the one fully_shard's mesh gives each module",
    "backend": "the group is the one fully_shard's mesh gives each module",
}


class SparseReduceScatter(_ReduceScatter):
    """An FSDP2 ``ReduceScatter`` comm that exchanges sparsely (installed by :func:`register_fsdp`).

    ``__call__(output_tensor, input_tensor, group, op)`` completes synchronously and returns None (FSDP does not
    use the return value); ``allocate`` is a plain ``torch.empty``.
    """

    def __init__(self, state: "FSDPSparsifyState", layout: ShardLayout):
        self.state, self.layout = state, layout

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False) -> None:
        reduce_scatter(self.state, self.layout, output_tensor, input_tensor, group, op)
        return None


class FSDPSparsifyState:
    """What the sparse reduce-scatter keeps between calls: compressor, residuals, telemetry, step.

    Built by :func:`register_fsdp`. ``stats()``, ``state_dict()`` and ``load_state_dict()`` as for
    :class:`sparsedist.SparsifyState` (residuals by parameter name; one file per rank, e.g. with
    :func:`sparsedist.checkpoint.save`).
    """

    def __init__(self, model: nn.Module, compressor: Compressor | None, options, residual_dtype=None,
                 replicate_group=None):
        options.check_compressor(compressor)
        self.options = options
        self.compressor = compressor
        self.feedback = CompactFeedback(options.feedback_for(compressor) and (compressor is not None
                                                                            or options.masks is not None),
                                        residual_dtype_of(residual_dtype))
        self.telemetry = Telemetry()
        self.replicate_group = replicate_group
        # an exchange-aware optimizer (sparsedist.optim.AdamW): the exchange sends its update (.optimizer)
        self.optimizer = options.optimizer if exchange_aware(options.optimizer) else None
        self.params: dict[str, torch.Tensor] = dict(model.named_parameters())
        self.step = 0
        self.in_step = False
        self.dense_now = False
        self.layouts: list[ShardLayout] = []
        self._backends: dict[int, TorchBackend] = {}
        self._backend: TorchBackend | None = None
        self._active: dict[str, tuple[Any, torch.Tensor]] = {}

    # -- what the exchange asks ----------------------------------------------------------------------------
    def backend_for(self, group, world_size: int) -> TorchBackend:
        backend = self._backends.get(id(group))
        if backend is None:
            backend = TorchBackend(group, timeout=self.options.timeout)
            if backend.size != world_size:
                raise RuntimeError(f"sparsedist.fsdp: the reduce-scatter group has {backend.size} ranks but the "
                                   f"parameters were sharded {world_size} ways")
            self._backends[id(group)] = backend
        self._backend = backend
        return backend

    def begin_step(self) -> None:
        """At a step's first reduce-scatter: decide its route, and end it when the backward pass ends."""
        if self.in_step:
            return
        masks = self.options.masks
        if self.optimizer is not None:  # its warm-up: raw gradients, FSDP2's dense reduce-scatter
            self.dense_now = self.optimizer.exchange_is_dense()
        else:
            self.dense_now = (self.compressor is None and masks is None) or bool(
                masks is not None and masks.needs_dense_gradient())
        self.in_step = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_step)

    def _end_step(self) -> None:
        self.telemetry.end_step()
        self.step += 1
        self.in_step = False

    def loss_scale(self) -> float:
        scaler = self.options.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def context(self, name: str, index: int, scale: float) -> SelectContext:
        backend = self._backend
        return SelectContext(step=self.step, key=name, index=index, world_size=backend.size, rank=backend.rank,
                             seed=self.options.seed, extra={"loss_scale": scale})

    def agree(self, ok: bool, group=None) -> bool:
        """True iff ``ok`` on every rank of ``group`` (if given) and of the replicate group (HSDP)."""
        groups = [g for g in (group, self.replicate_group) if g is not None]
        if not groups:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self._device())
        for g in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=g)
        return bool(flag.item() == 1.0)

    def active_positions(self, slot: Slot) -> torch.Tensor | None:
        """Positions (int32/int64, full parameter order) of a masked parameter's active weights, else None.

        Masks sharded like their parameters (``masks.sharded_masks``, e.g. :class:`~sparsedist.fsdp.ShardedRigL`)
        are all-gathered once per ``mask_version`` (a collective: every rank asks in the same order) and the
        positions cached: ``4 * active`` bytes per rank.
        """
        masks = self.options.masks
        if masks is None:
            return None
        param = self.params[slot.name]
        mask = masks.mask_of(param)
        if mask is None:
            return None
        version = getattr(masks, "mask_version", None)
        cached = self._active.get(slot.name)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        if getattr(masks, "sharded_masks", False) and isinstance(param, DTensor):
            mask = DTensor.from_local(mask.to(torch.uint8), param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride()).full_tensor()
        idx = mask.reshape(-1).nonzero().view(-1)
        idx = idx.to(torch.int32) if slot.numel < 2**31 else idx
        residual = self.feedback.residuals.get(slot.name)
        if cached is not None and residual is not None and residual.numel() == cached[1].numel():
            # not flushed by a dense step (it overflowed): follow the weights that stay active
            self.feedback.residuals[slot.name] = repack(residual, cached[1], idx)
        self._active[slot.name] = (version, idx)
        return idx

    def _device(self) -> torch.device:
        p = next(iter(self.params.values()))
        return p.device

    # -- public --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Telemetry of this rank: the keys of :mod:`sparsedist.stats`, where ``bytes_dense`` is what FSDP's
        dense ring reduce-scatter of the same gradients sends, ``(P-1)/P * n * b``, and ``collectives`` counts
        ``sparse_reduce_scatter`` / ``reduce_scatter`` (dense: RigL's update steps); plus ``residual_bytes``."""
        out = self.telemetry.as_dict(self.feedback.norm())
        out["auto_ratios"] = {}
        out["step_check"] = None
        out["residual_bytes"] = self.feedback.nbytes()
        if self.optimizer is not None:  # its warm-up length, and whether it is over
            out["optimizer"] = self.optimizer.stats()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Step, residuals and compressor state (by parameter name), telemetry: this rank's, save one per rank."""
        return {"step": self.step, "feedback": self.feedback.state_dict(),
                "compressor": self.compressor.state_dict() if self.compressor is not None else {},
                "telemetry": self.telemetry.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = [n for n in state["feedback"]["residuals"] if n not in self.params]
        if unknown:
            raise ValueError(f"state has residuals for parameters this model does not have: {unknown[:5]}; load it "
                             f"into the model it was saved from")
        check_resumable(self.compressor, state["feedback"])
        self.step = int(state["step"])
        self.feedback.load_state_dict(state["feedback"])
        if self.compressor is not None:
            self.compressor.load_state_dict(state.get("compressor", {}))
        self.telemetry.load_state_dict(state.get("telemetry", {}))


def register_fsdp(model: nn.Module, compressor: str | Compressor | None = "topk", *, residual_dtype=None,
                  replicate_group=None, **options: Any) -> FSDPSparsifyState:
    """Make every ``fully_shard`` module of ``model`` reduce-scatter its gradients sparsely; returns the state.

    Args:
        model: the root module, ``fully_shard`` already applied (to it and to its layers).
        compressor: ``"topk"``, ``"threshold"``, ``"randk"``, ``"dgc"``, ``"none"`` (no selection: a dense
            reduce-scatter, or with ``masks=`` the active weights' gradients only) or a Compressor object.
        residual_dtype: storage dtype of the error-feedback residuals: None (fp32) or ``"bfloat16"`` (half the
            memory; see :mod:`sparsedist.fsdp.residuals`).
        replicate_group: HSDP: the process group of this rank's replicas (the ranks holding the same shard);
            each module then also sums its reduce-scattered shard over that group (:mod:`sparsedist.fsdp.hsdp`).
            ``fully_shard`` must be given the 1-D shard mesh.
        **options: the compressor's options (``density``, ...) and exchange options as for
            :func:`sparsedist.register`: ``error_feedback``, ``value_dtype``, ``dense_below``, ``seed``,
            ``masks`` (e.g. a :class:`~sparsedist.fsdp.ShardedRigL`), ``grad_scaler``, ``optimizer`` (DGC's check;
            a :class:`sparsedist.optim.AdamW` makes the exchange send its update, :mod:`sparsedist.fsdp.optimizer`),
            ``timeout``.

    Raises:
        TypeError: ``model`` has no ``fully_shard`` module.
        ValueError: unknown or unsupported options (named, with the reason), a compressor this bridge lacks.
    """
    if FSDPModule is None:
        raise RuntimeError("sparsedist.fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call sparsedist.dist.init() (or "
                           "init_process_group) and fully_shard before register_fsdp()")
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise TypeError(f"register_fsdp needs a model with fully_shard applied (FSDP2), got {type(model).__name__} "
                        f"without any: call torch.distributed.fsdp.fully_shard(layer) per layer and on the root first")
    comp, opts = split_options(compressor, options, refused=_REFUSED, caller="sparsedist.fsdp.register_fsdp")
    if comp is not None and comp.needs_second_moment:
        raise ValueError(f"register_fsdp does not take {comp.name!r}: its per-example statistics are collected by "
                         f"hooks on unsharded layers, which fully_shard swaps; use 'topk', 'threshold', 'randk' "
                         f"or 'dgc'")
    if comp is not None and comp.name == "dgc":
        check_optimizer(opts.optimizer)
    state = FSDPSparsifyState(model, comp, opts, residual_dtype, replicate_group)
    names = {id(p): n for n, p in model.named_parameters()}
    sizes, installs = [], []
    for module in modules:
        mesh = _mesh_of(module)
        if mesh is None:
            continue
        if mesh.ndim != 1:
            raise ValueError("register_fsdp: this module was sharded over a 2-D mesh (FSDP's own HSDP, whose "
                             "replica all-reduce is dense); give fully_shard the 1-D shard mesh "
                             "(mesh['shard']) and pass replicate_group=mesh['replicate'].get_group()")
        layout = ShardLayout.of(module, names, mesh.size())
        if layout.slots:
            sizes.append(mesh.size())
            installs.append((module, layout))
            state.layouts.append(layout)
    check_exchange_optimizer(state, sizes, replicate_group)  # before any module is changed
    for module, layout in installs:
        module.set_reduce_scatter_unused_params(True, recurse=False)
        module.set_custom_reduce_scatter(SparseReduceScatter(state, layout))
    if replicate_group is not None:
        install_replicate_hooks(state, modules, replicate_group)
    return state


def _mesh_of(module: nn.Module):
    """The device mesh ``fully_shard`` sharded ``module``'s parameters over (None: it manages none)."""
    for _, p in managed_parameters(module):
        if DTensor is not None and isinstance(p, DTensor):
            return p.device_mesh
    return None
