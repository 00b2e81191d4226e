"""``SparsifyState``: what the hook keeps between calls -- a small holder of the compressor, the error-feedback
residuals, the planner, the telemetry and the parameter names -- and ``sparsify_hook``, the free function DDP calls.

Used like PyTorch's ``PowerSGDState`` / ``powerSGD_hook`` pair::

    state = sparsedist.SparsifyState(ddp, "topk", density=0.01)
    ddp.register_comm_hook(state, sparsedist.sparsify_hook)

or in one line, ``state = sparsedist.register(ddp, "topk", density=0.01)``. The flow of a bucket is in
:mod:`.pipeline`; the decisions in :mod:`.plan`.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..collectives.backend import Backend, TorchBackend
from ..compressors.base import Compressor, SelectContext
from ..compressors.dgc import check_optimizer
from ..feedback import ErrorFeedback, check_resumable
from ..options import ExchangeOptions, exchange_aware, split_options
from ..second_moment import SecondMomentCollector
from ..stats import Telemetry
from .params import ParamIndex, named_parameters_of
from .pipeline import exchange
from .plan import Planner
from .usage import ParamUsage, tracks_usage
from .units import FlatBucket, Unit

__all__ = ["SparsifyState", "sparsify_hook"]

_REATTACHED = ("masks", "grad_scaler", "optimizer")  # objects a pickled state leaves out; attach() takes them back


class SparsifyState:
    """State of :func:`sparsify_hook`.

    Args:
        model: the ``DistributedDataParallel`` model (or its module, or its ``named_parameters()``): gives every
            parameter its name, which keys all per-parameter state. None: names ``param0``, ``param1``, ... in the
            order the hook first sees the parameters.
        compressor: a compressor name (``"none"``, ``"topk"``, ``"threshold"``, ``"randk"``, ``"variance"``,
            ``"dgc"``), a :class:`~sparsedist.compressors.Compressor`, or None (dense exchange).
        **options: the compressor's options (with a name) and the exchange's
            (:data:`sparsedist.options.STATE_OPTIONS`).

    The state pickles without its process group, backend, model and the objects it only refers to (masks,
    grad_scaler, optimizer), as ``PowerSGDState`` does; after unpickling call :meth:`attach` with the model (and
    those objects) before training on.
    """

    def __init__(self, model: Any, compressor: str | Compressor | None = "topk", **options: Any):
        if compressor is not None and not isinstance(compressor, (str, Compressor)):
            raise TypeError(f"compressor must be a compressor name, a sparsedist Compressor or None, got "
                            f"{type(compressor).__name__}")
        self._setup(model, *split_options(compressor, options))

    @classmethod
    def from_options(cls, model: Any, compressor: Compressor | None, options: ExchangeOptions) -> "SparsifyState":
        """A state from a compressor object and already validated :class:`~sparsedist.options.ExchangeOptions`."""
        state = cls.__new__(cls)
        state._setup(model, compressor, options)
        return state

    def _setup(self, model: Any, compressor: Compressor | None, opts: ExchangeOptions) -> None:
        opts.check_compressor(compressor)
        self.options = opts
        self.compressor = compressor
        self.feedback = ErrorFeedback(enabled=opts.feedback_for(compressor) and compressor is not None)
        self.telemetry = Telemetry()
        self.planner = Planner(opts, compressor)
        self.step = 0
        self.in_step = False
        self.module: torch.nn.Module | None = None
        self.second_moment: SecondMomentCollector | None = None
        self.full_keys: set[str] = set()  # parameters sent in full (no per-example statistics for them)
        self._active: dict[str, tuple[Any, torch.Tensor]] = {}
        self._backend = opts.backend
        self._optimizer_hook = None
        module, named = (None, None) if model is None else named_parameters_of(model)
        self.params = ParamIndex(named)
        self.usage: ParamUsage | None = None
        self._track_usage(model, named)
        self._attach_objects(module, **{k: getattr(opts, k) for k in _REATTACHED})

    # -- attaching what is not pickled ---------------------------------------------------------------------------
    def attach(self, model: Any, *, masks: Any = None, grad_scaler: Any = None,
               optimizer: torch.optim.Optimizer | None = None) -> "SparsifyState":
        """Attach the model (and the objects pickling left out) to an unpickled state; returns the state.

        Parameters are matched by name, so a rebuilt model of the same architecture gets every residual on its
        parameter of the same name. ``masks``, ``grad_scaler`` and ``optimizer`` must be given again if the state
        was configured with them.
        """
        given = {"masks": masks, "grad_scaler": grad_scaler, "optimizer": optimizer}
        missing = [k for k in _REATTACHED if self._configured.get(k) and given[k] is None]
        if missing:
            raise ValueError(f"this state was configured with {missing}; pass them to attach() again")
        module, named = named_parameters_of(model)
        self.params.attach(named)
        self._track_usage(model, named)
        self.options = dataclasses.replace(self.options, masks=masks, grad_scaler=grad_scaler, optimizer=optimizer)
        self.planner.options = self.options
        self._attach_objects(module, masks, grad_scaler, optimizer)
        return self

    def _track_usage(self, model: Any, named: list[tuple[str, torch.Tensor]] | None) -> None:
        """With DDP's ``find_unused_parameters=True``, note which parameters each step uses (:mod:`.usage`)."""
        if self.usage is not None:
            self.usage.remove()
        self.usage = ParamUsage(named) if tracks_usage(model) else None

    def _attach_objects(self, module: torch.nn.Module | None, masks: Any, grad_scaler: Any, optimizer: Any) -> None:
        self._configured = {"masks": masks is not None, "grad_scaler": grad_scaler is not None,
                            "optimizer": optimizer is not None}
        self.module = module
        comp = self.compressor
        if comp is not None and comp.name == "dgc":
            check_optimizer(optimizer)
            # re-checked before every optimizer step, so momentum cannot be switched on later by mistake
            self._optimizer_hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: check_optimizer(opt))
        if comp is not None and comp.needs_second_moment:
            self._collect_second_moments(module)
        if getattr(optimizer, "error_reset", False):
            self._bind_local_models(module, optimizer)

    def _bind_local_models(self, module: torch.nn.Module | None, optimizer: Any) -> None:
        """Error reset (:mod:`sparsedist.optim.error_reset`): the optimizer localises the model's parameters by
        this state's residuals (keyed by parameter name) before each training forward pass."""
        opts = self.options
        why = ("the model itself is needed (register on the DDP model; Horovod: named_parameters=model)"
               if module is None
               else "error feedback is off (the local model is the consensus minus the residual)"
               if not self.feedback.enabled
               else "granularity='bucket' keys residuals by bucket" if opts.granularity != "layer"
               else "masks keep residuals on the active weights only" if opts.masks is not None else None)
        if why is not None:
            raise ValueError(f"optimizer={type(optimizer).__name__}(error_reset=True) cannot run here: {why}; use "
                             f"error_reset=False, or topk/randk/threshold with error feedback, per-layer selection "
                             f"and no masks")
        optimizer.attach_exchange(list(module.named_parameters()), lambda: self.feedback.residuals,
                                  lambda: self.backend, module)

    def _collect_second_moments(self, module: torch.nn.Module | None) -> None:
        name = self.compressor.name
        if module is None:
            raise ValueError(f"{name} selection needs per-example gradient statistics, which sparsedist collects "
                             f"with module hooks on the model's layers: pass the model itself, "
                             f"SparsifyState(ddp, compressor, ...)")
        if self.second_moment is not None:
            self.second_moment.remove()
        self.second_moment = SecondMomentCollector(module)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        uncovered = [n for n, p in trainable if not self.second_moment.covers(p)]
        if len(uncovered) == len(trainable):
            self.second_moment.remove()
            raise ValueError(f"{name} selection needs per-example gradient statistics, which sparsedist computes for "
                             f"Linear, Conv and Embedding layers; this model has none ({type(module).__name__}). "
                             f"Choose another compressor, e.g. 'topk'")
        if uncovered:
            warnings.warn(f"{name} selection: no per-example statistics for {uncovered} (not Linear/Conv/Embedding); "
                          f"these are sent in full", stacklevel=4)
        self.full_keys = set(uncovered)

    # -- what the pipeline asks -----------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = TorchBackend(self.options.process_group, timeout=self.options.timeout)
        return self._backend

    @property
    def world_size(self) -> int:
        return self.backend.size

    def loss_scale(self) -> float:
        scaler = self.options.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def wire_dtype(self, buffer: torch.Tensor) -> torch.dtype:
        return self.options.value_dtype or buffer.dtype

    def context(self, name: str, position: int, scale: float, moment: torch.Tensor | None = None) -> SelectContext:
        """What a compressor may know about the tensor ``name`` at this step."""
        return SelectContext(step=self.step, key=name, index=position, world_size=self.backend.size,
                             rank=self.backend.rank, seed=self.options.seed, second_moment=moment,
                             extra={"loss_scale": scale})

    def active_indices(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """Positions (int64) of a masked parameter's active weights, cached while the mask provider's
        ``mask_version`` stays the same."""
        version = getattr(self.options.masks, "mask_version", None)
        cached = self._active.get(name)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        idx = mask.reshape(-1).nonzero().view(-1)
        self._active[name] = (version, idx)
        return idx

    def active_count(self, param: torch.Tensor, name: str) -> int:
        """Elements of ``param`` that take part: its active weights under masks, else all."""
        masks = self.options.masks
        mask = masks.mask_of(param) if masks is not None else None
        return param.numel() if mask is None else int(self.active_indices(name, mask).numel())

    def moment(self, param: torch.Tensor, unit: Unit) -> torch.Tensor | None:
        """This step's per-example second moment of ``param`` (variance-based selection), flat, packed like
        ``unit``; None when the compressor needs none."""
        collector = self.second_moment
        if collector is None or unit.key in self.full_keys:
            return None
        m = collector.pop(param)
        if m is None and self.usage is not None and not self.usage.used_here(unit.key):
            m = torch.zeros(param.numel(), dtype=unit.acc.dtype)  # unused here, used elsewhere: no gradient here
        if m is None:
            raise ValueError(f"no per-example gradient statistics for parameter {unit.key!r}: variance-based "
                             f"selection supports Linear, Conv and Embedding layers")
        m = m.reshape(-1).to(unit.acc.device)
        return m[unit.index_map] if unit.index_map is not None else m

    def configuration(self, buffer: torch.Tensor) -> dict[str, Any]:
        """Everything that decides which collectives run, for the cross-rank check at the first step."""
        opts, comp = self.options, self.compressor
        step_check = self.planner.step_check
        return {
            "compressor": None if comp is None else comp.name,
            "compressor options": None if comp is None else _settings(comp),
            "error_feedback": self.feedback.enabled,
            "value_dtype": str(opts.value_dtype),
            "granularity": opts.granularity,
            "dense_below": opts.dense_below,
            "seed": opts.seed,
            "masks (mask-aware exchange)": opts.masks is not None,
            "grad_scaler (loss scaling)": opts.grad_scaler is not None and opts.grad_scaler.is_enabled(),
            "find_unused_parameters (usage exchange)": self.usage is not None,
            "collective": opts.collective,
            "timeout (synchronous exchange)": opts.timeout is not None,
            "check_every": opts.check_every,
            "auto_trials": opts.auto_trials,
            "auto_step_check": None if step_check is None else step_check.options(),
            "cost_model": None if opts.cost_model is None else opts.cost_model.state_dict(),
            "backend": type(self.backend).__name__,
            "first bucket (elements, dtype)": [buffer.numel(), str(buffer.dtype)],
        }

    # -- public ---------------------------------------------------------------------------------------------------
    def exchange(self, bucket: dist.GradBucket, synchronous: bool = False) -> torch.futures.Future:
        """Average ``bucket``'s gradients across ranks; a future of the bucket buffer (see :mod:`.pipeline`)."""
        return exchange(self, bucket, synchronous)

    def exchange_flat(self, buffer: torch.Tensor, params: list[torch.Tensor], *, index: int = 0,
                      is_last: bool = True) -> torch.Tensor:
        """Average a flat gradient buffer across ranks, synchronously, exactly as the DDP hook does.

        For integrations that own their gradient exchange (e.g. the Horovod optimizer).

        Args:
            buffer: 1-D tensor: the local gradients of ``params`` concatenated in order (not yet averaged).
            params: the parameters whose gradients ``buffer`` holds (their names select the residuals).
            index: a label for error messages (like a DDP bucket index).
            is_last: True for the last buffer of an optimizer step (advances the step counter).

        Returns:
            ``buffer``, overwritten with the average over ranks.
        """
        return self.exchange(FlatBucket(buffer, params, index, is_last), synchronous=True).value()

    def stats(self) -> dict[str, Any]:
        """Telemetry of this rank; the keys are documented in :mod:`sparsedist.stats`."""
        out = self.telemetry.as_dict(self.feedback.norm())
        out["auto_ratios"] = self.planner.tuner.ratios()
        step_check = self.planner.step_check
        out["step_check"] = None if step_check is None else step_check.report()
        if exchange_aware(self.options.optimizer):  # its warm-up length, and whether it is over
            out["optimizer"] = self.options.optimizer.stats()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this rank exactly: step, residuals and compressor state (by parameter
        name), telemetry, auto's whole state. Residuals differ per rank: save one file per rank."""
        fb = self.feedback.state_dict()
        return {
            "step": self.step,
            "world_size": self.backend.size if self._backend is not None or dist.is_initialized() else None,
            "feedback": {"enabled": fb["enabled"], "residuals": fb["residuals"]},
            "compressor": self.compressor.state_dict() if self.compressor is not None else {},
            "compressor_options": self.compressor.options() if self.compressor is not None else None,
            "telemetry": self.telemetry.state_dict(),
            "auto": self.planner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on a model with the same parameter names)."""
        known = set(self.params.names)
        unknown = [n for n in state["feedback"]["residuals"] if n not in known]
        if unknown and not self.params.first_seen:
            raise ValueError(f"state has residuals for parameters this model does not have: {unknown[:5]}; "
                             f"load it into the model it was saved from")
        check_resumable(self.compressor, state["feedback"])
        self.step = int(state["step"])
        self.feedback.load_state_dict(state["feedback"])
        if self.compressor is not None:
            self.compressor.load_state_dict(state.get("compressor", {}))
        self.telemetry.load_state_dict(state.get("telemetry", {}))
        here = self.backend.size if self._backend is not None or dist.is_initialized() else None
        # collective='auto' resumes with the same model, ratios and fill-in as it saved (at the same world size)
        if state.get("auto") is not None and state.get("world_size") in (None, here):
            self.planner.load_state_dict(state["auto"])

    def __getstate__(self) -> dict[str, Any]:
        s = self.__dict__.copy()
        s["options"] = dataclasses.replace(self.options, process_group=None, backend=None, masks=None,
                                           grad_scaler=None, optimizer=None)
        for key in ("_backend", "_optimizer_hook", "second_moment", "module", "usage"):
            s[key] = None
        s["_active"] = {}
        s["planner"] = Planner(s["options"], self.compressor)
        s["planner_state"] = self.planner.state_dict()
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        planner_state = state.pop("planner_state")
        self.__dict__.update(state)
        self.planner.load_state_dict(planner_state)
        self.planner.verified = False  # the configuration is checked again on the next first step


def _settings(comp: Compressor) -> dict[str, Any]:
    """A compressor's options, and every constructor argument it keeps under the argument's name (so that one
    its ``options()`` leaves out cannot differ across ranks unnoticed)."""
    kept = {name: getattr(comp, name) for name in inspect.signature(type(comp)).parameters if hasattr(comp, name)}
    return {**kept, **comp.options()}


def sparsify_hook(state: SparsifyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sparsify, exchange and average one bucket.

    Args:
        state: a :class:`SparsifyState`.
        bucket: the DDP ``GradBucket``; its buffer holds this rank's local gradient (not divided by world size).

    Returns:
        A future whose value is the bucket buffer (same shape and dtype) holding the gradient averaged over ranks.
    """
    return state.exchange(bucket)


# DDP compares the hook's annotations with the real objects, so they must not stay strings
# (this module uses postponed evaluation of annotations).
sparsify_hook.__annotations__.update(bucket=dist.GradBucket, state=SparsifyState,
                                     **{"return": torch.futures.Future[torch.Tensor]})
