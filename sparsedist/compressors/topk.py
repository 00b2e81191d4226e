"""Top-k sparsification: keep the k = ceil(density * n) largest-magnitude entries.

Two selection modes:

* ``"exact"``: ``torch.topk`` on ``|acc|``.
* ``"sampled"`` (Lin et al. 2018, DGC's sampled threshold): estimate the k-th largest magnitude from a uniform
  random sample of ``sample_ratio * n`` entries, take every entry at or above it, and only when that
  overshoots k run an exact top-k on the (few) candidates. When the estimate undershoots badly (fewer than
  ``k / 2`` candidates) it falls back to exact selection, so the count is always in ``[k/2, k]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..payload import SparseGrad
from .base import (FixedDensityCompressor, SelectContext, Workspace, check_density, count_for_density,
                   entries_at_least)

__all__ = ["TopKCompressor", "topk_indices", "sampled_topk_indices"]


#: below this many elements, or above this density, exact selection is a plain ``torch.topk``
_PREFILTER_MIN_NUMEL = 1 << 18
_PREFILTER_MAX_DENSITY = 1 / 16


def _abs(x: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    return x.abs() if workspace is None else workspace.abs(x)


def topk_indices(x: torch.Tensor, k: int, workspace: Workspace | None = None) -> torch.Tensor:
    """Indices (int64, ``(k,)``) of the k largest ``|x|`` of a flat tensor (exact; ties broken arbitrarily).

    On a CPU, on large tensors at low density, a full ``torch.topk`` costs 6-11x one memory pass (25M fp32
    elements, one thread). So a threshold is first estimated from a strided sample of ``|x|`` (set low enough that
    at least k entries pass it with near certainty), the entries at or above it are gathered, and the exact top-k
    is taken among them: all of the k largest are among the candidates whenever at least k pass, so the result is exact.
    If fewer than k pass (the sample was unrepresentative), it falls back to the full ``torch.topk``.
    ``workspace``: reuse its buffers for ``|x|`` and the candidate mask (see :class:`~.base.Workspace`).
    """
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    mag = _abs(x, workspace)
    if x.device.type != "cpu" or n < _PREFILTER_MIN_NUMEL or k > n * _PREFILTER_MAX_DENSITY:
        return torch.topk(mag, k, sorted=False).indices  # (an accelerator's topk needs no host synchronisation)
    stride = max(1, n // 65536)
    sample = mag[::stride]
    m = sample.numel()
    expected = k * m / n  # sample entries above the true k-th largest magnitude, on average
    k_s = min(m, math.ceil(expected + 4.0 * math.sqrt(expected) + 8))  # ~4 sigma lower threshold
    threshold = torch.topk(sample, k_s, sorted=False).values.min()
    candidates, cand_mag = entries_at_least(mag, threshold, workspace)
    if candidates.numel() < k:
        return torch.topk(mag, k, sorted=False).indices
    drop = candidates.numel() - k
    if drop == 0:
        return candidates
    if drop < k:  # cheaper to find the few smallest candidates than the many largest
        keep = torch.ones(candidates.numel(), dtype=torch.bool, device=x.device)
        keep[torch.topk(cand_mag, drop, largest=False, sorted=False).indices] = False
        return candidates[keep]
    return candidates[torch.topk(cand_mag, k, sorted=False).indices]


def sampled_topk_indices(x: torch.Tensor, k: int, sample_ratio: float = 0.01, min_samples: int = 1000,
                         generator: torch.Generator | None = None,
                         workspace: Workspace | None = None) -> torch.Tensor:
    """Approximate top-k by a sampled threshold; returns between ``k/2`` and ``k`` indices (int64).

    Args:
        x: flat floating tensor ``(n,)``.
        k: target count.
        sample_ratio: fraction of entries sampled to estimate the threshold.
        min_samples: lower bound on the sample size; below ``4 * min_samples`` entries exact top-k is used.
        generator: random generator for the sample (CPU generators are used for reproducibility).
        workspace: reuse its buffers for ``|x|`` and the candidate mask (see :class:`~.base.Workspace`).
    """
    n = x.numel()
    if k >= n or n < 4 * min_samples:
        return topk_indices(x, k, workspace)
    mag = _abs(x, workspace)
    num_samples = min(n, max(min_samples, int(n * sample_ratio)))
    sample_idx = torch.randint(0, n, (num_samples,), generator=generator, device="cpu").to(x.device)
    samples = mag[sample_idx]
    k_samples = max(1, math.ceil(k * num_samples / n))
    threshold = torch.topk(samples, k_samples, sorted=False).values.min()
    candidates, cand_mag = entries_at_least(mag, threshold, workspace)
    count = candidates.numel()
    if count > k:
        return candidates[torch.topk(cand_mag, k, sorted=False).indices]
    if 2 * count < k:
        return topk_indices(x, k, workspace)
    return candidates


class TopKCompressor(FixedDensityCompressor):
    """Keep the ``k = ceil(density * n)`` largest-magnitude entries of each accumulator.

    Args:
        density: fraction of entries sent, in (0, 1].
        mode: ``"exact"`` (``torch.topk``) or ``"sampled"`` (threshold estimated from a random sample; exact
            selection only when the count overshoots).
        sample_ratio: fraction sampled in ``"sampled"`` mode.

    Selection keeps scratch buffers between calls (``|acc|`` and a mask, for the largest tensor selected: 5 bytes
    per fp32 element) instead of allocating them per call (:class:`~.base.Workspace`).
    """

    name = "topk"
    count_bounded = True  # exact: k entries; sampled: between k/2 and k

    def __init__(self, density: float = 0.01, mode: str = "exact", sample_ratio: float = 0.01):
        super().__init__(density)
        if mode not in ("exact", "sampled"):
            raise ValueError(f"topk mode must be 'exact' or 'sampled', got {mode!r}")
        self.mode = mode
        self.sample_ratio = check_density(sample_ratio, "sample_ratio")
        self._generator = torch.Generator().manual_seed(0)
        self._workspace = Workspace()

    def select(self, acc: torch.Tensor, k: int) -> torch.Tensor:
        if self.mode == "sampled":
            return sampled_topk_indices(acc, k, self.sample_ratio, generator=self._generator,
                                        workspace=self._workspace)
        return topk_indices(acc, k, self._workspace)

    def compress(self, acc: torch.Tensor, ctx: SelectContext) -> SparseGrad:
        k = count_for_density(acc.numel(), self.density_at(ctx.step))
        idx = self.select(acc, k)
        return SparseGrad(idx, acc[idx], acc.numel())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()} if self.mode == "sampled" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._generator.set_state(state["generator"])

    def options(self) -> dict[str, Any]:
        return {**super().options(), "mode": self.mode, "sample_ratio": self.sample_ratio}
