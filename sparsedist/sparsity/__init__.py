"""Model sparsity: masks, layer-wise density distributions, and sparse training (static, SET, RigL).

* :mod:`.masks` — which parameters are sparsified, random masks with exact counts, deterministic top-n,
  mask fingerprints.
* :mod:`.distributions` — ``"uniform"`` and ``"erk"`` per-layer densities and exact integer counts.
* :mod:`.schedules` — mask-update steps and the cosine drop fraction.
* :mod:`.rigl` — :class:`StaticSparsity`, :class:`SET`, :class:`RigL`.

Nothing here imports the DDP communication hook; the hook consumes the mask-provider protocol
(``mask_of``, ``needs_dense_gradient``, ``mask_version``) that all three classes implement.
"""

from .distributions import erk_densities, layer_counts, layer_densities, uniform_densities
from .masks import DEFAULT_LAYER_TYPES, mask_checksum, random_mask, select_parameters, top_n
from .rigl import SET, RigL, StaticSparsity
from .schedules import UpdateSchedule, cosine_drop_fraction

__all__ = [
    "StaticSparsity",
    "SET",
    "RigL",
    "UpdateSchedule",
    "cosine_drop_fraction",
    "layer_counts",
    "layer_densities",
    "erk_densities",
    "uniform_densities",
    "select_parameters",
    "random_mask",
    "top_n",
    "mask_checksum",
    "DEFAULT_LAYER_TYPES",
]
