"""HOW to sum sparse payloads across ranks. Communication only, no selection logic.

* :mod:`.backend` — the primitives (torch.distributed or MPI) with byte accounting;
* :mod:`.wire` — the payload encoding; :mod:`.dense` and :mod:`.allgather` — the hook's basic paths;
* :mod:`.sparcml` and :func:`sparse_allreduce` — SparCML's SSAR/DSAR algorithms (Renggli et al. 2019);
* :mod:`.gtopk` — Ok-Topk's global top-k (Li & Hoefler 2022);
* :mod:`.choose` — the alpha-beta cost model that picks an algorithm per bucket (:class:`CostModel`; the module's
  ``choose()`` is not re-exported here, so that ``sparsedist.collectives.choose`` stays the module);
* :mod:`.step_check` — auto's whole-step check of its sparse choices against dense DDP (:class:`StepCheck`).
"""

from .backend import Backend, TorchBackend, ring_allreduce_bytes
from .choose import CostModel, predict, probe
from .gtopk import GlobalTopK, GlobalTopKResult
from .sparse_allreduce import sparse_allreduce
from .step_check import StepCheck

__all__ = ["Backend", "TorchBackend", "ring_allreduce_bytes", "sparse_allreduce", "GlobalTopK", "GlobalTopKResult",
           "CostModel", "predict", "probe", "StepCheck"]
