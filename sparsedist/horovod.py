"""``sparsedist.horovod``: sparsified gradient exchange for jobs started by ``horovodrun``.

    import horovod.torch as hvd
    import sparsedist.horovod

    hvd.init()
    opt = sparsedist.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                                  named_parameters=model.named_parameters(),
                                                  compressor="topk", density=0.01)

See :mod:`sparsedist.integrations.horovod` and docs/horovod.md. Needs Horovod with PyTorch support
(``bash scripts/build_horovod.sh``); importing this module without it raises ``ImportError`` saying so.
``import sparsedist`` never imports this module.
"""

from .integrations.horovod import DistributedOptimizer, HorovodBackend

__all__ = ["DistributedOptimizer", "HorovodBackend"]
