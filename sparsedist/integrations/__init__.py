"""Bridges to other communication stacks.

* :mod:`sparsedist.integrations.mpi`: :class:`~sparsedist.integrations.mpi.MPIBackend`, the sparse collectives
  over mpi4py (needs ``pip install sparsedist[mpi]`` and an MPI library).

Submodules are imported on demand so that ``import sparsedist`` never needs mpi4py.
"""
