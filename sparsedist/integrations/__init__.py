"""Bridges to other communication stacks and training frameworks.

* :mod:`sparsedist.integrations.mpi`: :class:`~sparsedist.integrations.mpi.MPIBackend`, the sparse collectives
  over mpi4py (needs ``pip install sparsedist[mpi]`` and an MPI library);
* :mod:`sparsedist.integrations.horovod`: the Horovod optimizer;
* :mod:`sparsedist.integrations.lightning`: ``SparsedistStrategy`` and ``LogSparsedistStats`` for PyTorch Lightning;
* :mod:`sparsedist.integrations.accelerate`: ``register`` and ``log_stats`` for Hugging Face Accelerate;
* :mod:`sparsedist.integrations.transformers`: ``SparsedistCallback`` for ``transformers.Trainer``;
* :mod:`sparsedist.integrations.tensorboard`: ``StatsWriter``, ``stats()`` as TensorBoard scalars;
* :mod:`sparsedist.integrations.scalars`: ``stats_scalars``, ``stats()`` flattened for any logger;
* :mod:`sparsedist.integrations.shards`: the per-rank hook-state files the framework integrations write.

Submodules are imported on demand so that ``import sparsedist`` never needs an optional dependency; each raises
an ``ImportError`` naming the extra to install (``pip install 'sparsedist[lightning]'``, ...).
"""
