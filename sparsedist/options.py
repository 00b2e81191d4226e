"""The exchange's options, declared once (with their documentation) and validated once.

:class:`ExchangeOptions` holds every option of the hook besides the compressor's own; :func:`split_options` sorts a
user's keyword arguments into compressor options and exchange options for :func:`sparsedist.register`, the
Horovod optimizer and anything else that builds a :class:`~sparsedist.SparsifyState` from keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from .collectives.backend import Backend, check_timeout
from .collectives.choose import CostModel
from .collectives.registry import OPTION_NAMES
from .collectives.step_check import StepCheck
from .compressors import COMPRESSORS, Compressor, build_compressor, compressor_options

__all__ = ["ExchangeOptions", "STATE_OPTIONS", "split_options", "parse_dtype", "exchange_aware"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _doc(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _int_at_least(value: Any, low: int, name: str, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({unit}), got {value!r}")
    return value


def parse_dtype(value_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating torch dtype from a name (``"float16"``, ``"bf16"``, ...) or a dtype; None stays None."""
    if value_dtype is None or isinstance(value_dtype, torch.dtype):
        if isinstance(value_dtype, torch.dtype) and not value_dtype.is_floating_point:
            raise ValueError(f"value_dtype must be a floating dtype, got {value_dtype}")
        return value_dtype
    if value_dtype not in _DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {value_dtype!r}")
    return _DTYPES[value_dtype]


@dataclass
class ExchangeOptions:
    """Options of the exchange (every ``SparsifyState`` / ``register()`` keyword besides the compressor's own).

    Construction validates every value and raises ``TypeError``/``ValueError`` naming the option and the fix.
    """

    error_feedback: Any = _doc("keep what was not sent and add it to the next gradient (default None: on, except "
                               "for Wangni's rand-k, whose rescaled values make it diverge)")
    value_dtype: Any = _doc("dtype values travel in: None (the gradient's), 'float32', 'float16' or 'bfloat16'")
    granularity: str = _doc("'layer' (select per parameter, default) or 'bucket' (select across the whole DDP "
                            "bucket)", "layer")
    dense_below: int = _doc("parameters with fewer elements than this are sent in full (default 0: compress all)", 0)
    seed: int = _doc("seed shared by all ranks, for shared-index randomness (default 0)", 0)
    masks: Any = _doc("a model-sparsity mask provider (e.g. sparsedist.RigL) for mask-aware exchange")
    grad_scaler: Any = _doc("the torch.amp.GradScaler in use, so residuals are kept in unscaled units")
    optimizer: Any = _doc("the optimizer: required for DGC (to reject optimizers with their own momentum); an "
                          "exchange-aware optimizer (sparsedist.optim.AdamW or SGD) makes the hook send its update "
                          "instead of the gradient (optimizer.to_wire), densely during its warm-up")
    timeout: Any = _doc("seconds a collective may wait before raising an error naming the bucket (default: the "
                        "process group's timeout; with a timeout every exchange runs synchronously)")
    process_group: Any = _doc("torch.distributed process group (default: the global group)")
    backend: Any = _doc("a sparsedist.collectives.Backend to communicate with (default: TorchBackend(process_group))")
    check_every: int = _doc("every N steps, verify that all ranks hold bit-identical parameters (0: never; default 0)",
                            0)
    collective: str = _doc("how sparse payloads are summed: 'allgather' (default), 'auto' (alpha-beta cost model per "
                           "bucket and step, corrected by measurements), 'dense', 'ssar_recursive_double', "
                           "'ssar_split_allgather', 'dsar_split_allgather', or 'gtopk' (global top-k: only the k "
                           "largest sums survive; the rest returns to the residuals)", "allgather")
    cost_model: Any = _doc("a sparsedist.collectives.CostModel for collective='auto' (default: probed at the first "
                           "step)")
    auto_trials: int = _doc("collective='auto': calls of each plausible collective timed per bucket before the "
                            "measured/predicted ratios correct the model's choice (default 2; 0: the model alone)", 2)
    auto_step_check: Any = _doc("collective='auto': time whole training steps with auto's sparse choices against "
                                "steps that send everything densely, now and then, and send densely while sparse "
                                "steps are not at least 10% faster (default: on, unless auto_trials=0 asks for the "
                                "model alone; False: per-bucket choices only; or a sparsedist.collectives.StepCheck)")

    def __post_init__(self) -> None:
        if self.error_feedback is not None and not isinstance(self.error_feedback, bool):
            raise TypeError(f"error_feedback must be True, False or None (the compressor's default), got "
                            f"{self.error_feedback!r}")
        self.value_dtype = parse_dtype(self.value_dtype)
        if self.granularity not in ("layer", "bucket"):
            raise ValueError(f"granularity must be 'layer' or 'bucket', got {self.granularity!r}")
        _int_at_least(self.dense_below, 0, "dense_below", "a number of elements")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.masks is not None:
            for attr in ("mask_of", "needs_dense_gradient"):
                if not callable(getattr(self.masks, attr, None)):
                    raise TypeError(f"masks must provide {attr}() (e.g. a sparsedist.RigL object), "
                                    f"got {type(self.masks).__name__}")
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        self.timeout = check_timeout(self.timeout)
        if self.process_group is not None and not isinstance(self.process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(self.process_group).__name__}")
        if self.backend is not None and not isinstance(self.backend, Backend):
            raise TypeError(f"backend must be a sparsedist.collectives.Backend, got {type(self.backend).__name__}")
        _int_at_least(self.check_every, 0, "check_every", "steps between parameter checks")
        if self.collective not in OPTION_NAMES:
            raise ValueError(f"collective must be one of {OPTION_NAMES}, got {self.collective!r}")
        if self.cost_model is not None and not isinstance(self.cost_model, CostModel):
            raise TypeError(f"cost_model must be a sparsedist.collectives.CostModel, got "
                            f"{type(self.cost_model).__name__}")
        _int_at_least(self.auto_trials, 0, "auto_trials", "timed calls per collective and bucket")
        if self.auto_step_check is not None and not isinstance(self.auto_step_check, (bool, StepCheck)):
            raise TypeError(f"auto_step_check must be None, True, False or a sparsedist.collectives.StepCheck, "
                            f"got {self.auto_step_check!r}")

    def check_compressor(self, compressor: Compressor | None) -> None:
        """The checks that need the compressor too; raise ``ValueError`` naming the conflict."""
        if self.collective == "gtopk" and (compressor is None or compressor.shared_indices
                                           or compressor.density_at(0) is None):
            raise ValueError("collective='gtopk' keeps the global top-k of the sum, with the same k as each rank's "
                             "local selection: it needs a fixed-density compressor that exchanges indices ('topk' "
                             "or 'dgc'), got " + (compressor.name if compressor is not None else "'none'"))
        if compressor is not None and compressor.name == "dgc" and self.optimizer is None:
            raise ValueError("DGC applies momentum itself, so it needs the optimizer to check that the optimizer "
                             "has none: pass optimizer=your_optimizer (built with momentum=0)")
        if exchange_aware(self.optimizer) and compressor is not None and (
                compressor.name == "dgc" or compressor.needs_second_moment):
            raise ValueError(f"{compressor.name} works on gradients (DGC applies its own momentum; variance-based "
                             f"selection needs per-example gradient statistics), but {type(self.optimizer).__name__} "
                             f"sends its update: use 'topk', 'randk' or 'threshold' with it, or a torch optimizer")
        if compressor is not None and compressor.needs_second_moment:
            if self.granularity != "layer":
                raise ValueError(f"{compressor.name} selection keeps per-element state per parameter; use "
                                 f"granularity='layer' (the rule is element-wise, so nothing is lost)")
            if self.error_feedback is False:
                raise ValueError(f"{compressor.name} selection delays elements until they are unambiguous: the "
                                 f"delayed part lives in the error-feedback residual, so error_feedback must be True")

        if compressor is not None and not compressor.contractive and self.error_feedback is True:
            raise ValueError(f"{compressor.name} rescales what it keeps by 1/p, so what it leaves behind can be far "
                             f"larger than the gradient, and error feedback adds it back step after step until it "
                             f"overflows (MNIST: 9.8 % accuracy, residual norm inf); leave error_feedback unset "
                             f"(off, as in the paper), or use 'randk' (uniform) or 'topk' with error feedback")

    def feedback_for(self, compressor: Compressor | None) -> bool:
        """Whether error feedback runs with ``compressor``: as asked, else the compressor's default (on for every
        compressor whose error is never larger than its input, off for Wangni's rand-k)."""
        if self.error_feedback is not None:
            return self.error_feedback
        return compressor is None or compressor.contractive

    def step_check(self, compressor: Compressor | None) -> StepCheck | None:
        """auto's whole-step check this configuration asks for (None: none)."""
        wanted = self.auto_step_check if self.auto_step_check is not None else self.auto_trials != 0
        if self.collective != "auto" or compressor is None or wanted is False:
            return None
        return wanted if isinstance(wanted, StepCheck) else StepCheck()


