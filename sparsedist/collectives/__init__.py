"""HOW to sum sparse payloads across ranks. Communication only, no selection logic.

* :mod:`.backend` -- the primitives (torch.distributed or MPI) with byte accounting; :mod:`.wire` -- the payload
  encoding;
* :mod:`.base` -- the :class:`Collective` interface every algorithm implements (``reduce`` and its ``cost``);
  :mod:`.registry` -- the one table of names;
* the algorithms: :mod:`.allgather` (the baseline, also asynchronous for fixed counts), :mod:`.dense` (dense
  sums and the values-only allreduce), :mod:`.sparcml` (SSAR/DSAR, Renggli et al. 2019, on the sparse streams of
  :mod:`.streams`), :mod:`.gtopk` (Ok-Topk's global top-k, Li & Hoefler 2022, with :mod:`.kselect`);
* :func:`sparse_allreduce` -- the public entry point;
* choosing: :mod:`.choose` (the alpha-beta cost model, :class:`CostModel`), :mod:`.measure` (:func:`probe`: measure it),
  :mod:`.tuner` (``collective="auto"``'s measured per-bucket choice), :mod:`.step_check` (auto's whole-step check
  against dense DDP), :mod:`.report` (predictions over grids).
"""

from .backend import Backend, TorchBackend, ring_allreduce_bytes
from .base import Collective, Reduced
from .choose import CostModel, predict
from .gtopk import GlobalTopK, GlobalTopKResult
from .measure import probe
from .registry import COLLECTIVES
from .sparse_allreduce import sparse_allreduce
from .step_check import StepCheck
from .tuner import AutoTuner

__all__ = ["Backend", "TorchBackend", "ring_allreduce_bytes", "sparse_allreduce", "GlobalTopK", "GlobalTopKResult",
           "CostModel", "predict", "probe", "StepCheck", "AutoTuner", "Collective", "Reduced", "COLLECTIVES"]
