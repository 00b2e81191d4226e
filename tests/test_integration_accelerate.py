"""Hugging Face Accelerate: a real Accelerate loop at 2 CPU processes on gloo (torchrun), DDP prepared by
``accelerator.prepare``, sparsedist's DGC hook registered on it with ``sparsedist.integrations.accelerate.register``.

Train 20 steps with ``accelerator.save_state`` at step 10, then ``accelerator.load_state`` in new processes and
train to step 30: every rank's residuals and DGC momenta come back exactly from its own shard, the ranks end
identical, the loss falls, and ``log_stats`` reached Accelerate's TensorBoard tracker. The shard files' own
checks (world size, stale shards, a model that is not DDP) are tested in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))
from integration_common import assert_identical, check_resume, torchrun  # noqa: E402

import sparsedist  # noqa: E402
from sparsedist.integrations.shards import load_shard, save_shard  # noqa: E402

JOB = Path(__file__).resolve().parent / "jobs" / "accelerate_job.py"


def test_accelerate_loop_saves_and_resumes_per_rank(tmp_path):
    pytest.importorskip("accelerate", reason="pip install 'sparsedist[accelerate]'")
    torchrun(JOB, str(tmp_path), "train", "20")
    shards = tmp_path / "ckpt" / "step10" / "sparsedist"
    assert sorted(p.name for p in shards.iterdir()) == ["rank00000-of00002.pt", "rank00001-of00002.pt"]
    torchrun(JOB, str(tmp_path), "resume", "30")
    check_resume(tmp_path, save_step=10)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "tb" / "resume").rglob("events.out.tfevents*")).parent))
    acc.Reload()
    steps = acc.Scalars("sparsedist/steps")
    assert [(e.step, e.value) for e in steps] == [(s, float(s)) for s in (15, 20, 25, 30)]
    assert acc.Scalars("sparsedist/bytes_saved")[-1].value > 0


def _state(seed: int) -> sparsedist.SparsifyState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    state = sparsedist.SparsifyState(model, sparsedist.compressors.DGCCompressor(density=0.25),
                                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state.feedback.residuals = {"weight": torch.randn(32), "bias": torch.randn(4)}
    state.step = 7
    return state


def test_shards_round_trip_and_refuse_what_does_not_belong(tmp_path):
    saved = _state(0)
    path = save_shard(tmp_path, saved, rank=1, world_size=2, meta={"global_step": 70})
    assert path.name == "rank00001-of00002.pt" and not list(tmp_path.glob(".*tmp*"))
    restored = _state(1)
    restored.load_state_dict(load_shard(tmp_path, rank=1, world_size=2, meta={"global_step": 70}))
    assert_identical(restored.state_dict(), saved.state_dict())
    with pytest.raises(ValueError, match="belongs to another save"):
        load_shard(tmp_path, rank=1, world_size=2, meta={"global_step": 80})
    with pytest.raises(ValueError, match="another number of processes"):
        load_shard(tmp_path, rank=1, world_size=4)
    with pytest.raises(FileNotFoundError, match="no sparsedist hook state for rank 0"):
        load_shard(tmp_path / "missing", rank=0, world_size=2)


def test_accelerate_register_refuses_a_model_that_is_not_ddp():
    pytest.importorskip("accelerate", reason="pip install 'sparsedist[accelerate]'")
    from accelerate import Accelerator

    from sparsedist.integrations.accelerate import register

    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register(accelerator, accelerator.prepare(torch.nn.Linear(2, 2)), "topk")
