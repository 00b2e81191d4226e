"""How a global density budget is split across layers: ``"uniform"`` and ``"erk"`` (Evci et al. 2020).

Everything here is pure arithmetic on shapes; no tensors, no communication.

* **uniform**: every layer gets the global density ``d``.
* **erk** (Erdos-Renyi-Kernel): layer ``l`` with shape ``(s_1, ..., s_k)`` gets density
  ``eps * (s_1 + ... + s_k) / (s_1 * ... * s_k)``, with one ``eps`` solved so that the layers together hold
  ``d * N`` active weights (``N`` = total number of weights). A layer whose density would exceed 1 is made
  dense, and ``eps`` is solved again for the others; this repeats (the layers with the largest raw density
  first, as in the reference implementation ``rigl/sparse_utils.py``) until every density is at most 1.

Densities are real numbers; :func:`layer_counts` turns them into exact integer active counts whose total is
``round(d * N)`` (round half up) by the largest-remainder method, so the global budget holds exactly and
each layer gets ``floor`` or ``ceil`` of its real count.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["erk_densities", "uniform_densities", "layer_densities", "layer_counts", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("uniform", "erk")

Shapes = Mapping[str, Sequence[int]]


def _check(shapes: Shapes, density: float) -> dict[str, int]:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1] (fraction of weights kept), got {density!r}")
    if len(shapes) == 0:
        raise ValueError("no layers given: shapes is empty")
    numels = {}
    for name, shape in shapes.items():
        dims = [int(s) for s in shape]
        if len(dims) == 0 or any(s <= 0 for s in dims):
            raise ValueError(f"layer {name!r} has shape {tuple(shape)}; every dimension must be >= 1 and the "
                             f"tensor at least 1-D")
        numels[name] = math.prod(dims)
    return numels


def uniform_densities(shapes: Shapes, density: float) -> dict[str, float]:
    """Every layer gets ``density``. ``shapes``: name -> tensor shape. Returns name -> density in (0, 1]."""
    _check(shapes, density)
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities for a global ``density`` (fraction of all weights kept).

    Args:
        shapes: layer name -> tensor shape (e.g. ``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv2d).
        density: global fraction of weights kept, in (0, 1].

    Returns:
        name -> density in (0, 1]; ``sum(density_l * numel_l) == density * N`` up to float rounding. Layers
        made dense have exactly 1.0.
    """
    numels = _check(shapes, density)
    raw = {name: sum(int(s) for s in shape) / numels[name] for name, shape in shapes.items()}
    budget = density * sum(numels.values())
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            break
        divisor = sum(raw[n] * numels[n] for n in sparse)
        eps = (budget - sum(numels[n] for n in dense)) / divisor
        max_raw = max(raw[n] for n in sparse)
        if eps * max_raw > 1.0:
            dense.update(n for n in sparse if raw[n] == max_raw)
        else:
            break
    out = {}
    for name in shapes:
        out[name] = 1.0 if name in dense else min(1.0, eps * raw[name])
    return out


def layer_densities(shapes: Shapes, density: float, distribution: str | Mapping[str, float] = "erk"
                    ) -> dict[str, float]:
    """Per-layer densities for ``distribution`` ``"uniform"``, ``"erk"``, or an explicit name -> density dict."""
    if isinstance(distribution, Mapping):
        _check(shapes, density)
        missing = [n for n in shapes if n not in distribution]
        extra = [n for n in distribution if n not in shapes]
        if missing or extra:
            raise ValueError(f"a density dict must name exactly the sparsified layers; missing {missing}, "
                             f"unknown {extra}")
        out = {}
        for n in shapes:
            d = distribution[n]
            if not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
                raise ValueError(f"density for layer {n!r} must be in (0, 1], got {d!r}")
            out[n] = float(d)
        return out
    if distribution == "uniform":
        return uniform_densities(shapes, density)
    if distribution == "erk":
        return erk_densities(shapes, density)
    raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS} or a dict "
                     f"layer name -> density")


def _largest_remainder(real: dict[str, float], caps: dict[str, int], total: int) -> dict[str, int]:
    """Integers ``c_l`` in ``[0, caps_l]`` with ``sum c_l == total``, each ``floor`` or ``ceil`` of ``real_l``."""
    counts = {n: min(caps[n], max(0, math.floor(v))) for n, v in real.items()}
    pos = {n: i for i, n in enumerate(real)}  # ties go to the earlier layer: deterministic
    deficit = total - sum(counts.values())
    # Hand out the missing units by largest fractional part, then (float edge cases) to any layer with room.
    by_rem = sorted(pos, key=lambda n: (-(real[n] - math.floor(real[n])), pos[n]))
    while deficit > 0:
        progressed = False
        for n in by_rem:
            if deficit == 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                deficit -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total} active weights in layers holding {sum(caps.values())}")
    by_small = sorted(pos, key=lambda n: ((real[n] - math.floor(real[n])), pos[n]))
    while deficit < 0:
        for n in by_small:
            if deficit == 0:
                break
            if counts[n] > 0:
                counts[n] -= 1
                deficit += 1
    return counts


def layer_counts(shapes: Shapes, density: float, distribution: str | Mapping[str, float] = "erk"
                 ) -> dict[str, int]:
    """Exact integer number of active (kept) weights per layer.

    For ``"uniform"`` and ``"erk"`` the total is ``floor(density * N + 0.5)`` (``N`` = total weights) and each
    layer gets ``floor`` or ``ceil`` of ``density_l * numel_l`` (largest remainder; ties to the earlier
    layer). For an explicit dict, each layer gets ``floor(density_l * numel_l + 0.5)``, no global budget.

    Returns:
        name -> count, ``0 <= count <= numel``.
    """
    densities = layer_densities(shapes, density, distribution)
    numels = {n: math.prod(int(s) for s in shape) for n, shape in shapes.items()}
    if isinstance(distribution, Mapping):
        return {n: min(numels[n], math.floor(densities[n] * numels[n] + 0.5)) for n in shapes}
    total = math.floor(density * sum(numels.values()) + 0.5)
    real = {n: densities[n] * numels[n] for n in shapes}
    return _largest_remainder(real, numels, total)
