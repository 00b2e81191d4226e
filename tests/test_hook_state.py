"""SparsifyState across pickling and registration paths: state keyed by parameter name, rebuilt from the model;
the world size reaching every compressor; auto's whole tuner state saved."""

import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.compressors import DGCCompressor, TopKCompressor
from sparsedist.testing import run_distributed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(rank, steps):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]


def _step(ddp, opt, batch):
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(batch[0]), batch[1]).backward()
    opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _pickle_into_fresh_model(rank, ws, with_model):
    """Train 3 steps, pickle the state, rebuild model/DDP/optimizer from scratch, continue 3 steps; compare with
    an uninterrupted run. With the model, the unpickled state is attached by name; without it (first-seen names)
    it is registered PyTorch-style."""
    data = _batches(rank, 6)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    state = sparsedist.SparsifyState(ddp if with_model else None, TopKCompressor(0.05))
    ddp.register_comm_hook(state, sparsedist.sparsify_hook)
    for b in data[:3]:
        _step(ddp, opt, b)
    blob = pickle.dumps(state)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    residuals = {k: v.clone() for k, v in state.feedback.residuals.items()}
    for b in data[3:]:
        _step(ddp, opt, b)
    straight = _flat(model)

    model2 = Net()
    model2.load_state_dict(saved)
    ddp2 = DDP(model2, bucket_cap_mb=0.002)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.5)
    restored = pickle.loads(blob)
    if with_model:
        sparsedist.register(ddp2, restored)  # attach(ddp2) + register_comm_hook
    else:
        ddp2.register_comm_hook(restored, sparsedist.sparsify_hook)
    same_residuals = restored.feedback.residuals.keys() == residuals.keys() and all(
        torch.equal(restored.feedback.residuals[k], v) for k, v in residuals.items())
    for b in data[3:]:
        _step(ddp2, opt2, b)
    return straight, _flat(model2), same_residuals, sorted(residuals)


@pytest.mark.parametrize("with_model", [True, False])
def test_pickle_round_trip_into_a_fresh_model_keeps_every_residual_on_its_parameter(with_model):
    for straight, resumed, same_residuals, names in run_distributed(_pickle_into_fresh_model, 2,
                                                                    args=(with_model,), timeout=180):
        assert same_residuals
        assert names == (["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "out.bias", "out.weight"]
                         if with_model else [f"param{i}" for i in range(6)])
        assert torch.equal(straight, resumed)


def _unattached(rank, ws):
    model = Net()
    ddp = DDP(model)
    state = sparsedist.register(ddp, "topk", density=0.1)
    restored = pickle.loads(pickle.dumps(state))
    ddp2 = DDP(Net())
    ddp2.register_comm_hook(restored, sparsedist.sparsify_hook)
    try:
        nn.functional.cross_entropy(ddp2(torch.randn(4, 12)), torch.zeros(4, dtype=torch.long)).backward()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_unpickled_state_without_its_model_says_how_to_attach_it():
    for msg in run_distributed(_unattached, 2, timeout=120):
        assert "unpickled without its model" in msg and "attach" in msg


def _dgc_paths(rank, ws):
    """register(ddp, "dgc", ...) and the PyTorch-style SparsifyState + register_comm_hook give the same
    parameters: the world size reaches DGC's local clipping (clip_norm / sqrt(P)) through the context."""
    out = []
    for path in ("register", "pytorch", "unclipped-by-P"):
        model = Net()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        if path == "register":
            sparsedist.register(ddp, "dgc", density=0.05, clip_norm=0.5, optimizer=opt)
        else:  # the reference that clipping at clip_norm (not clip_norm / sqrt(P)) must not equal
            norm = 0.5 if path == "pytorch" else 0.5 * ws ** 0.5
            state = sparsedist.SparsifyState(ddp, DGCCompressor(density=0.05, clip_norm=norm), optimizer=opt)
            ddp.register_comm_hook(state, sparsedist.sparsify_hook)
        for b in _batches(rank, 4):
            _step(ddp, opt, b)
        out.append(_flat(model))
    return out


def test_dgc_gets_the_world_size_on_every_registration_path():
    for registered, pytorch_style, clipped_without_p in run_distributed(_dgc_paths, 2, timeout=120):
        assert torch.equal(registered, pytorch_style)
        assert not torch.allclose(registered, clipped_without_p), "clipping must depend on the world size"


def _gtopk_resume(rank, ws):
    """collective='gtopk' reuses its global threshold and ranges between estimations: a state restored from
    state_dict() carries them (the planner's per-bucket collectives), so the resumed run keeps exactly what the
    uninterrupted run keeps. (One DDP bucket: a fresh DDP's first step buckets the gradients as DDP does before
    its rebuild, and a global top-k over a bucket depends on what the bucket holds.)"""
    data = _batches(rank, 8)
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    state = sparsedist.register(ddp, "topk", density=0.05, collective="gtopk")
    for b in data[:4]:
        _step(ddp, opt, b)
    saved_state, saved_model = state.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    for b in data[4:]:
        _step(ddp, opt, b)
    model2 = Net()
    model2.load_state_dict(saved_model)
    ddp2 = DDP(model2)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.5)
    state2 = sparsedist.register(ddp2, "topk", density=0.05, collective="gtopk")
    state2.load_state_dict(saved_state)
    for b in data[4:]:
        _step(ddp2, opt2, b)
    return _flat(model), _flat(model2), sorted(saved_state["auto"]["collectives"])


def test_global_topk_state_is_saved_so_a_resumed_run_keeps_what_the_uninterrupted_one_keeps():
    for straight, resumed, saved in run_distributed(_gtopk_resume, 2, timeout=180):
        assert saved and all(k.startswith("gtopk@") for k in saved)
        assert torch.equal(straight, resumed)
