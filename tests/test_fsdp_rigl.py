"""ShardedRigL + PackedAdamW + the mask-aware sparse exchange under FSDP2, with real processes (gloo, 2 and 3
ranks): the same weights and masks as dense FSDP RigL with torch's AdamW, packed state equal entry for entry to
the dense masked state, exact per-layer counts, resume from a sharded checkpoint bit for bit, masks verified."""

import math

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import sparsedist.checkpoint as ckpt
from sparsedist.fsdp import ShardedRigL, register_fsdp, regrow
from sparsedist.fsdp.rigl import local_of
from sparsedist.optim import PackedAdamW
from sparsedist.sparsity import RigL
from sparsedist.testing import run_distributed

STEPS = 12  # updates at steps 3 and 6 (stop at 9)


def mlp(shard=True):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 21), nn.ReLU(), nn.Linear(21, 13), nn.ReLU(), nn.Linear(13, 3))
    if shard:
        for layer in (m[0], m[2]):
            fully_shard(layer)
        fully_shard(m)
    return m


def build(kind, density=1.0):
    """kind 'dense': torch AdamW + FSDP's own reduce-scatter; 'sparse': PackedAdamW + mask-aware top-k."""
    m = mlp()
    opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False) if kind == "dense"
           else PackedAdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    rigl = ShardedRigL(m, opt, density=0.3, distribution="uniform", update_every=3, total_steps=STEPS)
    state = None
    if kind == "sparse":
        opt.attach_masks(rigl)
        state = register_fsdp(m, "topk", density=density, masks=rigl)
    return m, opt, rigl, state


def train(m, opt, rigl, rank, steps):
    for t in steps:
        g = torch.Generator().manual_seed(100 * t + rank)
        opt.zero_grad()
        m(torch.randn(6, 10, generator=g)).pow(2).mean().backward()
        opt.step()
        rigl.step()


def snapshot(m, opt, rigl):
    return ({n: p.to_local().clone() for n, p in m.named_parameters()},
            {n: v.clone() for n, v in rigl.masks.items()},
            {n: {k: local_of(v).clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for n, p in m.named_parameters()})


def same(a, b, exact):
    if exact:
        return torch.equal(a, b)
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def rigl_checks(rank, world, directory):
    exact = world == 2  # a sum of three depends on its order: gloo's and the owners' differ by an ulp
    dense, sparse = build("dense"), build("sparse")
    train(*dense[:3], rank, range(STEPS))
    train(*sparse[:3], rank, range(STEPS))
    (wd, md, sd), (wp, mp, sp) = snapshot(*dense[:3]), snapshot(*sparse[:3])
    assert sparse[2].mask_version >= 1
    assert all(same(wd[n], wp[n], exact) for n in wd)
    assert all(torch.equal(md[n], mp[n]) for n in md)
    for n, state in sp.items():  # packed state == dense masked state at the active positions
        if "index" in state:
            idx = state["index"].long()
            assert torch.equal(idx, mp[n].reshape(-1).nonzero().view(-1))
            for key in ("exp_avg", "exp_avg_sq"):
                assert same(sd[n][key].reshape(-1)[idx], state[key], exact), (n, key)
    stats = sparse[3].stats()
    assert stats["collectives"]["reduce_scatter"] == 3 * 2  # RigL's two update steps: dense, 3 modules
    # exact per-layer counts over the shards, and zeros outside the masks
    m, rigl = sparse[0], sparse[2]
    rigl.verify_masks()
    for n, p in m.named_parameters():
        if n in rigl.masks:
            assert not local_of(p)[~rigl.masks[n]].any()
            assert rigl.layer_counts[n] == math.floor(0.3 * p.numel() + 0.5)

    # resume from a sharded checkpoint, bit for bit (top-k at 0.3: residuals are not zero)
    whole = build("sparse", 0.3)
    train(*whole[:3], rank, range(STEPS))
    first = build("sparse", 0.3)
    train(*first[:3], rank, range(5))
    ckpt.save(directory, model=first[0], optimizer=first[1], state=first[3], sparsity=first[2])
    resumed = build("sparse", 0.3)
    ckpt.load(directory, model=resumed[0], optimizer=resumed[1], state=resumed[3], sparsity=resumed[2])
    train(*resumed[:3], rank, range(5, STEPS))
    for a, b in zip(snapshot(*whole[:3]), snapshot(*resumed[:3])):
        assert a.keys() == b.keys()
        for n in a:
            if isinstance(a[n], dict):
                assert a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]), n
            else:
                assert torch.equal(a[n], b[n]), n
    r1, r2 = whole[3].feedback.residuals, resumed[3].feedback.residuals
    assert r1.keys() == r2.keys() and all(torch.equal(r1[n], r2[n]) for n in r1) and r1

    # a mask changed behind RigL's back is caught on every rank
    if rank == 0:
        mask = next(iter(rigl.masks.values()))
        flat = mask.view(-1)
        flat[int((~flat).nonzero()[0])] = True
    with pytest.raises(RuntimeError, match="active weights together"):
        rigl.verify_masks()
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_rigl_packed_sparse_exchange(world, tmp_path):
    assert run_distributed(rigl_checks, world, args=(str(tmp_path / "ckpt"),), timeout=300) == [True] * world


def test_regrow_is_rigls_update():
    """regrow() on full tensors gives exactly the masks RigL computes (same arithmetic, same tie-breaking)."""
    m = mlp(shard=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rigl = RigL(m, opt, density=0.3, distribution="uniform", update_every=1, total_steps=10)
    rigl.step()  # step 0: no update
    m(torch.randn(6, 10)).pow(2).mean().backward()
    before = {n: (p.detach().clone(), p.grad.clone(), rigl.masks[n].clone()) for n, p in m.named_parameters()
              if n in rigl.masks}
    f = rigl.drop_fraction(1)
    rigl.step()  # step 1: an update from the gradients (the optimizer did not run)
    for n, (w, g, old) in before.items():
        count = rigl.layer_counts[n]
        expected = regrow(w, g, old, count, int(math.floor(f * count)))
        assert torch.equal(expected, rigl.masks[n]) and not torch.equal(expected, old), n
