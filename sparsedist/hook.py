"""The DDP communication hook: the one place that composes selection, error feedback and communication.

Used like PyTorch's ``PowerSGDState`` / ``powerSGD_hook`` pair::

    state = sparsedist.SparsifyState(ddp, "topk", density=0.01)
    ddp.register_comm_hook(state, sparsedist.sparsify_hook)

or in one line, ``state = sparsedist.register(ddp, "topk", density=0.01)``.

The flow for one bucket (see ``DESIGN.md`` §1): flat gradient buffer -> per-parameter views -> add residual
(compressor.accumulate) -> select (layer-wise, or across the whole bucket) -> residual keeps what was not
sent -> wire encode -> collective sums across ranks -> decode into the bucket buffer -> divide by world
size -> completed ``torch.futures.Future``.

Sparse exchanges run synchronously in the hook body and return a completed future: nested waits inside a
``Future.then()`` callback deadlock gloo once DDP has two or more buckets. Dense exchanges stay asynchronous
(the callback only divides), so they overlap with the rest of the backward pass as in plain DDP.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .collectives.allgather import scatter_add, sparse_allgather
from .collectives.backend import Backend, TorchBackend, ring_allreduce_bytes
from .collectives.dense import allreduce_mean_future
from .collectives.wire import MAX_PACKED_NUMEL, decode, encode
from .compressors.base import Compressor, SelectContext
from .feedback import ErrorFeedback, accumulator_dtype, all_finite
from .payload import SparseGrad
from .stats import Telemetry

__all__ = ["SparsifyState", "sparsify_hook", "FlatBucket", "STATE_OPTIONS"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

#: Options of :class:`SparsifyState` (beside the compressor's own), with their meaning.
STATE_OPTIONS = {
    "process_group": "torch.distributed process group (default: the global group)",
    "error_feedback": "keep what was not sent and add it to the next gradient (default True)",
    "value_dtype": "dtype values travel in: None (the gradient's), 'float32', 'float16' or 'bfloat16'",
    "granularity": "'layer' (select per parameter, default) or 'bucket' (select across the whole DDP bucket)",
    "dense_below": "parameters with fewer elements than this are sent in full (default 0: compress all)",
    "seed": "seed shared by all ranks, for shared-index randomness (default 0)",
    "masks": "a model-sparsity mask provider (e.g. sparsedist.RigL) for mask-aware exchange",
    "grad_scaler": "the torch.amp.GradScaler in use, so residuals are kept in unscaled units",
    "optimizer": "the optimizer (required for DGC, to reject optimizers with their own momentum)",
    "timeout": "seconds a collective may wait before raising an error naming the bucket (default: the "
               "process group's timeout)",
    "backend": "a sparsedist.collectives.Backend to communicate with (default: TorchBackend(process_group))",
    "check_every": "every N steps, verify that all ranks hold bit-identical parameters (0: never; default 0)",
    "collective": "how sparse payloads are summed: 'allgather' (default), 'auto' (alpha-beta cost model per bucket "
                  "and step), 'dense', 'ssar_recursive_double', 'ssar_split_allgather', 'dsar_split_allgather', or "
                  "'gtopk' (global top-k: only the k largest sums survive; the rest returns to the residuals)",
    "cost_model": "a sparsedist.collectives.CostModel for collective='auto' (default: probed at the first step)",
    "auto_trials": "collective='auto': calls of each plausible collective timed per bucket before the measured/"
                   "predicted ratios correct the model's choice (default 2; 0: the model alone)",
    "auto_step_check": "collective='auto': time whole training steps with auto's sparse choices against steps that "
                       "send everything densely, now and then, and send densely while sparse steps are not at "
                       "least 10% faster (default: on, unless auto_trials=0 asks for the model alone; False: "
                       "per-bucket choices only; or a sparsedist.collectives.StepCheck to configure it)",
}

COLLECTIVES = ("allgather", "auto", "dense", "ssar_recursive_double", "ssar_split_allgather",
               "dsar_split_allgather", "gtopk")


class _Unit:
    """One selection unit: a parameter (layer-wise) or a packed active set of a masked parameter."""

    __slots__ = ("key", "acc", "offset", "index_map", "numel", "payload")

    def __init__(self, key: int, acc: torch.Tensor, offset: int, index_map: torch.Tensor | None):
        self.key = key
        self.acc = acc
        self.offset = offset
        self.index_map = index_map
        self.numel = acc.numel()
        self.payload: SparseGrad | None = None

    def bucket_indices(self, local: torch.Tensor) -> torch.Tensor:
        idx = local.long()
        if self.index_map is not None:
            idx = self.index_map[idx]
        return idx + self.offset


class FlatBucket:
    """A ``GradBucket`` look-alike over a flat buffer holding the gradients of ``params`` in order."""

    def __init__(self, buffer: torch.Tensor, params: list[torch.Tensor], index: int = 0, is_last: bool = True):
        if buffer.dim() != 1:
            raise ValueError(f"buffer must be 1-D (gradients concatenated), got shape {tuple(buffer.shape)}")
        total = sum(p.numel() for p in params)
        if total != buffer.numel():
            raise ValueError(f"buffer has {buffer.numel()} elements but the parameters have {total}")
        self._buffer, self._params, self._index, self._last = buffer, list(params), index, is_last
        self._views, offset = [], 0
        for p in self._params:
            self._views.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        return self._views

    def is_last(self) -> bool:
        return self._last


class SparsifyState:
    """State of :func:`sparsify_hook`: the compressor, error-feedback residuals, the communicator, telemetry.

    Args:
        model: the ``DistributedDataParallel`` model (or its module, or its ``named_parameters()``). Gives every
            parameter a stable key (its position in ``named_parameters()``) and a name for :meth:`state_dict`.
            Keys, not DDP bucket indices, identify state, since DDP rebuilds its buckets after the first
            iteration. None: keys in first-seen order (names ``param0``, ...).
        compressor: a :class:`~sparsedist.compressors.Compressor`, or None for dense exchange.
        **options: see :data:`STATE_OPTIONS`.

    The state pickles without its process group and communicator (as ``PowerSGDState`` does); after
    unpickling, the default group is used.
    """

    def __init__(self, model: torch.nn.Module | None, compressor: Compressor | None, *,
                 process_group: dist.ProcessGroup | None = None, error_feedback: bool = True,
                 value_dtype: str | torch.dtype | None = None, granularity: str = "layer", dense_below: int = 0,
                 seed: int = 0, masks: Any = None, grad_scaler: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, timeout: float | None = None,
                 backend: Backend | None = None, check_every: int = 0, collective: str = "allgather",
                 cost_model: Any = None, auto_trials: int = 2, auto_step_check: Any = None):
        if compressor is not None and not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a sparsedist Compressor or None, got {type(compressor).__name__}; "
                            f"use sparsedist.register(ddp, 'topk', ...) to build one by name")
        if granularity not in ("layer", "bucket"):
            raise ValueError(f"granularity must be 'layer' or 'bucket', got {granularity!r}")
        if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
            raise ValueError(f"dense_below must be an int >= 0 (a number of elements), got {dense_below!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True or False, got {error_feedback!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
        if collective == "gtopk" and (compressor is None or compressor.shared_indices
                                      or compressor.density_at(0) is None):
            raise ValueError("collective='gtopk' keeps the global top-k of the sum, with the same k as each rank's "
                             "local selection: it needs a fixed-density compressor that exchanges indices ('topk' "
                             "or 'dgc'), got " + (compressor.name if compressor is not None else "'none'"))
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0 (steps between parameter checks), got {check_every!r}")
        if masks is not None:
            for attr in ("mask_of", "needs_dense_gradient"):
                if not callable(getattr(masks, attr, None)):
                    raise TypeError(f"masks must provide {attr}() (e.g. a sparsedist.RigL object), "
                                    f"got {type(masks).__name__}")
        self.compressor = compressor
        self.process_group = process_group
        self.value_dtype = _parse_dtype(value_dtype)
        self.granularity = granularity
        self.dense_below = dense_below
        self.seed = seed
        self.masks = masks
        self.grad_scaler = grad_scaler
        self.timeout = timeout
        self.feedback = ErrorFeedback(enabled=error_feedback and compressor is not None)
        self.telemetry = Telemetry()
        self.step = 0
        self.collective = collective
        self.cost_model = cost_model
        from .collectives.choose import AutoTuner

        self.tuner = AutoTuner(auto_trials)
        from .collectives.step_check import StepCheck

        if auto_step_check is not None and not isinstance(auto_step_check, (bool, StepCheck)):
            raise TypeError(f"auto_step_check must be None, True, False or a sparsedist.collectives.StepCheck, "
                            f"got {auto_step_check!r}")
        if auto_step_check is None:
            auto_step_check = auto_trials != 0
        self.step_check: StepCheck | None = None
        if collective == "auto" and compressor is not None and auto_step_check is not False:
            self.step_check = auto_step_check if isinstance(auto_step_check, StepCheck) else StepCheck()
        self._layouts_now: set = set()   # bucket layouts auto decided this step / the step before
        self._layouts_before: set = set()
        self._moments_paused = False      # the second-moment collector skipped this step's backward pass
        self._async_overflow_step = -1
        self._gtopk: dict[tuple, Any] = {}
        self._last_union: dict[tuple, int] = {}
        self._last_max_count: dict[tuple, int] = {}
        self.check_every = check_every
        self._verified = False
        self._in_step = False
        self._module = None
        self._backend = backend
        self._names: dict[int, tuple[int, str]] = {}
        self._next_key = 0
        self._active_cache: dict[int, tuple[int, torch.Tensor]] = {}
        if model is not None:
            if isinstance(model, torch.nn.Module):
                module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
                self._module = module
                named = list(module.named_parameters())
            else:  # an iterable of (name, parameter) pairs, e.g. model.named_parameters()
                named = list(model)
                if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) for x in named):
                    raise TypeError("model must be an nn.Module or an iterable of (name, parameter) pairs "
                                    "(model.named_parameters())")
            for key, (name, param) in enumerate(named):
                if param.requires_grad and (param.dtype.is_complex or not param.dtype.is_floating_point):
                    raise TypeError(f"parameter {name!r} has dtype {param.dtype}; sparsedist exchanges real "
                                    f"floating-point gradients only (float32, float16, bfloat16, float64)")
                self._names[id(param)] = (key, name)
            self._next_key = len(self._names)
        if compressor is not None and compressor.name == "dgc":
            if optimizer is None:
                raise ValueError("DGC applies momentum itself, so it needs the optimizer to check that the optimizer "
                                 "has none: pass optimizer=your_optimizer (built with momentum=0)")
            from .compressors.dgc import check_optimizer
            check_optimizer(optimizer)
            # Re-checked before every optimizer step, so momentum cannot be switched on later by mistake.
            self._optimizer_hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: check_optimizer(opt))
        self.second_moment = None
        self._full_keys: set[int] = set()
        if compressor is not None and compressor.needs_second_moment:
            if granularity != "layer":
                raise ValueError(f"{compressor.name} selection keeps per-element state per parameter; use "
                                 f"granularity='layer' (the rule is element-wise, so nothing is lost)")
            if not self.feedback.enabled:
                raise ValueError(f"{compressor.name} selection delays elements until they are unambiguous: the "
                                 f"delayed part lives in the error-feedback residual, so error_feedback must be True")
            if model is None:
                raise ValueError(f"{compressor.name} selection needs per-example gradient statistics, which "
                                 f"sparsedist collects with module hooks on the model: pass the model, "
                                 f"SparsifyState(ddp, compressor, ...)")
            from .second_moment import SecondMomentCollector

            module = self._module
            if module is None:
                raise ValueError(f"{compressor.name} selection needs the model itself (its layers get module hooks), "
                                 f"not only its named parameters")
            self.second_moment = SecondMomentCollector(module)
            uncovered = [(n, p) for n, p in module.named_parameters()
                         if p.requires_grad and not self.second_moment.covers(p)]
            if len(uncovered) == sum(p.requires_grad for p in module.parameters()):
                self.second_moment.remove()
                raise ValueError(f"{compressor.name} selection needs per-example gradient statistics, which "
                                 f"sparsedist computes for Linear, Conv and Embedding layers; this model has none "
                                 f"({type(module).__name__}). Choose another compressor, e.g. 'topk'")
            if uncovered:
                warnings.warn(f"{compressor.name} selection: no per-example statistics for "
                              f"{[n for n, _ in uncovered]} (not Linear/Conv/Embedding); these are sent in full",
                              stacklevel=3)
                self._full_keys = {self._names[id(p)][0] for _, p in uncovered}

    # -- bookkeeping ---------------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = TorchBackend(self.process_group, timeout=self.timeout)
        return self._backend

    @property
    def world_size(self) -> int:
        return self.backend.size

    def _key(self, param: torch.Tensor) -> int:
        entry = self._names.get(id(param))
        if entry is None:  # no model given: keys in first-seen order (DDP visits buckets in the same order everywhere)
            entry = (self._next_key, f"param{self._next_key}")
            self._names[id(param)] = entry
            self._next_key += 1
        return entry[0]

    def _loss_scale(self) -> float:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return float(self.grad_scaler.get_scale())

    def _active_indices(self, key: int, mask: torch.Tensor) -> torch.Tensor:
        version = getattr(self.masks, "mask_version", None)
        cached = self._active_cache.get(key)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        idx = mask.reshape(-1).nonzero().view(-1)
        self._active_cache[key] = (version, idx)
        return idx

    # -- public --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Telemetry of this rank; the keys are documented in :mod:`sparsedist.stats`."""
        out = self.telemetry.as_dict(self.feedback.norm())
        out["auto_ratios"] = self.tuner.ratios()
        out["step_check"] = None if self.step_check is None else self.step_check.report()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this rank exactly: step, residuals and compressor state (by parameter
        name), telemetry. Residuals differ per rank: save one file per rank."""
        names = {key: name for key, name in self._names.values()}
        fb = self.feedback.state_dict()
        comp = self.compressor.state_dict() if self.compressor is not None else {}
        return {
            "step": self.step,
            "world_size": self.backend.size if self._backend is not None or dist.is_initialized() else None,
            "feedback": {"enabled": fb["enabled"],
                         "residuals": {names.get(k, f"param{k}"): v for k, v in fb["residuals"].items()}},
            "compressor": _rename_keys(comp, names),
            "compressor_options": self.compressor.options() if self.compressor is not None else None,
            "telemetry": self.telemetry.state_dict(),
            "auto": {"cost_model": None if self.cost_model is None else self.cost_model.state_dict(),
                     "tuner": self.tuner.state_dict(),
                     "step_check": None if self.step_check is None else self.step_check.state_dict(),
                     "last_union": {f"{i}:{n}": v for (i, n), v in self._last_union.items()},
                     "last_max_count": {f"{i}:{n}": v for (i, n), v in self._last_max_count.items()}},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same parameters)."""
        keys = {name: key for key, name in self._names.values()}
        unknown = [n for n in state["feedback"]["residuals"] if n not in keys]
        if unknown:
            raise ValueError(f"state has residuals for parameters this model does not have: {unknown[:5]}; "
                             f"load it into the model it was saved from")
        self.step = int(state["step"])
        self.feedback.load_state_dict({"enabled": state["feedback"]["enabled"],
                                       "residuals": {keys[n]: v for n, v in state["feedback"]["residuals"].items()}})
        if self.compressor is not None:
            self.compressor.load_state_dict(_rename_keys(state.get("compressor", {}), keys))
        self.telemetry.load_state_dict(state.get("telemetry", {}))
        auto = state.get("auto")
        here = self.backend.size if self._backend is not None or dist.is_initialized() else None
        # collective='auto' resumes with the same model, ratios and fill-in as it saved (at the same world size)
        if auto is not None and state.get("world_size") in (None, here):
            from .collectives.choose import CostModel

            if auto.get("cost_model") is not None:
                self.cost_model = CostModel()
                self.cost_model.load_state_dict(auto["cost_model"])
            self.tuner.load_state_dict(auto.get("tuner", {}))
            if self.step_check is not None and auto.get("step_check") is not None:
                self.step_check.load_state_dict(auto["step_check"])
            layout = lambda key: tuple(int(x) for x in key.split(":"))  # noqa: E731
            self._last_union = {layout(k): int(v) for k, v in auto.get("last_union", {}).items()}
            self._last_max_count = {layout(k): int(v) for k, v in auto.get("last_max_count", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        s = self.__dict__.copy()
        s["process_group"] = None
        s["_backend"] = None
        s.pop("_optimizer_hook", None)
        s["grad_scaler"] = None
        s["second_moment"] = None
        s["masks"] = None
        s["_module"] = None
        s["_gtopk"] = {}
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- the exchange ----------------------------------------------------------------------------------------
    def exchange_flat(self, buffer: torch.Tensor, params: list[torch.Tensor], *, index: int = 0,
                      is_last: bool = True) -> torch.Tensor:
        """Average a flat gradient buffer across ranks, synchronously, exactly as the DDP hook does.

        For integrations that own their gradient exchange (e.g. the Horovod optimizer).

        Args:
            buffer: 1-D tensor: the local gradients of ``params`` concatenated in order (not yet averaged).
            params: the parameters whose gradients ``buffer`` holds (their keys select the residuals).
            index: a label for error messages (like a DDP bucket index).
            is_last: True for the last buffer of an optimizer step (advances the step counter).

        Returns:
            ``buffer``, overwritten with the average over ranks.
        """
        return self.exchange(FlatBucket(buffer, params, index, is_last), synchronous=True).value()

    def exchange(self, bucket: dist.GradBucket, synchronous: bool = False) -> torch.futures.Future:
        """Average ``bucket``'s gradients across ranks; returns a future of the bucket buffer."""
        buffer = bucket.buffer()
        params = bucket.parameters()
        if not self._in_step:  # first bucket of a step
            self._in_step = True
            try:
                if not self._verified:
                    self._verify_configuration(buffer)
                if self.check_every and self.step and self.step % self.check_every == 0 and self._module is not None:
                    from .guard import check_parameters

                    check_parameters(self._module, self.backend)
            except RuntimeError as exc:
                raise RuntimeError(f"sparsedist: consistency check before DDP bucket {bucket.index()} failed at step "
                                   f"{self.step}: {exc}") from exc
            self._begin_step(bucket)
        dense_step = self.masks is not None and bool(self.masks.needs_dense_gradient())
        dense = self.compressor is None and self.masks is None or (dense_step and not self.feedback.enabled)
        asynchronous = self.timeout is None and not synchronous and type(self.backend) is TorchBackend
        if dense and asynchronous:
            return self._dense(bucket, buffer, "allreduce")
        decided = None
        try:
            # auto's whole-step check (or a paused second-moment collector) sends this step densely
            step_dense = not dense and not dense_step and self.step_check is not None and (
                self.step_check.mode(self.step) == "dense" or self._moments_paused)
            if step_dense:
                decided = ("dense", None)
            elif not dense and not self._shared_path(dense_step):
                # the collective is decided before selection, identically on every rank
                layout = (bucket.index(), buffer.numel())
                keys = [self._key(p) for p in params]
                decided = self._algorithm(layout, params, keys, buffer.numel(), self.value_dtype or buffer.dtype)
            if (asynchronous and self._sends_all(decided) and self.masks is None
                    and (decided[1] is None or not self.tuner.tuning((bucket.index(), buffer.numel())))
                    and self.value_dtype in (None, buffer.dtype) and accumulator_dtype(buffer.dtype) == buffer.dtype
                    and self._loss_scale() == 1.0):
                return self._dense_async(bucket, decided)
            if dense:
                out = self._dense_sync(bucket, buffer)
            elif self._sends_all(decided) and self._flushable(buffer) and self.compressor.accumulates_plainly:
                out = self._send_all(bucket, buffer, params, decided)
            else:
                out = self._sparse(bucket, buffer, params, dense_step, decided)
        except RuntimeError as exc:
            raise RuntimeError(f"sparsedist: exchange of DDP bucket {bucket.index()} ({len(params)} parameters, "
                               f"{buffer.numel()} elements) failed at step {self.step}: {exc}") from exc
        fut: torch.futures.Future = (torch.futures.Future(devices=[buffer.device]) if buffer.device.type == "cuda"
                                     else torch.futures.Future())
        fut.set_result(out)
        return fut

    def _config(self, buffer: torch.Tensor) -> dict[str, Any]:
        return {
            "compressor": None if self.compressor is None else self.compressor.name,
            "compressor options": None if self.compressor is None else self.compressor.options(),
            "error_feedback": self.feedback.enabled,
            "value_dtype": str(self.value_dtype),
            "granularity": self.granularity,
            "dense_below": self.dense_below,
            "seed": self.seed,
            "masks (mask-aware exchange)": self.masks is not None,
            "first bucket (elements, dtype)": [buffer.numel(), str(buffer.dtype)],
        }

    def _verify_configuration(self, buffer: torch.Tensor) -> None:
        """Compare the configuration across ranks once, at the first exchange; raise on every rank if it differs."""
        from .guard import fingerprint

        config = self._config(buffer)
        local = fingerprint(config).to(buffer.device)
        rows = self.backend.allgather(local).cpu()
        self._verified = True
        keys = sorted(config)
        for i, key in enumerate(keys):
            differ = [r for r in range(rows.shape[0]) if rows[r, i] != rows[0, i]]
            if differ:
                raise ValueError(f"sparsedist: the hook is configured differently across ranks: {key!r} on rank "
                                 f"{self.backend.rank} is {config[key]!r} and differs between rank 0 and rank(s) "
                                 f"{differ}. Every rank must call register() with the same compressor and options")

    def _dense_sync(self, bucket: dist.GradBucket, buffer: torch.Tensor) -> torch.Tensor:
        """Dense allreduce through the backend (bounded by the state's timeout); same arithmetic as DDP's."""
        backend = self.backend
        before = (backend.bytes_sent, backend.bytes_received)
        buffer.mul_(1.0 / backend.size)
        backend.allreduce(buffer)
        self.telemetry.record_bucket(sent_bytes=backend.bytes_sent - before[0],
                                     received_bytes=backend.bytes_received - before[1],
                                     dense_bytes=ring_allreduce_bytes(buffer.numel(), buffer.element_size(),
                                                                      backend.size),
                                     elements_sent=buffer.numel(), elements_total=buffer.numel(),
                                     collective="allreduce")
        self._end_bucket(bucket)
        return buffer

    def _end_bucket(self, bucket: dist.GradBucket, overflow: bool = False) -> None:
        if bucket.is_last():
            self._in_step = False
            self.telemetry.end_step(overflow)
            self.step += 1
            if self.second_moment is not None and self.step_check is not None:
                # per-example statistics cost a backward-pass's worth of work: skip them on steps that will be
                # sent densely (a verdict that turns sparse at the next step finds them missing and waits a step)
                if self._moments_paused or self.step_check.mode(self.step - 1) == "dense":
                    self.second_moment.reset()  # nothing of a dense step may leak into the next selection
                self._moments_paused = self.step_check.mode(self.step) == "dense"
                self.second_moment.paused = self._moments_paused

    def _begin_step(self, bucket: dist.GradBucket) -> None:
        """First bucket of a step: auto's whole-step clock (see :class:`~sparsedist.collectives.StepCheck`)."""
        if self.step_check is None:
            return
        settled = not any(self.tuner.tuning(layout) for layout in self._layouts_now | self._layouts_before) \
            and self.step > 0
        self._layouts_before, self._layouts_now = self._layouts_now, set()
        try:
            self.step_check.begin_step(self.step, settled, self.backend)
        except RuntimeError as exc:
            raise RuntimeError(f"sparsedist: auto's step check before DDP bucket {bucket.index()} failed at step "
                               f"{self.step}: {exc}") from exc

    def _dense_async(self, bucket: dist.GradBucket, decided: tuple) -> torch.futures.Future:
        """auto's dense choice on the asynchronous path: each residual is added into its gradient in place
        (through the compressor's :meth:`~sparsedist.compressors.Compressor.dense_step`), then plain DDP's
        asynchronous allreduce runs, overlapped with the rest of the backward pass. Residuals are dropped and the
        compressor's state committed in the future's callback (local work only), and only if the sum is finite
        on every rank; otherwise both stay as they were and the NaN/inf result reaches the optimizer."""
        compressor = self.compressor
        keys = [self._key(p) for p in bucket.parameters()]
        self._drop_moments(bucket.parameters())
        flushed = []
        for key, g in zip(keys, bucket.gradients()):
            flat = g.view(-1)
            r = self.feedback.residuals.get(key) if self.feedback.enabled else None
            if r is not None and r.numel() != flat.numel():
                r = None
            compressor.dense_step(key, flat, r)
            if r is not None:
                flushed.append(key)
        step = self.step
        self.telemetry.record_choice("dense", None if decided[1] is None else decided[1].predictions["dense"].time,
                                     0.0)
        fut = self._dense(bucket, bucket.buffer(), "dense")

        def commit(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()
            if (flushed or not compressor.accumulates_plainly) and not all_finite(out):
                if self._async_overflow_step != step:  # once per step, as the synchronous paths count it
                    self._async_overflow_step = step
                    self.telemetry.overflow_steps += 1
                return out  # residuals and compressor state untouched: nothing is lost
            for key in flushed:
                self.feedback.residuals.pop(key, None)
            for key in keys:
                compressor.after_send_all(key)
            return out

        return fut.then(commit)

    def _drop_moments(self, params: list[torch.Tensor]) -> None:
        """A bucket sent whole needs no per-example statistics: drop this step's, so that they do not add to the
        next selection's."""
        if self.second_moment is not None and not self.second_moment.paused:
            for p in params:
                self.second_moment.pop(p)

    def _dense(self, bucket: dist.GradBucket, buffer: torch.Tensor, label: str) -> torch.futures.Future:
        world = self.world_size
        fut, nbytes = allreduce_mean_future(buffer, self.process_group, world)
        self.telemetry.record_bucket(sent_bytes=nbytes, received_bytes=nbytes,
                                     dense_bytes=ring_allreduce_bytes(buffer.numel(), buffer.element_size(), world),
                                     elements_sent=buffer.numel(), elements_total=buffer.numel(), collective=label)
        self._end_bucket(bucket)
        return fut

    def _flushable(self, buffer: torch.Tensor) -> bool:
        """True if residuals can be added into the bucket buffer without rounding (fp32/fp64 gradients sent in
        their own dtype, no packed active sets)."""
        return (self.masks is None and self.value_dtype in (None, buffer.dtype)
                and accumulator_dtype(buffer.dtype) == buffer.dtype)

    def _send_all(self, bucket: dist.GradBucket, buffer: torch.Tensor, params: list[torch.Tensor],
                  decided: tuple) -> torch.Tensor:
        """auto's dense choice, synchronously: flush the residuals into the gradients, allreduce the whole bucket
        (scaled by 1/P first, as DDP does), drop the residuals. If the sum is not finite (some rank overflowed),
        the residuals are put back untouched and the NaN/inf result reaches GradScaler on every rank."""
        backend = self.backend
        started = time.perf_counter()
        layout = (bucket.index(), buffer.numel())
        tuning = decided[1] is not None and self.tuner.tuning(layout)
        scale = self._loss_scale()
        base, esize = buffer.data_ptr(), buffer.element_size()
        flushed = {}
        for p, g in zip(params, bucket.gradients()):
            key = self._key(p)
            r = self.feedback.residuals.get(key) if self.feedback.enabled else None
            if r is not None and r.numel() == g.numel():
                off = (g.data_ptr() - base) // esize
                buffer[off:off + g.numel()].add_(r.reshape(-1), alpha=scale)
                flushed[key] = r
        before = (backend.bytes_sent, backend.bytes_received)
        buffer.mul_(1.0 / backend.size)
        backend.allreduce(buffer)
        bad = not all_finite(buffer)
        for key, r in flushed.items():
            if bad:
                self.feedback.residuals[key] = r  # nothing is lost on an overflow step
            else:
                del self.feedback.residuals[key]
        self._drop_moments(params)
        if not bad:
            for p in params:
                self.compressor.after_send_all(self._key(p))
        self._record_time(layout, "dense", decided[1], tuning, started, buffer)
        self.telemetry.record_bucket(sent_bytes=backend.bytes_sent - before[0],
                                     received_bytes=backend.bytes_received - before[1],
                                     dense_bytes=ring_allreduce_bytes(buffer.numel(), esize, backend.size),
                                     elements_sent=0 if bad else buffer.numel(), elements_total=buffer.numel(),
                                     collective="dense")
        self._end_bucket(bucket, overflow=bad)
        return buffer

    @staticmethod
    def _contiguous(units: list[_Unit], numel: int) -> bool:
        """True if the units tile the bucket buffer in order (no packed active sets)."""
        offset = 0
        for u in units:
            if u.index_map is not None or u.offset != offset:
                return False
            offset += u.numel
        return offset == numel

    def _sends_all(self, decided: tuple | None) -> bool:
        """True if auto chose the dense sum for a compressor that may send everything (no selection)."""
        return (decided is not None and decided[0] == "dense" and self.collective == "auto"
                and self.compressor is not None and self.compressor.dense_fallback)

    def _sparse(self, bucket: dist.GradBucket, buffer: torch.Tensor, params: list[torch.Tensor],
                dense_step: bool, decided: tuple | None = None) -> torch.Tensor:
        backend = self.backend
        world = backend.size
        scale = self._loss_scale()
        finite = all_finite(buffer)
        wire_dtype = self.value_dtype or buffer.dtype
        base = buffer.data_ptr()
        esize = buffer.element_size()
        grads = [g.reshape(-1) for g in bucket.gradients()]
        offsets = [(g.data_ptr() - base) // esize for g in grads]
        keys = [self._key(p) for p in params]

        units: list[_Unit] = []
        sent_before = (backend.bytes_sent, backend.bytes_received)
        started = time.perf_counter()  # the exchange's measured time includes accumulation and selection
        layout = (bucket.index(), buffer.numel())
        if decided is None and not self._shared_path(dense_step):  # (exchange() decides; exchange_flat too)
            decided = self._algorithm(layout, params, keys, buffer.numel(), wire_dtype)
        tuning = decided is not None and decided[1] is not None and self.tuner.tuning(layout)
        # auto chose the dense sum: skip selection and send everything (the residual is flushed into it)
        full_dense = self._sends_all(decided)
        full = dense_step or full_dense

        # 1. accumulate (error feedback) and select, unless this rank's gradient is not finite.
        if finite:
            for p, g, off, key in zip(params, grads, offsets, keys):
                mask = None if self.masks is None else self.masks.mask_of(p)
                index_map = None
                if mask is not None and not dense_step:
                    index_map = self._active_indices(key, mask)
                    g = g[index_map]
                    residual = self.feedback.get(key, g, scale)
                elif mask is not None:
                    # RigL update step: the residual was kept on the active set only; spread it back out so
                    # the dense exchange carries it (nothing is lost when the mask changes afterwards).
                    active = self._active_indices(key, mask)
                    packed_r = self.feedback.get(key, g.new_empty(active.numel()), scale)
                    residual = None
                    if packed_r is not None:
                        residual = torch.zeros(g.numel(), dtype=packed_r.dtype, device=g.device)
                        residual[active] = packed_r
                else:
                    residual = self.feedback.get(key, g, scale)
                if self.compressor is None or dense_step:
                    acc = g.to(accumulator_dtype(g.dtype)) if residual is None else residual + g
                else:
                    acc = self.compressor.accumulate(key, g, residual)
                units.append(_Unit(key, acc, off, index_map))
            self._select(units, params, full)
        elif self._shared_path(full):
            # Shared indices are known without the values: take part with zeros and raise the flag.
            for p, g, off, key in zip(params, grads, offsets, keys):
                mask = None if (self.masks is None or dense_step) else self.masks.mask_of(p)
                index_map = self._active_indices(key, mask) if mask is not None else None
                n = index_map.numel() if index_map is not None else g.numel()
                units.append(_Unit(key, torch.zeros(n, dtype=accumulator_dtype(g.dtype), device=g.device),
                                   off, index_map))
            self._select(units, params, full)

        # 2. communicate.
        shared = self._shared_path(full)
        in_order = full_dense and self._contiguous(units, buffer.numel())  # every entry, in bucket order
        out = None if in_order else \
            torch.zeros(buffer.numel(), dtype=accumulator_dtype(buffer.dtype), device=buffer.device)
        if shared:
            collective = "allreduce" if dense_step else "dense" if full_dense else "values_allreduce"
            vals = torch.cat([u.payload.values.to(wire_dtype) for u in units] +
                             [torch.tensor([0.0 if finite else 1.0], dtype=wire_dtype, device=buffer.device)])
            vals = backend.allreduce(vals)
            any_bad = bool(vals[-1] != 0) or not all_finite(vals[:-1])
            if in_order:  # no scatter
                out = vals[:-1].to(accumulator_dtype(buffer.dtype))
            else:
                idx = torch.cat([u.bucket_indices(u.payload.indices) for u in units]) if units else \
                    torch.empty(0, dtype=torch.int64, device=buffer.device)
                scatter_add(out, idx, vals[:-1])
            if full_dense:
                self._record_time(layout, collective, decided[1], tuning, started, out)
        else:
            collective, choice = decided
            if finite:
                idx = torch.cat([u.bucket_indices(u.payload.indices) for u in units])
                vals = torch.cat([u.payload.values for u in units])
            if collective == "allgather":
                constant = self._packed_constant(units, buffer.numel())
                payload = encode(idx, vals, wire_dtype, constant) if finite else \
                    torch.empty(0, dtype=torch.uint8, device=buffer.device)
                received, flags = sparse_allgather(backend, payload, 0 if finite else 1)
                any_bad = any(flags)
                if not any_bad:
                    for buf in received:
                        r_idx, r_vals = decode(buf, wire_dtype, constant)
                        scatter_add(out, r_idx, r_vals)
                vbytes = torch.empty(0, dtype=wire_dtype).element_size()
                self._last_max_count[layout] = max(b.numel() for b in received) // (4 if constant else 4 + vbytes)
            else:
                if not finite:  # announce the overflow through the sum itself: NaN reaches every rank
                    idx = torch.zeros(1, dtype=torch.int64, device=buffer.device)
                    vals = torch.full((1,), float("nan"), dtype=wire_dtype, device=buffer.device)
                vals = vals.to(wire_dtype)
                if collective == "gtopk":
                    result = self._gtopk_for(layout)(idx, vals, buffer.numel(), self._gtopk_k(params, keys),
                                                     backend=backend)
                    scatter_add(out, result.indices, result.values)
                    if finite:  # what did not survive the global selection goes back into the residuals
                        self._keep_only(units, result.kept)
                else:
                    from .collectives.sparse_allreduce import sparse_allreduce

                    out.add_(sparse_allreduce(idx, vals, buffer.numel(), algorithm=collective, backend=backend))
                any_bad = not all_finite(out)
            self._last_union[layout] = int(torch.count_nonzero(out))
            self._record_time(layout, collective, choice, tuning, started, out)
        sent_b, recv_b = backend.bytes_sent - sent_before[0], backend.bytes_received - sent_before[1]

        # 3. commit residuals and compressor state only if the step is good on every rank.
        elements_sent = sum(u.payload.nnz for u in units) if finite else 0
        if any_bad:
            out.fill_(float("nan"))
            if self.compressor is not None:
                self.compressor.discard_pending()
        else:
            for u in units:
                sent = SparseGrad(u.payload.indices, u.payload.values.to(wire_dtype), u.numel)
                self.feedback.update(u.key, u.acc, sent, scale, sent_all=full_dense)
                if self.compressor is not None and full_dense:
                    self.compressor.after_send_all(u.key)
                elif self.compressor is not None and not dense_step:
                    self.compressor.after_send(u.key, u.payload)
        out.div_(world)
        buffer.copy_(out)
        self.telemetry.record_bucket(sent_bytes=sent_b, received_bytes=recv_b,
                                     dense_bytes=ring_allreduce_bytes(buffer.numel(), esize, world),
                                     elements_sent=elements_sent, elements_total=buffer.numel(),
                                     collective=collective)
        self._end_bucket(bucket, overflow=any_bad)
        return buffer

    def _record_time(self, layout: tuple, collective: str, choice: Any, tuning: bool, started: float,
                     out: torch.Tensor) -> None:
        """Telemetry of one exchange's time (selection included) and, during auto's trials, the tuner's sample."""
        if tuning and out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # time the collective, not its launch
        elapsed = time.perf_counter() - started
        predicted = None if choice is None else choice.predictions[collective].time
        if choice is not None:  # the trials, then the periodic refresh of what runs
            self.tuner.observe(layout, collective, predicted, elapsed)
        self.telemetry.record_choice(collective, predicted, elapsed)

    def _algorithm(self, layout: tuple, params: list[torch.Tensor], keys: list[int], numel: int,
                   wire_dtype: torch.dtype) -> tuple[str, Any]:
        """The collective for this bucket and step; identical on every rank (it depends on configuration and on
        results every rank shares, never on local counts)."""
        if self.collective != "auto":
            return self.collective, None
        from .collectives.choose import EXACT_ALGORITHMS, probe

        self._layouts_now.add(layout)
        nnz = self._expected_count(params, keys)
        # A variable-count compressor's count comes from its last allgather; it is counted afresh at the first
        # step of each whole-step check too (dense choices leave the last count as it was, so a count from a
        # dense early phase would otherwise keep auto dense)
        if nnz is None and not (self.step_check is not None and self.step_check.window_begins(self.step)):
            nnz = self._last_max_count.get(layout)
        if nnz is None:  # count it with the allgather
            return "allgather", None
        if self.cost_model is None:
            self.cost_model = probe(self.backend)
        choice = self.cost_model.choose(numel, float(nnz), self.backend.size, candidates=EXACT_ALGORITHMS,
                                        value_bytes=torch.empty(0, dtype=wire_dtype).element_size(),
                                        union_nnz=self._last_union.get(layout))
        return self.tuner.choose(layout, choice, self.backend), choice

    def _expected_count(self, params: list[torch.Tensor], keys: list[int]) -> int | None:
        """Entries each rank sends for this bucket, from the configuration alone (None for variable counts)."""
        density = self.compressor.density_at(self.step) if self.compressor is not None else None
        if density is None:
            return None
        from .compressors.base import count_for_density

        sizes = []
        for p, key in zip(params, keys):
            mask = self.masks.mask_of(p) if self.masks is not None else None
            sizes.append((int(mask.sum()) if mask is not None else p.numel(), key))
        full = sum(n for n, key in sizes if n < self.dense_below or key in self._full_keys)
        selected = [n for n, key in sizes if not (n < self.dense_below or key in self._full_keys)]
        if self.granularity == "bucket":
            return full + count_for_density(sum(selected), density)
        return full + sum(count_for_density(n, density) for n in selected)

    def _gtopk_k(self, params: list[torch.Tensor], keys: list[int]) -> int:
        return int(self._expected_count(params, keys))

    def _gtopk_for(self, layout: tuple) -> Any:
        if layout not in self._gtopk:
            from .collectives.gtopk import GlobalTopK

            self._gtopk[layout] = GlobalTopK()
        return self._gtopk[layout]

    @staticmethod
    def _keep_only(units: list[_Unit], kept: torch.Tensor) -> None:
        """Shrink each unit's payload to the entries that survived (``kept``: one bool per entry, in order)."""
        start = 0
        for u in units:
            n = u.payload.nnz
            sel = kept[start:start + n]
            start += n
            u.payload = SparseGrad(u.payload.indices[sel], u.payload.values[sel], u.numel,
                                   u.payload.shared_indices, u.payload.constant)

    def _shared_path(self, dense_step: bool) -> bool:
        return dense_step or self.compressor is None or self.compressor.shared_indices

    def _packed_constant(self, units: list[_Unit], numel: int) -> float | None:
        """The shared +/-constant if every payload of the bucket is Strom-quantised (4-byte packed wire format)."""
        constants = {u.payload.constant for u in units if u.payload is not None}
        if numel < MAX_PACKED_NUMEL and units and len(constants) == 1 and None not in constants:
            return constants.pop()
        # (A rank without payloads has a non-finite gradient: it sends nothing and no rank decodes this step.)
        return None

    def _select(self, units: list[_Unit], params: list[torch.Tensor], send_all: bool) -> None:
        """Fill ``unit.payload`` for every unit (indices local to the unit); ``send_all``: every entry."""
        full = self.compressor is None or send_all
        world = self.world_size
        rank = self.backend.rank

        scale = self._loss_scale()

        def ctx_for(key: int, moment: torch.Tensor | None = None) -> SelectContext:
            return SelectContext(step=self.step, key=key, world_size=world, rank=rank, seed=self.seed,
                                 second_moment=moment, extra={"loss_scale": scale})

        def everything(u: _Unit) -> SparseGrad:
            return SparseGrad(torch.arange(u.numel, device=u.acc.device), u.acc, u.numel, shared_indices=True)

        moments = [self._moment(p, u) for p, u in zip(params, units)]
        if full:
            for u in units:
                u.payload = everything(u)
            return
        if self.granularity == "bucket":
            big = [i for i, u in enumerate(units) if u.numel >= self.dense_below and u.key not in self._full_keys]
            for i, u in enumerate(units):
                if i not in big:
                    u.payload = everything(u)
            if big:
                acc = torch.cat([units[i].acc for i in big])
                moment = torch.cat([moments[i] for i in big]) if moments[big[0]] is not None else None
                payload = self.compressor.compress(acc, ctx_for(units[big[0]].key, moment))
                starts = torch.tensor([0] + [units[i].numel for i in big], device=acc.device).cumsum(0)
                owner = torch.bucketize(payload.indices.long(), starts[1:], right=True)
                for j, i in enumerate(big):
                    sel = owner == j
                    units[i].payload = SparseGrad(payload.indices[sel].long() - starts[j], payload.values[sel],
                                                  units[i].numel, payload.shared_indices, payload.constant)
            return
        for u, moment in zip(units, moments):
            if u.numel < self.dense_below or u.key in self._full_keys:
                u.payload = everything(u)
            else:
                u.payload = self.compressor.compress(u.acc, ctx_for(u.key, moment))

    def _moment(self, param: torch.Tensor, unit: _Unit) -> torch.Tensor | None:
        collector = self.second_moment
        if collector is None or self.compressor is None or not self.compressor.needs_second_moment:
            return None
        if unit.key in self._full_keys:
            return None
        m = collector.pop(param)
        if m is None:
            raise ValueError(f"no per-example gradient statistics for parameter {self._name_of(param)!r}: "
                             f"variance-based selection supports Linear, Conv and Embedding layers")
        m = m.reshape(-1).to(unit.acc.device)
        if unit.index_map is not None:
            m = m[unit.index_map]
        return m

    def _name_of(self, param: torch.Tensor) -> str:
        entry = self._names.get(id(param))
        return entry[1] if entry else "<unknown>"


def _rename_keys(state: dict[str, Any], mapping: dict) -> dict[str, Any]:
    """Rename the integer parameter keys of a compressor's per-tensor state dicts (one level deep)."""
    out: dict[str, Any] = {}
    for field, value in state.items():
        if isinstance(value, dict) and value and all(k in mapping for k in value):
            out[field] = {mapping[k]: v for k, v in value.items()}
        else:
            out[field] = value
    return out


def _parse_dtype(value_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if value_dtype is None or isinstance(value_dtype, torch.dtype):
        if isinstance(value_dtype, torch.dtype) and not value_dtype.is_floating_point:
            raise ValueError(f"value_dtype must be a floating dtype, got {value_dtype}")
        return value_dtype
    if value_dtype not in _DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {value_dtype!r}")
    return _DTYPES[value_dtype]


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
