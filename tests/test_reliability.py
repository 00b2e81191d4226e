"""Reliability: sharded checkpoints, resharding, kill-and-resume, bad input, timeouts, consistency guard."""

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist import checkpoint
from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def _step(ddp, opt):
    x = torch.randn(8, 10)  # global RNG: restored by the checkpoint
    y = torch.randint(0, 4, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()


def _build(compressor="dgc", rigl=False):
    model = _net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.0 if compressor == "dgc" else 0.9)
    opts = {"optimizer": opt, "density": 0.1} if compressor == "dgc" else {"density": 0.1, "mode": "sampled"}
    sparsity = None
    if rigl:
        sparsity = sparsedist.RigL(ddp, opt, density=0.3, update_every=2, total_steps=8)
        opts["masks"] = sparsity
    state = sparsedist.register(ddp, compressor, **opts)
    return model, ddp, opt, state, sparsity


def _step_all(ddp, opt, sparsity):
    _step(ddp, opt)
    if sparsity is not None:
        sparsity.step()


def resume_same_world(rank, ws, root, compressor, rigl):
    torch.manual_seed(100 + rank)
    model, ddp, opt, state, sparsity = _build(compressor, rigl)
    for _ in range(3):
        _step_all(ddp, opt, sparsity)
    checkpoint.save(Path(root) / "step-000003", model=ddp, optimizer=opt, state=state, sparsity=sparsity,
                    extra={"step": 3})
    for _ in range(4):
        _step_all(ddp, opt, sparsity)
    straight = [p.detach().clone() for p in model.parameters()]
    masks = {k: v.clone() for k, v in sparsity.masks.items()} if rigl else {}

    torch.manual_seed(999)  # scramble the RNG: the checkpoint must restore it
    model2, ddp2, opt2, state2, sparsity2 = _build(compressor, rigl)
    extra = checkpoint.load(checkpoint.latest_checkpoint(root), model=ddp2, optimizer=opt2, state=state2,
                            sparsity=sparsity2)
    for _ in range(4):
        _step_all(ddp2, opt2, sparsity2)
    resumed = [p.detach().clone() for p in model2.parameters()]
    same_masks = all(torch.equal(masks[k], sparsity2.masks[k]) for k in masks)
    return extra, all(torch.equal(a, b) for a, b in zip(straight, resumed)), state2.stats()["steps"], same_masks


@pytest.mark.parametrize("compressor,rigl", [("dgc", False), ("topk", False), ("topk", True)])
def test_resume_is_bit_identical(tmp_path, compressor, rigl):
    out = run_distributed(resume_same_world, 2, args=(str(tmp_path), compressor, rigl), timeout=120)
    for extra, identical, steps, same_masks in out:
        assert extra == {"step": 3}
        assert identical, "resuming must reproduce the uninterrupted run exactly"
        assert same_masks, "RigL masks after resuming must equal the uninterrupted run's"
        assert steps == 7
    assert sorted(p.name for p in (tmp_path / "step-000003").iterdir()) == [
        "COMPLETE", "rank00000-of00002.pt", "rank00001-of00002.pt"]


def save_at_two(rank, ws, root):
    torch.manual_seed(rank)
    model, ddp, opt, state, _ = _build("dgc")
    for _ in range(3):
        _step(ddp, opt)
    checkpoint.save(root, model=ddp, optimizer=opt, state=state, extra={"step": 3})
    sd = state.state_dict()
    return sd["feedback"]["residuals"], sd["compressor"]["momentum"]


