"""Model sparsity: masks, layer-wise density distributions, sparse training and pruning.

* :mod:`.masks` — which parameters are sparsified, random masks with exact counts, deterministic top-n,
  mask fingerprints.
* :mod:`.distributions` — ``"uniform"`` and ``"erk"`` per-layer densities and exact integer counts.
* :mod:`.schedules` — mask-update steps, the cosine drop fraction, Zhu & Gupta's cubic pruning schedule.
* :mod:`.base` — :class:`MaskedSparsity`, the root of the hierarchy (optimizer hooks, mask provider, state).
* :mod:`.rigl` — sparse from scratch: :class:`StaticSparsity` -> :class:`SET` -> :class:`RigL`.
* :mod:`.scores` — pruning scores (magnitude, Taylor ``|w * g|``, random), budgets (uniform, ERK, global),
  one-shot :func:`prune_model`, N:M masks.
* :mod:`.pruning` — :class:`Pruning`, the base of :class:`GradualMagnitudePruning` (:mod:`.gmp`, Zhu & Gupta
  2017) and :class:`PruneRetrain` (:mod:`.prune_retrain`, Han et al. 2015, with rewinding).
* :mod:`.graph`, :mod:`.neurons`, :mod:`.structured` — which layer feeds which; dead-neuron removal;
  structured pruning to a smaller dense model (Li et al. 2017).
* :mod:`.export` — inference exports (plain module, ``torch.sparse`` CSR, 2:4 on CUDA) loadable without
  sparsedist.

Nothing here imports the DDP communication hook; the hook consumes the mask-provider protocol
(``mask_of``, ``needs_dense_gradient``, ``mask_version``) that every :class:`MaskedSparsity` implements.
"""

from .base import MaskedSparsity
from .distributions import erk_densities, layer_counts, layer_densities, uniform_densities
from .export import (CSRConv2d, CSRLinear, export_dense, fold_batchnorm, save_inference, storage_bytes,
                     to_semi_structured, to_sparse_csr)
from .gmp import GMP, GradualMagnitudePruning
from .graph import LayerPair, find_layer_pairs
from .masks import DEFAULT_LAYER_TYPES, mask_checksum, random_mask, select_parameters, top_n
from .neurons import remove_dead_neurons
from .prune_retrain import PruneRetrain
from .pruning import Pruning
from .rigl import SET, RigL, StaticSparsity
from .schedules import PruningSchedule, UpdateSchedule, cosine_drop_fraction, cubic_sparsity
from .scores import nm_mask, prune_masks, prune_model, weight_scores
from .structured import count_flops, fraction_for_flops, select_neurons, structured_prune

__all__ = [
    "MaskedSparsity",
    "StaticSparsity",
    "SET",
    "RigL",
    "Pruning",
    "GradualMagnitudePruning",
    "GMP",
    "PruneRetrain",
    "UpdateSchedule",
    "PruningSchedule",
    "cosine_drop_fraction",
    "cubic_sparsity",
    "layer_counts",
    "layer_densities",
    "erk_densities",
    "uniform_densities",
    "select_parameters",
    "random_mask",
    "top_n",
    "mask_checksum",
    "DEFAULT_LAYER_TYPES",
    "weight_scores",
    "prune_masks",
    "prune_model",
    "nm_mask",
    "LayerPair",
    "find_layer_pairs",
    "remove_dead_neurons",
    "structured_prune",
    "select_neurons",
    "count_flops",
    "fraction_for_flops",
    "export_dense",
    "fold_batchnorm",
    "to_sparse_csr",
    "to_semi_structured",
    "save_inference",
    "storage_bytes",
    "CSRLinear",
    "CSRConv2d",
]
