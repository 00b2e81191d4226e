"""Hugging Face transformers.Trainer: a real Trainer at 2 CPU processes on gloo (torchrun) with SparsedistCallback.

A 2-layer GPT-2 built from a config (no downloaded weights) on the bundled tinyshakespeare text, AdamW, sampled
top-k: train 20 steps (checkpoints at 10 and 20), then ``train(resume_from_checkpoint=True)`` in new processes
to step 30. Every rank's residuals and its sampling generator come back exactly from its own shard in
``checkpoint-20/sparsedist/``, the ranks end identical, the loss falls, and the telemetry reached the Trainer's
TensorBoard reporter and log history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))
from integration_common import check_resume, torchrun  # noqa: E402

pytest.importorskip("transformers", reason="pip install 'sparsedist[transformers]'")
JOB = Path(__file__).resolve().parent / "jobs" / "transformers_job.py"


def test_transformers_trainer_trains_saves_and_resumes_per_rank(tmp_path):
    torchrun(JOB, str(tmp_path), "train", "20")
    shards = tmp_path / "run" / "checkpoint-20" / "sparsedist"
    assert sorted(p.name for p in shards.iterdir()) == ["rank00000-of00002.pt", "rank00001-of00002.pt"]
    torchrun(JOB, str(tmp_path), "resume", "30")
    check_resume(tmp_path, save_step=20, factor=0.9)

    history = json.loads((tmp_path / "run" / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    stats = [h for h in history if "sparsedist/bytes_sent" in h]
    assert len(losses) == 30 and len(stats) == 30, "one telemetry log after each loss log (logging_steps=1)"
    assert stats[-1]["sparsedist/steps"] == 30 and 20 < stats[-1]["sparsedist/compression_ratio"] < 30

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "resume"))
    acc.Reload()
    sent = acc.Scalars("train/sparsedist/bytes_sent")
    assert [e.step for e in sent] == list(range(21, 31)) and sent[-1].value == stats[-1]["sparsedist/bytes_sent"]
