"""The DDP communication hook, as a pipeline: plan -> accumulate -> select -> reduce -> commit.

* :mod:`.state` -- :class:`SparsifyState` (the small holder of what persists between calls) and
  :func:`sparsify_hook`, the free function DDP calls;
* :mod:`.plan` -- the :class:`Planner`, which makes every per-step and per-bucket decision and returns a
  :class:`Plan`;
* :mod:`.pipeline` -- one bucket's flow, top to bottom; :mod:`.dense` -- the one dense path; :mod:`.rows` --
  sparse (COO) gradients such as ``nn.Embedding(sparse=True)``'s, sent as they are;
* :mod:`.usage` -- which parameters a step used (DDP's ``find_unused_parameters=True``);
* :mod:`.units` and :mod:`.params` -- the pieces a bucket is cut into, and which parameter is which (by name).

See docs/architecture.md.
"""

from ..collectives.registry import OPTION_NAMES as COLLECTIVES
from ..options import STATE_OPTIONS
from .plan import Plan, Planner
from .state import SparsifyState, sparsify_hook
from .units import FlatBucket

__all__ = ["SparsifyState", "sparsify_hook", "FlatBucket", "Plan", "Planner", "STATE_OPTIONS", "COLLECTIVES"]
