"""What a training step keeps in memory on this rank, by kind, counted from the tensors themselves.

:func:`training_memory` adds up the bytes of the local (sharded) weights, the gradients kept between backward
and step (dense ``param.grad``, :class:`~sparsedist.optim.PackedOptimizer`'s packed ones and the full-size local
gradients an exchange-aware :class:`~sparsedist.optim.AdamW` keeps until its step), the optimizer
state (packed values and their int32 positions counted apart), the exchange's error-feedback residuals and
cached mask positions, and the masks. Storage shared by several tensors (FSDP's gradients are views of one
reduce-scatter buffer per module) is counted once. It is bookkeeping, not the allocator: temporaries,
activations and allocator caching are not in it (``benchmarks/fsdp_memory.py`` measures peaks with the
allocator).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["training_memory", "storage_bytes"]


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local tensors; None skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if DTensor is not None and isinstance(t, DTensor):
            t = t.to_local()
        s = t.untyped_storage()
        seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, exchange: Any = None,
                    masks: Any = None) -> dict[str, int]:
    """Bytes on this rank by kind: ``weights``, ``gradients``, ``optimizer`` (``optimizer_index``: packed
    positions, included), ``residuals`` (with the exchange's cached mask positions), ``masks``, ``total``.

    Args:
        model: the (``fully_shard``-ed) model.
        optimizer: its optimizer (a :class:`~sparsedist.optim.PackedOptimizer` reports its packed gradients too).
        exchange: the state of :func:`sparsedist.fsdp.register_fsdp` or :func:`sparsedist.register`, or None.
        masks: the model-sparsity object (``masks`` property: name -> bool mask), or None.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params]
    out = {"weights": storage_bytes(params)}
    index = 0
    opt_tensors: list[torch.Tensor] = []
    if optimizer is not None:
        packed = getattr(optimizer, "packed_grad", None)
        if packed is not None:
            grads += [packed(p) for p in params]
        kept = getattr(optimizer, "kept_gradients", None)  # sparsedist.optim's local gradients until step()
        if kept is not None:
            grads += kept()
        for state in optimizer.state.values():
            for key, v in state.items():
                if torch.is_tensor(v) and key != "step":
                    opt_tensors.append(v)
                    if key == "index":
                        index += storage_bytes([v])
    out["gradients"] = storage_bytes(grads)
    out["optimizer"] = storage_bytes(opt_tensors)
    out["optimizer_index"] = index
    residuals = 0
    if exchange is not None:
        residuals = storage_bytes(exchange.feedback.residuals.values())
        residuals += storage_bytes(v[1] for v in getattr(exchange, "_active", {}).values())
    out["residuals"] = residuals
    out["masks"] = storage_bytes(masks.masks.values()) if masks is not None else 0
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "residuals", "masks"))
    return out
