"""sparsedist.optim.PackedOptimizer: state on the active weights only, equal entry for entry to a dense masked
optimizer's (bit for bit, through RigL's mask updates), state_dict round trip, packed gradients, its memory."""

import io

import pytest
import torch
from torch import nn

from sparsedist.optim import PackedAdam, PackedAdamW, PackedOptimizer, PackedSGD, repack
from sparsedist.sparsity import RigL, StaticSparsity

STEPS = 16  # RigL updates at steps 4 and 8 (stop at 12)

DENSE = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3, foreach=False),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False),
}
PACKED = {
    "adamw": lambda ps: PackedAdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam": lambda ps: PackedAdam(ps, lr=1e-2, weight_decay=1e-3),
    "sgd": lambda ps: PackedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def train(m, opt, rigl, steps):
    for t in steps:
        g = torch.Generator().manual_seed(t)
        opt.zero_grad()
        m(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
        rigl.step()


def setup(algo, packed, total=STEPS):
    m = model()
    opt = (PACKED if packed else DENSE)[algo](m.parameters())
    rigl = RigL(m, opt, density=0.25, distribution="uniform", update_every=4, total_steps=total)
    if packed:
        opt.attach_masks(rigl)
    return m, opt, rigl


@pytest.mark.parametrize("algo", ["adamw", "adam", "sgd"])
def test_packed_state_equals_dense_masked_state(algo):
    md, od, rd = setup(algo, False)
    mp, op, rp = setup(algo, True)
    train(md, od, rd, range(STEPS))
    train(mp, op, rp, range(STEPS))
    assert rp.mask_version >= 2  # the masks did change, and the state was re-packed
    for (name, wd), wp in zip(md.named_parameters(), mp.parameters()):
        assert torch.equal(wd, wp), name
        sd, sp = od.state[wd], op.state[wp]
        if "index" not in sp:  # unmasked: the dense state itself
            assert all(torch.equal(sd[k], sp[k]) for k in sd)
            continue
        idx = sp["index"].long()
        assert torch.equal(idx, rp.masks[name].reshape(-1).nonzero().view(-1))
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in sd:
                assert sp[key].numel() == idx.numel()
                assert torch.equal(sd[key].reshape(-1)[idx], sp[key]), (name, key)


def test_state_dict_round_trip_resumes_bit_identically():
    m, opt, rigl = setup("adamw", True)
    train(m, opt, rigl, range(STEPS))
    m2, opt2, rigl2 = setup("adamw", True)
    train(m2, opt2, rigl2, range(6))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": opt2.state_dict(), "rigl": rigl2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m3, opt3, rigl3 = setup("adamw", True)
    m3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    rigl3.load_state_dict(saved["rigl"])
    assert all(s["index"].dtype == torch.int32 for s in opt3.state.values() if "index" in s)
    train(m3, opt3, rigl3, range(6, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m3.parameters()))
    for p, p3 in zip(m.parameters(), m3.parameters()):
        assert all(torch.equal(v, opt3.state[p3][k]) for k, v in opt.state[p].items() if torch.is_tensor(v))


def test_gradients_are_packed_except_on_update_steps():
    m, opt, rigl = setup("adamw", True)
    weights = [p for n, p in m.named_parameters() if n in rigl.masks]
    m(torch.randn(8, 16)).sum().backward()
    for p, mask in zip(weights, rigl.masks.values()):
        assert p.grad is None and opt.packed_grad(p).numel() == int(mask.sum())
    assert all(p.grad is not None for n, p in m.named_parameters() if n not in rigl.masks)
    opt.step()
    rigl.step()
    train(m, opt, rigl, range(1, 4))
    assert rigl.needs_dense_gradient()  # step 4 updates the masks: the dense gradient stays
    opt.zero_grad()
    m(torch.randn(8, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in weights)
    assert all(opt.packed_grad(p) is None for p in weights)


def test_state_memory_shrinks_with_density():
    m = model()
    opt = PackedAdamW(m.parameters(), lr=1e-3)
    masks = StaticSparsity(m, opt, density=0.1, distribution="uniform")
    opt.attach_masks(masks)
    train(m, opt, masks, range(2))
    active = sum(int(v.sum()) for v in masks.masks.values())
    dense = sum(p.numel() for n, p in m.named_parameters() if n not in masks.masks)
    assert opt.state_bytes() == {"values": 2 * 4 * (active + dense), "index": 4 * active}


def test_bad_arguments():
    ps = list(model().parameters())
    with pytest.raises(ValueError, match="algorithm"):
        PackedOptimizer(ps, "lamb")
    with pytest.raises(ValueError, match="unknown option"):
        PackedOptimizer(ps, "sgd", betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="amsgrad"):
        PackedOptimizer(ps, "adam", amsgrad=True)
    with pytest.raises(TypeError, match="mask_of"):
        PackedAdamW(ps).attach_masks(object())


def test_repack_moves_values_with_their_positions():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = repack(values, torch.tensor([1, 4, 6, 9], dtype=torch.int32), torch.tensor([0, 4, 5, 9]))
    assert torch.equal(out, torch.tensor([0.0, 2.0, 0.0, 4.0]))
    assert repack(values[:0], torch.tensor([], dtype=torch.long), torch.tensor([3])).tolist() == [0.0]
