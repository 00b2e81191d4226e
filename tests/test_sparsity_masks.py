"""Masks, layer distributions (uniform, ERK) and schedules of sparsedist.sparsity (single process)."""

import math

import pytest
import torch
from torch import nn

from sparsedist.sparsity import (
    UpdateSchedule,
    cosine_drop_fraction,
    erk_densities,
    layer_counts,
    mask_checksum,
    random_mask,
    select_parameters,
    top_n,
    uniform_densities,
)
from sparsedist.sparsity.masks import derive_seed

MLP = {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}
CNN = {"conv1": (32, 1, 5, 5), "conv2": (64, 32, 5, 5), "fc1": (1024, 3136), "fc2": (10, 1024)}


def numel(shape):
    return math.prod(shape)


# -- distributions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [MLP, CNN, {"a": (7,), "b": (3, 5), "c": (13, 11, 3)}])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_global_budget_is_exact(shapes, density, distribution):
    counts = layer_counts(shapes, density, distribution)
    total = sum(numel(s) for s in shapes.values())
    assert sum(counts.values()) == math.floor(density * total + 0.5)
    dens = erk_densities(shapes, density) if distribution == "erk" else uniform_densities(shapes, density)
    for name, shape in shapes.items():
        real = dens[name] * numel(shape)
        assert 0 <= counts[name] <= numel(shape)
        assert math.floor(real) - 1e-9 <= counts[name] <= math.ceil(real) + 1e-9  # floor or ceil


def test_erk_raw_density_and_dense_resolve_by_hand():
    # density 0.1 of 266200 weights: eps * (1084 + 400 + 110) = 26620 -> fc3 would get 110 * 16.7 > 1, so fc3
    # is made dense and eps is solved again over fc1 and fc2 only.
    d = erk_densities(MLP, 0.1)
    assert d["fc3"] == 1.0
    eps = (0.1 * 266200 - 1000) / (784 + 300 + 300 + 100)
    assert d["fc1"] == pytest.approx(eps * (784 + 300) / (784 * 300), rel=1e-12)
    assert d["fc2"] == pytest.approx(eps * (300 + 100) / (300 * 100), rel=1e-12)
    # densities of the sparse layers are proportional to (sum of dims) / (product of dims)
    assert d["fc1"] / d["fc2"] == pytest.approx(((784 + 300) / 235200) / (400 / 30000), rel=1e-12)
    assert d["fc1"] * 235200 + d["fc2"] * 30000 + 1000 == pytest.approx(26620, rel=1e-12)
    assert sum(layer_counts(MLP, 0.1, "erk").values()) == 26620


def test_erk_resolve_cascades():
    # Making the smallest layer dense pushes the next one over 1 as well: both end up dense.
    shapes = {"tiny": (2, 2), "small": (4, 4), "big": (200, 200)}
    d = erk_densities(shapes, 0.05)
    assert d["tiny"] == 1.0 and d["small"] == 1.0
    assert d["big"] == pytest.approx((0.05 * (4 + 16 + 40000) - 20) / 40000, rel=1e-12)
    counts = layer_counts(shapes, 0.05, "erk")
    assert counts["tiny"] == 4 and counts["small"] == 16
    assert sum(counts.values()) == math.floor(0.05 * 40020 + 0.5)


def test_erk_conv_uses_all_dims():
    d = erk_densities({"a": (8, 4, 3, 3), "b": (16, 8, 3, 3)}, 0.3)
    ra, rb = (8 + 4 + 3 + 3) / (8 * 4 * 9), (16 + 8 + 3 + 3) / (16 * 8 * 9)
    assert d["a"] / d["b"] == pytest.approx(ra / rb, rel=1e-12)


def test_density_one_is_dense_everywhere():
    assert layer_counts(CNN, 1.0, "erk") == {n: numel(s) for n, s in CNN.items()}


def test_explicit_density_dict():
    counts = layer_counts(MLP, 0.1, {"fc1": 0.05, "fc2": 0.5, "fc3": 1.0})
    assert counts == {"fc1": round(0.05 * 235200), "fc2": 15000, "fc3": 1000}
    with pytest.raises(ValueError, match="missing"):
        layer_counts(MLP, 0.1, {"fc1": 0.5})


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "0.1"])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density"):
        layer_counts(MLP, bad, "erk")


def test_bad_distribution():
    with pytest.raises(ValueError, match="unknown distribution"):
        layer_counts(MLP, 0.1, "er")


# -- schedules -------------------------------------------------------------------------------------------
def test_cosine_drop_fraction_values():
    assert cosine_drop_fraction(0, 0.3, 750) == pytest.approx(0.3)
    assert cosine_drop_fraction(375, 0.3, 750) == pytest.approx(0.15)
    assert cosine_drop_fraction(750, 0.3, 750) == pytest.approx(0.0, abs=1e-15)
    assert cosine_drop_fraction(900, 0.3, 750) == pytest.approx(0.0, abs=1e-15)
    for t in (1, 100, 250, 600):
        assert cosine_drop_fraction(t, 0.3, 750) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 750)))


