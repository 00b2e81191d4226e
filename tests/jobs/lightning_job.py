"""torchrun job of tests/test_integration_lightning.py: a real Lightning Trainer with SparsedistStrategy (DGC).

    torchrun --nproc_per_node=2 tests/jobs/lightning_job.py OUT train  STEPS
    torchrun --nproc_per_node=2 tests/jobs/lightning_job.py OUT resume STEPS CKPT
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_common import MNIST_SMALL, dump  # noqa: E402

import sparsedist.dist  # noqa: E402
from sparsedist.datasets import load_mnist  # noqa: E402
from sparsedist.integrations.lightning import LogSparsedistStats, SparsedistStrategy  # noqa: E402


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # no momentum: DGC applies it


class Probe(Callback):
    """Records losses and dumps the hook state at save time, after restoring, and at the end."""

    def __init__(self, out: Path, phase: str):
        self.out, self.phase, self.losses = out, phase, []

    def _state(self, trainer):
        return trainer.strategy.sparsedist_state

    def on_train_start(self, trainer, pl_module):
        dump(self.out, f"start-{self.phase}-rank{trainer.global_rank}", self._state(trainer).state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        dump(self.out, f"ref-step{trainer.global_step}-rank{trainer.global_rank}", self._state(trainer).state_dict())

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        dump(self.out, f"end-{self.phase}-rank{trainer.global_rank}",
             {"params": params, "losses": self.losses, "stats": self._state(trainer).stats()})


def main(out: str, phase: str, steps: str, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    L.seed_everything(0, verbose=False)
    data = load_mnist(MNIST_SMALL)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    strategy = SparsedistStrategy("dgc", {"density": 0.02, "momentum": 0.9}, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy=strategy, max_steps=int(steps),
                        logger=CSVLogger(out, name="logs", version=phase), log_every_n_steps=5,
                        callbacks=[LogSparsedistStats(), ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10,
                                                                         save_top_k=-1), Probe(out, phase)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), train_dataloaders=loader, ckpt_path=ckpt)
    sparsedist.dist.shutdown()  # gloo's threads let go before the interpreter exits (docs/launch.md)


if __name__ == "__main__":
    main(*sys.argv[1:])
