"""``sparsedist.register``: one line that makes a DDP model's gradient exchange sparse."""

from __future__ import annotations

from typing import Any

import torch

from .compressors import Compressor
from .hook import SparsifyState, sparsify_hook

__all__ = ["register"]


def register(model: torch.nn.parallel.DistributedDataParallel, compressor: str | Compressor | SparsifyState = "topk",
             **options: Any) -> SparsifyState:
    """Build a :class:`SparsifyState`, register :func:`sparsify_hook` on ``model``, and return the state.

    Call it once, after wrapping the model in DDP and before the first backward pass::

        ddp = DistributedDataParallel(model)
        state = sparsedist.register(ddp, "topk", density=0.01)
        ...train...
        print(state.stats())

    Args:
        model: the ``DistributedDataParallel`` model.
        compressor: ``"none"``, ``"topk"``, ``"threshold"``, ``"randk"``, ``"variance"``, ``"dgc"``, a
            :class:`~sparsedist.compressors.Compressor` object, or an unpickled :class:`SparsifyState` (it is
            attached to ``model``, with ``masks``/``grad_scaler``/``optimizer`` from ``options``, and registered).
        **options: the compressor's options (e.g. ``density``, ``threshold``, ``alpha``/``zeta``, ``momentum``,
            ``warmup_steps``, ``clip_norm``, ``mode``, ``variant``) and the exchange's (see
            :data:`sparsedist.options.STATE_OPTIONS`: ``error_feedback``, ``value_dtype``, ``granularity``,
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
    if isinstance(compressor, SparsifyState):
        extra = sorted(set(options) - {"masks", "grad_scaler", "optimizer"})
        if extra:
            raise ValueError(f"an existing SparsifyState keeps its own options; only masks, grad_scaler and "
                             f"optimizer can be given again, not {extra}")
        state = compressor.attach(model, **options)
    else:
        state = SparsifyState(model, compressor, **options)
    model.register_comm_hook(state, sparsify_hook)
    return state