def test_update_schedule_steps_and_stop():
    s = UpdateSchedule.from_training(update_every=100, stop_at=0.75, total_steps=1000, alpha=0.3)
    assert s.end_step == 750
    assert s.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    assert [t for t in range(1000) if s.is_update_step(t)] == s.update_steps()
    assert s.drop_fraction(200) == pytest.approx(0.15 * (1 + math.cos(math.pi * 200 / 750)))
    c = UpdateSchedule(update_every=10, end_step=50, alpha=0.3, anneal="constant")
    assert c.drop_fraction(40) == 0.3
    assert c.update_steps() == [10, 20, 30, 40]


def test_update_schedule_state_dict_roundtrip():
    s = UpdateSchedule(7, 100, 0.25, "cosine")
    t = UpdateSchedule(1, 1)
    t.load_state_dict(s.state_dict())
    assert t == s


@pytest.mark.parametrize("kwargs,match", [
    (dict(update_every=0, stop_at=0.75, total_steps=10), "update_every"),
    (dict(update_every=1, stop_at=1.5, total_steps=10), "stop_at"),
    (dict(update_every=1, stop_at=0.5, total_steps=0), "total_steps"),
    (dict(update_every=1, stop_at=0.5, total_steps=10, alpha=2.0), "alpha"),
    (dict(update_every=1, stop_at=0.5, total_steps=10, anneal="linear"), "anneal"),
])
def test_update_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateSchedule.from_training(**kwargs)


# -- masks -----------------------------------------------------------------------------------------------
def test_random_mask_exact_count_and_deterministic():
    m = random_mask((30, 7), 61, seed=5)
    assert m.dtype == torch.bool and m.shape == (30, 7) and int(m.sum()) == 61
    assert torch.equal(m, random_mask((30, 7), 61, seed=5))
    assert not torch.equal(m, random_mask((30, 7), 61, seed=6))
    with pytest.raises(ValueError):
        random_mask((3, 3), 10, seed=0)


def test_derive_seed_is_stable():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, s, 3) for s in range(100)}) == 100
    assert 0 <= derive_seed(-5, 2**70) < 2**63


def test_top_n_breaks_ties_towards_lower_index():
    s = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert sorted(top_n(s, 1).tolist()) == [1]
    assert sorted(top_n(s, 2).tolist()) == [1, 3]
    assert sorted(top_n(s, 3).tolist()) == [1, 2, 3]
    assert sorted(top_n(s, 4).tolist()) == [1, 2, 3, 4]
    assert sorted(top_n(s, 0).tolist()) == []
    assert sorted(top_n(s, 9).tolist()) == list(range(7))
    z = torch.zeros(1000)
    assert sorted(top_n(z, 10).tolist()) == list(range(10))
    neg = torch.full((6,), float("-inf"))
    neg[4] = 0.5
    assert sorted(top_n(neg, 2).tolist()) == [0, 4]


def test_mask_checksum_detects_a_moved_weight():
    m = random_mask((50, 40), 200, seed=1)
    a = mask_checksum(m)
    assert a[0] == 200
    on = int(torch.nonzero(m.flatten())[0])
    off = int(torch.nonzero(~m.flatten())[0])
    moved = m.clone().flatten()
    moved[on], moved[off] = False, True
    assert not torch.equal(mask_checksum(moved.view_as(m)), a)
    assert torch.equal(mask_checksum(m.clone()), a)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(2))


def test_default_selection_is_linear_conv_embedding_weights():
    net = _Net()
    names = [n for n, _ in select_parameters(net)]
    assert names == ["emb.weight", "conv.weight", "fc.weight"]
    ddp_like = nn.Sequential(net)  # a wrapper: names keep the wrapper's prefix
    assert [n for n, _ in select_parameters(ddp_like)] == ["0.emb.weight", "0.conv.weight", "0.fc.weight"]


def test_include_callable_and_list():
    net = _Net()
    assert [n for n, _ in select_parameters(net, lambda n, p: p.dim() == 1)] == [
        "scale", "conv.bias", "norm.weight", "norm.bias", "fc.bias", "frozen.bias"]  # named_parameters order
    assert [n for n, _ in select_parameters(net, ["fc.weight", "scale"])] == ["scale", "fc.weight"]
    with pytest.raises(ValueError, match="do not exist"):
        select_parameters(net, ["fc.wieght"])
    with pytest.raises(TypeError, match="single string"):
        select_parameters(net, "fc.weight")
    with pytest.raises(ValueError, match="nothing to sparsify"):
        select_parameters(net, [])
    with pytest.raises(TypeError, match="nn.Module"):
        select_parameters(object())
