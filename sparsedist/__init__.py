"""sparsedist: sparse gradient exchange, sparse collectives and sparse models for distributed PyTorch.

The public API is small:

* :func:`register` — one line that makes a DDP model's gradient exchange sparse, with error feedback;
* :class:`SparsifyState` and :func:`sparsify_hook` — the same, used like PyTorch's ``PowerSGDState`` /
  ``powerSGD_hook`` pair with ``ddp.register_comm_hook``;
* :mod:`sparsedist.compressors` — the selection rules (top-k, threshold, rand-k, variance-based, DGC);
* :mod:`sparsedist.collectives` — sparse collectives over torch.distributed or MPI;
* :class:`SparseGrad` — the payload type compressors produce and collectives consume;
* :mod:`sparsedist.checkpoint` — sharded checkpoints of model, optimizer, hook and sparsity state;
* :mod:`sparsedist.dist` — process-group set-up from torchrun, SLURM or MPI environment variables;
* :mod:`sparsedist.guard` — cross-rank consistency checks;
* :mod:`sparsedist.sparsity` — model sparsity: :class:`RigL`, :class:`SET`, :class:`StaticSparsity`, whose masks
  the hook can use for mask-aware exchange (``register(ddp, "none", masks=rigl)``), and pruning:
  :class:`GradualMagnitudePruning`, :class:`PruneRetrain`, structured pruning and inference export;
* :mod:`sparsedist.nn` — ephemeral sparsity: top-k / threshold activations, meProp sparse back-propagation;
* :mod:`sparsedist.optim` — exchange-aware optimizers (the hook sends their update: AdamW, SGD) and packed
  optimizer state for masked parameters;
* :mod:`sparsedist.fsdp` — the sparse reduce-scatter for FSDP2 (``fully_shard``) and RigL with sharded masks.
"""

from . import checkpoint, collectives, compressors, dist, fsdp, guard, nn, optim, sparsity
from .hook import SparsifyState, sparsify_hook
from .payload import SparseGrad
from .register import register
from .sparsity import SET, GradualMagnitudePruning, PruneRetrain, RigL, StaticSparsity

__version__ = "0.1.0"

__all__ = ["register", "SparsifyState", "sparsify_hook", "SparseGrad", "compressors", "collectives", "checkpoint",
           "dist", "guard", "nn", "optim", "fsdp", "sparsity", "RigL", "SET", "StaticSparsity",
           "GradualMagnitudePruning", "PruneRetrain", "__version__"]
