"""Hugging Face ``transformers.Trainer``: a sparsedist hook on the Trainer's DDP model, its per-rank state in the
Trainer's checkpoints, and ``stats()`` in the Trainer's logs.

::

    from sparsedist.integrations.transformers import SparsedistCallback

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=data)
    callback = SparsedistCallback.attach(trainer, "topk", density=0.01)
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)
    callback.state.stats()

What goes wrong without it: the Trainer wraps the model in DDP inside ``train()``, so there is no DDP model to
register a hook on beforehand, and it writes checkpoints (``checkpoint-<step>/``) from the main process, so
per-rank residuals would be lost. The callback registers the hook when training begins (after the Trainer's
``accelerator.prepare``, before the first backward); on every save each rank writes its hook state to
``checkpoint-<step>/sparsedist/rank{r}-of{P}.pt``; on resume each rank loads its own shard, checked against the
resumed global step; after each training-loss log (every ``logging_steps``) the ``stats()`` scalars go through
``trainer.log`` to every reporter (TensorBoard, W&B, ...) and into ``trainer.state.log_history``. The resumed
checkpoint is ``resume_from`` if set, else ``args.resume_from_checkpoint`` if it is a path, else
``<output_dir>/checkpoint-<global step>`` (where ``resume_from_checkpoint=True`` resumes from). Resuming needs the
same number of processes. Needs ``pip install 'sparsedist[transformers]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

try:  # optional dependency
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - exercised only without transformers installed
    raise ImportError("sparsedist.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'sparsedist[transformers]' (or pip install transformers)") from exc

from ..compressors import Compressor
from ..hook import SparsifyState
from ..register import register
from .accelerate import SHARD_DIRECTORY
from .scalars import stats_scalars
from .shards import load_shard, save_shard

__all__ = ["SparsedistCallback"]


class SparsedistCallback(TrainerCallback):
    """Registers sparsedist's hook on ``trainer``'s DDP model and keeps its state per rank in the checkpoints.

    Args:
        trainer: the ``transformers.Trainer`` (the callback needs its DDP-wrapped model and its optimizer).
        compressor, **options: as :func:`sparsedist.register` (for DGC the Trainer's optimizer is passed).
        log_stats: log the ``stats()`` scalars (prefix ``sparsedist/``) after each training-loss log.
        resume_from: the checkpoint directory being resumed, when it is not found as described in the module doc.

    After training begins, ``callback.state`` is the :class:`sparsedist.SparsifyState`.
    """

    def __init__(self, trainer: Any, compressor: str | Compressor = "topk", *, log_stats: bool = True,
                 resume_from: str | os.PathLike | None = None, **options: Any):
        self.trainer = trainer
        self.compressor = compressor
        self.options = options
        self.log_stats = log_stats
        self.resume_from = resume_from
        self.state: SparsifyState | None = None
        self._logging = False

    @classmethod
    def attach(cls, trainer: Any, compressor: str | Compressor = "topk", **kwargs: Any) -> "SparsedistCallback":
        """Build the callback for ``trainer``, add it with ``trainer.add_callback``, and return it."""
        callback = cls(trainer, compressor, **kwargs)
        trainer.add_callback(callback)
        return callback

    def _rank_world(self, args: Any) -> tuple[int, int]:
        return args.process_index, args.world_size

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"sparsedist's hook runs on a DistributedDataParallel model, but the Trainer's model is "
                             f"{type(model).__name__} ({args.world_size} process(es), parallel mode "
                             f"{args.parallel_mode}): launch several processes with torchrun (DDP), not FSDP or "
                             f"DeepSpeed")
        options = dict(self.options)
        name = self.compressor if isinstance(self.compressor, str) else self.compressor.name
        if name == "dgc" and "optimizer" not in options:
            opt = self.trainer.optimizer
            options["optimizer"] = getattr(opt, "optimizer", opt)  # the torch optimizer inside accelerate's wrapper
        self.state = register(model, self.compressor, **options)
        if state.global_step > 0:
            rank, world = self._rank_world(args)
            shards = self._resumed_checkpoint(args, state) / SHARD_DIRECTORY
            self.state.load_state_dict(load_shard(shards, rank=rank, world_size=world,
                                                  meta={"global_step": state.global_step}, map_location=args.device))

    def _resumed_checkpoint(self, args, state) -> Path:
        if self.resume_from is not None:
            return Path(self.resume_from)
        if isinstance(args.resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(args.resume_from_checkpoint):
            return Path(args.resume_from_checkpoint)
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def on_save(self, args, state, control, **kwargs):
        if self.state is None:
            return
        rank, world = self._rank_world(args)
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / SHARD_DIRECTORY
        save_shard(directory, self.state, rank=rank, world_size=world, meta={"global_step": state.global_step})

    def on_log(self, args, state, control, logs=None, **kwargs):
        # after each training-loss log, one more log with the telemetry, to every reporter and to log_history
        if self.log_stats and self.state is not None and not self._logging and logs and "loss" in logs:
            self._logging = True
            try:
                self.trainer.log(stats_scalars(self.state.stats()))
            finally:
                self._logging = False
