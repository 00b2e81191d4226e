"""Validation of numeric arguments, shared by the compressors and the ephemeral-sparsity ops: each raises
``TypeError``/``ValueError`` naming the argument and what it must be."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_density", "check_nonnegative"]


def check_density(density: Any, name: str = "density") -> float:
    """Validate a density in (0, 1]; raise ``TypeError``/``ValueError`` naming the option otherwise."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {density!r} of type {type(density).__name__}")
    density = float(density)
    if math.isnan(density) or not 0.0 < density <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (fraction of elements sent), got {density}; "
                         f"e.g. {name}=0.01 sends 1% of the gradient")
    return density


def check_nonnegative(value: Any, name: str) -> float:
    """Validate a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value
