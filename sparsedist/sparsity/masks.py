"""Masks: which parameters get one, how they are drawn, selected, applied and checksummed.

A mask is a ``torch.bool`` tensor of its parameter's shape and device; ``True`` marks an active (kept) weight.
Every function here is deterministic given its inputs, so all ranks of a data-parallel job that call it with
the same inputs get bitwise-identical masks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "select_parameters",
    "derive_seed",
    "random_mask",
    "top_n",
    "apply_mask_",
    "mask_checksum",
]

#: Module types whose ``weight`` is sparsified by default (biases, norms and everything else stay dense).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
    nn.Embedding,
    nn.EmbeddingBag,
)

Include = Callable[[str, nn.Parameter], bool] | Iterable[str] | None


def select_parameters(model: nn.Module, include: Include = None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to sparsify, in ``model.named_parameters()`` order.

    Names are exactly those of ``model.named_parameters()`` for the module passed in (a
    ``DistributedDataParallel`` wrapper therefore gives ``"module.fc1.weight"``). Shared parameters appear
    once, under their first name.

    Args:
        model: the module.
        include: ``None`` (default): the ``weight`` of every :data:`DEFAULT_LAYER_TYPES` module (Linear,
            Bilinear, Conv*/ConvTranspose*, Embedding, EmbeddingBag) that requires grad. A callable
            ``include(name, param) -> bool`` over ``named_parameters()``. Or an iterable of parameter names.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``include`` has the wrong type.
        ValueError: a listed name does not exist, or nothing was selected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if include is None:
        ids = set()
        for mod in model.modules():
            if isinstance(mod, DEFAULT_LAYER_TYPES):
                w = getattr(mod, "weight", None)
                if isinstance(w, nn.Parameter) and w.requires_grad:
                    ids.add(id(w))
        chosen = [(n, p) for n, p in named if id(p) in ids]
        what = "no Linear/Conv/Embedding weight that requires grad"
    elif callable(include):
        chosen = [(n, p) for n, p in named if include(n, p)]
        what = "the include callable selected no parameter"
    elif isinstance(include, (str, bytes)):
        raise TypeError("include must be a callable or a list of parameter names, not a single string; "
                        f"write include=[{include!r}]")
    else:
        try:
            wanted = list(include)
        except TypeError:
            raise TypeError(f"include must be None, a callable (name, param) -> bool, or an iterable of "
                            f"parameter names; got {type(include).__name__}") from None
        names = {n for n, _ in named}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"include names parameters that do not exist: {unknown}; names come from "
                             f"model.named_parameters(), e.g. {sorted(names)[:6]}")
        wanted_set = set(wanted)
        chosen = [(n, p) for n, p in named if n in wanted_set]
        what = "include is empty"
    if not chosen:
        raise ValueError(f"nothing to sparsify: {what}. Pass include= to choose the parameters.")
    return chosen


_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. ``(seed, step, layer)``), same value in every process.

    SplitMix64 finalizer chained over the keys; independent of ``PYTHONHASHSEED``.
    """
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def random_mask(shape: torch.Size | tuple[int, ...], n_active: int, seed: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``n_active`` True entries, uniformly at random.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and then moved to ``device``, so it is
    identical on every device and every rank.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if not 0 <= n_active <= numel:
        raise ValueError(f"n_active must be in [0, {numel}] for shape {tuple(shape)}, got {n_active}")
    gen = torch.Generator().manual_seed(int(seed))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=gen)[:n_active]] = True
    return flat.view(tuple(shape)).to(device) if device is not None else flat.view(tuple(shape))


def top_n(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest entries of the 1-D ``score``; ties broken towards the lower index.

    Deterministic (unlike ``torch.topk``'s index order among equal values), so every rank that holds the same
    scores selects the same positions. NaN must not occur in ``score``.

    Returns:
        int64 tensor of ``min(n, numel)`` distinct indices on ``score``'s device, in no particular order.
    """
    if score.dim() != 1:
        raise ValueError(f"top_n needs a 1-D score, got shape {tuple(score.shape)}")
    numel = score.numel()
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    if n >= numel:
        return torch.arange(numel, device=score.device)
    kth = torch.topk(score, n, sorted=False).values.min()  # the n-th largest value: well defined
    above = torch.nonzero(score > kth).flatten()
    tied = torch.nonzero(score == kth).flatten()[: n - above.numel()]  # nonzero is in ascending order
    return torch.cat([above, tied])


@torch.no_grad()
def apply_mask_(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set ``tensor`` to exactly ``+0.0`` where ``mask`` is False, in place; returns ``tensor``."""
    return tensor.masked_fill_(~mask, 0)


_HASH_MUL = 2_147_483_629  # a prime below 2**31
_HASH_MOD = 2_147_483_647  # 2**31 - 1


def mask_checksum(mask: torch.Tensor) -> torch.Tensor:
    """A small fingerprint of a mask: int64 ``[count, sum(idx), sum((idx * A) mod M)]`` over its active flat
    indices ``idx``. Equal masks give equal fingerprints; a moved weight changes ``sum(idx)``. Valid for up to
    2**31 elements per mask. Returned on the mask's device."""
    idx = torch.nonzero(mask.reshape(-1)).flatten()
    return torch.stack([
        torch.tensor(idx.numel(), dtype=torch.long, device=mask.device),
        idx.sum(),
        ((idx * _HASH_MUL) % _HASH_MOD).sum(),
    ])
