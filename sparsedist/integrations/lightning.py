"""PyTorch Lightning: a sparsedist hook under ``Trainer``, its per-rank state in Lightning's checkpoints, and
``stats()`` in the Trainer's logger.

::

    from sparsedist.integrations.lightning import LogSparsedistStats, SparsedistStrategy

    trainer = L.Trainer(strategy=SparsedistStrategy("topk", {"density": 0.01}), devices=2,
                        callbacks=[LogSparsedistStats()])
    trainer.fit(model)                                       # resume: trainer.fit(model, ckpt_path=...)
    trainer.strategy.sparsedist_state.stats()

Why not ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=sparsedist.sparsify_hook)``: Lightning (2.6) registers
communication hooks only when the device is CUDA, so on CPU/gloo the hook is dropped without a word and nothing is
compressed; it saves the checkpoint from rank 0 only, so every other rank's error-feedback residuals would be lost
(or replaced by rank 0's on resume); and the state cannot be built before the strategy wraps the model in DDP.

:class:`SparsedistStrategy` is a ``DDPStrategy`` that calls :func:`sparsedist.register` itself on every device type
(once: it never passes the hook to Lightning's own registration), after the optimizers exist (DGC gets the
optimizer). Every rank writes its hook state to ``<checkpoint>.sparsedist/rank{r}-of{P}.pt`` when Lightning saves
``<checkpoint>`` (Lightning's file records where), and reads its own shard back when ``ckpt_path`` is resumed,
checked against the checkpoint's global step. Shards are removed with their checkpoint (``save_top_k``). The
checkpoint path must be on a filesystem every rank can write (local or shared). Resuming needs the same number of
processes. Needs ``pip install 'sparsedist[lightning]'`` (``lightning>=2.0``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

try:  # optional dependency
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as exc:  # pragma: no cover - exercised only without lightning installed
    raise ImportError("sparsedist.integrations.lightning needs PyTorch Lightning 2.x: "
                      "pip install 'sparsedist[lightning]' (or pip install lightning)") from exc

from ..compressors import Compressor
from ..hook import SparsifyState
from ..register import register
from .scalars import stats_scalars
from .shards import load_shard, save_shard

__all__ = ["SparsedistStrategy", "LogSparsedistStats", "shard_directory"]

_SUFFIX = ".sparsedist"


def shard_directory(checkpoint_path: str | os.PathLike) -> Path:
    """Where the per-rank hook state of a Lightning checkpoint file lives (follows a ``last.ckpt`` symlink)."""
    path = Path(checkpoint_path)
    directory = path.with_name(path.name + _SUFFIX)
    if not directory.exists() and path.is_symlink():
        real = path.resolve()
        directory = real.with_name(real.name + _SUFFIX)
    return directory


class SparsedistStrategy(DDPStrategy):
    """``DDPStrategy`` with a sparsedist communication hook, and the hook state saved and restored per rank.

    Args:
        compressor: as :func:`sparsedist.register`: ``"topk"``, ``"threshold"``, ``"randk"``, ``"variance"``,
            ``"dgc"``, ``"none"`` or a :class:`~sparsedist.compressors.Compressor`.
        options: the compressor's and the exchange's options, as ``register``'s keyword arguments (e.g.
            ``{"density": 0.01, "collective": "auto"}``). For DGC the optimizer is passed for you (one
            optimizer only).
        **kwargs: ``DDPStrategy``'s arguments (``find_unused_parameters``, ``static_graph``, ``timeout``, ...),
            except the comm-hook ones.

    After ``trainer.fit`` has set up, ``strategy.sparsedist_state`` is the :class:`sparsedist.SparsifyState`.
    """

    def __init__(self, compressor: str | Compressor = "topk", options: dict[str, Any] | None = None, **kwargs: Any):
        clash = sorted({"ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"} & set(kwargs))
        if clash:
            raise ValueError(f"SparsedistStrategy registers the sparsedist hook itself; drop {clash} (the hook's "
                             f"options go in options={{...}})")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of sparsedist.register options, got {type(options).__name__}")
        super().__init__(**kwargs)
        self.compressor = compressor
        self.options = dict(options or {})
        self.sparsedist_state: SparsifyState | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        previous = self.sparsedist_state
        super().setup(trainer)  # wraps the module in DDP (registering no hook of its own) and builds the optimizers
        if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return  # not fitting: nothing is exchanged
        options = dict(self.options)
        name = self.compressor if isinstance(self.compressor, str) else self.compressor.name
        if name == "dgc" and "optimizer" not in options:
            if len(self.optimizers) != 1:
                raise ValueError(f"DGC needs the optimizer to check that it has no momentum of its own; this module "
                                 f"has {len(self.optimizers)} optimizers: pass options={{'optimizer': ...}}")
            options["optimizer"] = self.optimizers[0]
        self.sparsedist_state = register(self.model, self.compressor, **options)
        if self._pending is not None:
            self.sparsedist_state.load_state_dict(self._pending)
            self._pending = None
        elif previous is not None:  # a second fit() with this strategy goes on from the first one's state
            self.sparsedist_state.load_state_dict(previous.state_dict())

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.sparsedist_state is not None:
            step = int(checkpoint.get("global_step", 0))
            directory = shard_directory(filepath)
            save_shard(directory, self.sparsedist_state, rank=self.global_rank, world_size=self.world_size,
                       meta={"global_step": step})
            checkpoint["sparsedist"] = {"shards": directory.name, "world_size": self.world_size,
                                        "global_step": step}
            self.barrier("sparsedist.shards")  # every shard exists before rank 0 writes the checkpoint
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        meta = checkpoint.get("sparsedist")
        if meta is None:  # saved without sparsedist (e.g. plain DDP): the hook starts with empty residuals
            self._pending = None
            return checkpoint
        directory = Path(checkpoint_path).parent / meta["shards"]
        if not directory.exists():
            directory = shard_directory(checkpoint_path)
        state = load_shard(directory, rank=self.global_rank, world_size=self.world_size,
                           meta={"global_step": meta["global_step"]}, map_location=self.root_device)
        if self.sparsedist_state is not None:
            self.sparsedist_state.load_state_dict(state)
        else:
            self._pending = state  # Lightning restores before setup(): applied once the hook is registered
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        directory = shard_directory(filepath)
        if self.is_global_zero and directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


class LogSparsedistStats(Callback):
    """Logs ``stats()`` of :class:`SparsedistStrategy`'s hook through the Trainer's loggers (rank 0's telemetry).

    Args:
        every_n_steps: log on global steps divisible by this (default: the Trainer's ``log_every_n_steps``).
        prefix: name prefix of the scalars (see :func:`sparsedist.integrations.scalars.stats_scalars`).
    """

    def __init__(self, every_n_steps: int | None = None, prefix: str = "sparsedist/"):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._logged_step = -1  # with gradient accumulation several batches end at one global step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.strategy, SparsedistStrategy):
            raise ValueError(f"LogSparsedistStats logs the hook of SparsedistStrategy, but the Trainer's strategy is "
                             f"{type(trainer.strategy).__name__}: Trainer(strategy=SparsedistStrategy(...))")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        state = trainer.strategy.sparsedist_state
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if (state is None or not trainer.is_global_zero or step % every != 0 or not trainer.loggers
                or step == self._logged_step):
            return
        self._logged_step = step
        scalars = stats_scalars(state.stats(), self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