def load_at_three(rank, ws, root, how):
    model, ddp, opt, state, _ = _build("dgc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            checkpoint.load(root, model=ddp, optimizer=opt, state=state, reshard=how)
        except ValueError as exc:
            return "error", str(exc)
    sd = state.state_dict()
    _step(ddp, opt)  # and training goes on
    return ([str(w.message) for w in caught], sd["feedback"]["residuals"], sd["compressor"]["momentum"],
            [p.detach().clone() for p in model.parameters()])


def test_checkpoint_written_at_two_loaded_at_three(tmp_path):
    saved = run_distributed(save_at_two, 2, args=(str(tmp_path),), timeout=120)
    mean = run_distributed(load_at_three, 3, args=(str(tmp_path), "mean"), timeout=120)
    for msgs, residuals, momentum, params in mean:
        assert any("written at 2 ranks and is loaded at 3" in m and "mean" in m for m in msgs), msgs
        for name, r in residuals.items():
            torch.testing.assert_close(r, (saved[0][0][name] + saved[1][0][name]) / 2)
        for name, u in momentum.items():
            torch.testing.assert_close(u, (saved[0][1][name] + saved[1][1][name]) / 2)
        for a, b in zip(params, mean[0][3]):
            assert torch.equal(a, b)
    # conservation: (1/3) * sum of 3 means == (1/2) * sum of the 2 saved residuals
    name = next(iter(saved[0][0]))
    torch.testing.assert_close(sum(m[1][name] for m in mean) / 3, (saved[0][0][name] + saved[1][0][name]) / 2)

    reset = run_distributed(load_at_three, 3, args=(str(tmp_path), "reset"), timeout=120)
    for msgs, residuals, momentum, _ in reset:
        assert any("reset to zero" in m for m in msgs)
        assert residuals == {} and momentum == {}
    err = run_distributed(load_at_three, 3, args=(str(tmp_path), "error"), timeout=120)
    assert all(e[0] == "error" and "2 ranks" in e[1] for e in err)


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "step-000001").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        checkpoint.load(tmp_path / "step-000001", model=_net())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, name, kill_at):
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=3",
           "--monitor-interval=0.5", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
           str(ROOT / "tests" / "jobs" / "elastic_train.py"), "--ckpt", str(tmp_path / name), "--out", str(out),
           "--kill-at", str(kill_at)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    log = tmp_path / f"{name}.log"
    # Output to a file, not pipes: torch elastic puts its workers in sessions of their own, and an orphaned worker
    # holding a pipe would block this test. On a timeout, kill torchrun's session and every process whose command
    # line carries this run's unique checkpoint path (the workers).
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", str(tmp_path / name)], check=False)
            proc.wait(timeout=30)
            pytest.fail(f"torchrun ({name}) did not finish within 420 s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.timeout(1000)
def test_sigkill_one_rank_torchrun_restarts_and_resumes(tmp_path):
    straight = _torchrun(tmp_path, "straight", kill_at=-1)
    faulty = _torchrun(tmp_path, "faulty", kill_at=7)
    assert straight["attempt"] == 0 and straight["started_at"] == 0
    # (a heavily loaded machine may need a further restart to reconnect: any attempt >= 1 resumes from a checkpoint)
    assert faulty["attempt"] >= 1, "torchrun must have restarted the group"
    assert faulty["started_at"] >= 6, "the restarted group resumes from the last complete checkpoint"
    for a, b in zip(straight["params"], faulty["params"]):
        assert torch.equal(a, b), "kill-and-resume must end with the uninterrupted run's parameters"


def config_mismatch(rank, ws):
    model = _net()
    ddp = DDP(model)
    sparsedist.register(ddp, "topk", density=0.01 if rank == 0 else 0.02)
    try:
        nn.functional.cross_entropy(ddp(torch.randn(4, 10)), torch.randint(0, 4, (4,))).backward()
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("world", [2, 3])
def test_configuration_differing_across_ranks_raises_everywhere(world):
    msgs = run_distributed(config_mismatch, world, timeout=60)
    for m in msgs:
        assert m is not None and "compressor options" in m and "differs" in m, m


def stalled_peer(rank, ws, timeout):
    model = _net()
    ddp = DDP(model)
    sparsedist.register(ddp, "topk", density=0.1, timeout=timeout)
    if rank == 1:
        time.sleep(timeout * 3)  # stops answering
        return None
    t0 = time.monotonic()
    try:
        nn.functional.cross_entropy(ddp(torch.randn(4, 10)), torch.randint(0, 4, (4,))).backward()
    except RuntimeError as exc:
        return time.monotonic() - t0, str(exc)
    return "no error"


def test_stalled_peer_raises_naming_bucket_and_collective():
    out = run_distributed(stalled_peer, 2, args=(2.0,), timeout=90)
    elapsed, msg = out[0]
    assert elapsed < 10, elapsed
    assert "bucket 0" in msg and "allgather" in msg and "2.0 s" in msg, msg


def diverged(rank, ws):
    model = _net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sparsedist.register(ddp, "topk", density=0.1, check_every=2)
    torch.manual_seed(rank)
    try:
        for step in range(4):
            _step(ddp, opt)
            if step == 0 and rank == 1:
                with torch.no_grad():
                    model[2].bias[0] += 1e-3  # a silent divergence
    except RuntimeError as exc:
        return str(exc)
    return None


def test_consistency_guard_names_the_diverging_tensor():
    msgs = run_distributed(diverged, 2, timeout=60)
    for m in msgs:
        assert m is not None and "'2.bias'" in m and "diverged" in m, m


def test_bad_dtypes_and_missing_statistics_are_rejected():
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    comp = sparsedist.compressors.TopKCompressor(0.1)
    with pytest.raises(TypeError, match="complex64"):
        sparsedist.SparsifyState(Complex(), comp)
    with pytest.raises(ValueError, match="pass the model"):
        sparsedist.SparsifyState(None, sparsedist.compressors.VarianceCompressor())
    with pytest.raises(ValueError, match="check_every"):
        sparsedist.SparsifyState(_net(), comp, check_every=-1)
    with pytest.raises(ValueError, match="timeout"):
        sparsedist.SparsifyState(_net(), comp, timeout=0)
    with pytest.raises(ValueError, match="reshard"):
        checkpoint.load("nowhere", model=_net(), reshard="average")
