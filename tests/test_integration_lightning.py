"""PyTorch Lightning: a real Trainer at 2 CPU processes on gloo (torchrun) with SparsedistStrategy.

Train 20 steps with DGC (checkpoints at steps 10 and 20), then resume from step 10 in new processes: every
rank's residuals and DGC momenta come back exactly from its own shard, the resumed run ends with identical
parameters on both ranks and a lower loss, the hook really ran (Lightning's own DDPStrategy drops comm hooks on
CPU), stats() reached the Trainer's logger, and removing a checkpoint removes its shards.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))
from integration_common import check_resume, torchrun  # noqa: E402

pytest.importorskip("lightning", reason="pip install 'sparsedist[lightning]'")
JOB = Path(__file__).resolve().parent / "jobs" / "lightning_job.py"


def test_lightning_trainer_trains_saves_and_resumes_per_rank(tmp_path):
    torchrun(JOB, str(tmp_path), "train", "20")
    ckpt = tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "epoch=0-step=10.ckpt.sparsedist").iterdir())
    assert shards == ["rank00000-of00002.pt", "rank00001-of00002.pt"]
    torchrun(JOB, str(tmp_path), "resume", "30", str(ckpt))
    check_resume(tmp_path, save_step=10)

    with open(tmp_path / "logs" / "resume" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsedist/bytes_sent")]
    assert rows, "LogSparsedistStats wrote nothing to the Trainer's logger"
    last = rows[-1]
    assert float(last["sparsedist/bytes_saved"]) > 0 and float(last["sparsedist/compression_ratio"]) > 5
    assert 0 < float(last["sparsedist/density"]) < 0.1 and float(last["sparsedist/residual_norm"]) > 0

    from sparsedist.integrations.lightning import SparsedistStrategy

    strategy = SparsedistStrategy("topk")
    strategy.remove_checkpoint(ckpt)  # one process, rank 0: the checkpoint and its shards go together
    assert not ckpt.exists() and not (tmp_path / "ckpt" / "epoch=0-step=10.ckpt.sparsedist").exists()


def test_lightning_strategy_rejects_a_second_hook():
    from sparsedist.integrations.lightning import SparsedistStrategy

    with pytest.raises(ValueError, match="registers the sparsedist hook itself"):
        SparsedistStrategy("topk", ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(TypeError, match="options must be a dict"):
        SparsedistStrategy("topk", 0.01)
