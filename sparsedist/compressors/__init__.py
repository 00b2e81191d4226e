"""WHAT to send: gradient selection rules. Pure tensor code, no communication, no DDP.

=============  ==============================================  ==========================================
name           class                                           paper
=============  ==============================================  ==========================================
``topk``       :class:`TopKCompressor`                         (exact; or DGC's sampled threshold)
``threshold``  :class:`ThresholdCompressor`                    Strom 2015
``randk``      :class:`RandKCompressor` / :class:`WangniCompressor`  Stich et al. 2018 / Wangni et al. 2018
``variance``   :class:`VarianceCompressor`                     Tsuzuku, Imachi & Akiba 2018
``dgc``        :class:`DGCCompressor`                          Lin et al. 2018
=============  ==============================================  ==========================================
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Compressor, SelectContext
from .dgc import DGCCompressor
from .randk import RandKCompressor, WangniCompressor
from .threshold import ThresholdCompressor
from .topk import TopKCompressor

__all__ = ["Compressor", "SelectContext", "TopKCompressor", "ThresholdCompressor", "RandKCompressor",
           "WangniCompressor", "DGCCompressor", "build_compressor", "compressor_options", "COMPRESSORS"]

try:  # the variance-based compressor lives in its own module
    from .variance import VarianceCompressor  # noqa: F401

    __all__.append("VarianceCompressor")
except ImportError:  # pragma: no cover - only while the module is absent
    VarianceCompressor = None  # type: ignore[assignment]


def _randk(density: float = 0.01, variant: str = "uniform") -> Compressor:
    """rand-k: ``variant="uniform"`` (shared-seed, values-only allreduce) or ``"wangni"`` (unbiased)."""
    if variant == "uniform":
        return RandKCompressor(density)
    if variant == "wangni":
        return WangniCompressor(density)
    raise ValueError(f"randk variant must be 'uniform' (Stich et al. 2018) or 'wangni' (Wangni et al. 2018), "
                     f"got {variant!r}")


#: Compressor names accepted by :func:`sparsedist.register`, with their factories.
COMPRESSORS: dict[str, Callable[..., Compressor] | None] = {
    "none": None,
    "topk": TopKCompressor,
    "threshold": ThresholdCompressor,
    "randk": _randk,
    "variance": VarianceCompressor,
    "dgc": DGCCompressor,
}


def compressor_options(name: str) -> list[str]:
    """Option names the compressor ``name`` accepts."""
    factory = COMPRESSORS[name]
    if factory is None:
        return []
    return [p for p in inspect.signature(factory).parameters if p != "self"]


def build_compressor(name: str, **options: Any) -> Compressor | None:
    """Build a compressor by name; unknown names or options raise ``ValueError`` listing the valid ones."""
    if not isinstance(name, str) or name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(COMPRESSORS)} "
                         f"(or pass a Compressor object)")
    factory = COMPRESSORS[name]
    if factory is None and name != "none":
        raise ValueError(f"compressor {name!r} is not available in this installation")
    valid = compressor_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for compressor {name!r}; valid: {valid or 'none'}")
    return None if factory is None else factory(**options)
