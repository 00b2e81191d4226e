"""The one registry of collective names: what ``collective=`` accepts, and the class that implements each.

A new collective goes here once: a :class:`~sparsedist.collectives.base.Collective` subclass with its
``reduce`` and its ``cost`` (next to its code), added to :data:`COLLECTIVES`. The cost model, the tuner, the
hook, :func:`~sparsedist.collectives.sparse_allreduce` and the option checks all read this table.
"""

from __future__ import annotations

from .allgather import Allgather
from .base import Collective
from .dense import DenseSum
from .gtopk import GlobalTopKSum
from .sparcml import DSARSplitAllgather, SSARRecursiveDouble, SSARSplitAllgather

__all__ = ["COLLECTIVES", "ALGORITHMS", "EXACT_ALGORITHMS", "OPTION_NAMES", "make"]

#: name -> implementation, in the order the cost model breaks ties
COLLECTIVES: dict[str, type[Collective]] = {c.name: c for c in (
    DenseSum, Allgather, SSARRecursiveDouble, SSARSplitAllgather, DSARSplitAllgather, GlobalTopKSum)}
#: every algorithm the cost model prices
ALGORITHMS = tuple(COLLECTIVES)
#: the algorithms whose result is the exact sum (what ``"auto"`` chooses among)
EXACT_ALGORITHMS = tuple(name for name, c in COLLECTIVES.items() if c.exact)
#: what the hook's ``collective=`` option accepts: an algorithm, or ``"auto"`` (the cost model and tuner pick)
OPTION_NAMES = ALGORITHMS + ("auto",)


def make(name: str) -> Collective:
    """A new instance of the collective ``name`` (stateful ones need one per bucket)."""
    if name not in COLLECTIVES:
        raise ValueError(f"unknown collective {name!r}; choose one of {ALGORITHMS}")
    return COLLECTIVES[name]()
