"""Hugging Face Accelerate: a sparsedist hook on the prepared model, its per-rank state in ``save_state``.

::

    from sparsedist.integrations.accelerate import log_stats, register

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(accelerator, model, "topk", density=0.01)     # after prepare(), before the first backward
    ...
    accelerator.save_state("ckpt/step-600")          # every rank also writes ckpt/step-600/sparsedist/rank{r}-of{P}.pt
    accelerator.load_state("ckpt/step-600")          # every rank reads its own shard back
    log_stats(accelerator, state, step)              # stats() through accelerator.log (its trackers)
    sparsedist.dist.shutdown()                       # at the end, before accelerator.end_training(), which
    accelerator.end_training()                       # destroys the group without draining gloo (docs/launch.md)

What goes wrong without it: ``DistributedDataParallelKwargs(comm_hook=...)`` accepts only PyTorch's built-in hooks
(fp16, bf16, PowerSGD), and objects given to ``accelerator.register_for_checkpointing`` are saved by the main
process only -- every other rank would resume with rank 0's error-feedback residuals. :func:`register` registers
the hook on the ``DistributedDataParallel`` model that ``prepare`` returned and adds a save-state and a load-state
pre-hook that run on every process; on load the ranks check, with one small allreduce, that they restored the
same step. Resuming needs the same number of processes. Needs ``pip install 'sparsedist[accelerate]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..compressors import Compressor
from ..hook import SparsifyState
from ..register import register as _register
from .scalars import stats_scalars
from .shards import load_shard, save_shard

__all__ = ["register", "log_stats", "SHARD_DIRECTORY"]

#: Sub-directory of an ``accelerator.save_state`` directory that holds the per-rank hook state.
SHARD_DIRECTORY = "sparsedist"


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside an ``AcceleratedOptimizer`` (its step hooks are what DGC's check uses)."""
    try:  # optional dependency
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover - only without accelerate
        return optimizer
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def register(accelerator: Any, model: torch.nn.Module, compressor: str | Compressor = "topk",
             **options: Any) -> SparsifyState:
    """Register sparsedist's hook on the model ``accelerator.prepare`` returned, with per-rank checkpointing.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (a ``DistributedDataParallel`` when several processes run).
        compressor, **options: as :func:`sparsedist.register` (an ``AcceleratedOptimizer`` given as
            ``optimizer=`` is unwrapped).

    Returns:
        The :class:`sparsedist.SparsifyState`.

    Raises:
        ValueError: the model is not ``DistributedDataParallel`` (one process, or another distributed type
            such as FSDP or DeepSpeed, whose gradient exchange is not DDP's).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"sparsedist's hook runs on a DistributedDataParallel model, but the prepared model is "
                         f"{type(model).__name__} (accelerator.distributed_type={accelerator.distributed_type}, "
                         f"{accelerator.num_processes} process(es)). Pass the model returned by accelerator.prepare, "
                         f"and launch several processes (accelerate launch --num_processes N, or torchrun) with "
                         f"plain DDP (MULTI_GPU / MULTI_CPU)")
    if "optimizer" in options:
        options["optimizer"] = _unwrap_optimizer(options["optimizer"])
    state = _register(model, compressor, **options)
    rank, world = accelerator.process_index, accelerator.num_processes

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        save_shard(Path(output_dir) / SHARD_DIRECTORY, state, rank=rank, world_size=world, meta={"step": state.step})

    def load_hook(models: list, input_dir: str) -> None:
        state.load_state_dict(load_shard(Path(input_dir) / SHARD_DIRECTORY, rank=rank, world_size=world,
                                         map_location=accelerator.device))
        _check_same_step(state.step, accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return state


def _check_same_step(step: int, device: torch.device) -> None:
    """Every rank restored the same hook step (a shard left from another save would differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"the sparsedist shards of this checkpoint come from different saves (hook steps "
                         f"{-int(t[1])}..{int(t[0])} across ranks; this rank: {step}): resume from a complete save")


def log_stats(accelerator: Any, state: SparsifyState, step: int, prefix: str = "sparsedist/") -> dict[str, float]:
    """Log ``state.stats()`` through ``accelerator.log`` (its trackers write on the main process); returns them."""
    scalars = stats_scalars(state.stats(), prefix)
    accelerator.log(scalars, step=step)
    return scalars
