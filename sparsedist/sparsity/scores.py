"""What to prune: importance scores of weights, and how a density budget is split over layers.

Scores (higher = kept), one float32 tensor per weight, of its shape:

* ``"magnitude"``: ``|w|`` (Han et al. 2015; Zhu & Gupta 2017).
* ``"taylor"``: ``|w * g|``, the first-order Taylor estimate of the loss change when ``w`` is set to zero
  (Molchanov et al. 2017/2019); ``g`` is a gradient (the pruning methods average it over the steps since the
  last pruning step).
* ``"random"``: uniform random numbers keyed by ``(seed, step, layer)``, identical on every rank: the
  baseline that magnitude pruning should beat.

Budgets, for a global density ``d`` (fraction of the sparsified weights kept):

* ``"uniform"``: every layer keeps ``d`` of its weights;
* ``"erk"``: Erdos-Renyi-Kernel densities (:func:`~sparsedist.sparsity.distributions.erk_densities`);
* ``"global"``: one threshold over all layers' scores together: the ``round(d * N)`` best-scored weights
  of the whole model are kept, wherever they are (a layer can end up much sparser than ``d``).

Every selection is deterministic (ties go to the lower flat index, then to the earlier layer), so ranks that
hold the same weights and gradients compute the same masks. Pruning only removes: a new mask is always a
subset of the current one.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from .distributions import layer_counts
from .masks import Include, apply_mask_, derive_seed, select_parameters, top_n

__all__ = ["SCORES", "BUDGETS", "weight_scores", "budget_counts", "prune_masks", "prune_model", "nm_mask"]

SCORES = ("magnitude", "taylor", "random")
BUDGETS = ("global", "uniform", "erk")

_RANDOM_KEY = 0x5C0E  # derive_seed domain of random pruning scores


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``what`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(choices)}")


def weight_scores(score: str, weight: torch.Tensor, grad: torch.Tensor | None = None, *, seed: int = 0,
                  step: int = 0, layer: int = 0) -> torch.Tensor:
    """The float32 importance of every entry of ``weight`` (same shape and device); higher is kept first.

    Args:
        score: ``"magnitude"``, ``"taylor"`` (needs ``grad``, the weight's shape) or ``"random"``.
        weight: the weight tensor.
        grad: the gradient for ``"taylor"``.
        seed, step, layer: key the random scores (same numbers on every rank and device).
    """
    check_choice("score", score, SCORES)
    w = weight.detach()
    if score == "magnitude":
        return w.abs().float()
    if score == "taylor":
        if grad is None or tuple(grad.shape) != tuple(w.shape):
            raise ValueError(f"the taylor score |w * g| needs a gradient of the weight's shape {tuple(w.shape)}, "
                             f"got {None if grad is None else tuple(grad.shape)}; run a backward pass before pruning")
        return (w.float() * grad.detach().float()).abs()
    gen = torch.Generator().manual_seed(derive_seed(seed, _RANDOM_KEY, step, layer))
    return torch.rand(w.numel(), generator=gen).view(w.shape).to(w.device)


def budget_counts(shapes: Mapping[str, Sequence[int]], density: float, budget: str | Mapping[str, float]
                  ) -> dict[str, int] | None:
    """Per-layer numbers of kept weights for ``budget`` ``"uniform"``, ``"erk"`` or a dict name -> density
    (exact integers, see :func:`~sparsedist.sparsity.distributions.layer_counts`); ``None`` for ``"global"``,
    whose split follows the scores."""
    if isinstance(budget, str):
        check_choice("budget", budget, BUDGETS)
        if budget == "global":
            if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
                raise ValueError(f"density must be a number in (0, 1] (fraction of weights kept), got {density!r}")
            return None
    return layer_counts(shapes, density, budget)


@torch.no_grad()
def prune_masks(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], names: Sequence[str],
                density: float, budget: str | Mapping[str, float] = "global") -> list[torch.Tensor]:
    """New masks that keep the best-scored active weights at global ``density``.

    Args:
        scores: one float tensor per layer (any shape of ``numel`` equal to the mask's); NaN is not allowed.
        masks: the current bool masks; positions already pruned stay pruned.
        names: the layers' names (keys of a dict ``budget``).
        density: fraction of all the layers' weights kept, in (0, 1].
        budget: ``"global"``, ``"uniform"``, ``"erk"`` or a dict name -> density.

    Returns:
        one bool tensor per layer, shaped like its mask, a subset of it. A layer already sparser than its
        budget keeps what it has; so the total can fall below ``density``.
    """
    shapes = {n: tuple(m.shape) for n, m in zip(names, masks)}
    counts = budget_counts(shapes, density, budget)
    neg_inf = float("-inf")
    flat = [torch.where(m.reshape(-1), s.reshape(-1).float(), torch.full_like(s.reshape(-1).float(), neg_inf))
            for s, m in zip(scores, masks)]
    out = []
    if counts is None:
        total = math.floor(density * sum(m.numel() for m in masks) + 0.5)
        total = min(total, sum(int(m.sum()) for m in masks))
        device = masks[0].device
        keep = top_n(torch.cat([f.to(device) for f in flat]), total)
        chosen = torch.zeros(sum(m.numel() for m in masks), dtype=torch.bool, device=device)
        chosen[keep] = True
        for m, part in zip(masks, chosen.split([m.numel() for m in masks])):
            out.append(part.to(m.device).view_as(m) & m)
        return out
    for n, m, f in zip(names, masks, flat):
        new = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
        new[top_n(f, min(counts[n], int(m.sum())))] = True
        out.append(new.view_as(m) & m)
    return out


@torch.no_grad()
def prune_model(model: nn.Module, density: float, *, budget: str | Mapping[str, float] = "global",
                score: str = "magnitude", include: Include = None, seed: int = 0,
                masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One-shot pruning, in place: keep the best-scored ``density`` of the weights and set the rest to zero.

    The weights' ``.grad`` is read for ``score="taylor"``. ``masks`` (name -> bool) restricts the choice to
    positions already active. Returns the masks (name -> bool tensor), for :class:`PruneRetrain`'s retraining
    or for export. Nothing keeps the weights at zero afterwards: training them again needs a masked method.
    """
    pairs = select_parameters(model, include)
    names = [n for n, _ in pairs]
    current = [(masks[n].to(p.device).bool() if masks is not None and n in masks else
                torch.ones_like(p, dtype=torch.bool)) for n, p in pairs]
    scores = [weight_scores(score, p, p.grad, seed=seed, layer=i) for i, (_, p) in enumerate(pairs)]
    new = prune_masks(scores, current, names, density, budget)
    for (_, p), m in zip(pairs, new):
        apply_mask_(p.data, m)
    return dict(zip(names, new))


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The N:M mask of ``weight``: in every group of ``m`` consecutive weights along the input dimension
    (rows of ``weight.reshape(out, -1)``), the ``n`` of largest ``|w|`` are kept (ties to the lower index).

    2:4 is the layout of NVIDIA's sparse tensor cores (``torch.sparse.to_sparse_semi_structured``).

    Raises:
        ValueError: the row length is not a multiple of ``m``, or not ``0 < n <= m``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"N:M sparsity groups {m} consecutive inputs, but a row of this weight has "
                         f"{rows.shape[1]} (shape {tuple(weight.shape)}); pad the layer or leave it dense")
    groups = rows.abs().float().reshape(-1, m)
    # a stable descending order: ties keep the lower index first
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order, True)
    return keep.view(weight.shape)
