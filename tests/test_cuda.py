"""sparsedist on CUDA: the checks a CPU-only CI cannot make.

Skipped without a GPU. On a machine with one::

    python -m pytest -q tests/test_cuda.py

One GPU is enough. NCCL runs one rank per process group here (NCCL refuses two ranks on one device), which
exercises the hook's CUDA futures, streams and device handling; the multi-rank algorithms (SparCML, global
top-k, the allgather path, RigL's mask agreement) run with two ranks on CUDA tensors over gloo. Every result is
compared with the same computation on the CPU: selection must agree exactly, training within float tolerance.

``SPARSEDIST_TEST_DEVICE=cpu`` runs the same file against the CPU (with gloo instead of NCCL), which checks the
tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.compressors import build_compressor
from sparsedist.compressors.base import SelectContext
from sparsedist.nn import functional as SF
from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("SPARSEDIST_TEST_DEVICE", "cuda")
ONE_RANK_BACKEND = "nccl" if DEVICE == "cuda" else "gloo"

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (or SPARSEDIST_TEST_DEVICE=cpu to check the tests)")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")


# -- selection: bit-identical to the CPU --------------------------------------------------------------------
SELECTORS = [
    ("topk", {"density": 0.01}),
    ("topk", {"density": 0.001}),
    ("threshold", {"threshold": 2.0}),
    ("threshold", {"threshold": 2.0, "quantize": False}),
    ("randk", {"density": 0.01}),
    ("dgc", {"density": 0.01, "momentum": 0.9}),
    ("variance", {"alpha": 1.0}),
]


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4


@pytest.mark.parametrize("name,opts", SELECTORS, ids=[f"{n}-{sorted(o.items())}" for n, o in SELECTORS])
def test_selection_on_device_matches_cpu(name, opts):
    dev = _device()
    comps = {d: build_compressor(name, **opts) for d in ("cpu", "dev")}
    for step in range(3):
        x = _heavy_tailed(300_000, seed=step)
        # per-example gradients that mostly disagree (large variance), except on a tenth of the entries
        noisy = torch.rand(x.numel(), generator=torch.Generator().manual_seed(9)) > 0.1
        sm = x.square() * torch.where(noisy, 4.0, 0.1) if name == "variance" else None
        got = {}
        for d, t_dev in (("cpu", torch.device("cpu")), ("dev", dev)):
            ctx = SelectContext(step=step, key="w", index=3, world_size=2, rank=0, seed=11,
                                second_moment=None if sm is None else sm.to(t_dev))
            acc = comps[d].accumulate(x.to(t_dev), None, ctx)
            p = comps[d].compress(acc, ctx)
            assert p.indices.device == t_dev and p.values.device == t_dev, (d, p.indices.device, p.values.device)
            comps[d].after_send("w", p)
            order = torch.argsort(p.indices)
            got[d] = (p.indices[order].cpu(), p.values[order].cpu(), p.shared_indices, p.constant)
        assert got["dev"][0].numel() > 0
        assert torch.equal(got["dev"][0], got["cpu"][0]), f"{name}: indices differ on {dev} at step {step}"
        torch.testing.assert_close(got["dev"][1], got["cpu"][1], rtol=1e-6, atol=1e-7)
        assert got["dev"][2:] == got["cpu"][2:]


# -- the DDP hook -------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


HOOK_CONFIGS = [
    ("topk", {"density": 0.05}),
    ("topk", {"density": 0.05, "collective": "ssar_recursive_double"}),
    ("topk", {"density": 0.05, "collective": "ssar_split_allgather"}),
    ("topk", {"density": 0.05, "collective": "dsar_split_allgather"}),
    ("topk", {"density": 0.05, "collective": "gtopk"}),
    ("topk", {"density": 0.05, "value_dtype": "float16"}),
    ("topk", {"density": 0.05, "granularity": "bucket"}),
    ("threshold", {"threshold": 0.01}),
    ("randk", {"density": 0.1}),
    ("dgc", {"density": 0.05, "momentum": 0.9, "warmup_steps": 2, "clip_norm": 5.0}),
    ("variance", {"alpha": 1.0}),
    ("topk", {"density": 0.05, "collective": "dense"}),
]
HOOK_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in HOOK_CONFIGS]


def _train(rank, world_size, device: str, configs, steps=5):
    dev = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    out = []
    for compressor, opts in configs:
        model = Net().to(dev)
        ddp = DDP(model, bucket_cap_mb=0.01, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        opts = dict(opts)
        if compressor == "dgc":
            opts["optimizer"] = opt
        state = sparsedist.register(ddp, compressor, **opts)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(steps):
            x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x.to(dev)), y.to(dev)).backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        residuals = [r.device.type for r in state.state_dict()["feedback"]["residuals"].values()]
        out.append((flat.cpu(), state.stats()["bytes_sent"], flat.device.type, residuals))
    return out


def _compare(dev_results, cpu_results, world_size):
    for i, ((flat, sent, where, residuals), (flat_cpu, sent_cpu, _, _)) in enumerate(zip(dev_results, cpu_results)):
        assert where == DEVICE, (HOOK_IDS[i], where)
        assert all(r == DEVICE for r in residuals), (HOOK_IDS[i], residuals)
        # the same selection on nearly the same gradients: the same bytes (a top-k tie at the boundary could
        # differ in principle; none occurs with these seeds)
        assert sent == sent_cpu, (HOOK_IDS[i], sent, sent_cpu)
        torch.testing.assert_close(flat, flat_cpu, rtol=1e-4, atol=1e-5, msg=lambda m: f"{HOOK_IDS[i]}: {m}")


def test_hook_one_rank_nccl_matches_cpu():
    dev = run_distributed(_train, 1, args=(DEVICE, HOOK_CONFIGS), backend=ONE_RANK_BACKEND, timeout=300)[0]
    cpu = run_distributed(_train, 1, args=("cpu", HOOK_CONFIGS), timeout=300)[0]
    _compare(dev, cpu, 1)


def test_hook_two_ranks_on_device_over_gloo_matches_cpu():
    dev = run_distributed(_train, 2, args=(DEVICE, HOOK_CONFIGS), timeout=300)
    cpu = run_distributed(_train, 2, args=("cpu", HOOK_CONFIGS), timeout=300)
    for i in range(len(HOOK_CONFIGS)):
        assert torch.equal(dev[0][i][0], dev[1][i][0]), f"{HOOK_IDS[i]}: ranks differ on {DEVICE}"
    _compare(dev[0], cpu[0], 2)


def test_auto_collective_on_device():
    configs = [("topk", {"density": 0.05, "collective": "auto"}), ("randk", {"density": 0.1, "collective": "auto"})]
    res = run_distributed(_train, 2, args=(DEVICE, configs), timeout=300)
    for i in range(len(configs)):
        assert torch.equal(res[0][i][0], res[1][i][0]), "ranks differ with collective='auto'"
        assert res[0][i][2] == DEVICE


# -- RigL: masks on the device, identical on every rank --------------------------------------------------------
def _rigl(rank, world_size, device):
    from sparsedist.sparsity import RigL

    dev = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    model = Net().to(dev)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, density=0.3, distribution="erk", update_every=2, total_steps=20)
    g = torch.Generator().manual_seed(7 + rank)
    versions = []
    for _ in range(12):
        x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x.to(dev)), y.to(dev)).backward()
        opt.step()
        rigl.step()
        versions.append(rigl.mask_version)
    masks = {n: m.cpu() for n, m in rigl.masks.items()}
    devices = {m.device.type for m in rigl.masks.values()}
    off = sum(int((p.detach()[~rigl.masks[n]] != 0).sum()) for n, p in model.named_parameters() if n in rigl.masks)
    return masks, devices, off, versions


def test_rigl_on_device_two_ranks():
    res = run_distributed(_rigl, 2, args=(DEVICE,), timeout=300)
    (m0, dev0, off0, v0), (m1, _, off1, v1) = res
    assert dev0 == {DEVICE}
    assert v0 == v1 and v0[-1] > 0, "RigL never updated its masks"
    assert off0 == off1 == 0, "weights outside the mask are not zero"
    assert m0.keys() == m1.keys() and all(torch.equal(m0[n], m1[n]) for n in m0), "masks differ between ranks"


# -- ephemeral sparsity: forward and backward agree with the CPU -------------------------------------------
def test_sparse_activations_and_errors_on_device_match_cpu():
    dev = _device()
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(16, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    outs = {}
    for d in (torch.device("cpu"), dev):
        xi, wi, bi = (t.to(d).requires_grad_() for t in (x, w, b))
        h = SF.sparse_backprop_linear(xi, wi, bi, 5)
        h = SF.kwinners(h, 8)
        h = SF.sparse_error(h, 6)
        loss = (h * torch.arange(24, device=d)).sum() + SF.topk_mask(h, 3).float().sum()
        loss.backward()
        outs[d.type] = [t.detach().cpu() for t in (h, xi.grad, wi.grad, bi.grad)]
    for a, c in zip(outs[dev.type], outs["cpu"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# -- checkpoints: written from the device, read on the CPU ---------------------------------------------------
def _checkpoint(rank, world_size, device, directory):
    from sparsedist import checkpoint

    dev = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    model = Net().to(dev)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = sparsedist.register(ddp, "topk", density=0.05)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(ddp(x.to(dev)), y.to(dev)).backward()
    opt.step()
    checkpoint.save(directory, model=ddp, optimizer=opt, state=state, extra={"step": 1})
    residuals = {k: v.cpu() for k, v in state.state_dict()["feedback"]["residuals"].items()}
    return {k: v.cpu() for k, v in model.state_dict().items()}, residuals


def _restore(rank, world_size, directory):
    from sparsedist import checkpoint

    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = sparsedist.register(ddp, "topk", density=0.05)
    extra = checkpoint.load(directory, model=ddp, optimizer=opt, state=state, map_location="cpu")
    return extra, dict(model.state_dict()), dict(state.state_dict()["feedback"]["residuals"])


def test_checkpoint_from_device_loads_on_cpu(tmp_path):
    saved, residuals = run_distributed(_checkpoint, 1, args=(DEVICE, str(tmp_path)), backend=ONE_RANK_BACKEND,
                                       timeout=180)[0]
    extra, loaded, loaded_res = run_distributed(_restore, 1, args=(str(tmp_path),), timeout=180)[0]
    assert extra["step"] == 1
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert residuals and all(torch.equal(residuals[k], loaded_res[k].cpu()) for k in residuals)


# -- the fully sparse example end to end --------------------------------------------------------------------
def test_fully_sparse_char_gpt_runs_on_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(ROOT / "examples" / "char_gpt.py"), "--fully-sparse", "--steps", "40", "--eval-every", "20",
           "--eval-batches", "2", "--rigl-every", "10", "--json", str(tmp_path / "out.json"), "--quiet"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "out.json").read_text())
    history = summary["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    assert summary["density"] < 0.2, summary["density"]
