"""Optimizer-side pieces: packed optimizer state for masked parameters (:mod:`.packed`)."""

from .packed import PackedAdam, PackedAdamW, PackedOptimizer, PackedSGD, repack

__all__ = ["PackedOptimizer", "PackedAdam", "PackedAdamW", "PackedSGD", "repack"]
