"""Damaged checkpoints are never taken for good ones.

The ``COMPLETE`` marker records every shard's size and SHA-256. ``latest_checkpoint`` skips a checkpoint whose
shard is missing, truncated or altered (with a warning naming the shard) and returns the newest intact one; a
direct ``load`` of a damaged checkpoint fails on every rank with a ``CheckpointError`` naming the file, before
anything is restored. Before the fix, a truncated shard's checkpoint was returned by ``latest_checkpoint``, the
rank that loaded it got ``OSError: [Errno 22] Invalid argument`` with no path, and the other rank ran on.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist import checkpoint
from sparsedist.testing import run_distributed

# checkpoint -> (how it is damaged, the shard that is)
DAMAGE = {"step-000002": ("deleted", "rank00000-of00002.pt"),
          "step-000003": ("one byte altered", "rank00001-of00002.pt"),
          "step-000004": ("truncated", "rank00001-of00002.pt")}


def _build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    return model, ddp, opt, sparsedist.register(ddp, "topk", density=0.1)


def _step(ddp, opt):
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(torch.randn(8, 10)), torch.randint(0, 4, (8,))).backward()
    opt.step()


def save_four(rank, ws, root):
    torch.manual_seed(rank)
    model, ddp, opt, state = _build()
    for step in range(1, 5):
        _step(ddp, opt)
        checkpoint.save(Path(root) / f"step-{step:06d}", model=ddp, optimizer=opt, state=state, extra={"step": step})


def damage(root: Path) -> None:
    for name, (how, shard) in DAMAGE.items():
        path = root / name / shard
        data = bytearray(path.read_bytes())
        if how == "deleted":
            path.unlink()
        elif how == "one byte altered":
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(bytes(data[: len(data) // 2]))


def load_back(rank, ws, root):
    root = Path(root)
    model, ddp, opt, state = _build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = checkpoint.latest_checkpoint(root)
    errors = {}
    for name in DAMAGE:
        try:
            checkpoint.load(root / name, model=ddp, optimizer=opt, state=state)
        except checkpoint.CheckpointError as exc:
            errors[name] = str(exc)
    extra = checkpoint.load(latest, model=ddp, optimizer=opt, state=state)
    _step(ddp, opt)  # and training goes on from the intact checkpoint
    return (latest.name, [str(w.message) for w in caught], errors, extra,
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_damaged_checkpoints_are_skipped_and_refused_on_every_rank(tmp_path):
    run_distributed(save_four, 2, args=(str(tmp_path),), timeout=120)
    damage(tmp_path)
    out = run_distributed(load_back, 2, args=(str(tmp_path),), timeout=120, collective_timeout=60)
    for latest, messages, errors, extra, _ in out:
        assert latest == "step-000001" and extra == {"step": 1}
        for name, (how, shard) in DAMAGE.items():
            assert any(name in m and shard in m for m in messages), (name, messages)
            assert name in errors and shard in errors[name], (name, errors)
    assert torch.equal(out[0][4], out[1][4])
    assert checkpoint.verify(tmp_path / "step-000001") == []
    marker = json.loads((tmp_path / "step-000001" / "COMPLETE").read_text())
    assert sorted(marker["shards"]) == ["rank00000-of00002.pt", "rank00001-of00002.pt"]


def _save_alone(directory: Path) -> Path:
    torch.manual_seed(0)
    return checkpoint.save(directory, model=nn.Linear(4, 2), extra={"step": 1})


def test_a_damaged_marker_or_an_old_marker_with_a_missing_shard_is_skipped(tmp_path):
    _save_alone(tmp_path / "step-000001")
    _save_alone(tmp_path / "step-000002")
    (tmp_path / "step-000002" / "COMPLETE").write_text("{not json")
    with pytest.warns(UserWarning, match="step-000002.*marker"):
        assert checkpoint.latest_checkpoint(tmp_path).name == "step-000001"
    with pytest.raises(checkpoint.CheckpointError, match="COMPLETE"):
        checkpoint.load(tmp_path / "step-000002", model=nn.Linear(4, 2))
    # a marker written before shards were recorded: the shards' presence is still checked
    (tmp_path / "step-000002" / "COMPLETE").write_text(json.dumps({"world_size": 2, "extra": {}}))
    with pytest.warns(UserWarning, match="rank00001-of00002.pt is missing"):
        assert checkpoint.latest_checkpoint(tmp_path).name == "step-000001"


def test_checksums_false_checks_sizes_only(tmp_path):
    shard = _save_alone(tmp_path / "step-000001")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert checkpoint.latest_checkpoint(tmp_path, checksums=False).name == "step-000001"
    with pytest.warns(UserWarning, match="SHA-256"):
        assert checkpoint.latest_checkpoint(tmp_path) is None
    with pytest.raises(checkpoint.CheckpointError, match="rank00000-of00001.pt"):
        checkpoint.load(tmp_path / "step-000001", model=nn.Linear(4, 2))
