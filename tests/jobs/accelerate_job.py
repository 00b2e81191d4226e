"""torchrun job of tests/test_integration_accelerate.py: an Accelerate training loop (2 CPU processes, DDP on
gloo) with sparsedist's DGC hook registered on the prepared model; save_state / load_state; log_stats to
Accelerate's TensorBoard tracker.

    torchrun --nproc_per_node=2 tests/jobs/accelerate_job.py OUT train  STEPS   (save_state at step 10)
    torchrun --nproc_per_node=2 tests/jobs/accelerate_job.py OUT resume STEPS   (load_state of step 10)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_common import MNIST_SMALL, dump  # noqa: E402

import sparsedist.dist  # noqa: E402
from sparsedist.datasets import load_mnist  # noqa: E402
from sparsedist.integrations.accelerate import log_stats, register  # noqa: E402

SAVE_STEP = 10


def main(out: str, phase: str, steps: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(out / "tb"))
    accelerator.init_trackers(phase)
    rank = accelerator.process_index
    torch.manual_seed(0)
    data = load_mnist(MNIST_SMALL)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: DGC applies it
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(accelerator, model, "dgc", density=0.02, momentum=0.9, optimizer=optimizer)
    step = 0
    if phase == "resume":
        accelerator.load_state(str(out / "ckpt" / f"step{SAVE_STEP}"))
        step = SAVE_STEP
        dump(out, f"start-resume-rank{rank}", state.state_dict())
    losses = []
    while step < int(steps):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % 5 == 0:
                log_stats(accelerator, state, step)
            if phase == "train" and step == SAVE_STEP:
                accelerator.save_state(str(out / "ckpt" / f"step{SAVE_STEP}"))
                dump(out, f"ref-step{SAVE_STEP}-rank{rank}", state.state_dict())
            if step == int(steps):
                break
    params = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    dump(out, f"end-{phase}-rank{rank}", {"params": params, "losses": losses, "stats": state.stats()})
    # drain gloo's threads, then destroy the group -- before end_training(), which destroys it without draining and
    # leaves DDP's reducer holding the group's last reference (docs/launch.md, "Ending a run")
    sparsedist.dist.shutdown()
    accelerator.end_training()  # the process group is gone: it only closes the trackers now


if __name__ == "__main__":
    main(*sys.argv[1:])
