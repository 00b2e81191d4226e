"""TensorBoard: stats() as scalars (sparsedist.integrations.tensorboard / .scalars), read back from the event files.

A real 2-rank DDP run with collective="auto" and a short whole-step check writes every rank's telemetry; the
event files hold bytes sent and saved, density, residual norm, the chosen collectives, auto's ratios and the
step-check verdict, equal to stats() at the same steps. The examples take --tensorboard DIR.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import sparsedist
from sparsedist.collectives import StepCheck
from sparsedist.integrations.scalars import stats_scalars
from sparsedist.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))
from integration_common import torchrun  # noqa: E402

pytest.importorskip("tensorboard", reason="pip install 'sparsedist[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train_and_write(rank, world_size, log_dir):
    from sparsedist.integrations.tensorboard import StatsWriter

    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)))
    state = sparsedist.register(ddp, "topk", density=0.05, collective="auto",
                                auto_step_check=StepCheck(window=2, every=4, start=2))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    tb = StatsWriter(log_dir, state, every=5, all_ranks=True)
    written = {}
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 21):
        opt.zero_grad()
        loss = ddp(torch.randn(16, 32, generator=g)).square().mean()
        loss.backward()
        opt.step()
        tb.log(step, loss=loss)
        if step % 5 == 0:
            written[step] = stats_scalars(state.stats())
    tb.close()
    return written


def test_stats_writer_event_files_hold_stats_of_every_rank(tmp_path):
    written = run_distributed(_train_and_write, 2, args=(str(tmp_path),), timeout=120)
    for rank in range(2):
        events = _events(tmp_path / f"rank{rank}")
        assert [s for s, _ in events["loss"]] == [5, 10, 15, 20]
        for step, scalars in written[rank].items():
            for name, value in scalars.items():
                assert (step, pytest.approx(value, rel=1e-6)) in events[name], (rank, step, name)
        last = written[rank][20]
        for name in ("bytes_sent", "bytes_saved", "density", "residual_norm", "steps", "step_check/sparse",
                     "step_check/checks"):
            assert f"sparsedist/{name}" in last, name
        assert last["sparsedist/steps"] == 20 and last["sparsedist/bytes_saved"] > 0
        assert last["sparsedist/step_check/checks"] >= 1
        assert any(k.startswith("sparsedist/collectives/") for k in last)
        assert any(k.startswith("sparsedist/auto_ratios/") for k in last)


def test_stats_scalars_flattens_and_drops_non_finite():
    stats = {"steps": 3, "bytes_sent": 0, "bytes_dense": 100, "compression_ratio": float("inf"),
             "density": 0.5, "residual_norm": 1.5, "collectives": {"allgather": 2, "dense": 1},
             "collective_time": {"allgather": {"calls": 2, "measured_s": 0.5, "predicted_s": None}},
             "auto_ratios": {"0:100": {"allgather": 1.25}},
             "step_check": {"verdict": "dense", "checks": [{"sparse_step_s": 0.2, "dense_step_s": 0.1}]}}
    out = stats_scalars(stats, prefix="")
    assert "compression_ratio" not in out and "collective_time/allgather/predicted_s" not in out
    assert out["bytes_saved"] == 100 and out["collective_share/dense"] == pytest.approx(1 / 3)
    assert out["auto_ratios/0:100/allgather"] == 1.25 and out["step_check/sparse"] == 0.0
    assert out["step_check/dense_step_s"] == 0.1 and out["collective_time/allgather/calls"] == 2


def test_stats_writer_without_a_directory_does_nothing_and_checks_its_arguments(tmp_path):
    from sparsedist.integrations.tensorboard import StatsWriter

    off = StatsWriter(None, object.__new__(sparsedist.SparsifyState))
    off.log(10, loss=1.0)
    off.close()
    assert not off.enabled
    with pytest.raises(TypeError, match="stats"):
        StatsWriter(tmp_path, object())
    with pytest.raises(ValueError, match="every"):
        StatsWriter(tmp_path, None, every=0)


def test_examples_take_tensorboard(tmp_path):
    torchrun(ROOT / "examples" / "mnist.py", "--steps", "20", "--data", str(ROOT / "tests" / "data" / "mnist_small.npz"),
             "--quiet", "--tensorboard", str(tmp_path / "mnist"), timeout=120)
    events = _events(tmp_path / "mnist")
    assert [s for s, _ in events["sparsedist/bytes_sent"]] == [10, 20] and [s for s, _ in events["loss"]] == [10, 20]
    assert events["sparsedist/compression_ratio"][-1][1] > 40  # top-k at 1 %: index + value per entry
    parsers = {"char_gpt.py": lambda m: m.build_parser().parse_args, "mnist_rigl.py": lambda m: m.parse_args}
    sys.path.insert(0, str(ROOT / "examples"))  # the examples import examples/common.py
    for script, parser in parsers.items():
        spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", ROOT / "examples" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert parser(module)(["--tensorboard", str(tmp_path / "x")]).tensorboard == str(tmp_path / "x"), script
    # mnist_horovod.py imports horovod at the top (built by scripts/build_horovod.sh) and takes its flags from
    # examples/common.py, as mnist.py does: read that parser statically
    assert "add_training_arguments(p)" in (ROOT / "examples" / "mnist_horovod.py").read_text()
    tree = ast.parse((ROOT / "examples" / "common.py").read_text())
    flags = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "attr", "")
             == "add_argument" and c.args and isinstance(c.args[0], ast.Constant)}
    assert "--tensorboard" in flags
