"""HOW to sum sparse payloads across ranks. Communication only, no selection logic."""

from .backend import Backend, TorchBackend, ring_allreduce_bytes

__all__ = ["Backend", "TorchBackend", "ring_allreduce_bytes"]
