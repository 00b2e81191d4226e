"""Ephemeral sparsity: sparse activations and sparse back-propagated errors (plus a CSR linear layer).

Pure functions live in :mod:`sparsedist.nn.functional`; the modules here are thin wrappers.

* Activations (:mod:`.activations`): :class:`TopKActivation` (k-winners-take-all), :class:`ThresholdActivation`
  (FATReLU), :func:`sparsify_activations` (swap a model's activations in place), :class:`ActivationSparsityMeter`.
* Errors (:mod:`.errors`): :class:`SparseBackpropLinear` (meProp), :class:`SparseError` / :func:`sparse_error`
  (top-k of the back-propagated error), :func:`convert_linear_to_sparse_backprop`,
  :func:`dense_backward` (turn error sparsity off for a step, e.g. RigL mask updates).
* Weights stored sparse (:mod:`.csr`): :class:`CSRLinear`, a fixed-mask linear layer on ``torch.sparse`` CSR kernels.
"""

from . import functional
from .activations import (
    DEFAULT_ACTIVATION_TYPES,
    ActivationSparsityMeter,
    ThresholdActivation,
    TopKActivation,
    sparsify_activations,
)
from .csr import CSRLinear
from .errors import (
    SparseBackpropLinear,
    SparseError,
    convert_linear_to_sparse_backprop,
    dense_backward,
    sparse_error,
)

__all__ = [
    "functional",
    "TopKActivation",
    "ThresholdActivation",
    "sparsify_activations",
    "ActivationSparsityMeter",
    "DEFAULT_ACTIVATION_TYPES",
    "SparseBackpropLinear",
    "SparseError",
    "sparse_error",
    "convert_linear_to_sparse_backprop",
    "dense_backward",
    "CSRLinear",
]
