"""Pruning with real processes over gloo (2 ranks): identical masks on every rank, composition with the hook's
mask-aware exchange (``register(..., masks=pruner)``), checkpoint round trips through sparsedist.checkpoint,
structured pruning agreeing across ranks, and the example under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives.backend import ring_allreduce_bytes
from sparsedist.sparsity import GradualMagnitudePruning, PruneRetrain, mask_checksum, structured_prune
from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)


def _gmp(ddp, opt, score="magnitude"):
    return GradualMagnitudePruning(ddp, opt, 0.8, begin_step=2, end_step=8, frequency=3, budget="global", score=score)


def _run(rank, compressor, mask_aware, start=0, stop=STEPS, ckpt=None, resume=None, score="magnitude"):
    model = _net()
    ddp = DDP(model, bucket_cap_mb=100)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gmp = _gmp(ddp, opt, score)
    state = sparsedist.register(ddp, compressor, masks=gmp) if mask_aware else None
    if resume is not None:
        sparsedist.checkpoint.load(resume, model=ddp, optimizer=opt, state=state, sparsity=gmp)
    log = []
    for step in range(start, stop):
        x, y = _batch(step, rank)
        dense = gmp.needs_dense_gradient()
        active_before = sum(int(m.sum()) for m in gmp.masks.values())
        before = state.stats()["bytes_sent"] if state else 0
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        sent = state.stats()["bytes_sent"] - before if state else 0
        opt.step()
        gmp.step()
        zero = all(bool((p.detach()[~gmp.mask_of(p)] == 0).all()) for p in model.parameters()
                   if gmp.mask_of(p) is not None)
        log.append((dense, sent, active_before, zero))
        if ckpt is not None and step == ckpt[1]:
            sparsedist.checkpoint.save(ckpt[0], model=ddp, optimizer=opt, state=state, sparsity=gmp)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sums = torch.stack([mask_checksum(m) for m in gmp.masks.values()])
    return flat, sums, log, (state.stats() if state else None), gmp.mask_version


def scenario(rank, world, tmp):
    out = {"plain": _run(rank, "none", False), "none": _run(rank, "none", True),
           "topk": _run(rank, "topk", True, score="taylor")}
    ckpt = os.path.join(tmp, "ckpt")
    _run(rank, "topk", True, stop=6, ckpt=(ckpt, 5), score="taylor")  # saved inside a Taylor window (step 5)
    out["resumed"] = _run(rank, "topk", True, start=6, resume=ckpt, score="taylor")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(scenario, 2, args=(str(tmp_path_factory.mktemp("gmp")),), timeout=240)


def test_masks_and_parameters_identical_on_every_rank(results):
    for key in ("plain", "none", "topk", "resumed"):
        assert torch.equal(results[0][key][0], results[1][key][0]), key
        assert torch.equal(results[0][key][1], results[1][key][1]), key
    assert results[0]["none"][4] == 2  # pruning steps 2 (s_i = 0: no change), 5 and 8


def test_mask_aware_exchange_sends_only_active_gradients(results):
    world = len(results)
    flat, _, log, stats, _ = results[0]["none"]
    # the inactive weights' gradients are discarded anyway: the same training as plain DDP
    torch.testing.assert_close(flat, results[0]["plain"][0], rtol=1e-6, atol=1e-7)
    model = _net()
    total = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    for step, (dense, sent, active, zero) in enumerate(log):
        assert zero
        if dense:  # pruning steps: the full gradient (flushes residuals kept on the old active set)
            assert step in (2, 5, 8) and sent == ring_allreduce_bytes(total, 4, world)
        else:
            assert sent == ring_allreduce_bytes(active + dense_params + 1, 4, world), step
    assert stats["collectives"] == {"allreduce": 3, "values_allreduce": STEPS - 3}
    assert stats["bytes_sent"] < stats["bytes_dense"]


def test_checkpoint_round_trip_resumes_exactly(results):
    for r in results:
        assert torch.equal(r["resumed"][0], r["topk"][0])
        assert torch.equal(r["resumed"][1], r["topk"][1])
    assert results[0]["topk"][3]["residual_norm"] > 0


# -- prune-retrain and structured pruning at 2 ranks --------------------------------------------------------------
def _prune_retrain_and_structured(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 16, 24), nn.ReLU(), nn.Linear(24, 3))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    pr = PruneRetrain(ddp, opt, 0.9, train_steps=4, retrain_steps=3, rounds=2, score="taylor", score_window=2,
                      weights="reinit", lr_schedule=lambda t: 1.0)
    state = sparsedist.register(ddp, "none", masks=pr)
    for step in range(pr.total_steps):
        g = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        pr.step()
    pruned, kept = structured_prune(ddp, 0.5, ranking="global")
    out = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
           "masks": torch.stack([mask_checksum(m) for m in pr.masks.values()]), "density": pr.active_fraction,
           "dead": pr.dead_neurons, "kept": {k: v.tolist() for k, v in kept.items()},
           "collectives": state.stats()["collectives"]}
    with torch.no_grad():  # one rank's weights differ: structured pruning must refuse on every rank
        if rank == 1:
            model[0].weight.fill_(1.0)
            model[0].weight[kept["0"]] = 0.0  # rank 1 would keep exactly the filters rank 0 removes
    try:
        structured_prune(model, 0.5)
        out["diverged"] = None
    except RuntimeError as exc:
        out["diverged"] = str(exc)
    return out


def test_prune_retrain_and_structured_pruning_agree_across_ranks():
    results = run_distributed(_prune_retrain_and_structured, 2, timeout=180)
    a, b = results
    assert torch.equal(a["params"], b["params"]) and torch.equal(a["masks"], b["masks"])
    assert a["density"] <= 0.1 + 1e-6 and a["kept"] == b["kept"] and a["dead"] == b["dead"]
    assert a["collectives"] == {"allreduce": 2, "values_allreduce": 8}
    assert a["diverged"] and b["diverged"] and "rank 1" in a["diverged"]


def test_example_under_torchrun_with_mask_aware_exchange(tmp_path):
    data = ROOT / "tests" / "data" / "mnist_small.npz"
    out = tmp_path / "result.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               PYTHONPATH=str(ROOT))
    for method in (["gmp", "--mask-aware", "--frequency", "5"], ["structured", "--flops", "0.5"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "mnist_prune.py"), "--data", str(data), "--model", "cnn", "--steps", "30",
               "--json", str(out), "--export", str(tmp_path / f"{method[0]}.pt"), "--method", *method]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gmp, structured = [json.loads(line) for line in out.read_text().splitlines()]
    assert gmp["world_size"] == 2 and gmp["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert gmp["test_accuracy"] > 50 and 0 < gmp["comm"]["bytes_sent"] < gmp["comm"]["bytes_dense"]
    assert structured["pruned_flops"] <= 0.5 * structured["flops"] and structured["test_accuracy"] > 50
    assert structured["weights"] < 0.6 * gmp["weights"]
    for name in ("gmp", "structured"):
        loaded = torch.jit.load(str(tmp_path / f"{name}.pt"))
        assert loaded(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
