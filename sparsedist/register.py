"""``sparsedist.register``: one line that makes a DDP model's gradient exchange sparse."""

from __future__ import annotations

from typing import Any

import torch

from .compressors import COMPRESSORS, Compressor, build_compressor, compressor_options
from .hook import STATE_OPTIONS, SparsifyState, sparsify_hook

__all__ = ["register"]


def register(model: torch.nn.parallel.DistributedDataParallel, compressor: str | Compressor = "topk",
             **options: Any) -> SparsifyState:
    """Build a :class:`SparsifyState`, register :func:`sparsify_hook` on ``model``, and return the state.

    Call it once, after wrapping the model in DDP and before the first backward pass::

        ddp = DistributedDataParallel(model)
        state = sparsedist.register(ddp, "topk", density=0.01)
        ...train...
        print(state.stats())

    Args:
        model: the ``DistributedDataParallel`` model.
        compressor: ``"none"``, ``"topk"``, ``"threshold"``, ``"randk"``, ``"variance"``, ``"dgc"``, or a
            :class:`~sparsedist.compressors.Compressor` object.
        **options: the compressor's options (e.g. ``density``, ``threshold``, ``alpha``/``zeta``, ``momentum``,
            ``warmup_steps``, ``clip_norm``, ``mode``, ``variant``) and the state's (see
            :data:`sparsedist.hook.STATE_OPTIONS`: ``error_feedback``, ``value_dtype``, ``granularity``,
            ``dense_below``, ``seed``, ``masks``, ``grad_scaler``, ``optimizer``, ``timeout``, ...).

    Returns:
        The :class:`SparsifyState`; ``state.stats()`` gives the telemetry.

    Raises:
        TypeError: ``model`` is not a DistributedDataParallel model.
        ValueError: unknown compressor or option names (the message lists the valid ones), invalid values.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"sparsedist.register needs a torch.nn.parallel.DistributedDataParallel model, got "
                        f"{type(model).__name__}; wrap it first: DistributedDataParallel(model)")
    state_opts = {k: v for k, v in options.items() if k in STATE_OPTIONS}
    comp_opts = {k: v for k, v in options.items() if k not in STATE_OPTIONS}
    if isinstance(compressor, Compressor):
        if comp_opts:
            raise ValueError(f"unknown option(s) {sorted(comp_opts)}: a Compressor object carries its own "
                             f"settings; options accepted here: {sorted(STATE_OPTIONS)}")
        comp = compressor
    else:
        if isinstance(compressor, str) and compressor in COMPRESSORS:
            unknown = sorted(set(comp_opts) - set(compressor_options(compressor)))
            if unknown:
                raise ValueError(
                    f"unknown option(s) {unknown} for compressor {compressor!r}; valid: "
                    f"{sorted(compressor_options(compressor))} (compressor) and {sorted(STATE_OPTIONS)} (exchange)")
        comp = build_compressor(compressor, **comp_opts)
    state = SparsifyState(model, comp, **state_opts)
    if comp is not None and hasattr(comp, "set_world_size"):
        comp.set_world_size(state.world_size)
    model.register_comm_hook(state, sparsify_hook)
    return state