def exchange_aware(optimizer: Any) -> bool:
    """True for an optimizer that defines what the exchange sends (``exchange_is_dense()`` and ``to_wire(p, grad)``,
    the contract of :mod:`sparsedist.optim`)."""
    return callable(getattr(optimizer, "to_wire", None)) and callable(getattr(optimizer, "exchange_is_dense", None))


#: option name -> its documentation (the fields of :class:`ExchangeOptions`)
STATE_OPTIONS = {f.name: f.metadata["doc"] for f in fields(ExchangeOptions)}


def split_options(compressor: str | Compressor | None, options: dict[str, Any], *,
                  refused: dict[str, str] | None = None,
                  caller: str = "sparsedist.register") -> tuple[Compressor | None, ExchangeOptions]:
    """``(compressor object or None, ExchangeOptions)`` from a compressor name or object and keyword options.

    Options named in :data:`STATE_OPTIONS` go to the exchange, the rest to the compressor; unknown names raise
    ``ValueError`` listing the valid ones. ``refused``: option names ``caller`` does not take, with the reason.
    """
    refused = refused or {}
    for key in options:
        if key in refused:
            raise ValueError(f"{caller} does not take {key!r}: {refused[key]}")
    exchange = {k: v for k, v in options.items() if k in STATE_OPTIONS}
    comp_opts = {k: v for k, v in options.items() if k not in STATE_OPTIONS}
    accepted = sorted(set(STATE_OPTIONS) - set(refused))
    if isinstance(compressor, Compressor):
        if comp_opts:
            raise ValueError(f"unknown option(s) {sorted(comp_opts)}: a Compressor object carries its own "
                             f"settings; options accepted here: {accepted}")
        comp = compressor
    else:
        name = "none" if compressor is None else compressor
        if isinstance(name, str) and name in COMPRESSORS:
            unknown = sorted(set(comp_opts) - set(compressor_options(name)))
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for compressor {name!r}; valid: "
                                 f"{sorted(compressor_options(name))} (compressor) and {accepted} (exchange)")
        comp = build_compressor(name, **comp_opts)
    return comp, ExchangeOptions(**exchange)
