"""Pruning, one process: the cubic schedule, scores and budgets, gradual magnitude pruning, prune-retrain with
its rewinding options, dead-neuron removal, state dicts (resume parity)."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import sparsedist
from sparsedist.sparsity import (GradualMagnitudePruning, PruneRetrain, PruningSchedule, cubic_sparsity,
                                 find_layer_pairs, nm_mask, prune_masks, prune_model, remove_dead_neurons,
                                 weight_scores)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))


def batch(step, n=16):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def train(model, opt, sparse, steps, start=0):
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparse.step()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def weights(model):
    return {n: m.weight for n, m in linears(model).items()}


def check_resume(fresh, total, split):
    """Train ``total`` steps at once, and ``split`` steps, save (torch.save), load into fresh objects and train the
    rest: the parameters must be equal. Returns (uninterrupted objects, the saved sparsity state, resumed objects)."""
    model, opt, sparse = fresh()
    train(model, opt, sparse, total)
    model2, opt2, sparse2 = fresh()
    train(model2, opt2, sparse2, split)
    buf = io.BytesIO()
    torch.save({"m": model2.state_dict(), "o": opt2.state_dict(), "s": sparse2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model3, opt3, sparse3 = fresh()
    model3.load_state_dict(saved["m"])
    opt3.load_state_dict(saved["o"])
    sparse3.load_state_dict(saved["s"])
    train(model3, opt3, sparse3, total - split, start=split)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    return (model, opt, sparse), saved["s"], (model3, opt3, sparse3)


# -- the cubic schedule ----------------------------------------------------------------------------------
def test_cubic_schedule_matches_zhu_and_gupta():
    s = PruningSchedule(final_sparsity=0.9, begin_step=100, end_step=400, frequency=100)
    assert s.prune_steps() == [100, 200, 300, 400]
    for t in (100, 200, 300, 400):
        assert s.sparsity(t) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - (t - 100) / 300) ** 3)
    assert s.sparsity(0) == 0.0 and s.sparsity(10_000) == pytest.approx(0.9)
    assert [s.is_prune_step(t) for t in (99, 100, 150, 400, 500)] == [False, True, False, True, False]
    # end_step not on the grid: it is still a pruning step, so s_f is reached
    odd = PruningSchedule(final_sparsity=0.5, begin_step=0, end_step=250, frequency=100)
    assert odd.prune_steps() == [0, 100, 200, 250] and odd.sparsity(250) == pytest.approx(0.5)
    # most of the pruning happens early: the cubic's slope is steepest at t_0
    assert s.sparsity(200) - s.sparsity(100) > s.sparsity(400) - s.sparsity(300)
    assert cubic_sparsity(5, 0.2, 0.8, 5, 5) == 0.8
    for bad in (dict(final_sparsity=1.0), dict(end_step=50), dict(frequency=0), dict(initial_sparsity=0.95)):
        kw = dict(final_sparsity=0.9, begin_step=100, end_step=400, frequency=100) | bad
        with pytest.raises(ValueError):
            PruningSchedule(**kw)


# -- scores and budgets ----------------------------------------------------------------------------------
def test_scores_and_the_three_budgets():
    torch.manual_seed(1)
    ws = [torch.randn(20, 30) * 3, torch.randn(10, 20), torch.randn(5, 10) * 0.1]
    names = ["a", "b", "c"]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    scores = [weight_scores("magnitude", w) for w in ws]
    total = sum(w.numel() for w in ws)
    uni = prune_masks(scores, masks, names, 0.2, "uniform")
    assert [int(m.sum()) for m in uni] == [120, 40, 10]
    for w, m in zip(ws, uni):  # each layer keeps its largest |w|
        assert w.abs()[m].min() >= w.abs()[~m].max()
    glob = prune_masks(scores, masks, names, 0.2, "global")
    assert sum(int(m.sum()) for m in glob) == round(0.2 * total)
    kept = torch.cat([w.abs()[m] for w, m in zip(ws, glob)])
    dropped = torch.cat([w.abs()[~m] for w, m in zip(ws, glob)])
    assert kept.min() >= dropped.max()  # one threshold over all layers
    assert int(glob[2].sum()) == 0  # the small-weight layer is emptied: the known risk of a global threshold
    erk = prune_masks(scores, masks, names, 0.2, "erk")
    assert sum(int(m.sum()) for m in erk) == round(0.2 * total)
    assert erk[2].float().mean() > uni[2].float().mean()  # ERK gives the small layer more
    # a second pruning only removes; already pruned positions never come back, even with high scores
    again = prune_masks([s + 100 * (~m) for s, m in zip(scores, uni)], uni, names, 0.1, "uniform")
    assert all(bool((a & ~m).sum() == 0) for a, m in zip(again, uni))
    # taylor is |w * g|; random is keyed by (seed, step, layer)
    g = torch.randn(20, 30)
    assert torch.equal(weight_scores("taylor", ws[0], g), (ws[0] * g).abs())
    r1 = weight_scores("random", ws[0], seed=3, step=7, layer=1)
    assert torch.equal(r1, weight_scores("random", ws[0], seed=3, step=7, layer=1))
    assert not torch.equal(r1, weight_scores("random", ws[0], seed=3, step=8, layer=1))
    with pytest.raises(ValueError, match="taylor"):
        weight_scores("taylor", ws[0])
    with pytest.raises(ValueError, match="unknown budget"):
        prune_masks(scores, masks, names, 0.2, "layerwise")


def test_prune_model_one_shot_and_nm_masks():
    model = mlp()
    masks = prune_model(model, 0.25, budget="uniform")
    for n, w in weights(model).items():
        m = masks[f"{n}.weight"]
        assert int(m.sum()) == round(0.25 * w.numel()) and bool((w[~m] == 0).all())
    w = torch.tensor([[0.1, -3.0, 2.0, 0.2, 1.0, 1.0, 1.0, -5.0]])
    assert nm_mask(w).tolist() == [[False, True, True, False, True, False, False, True]]  # ties to the lower index
    big = torch.randn(16, 32)
    assert bool((nm_mask(big).view(16, 8, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="groups 4 consecutive"):
        nm_mask(torch.randn(4, 6))


# -- gradual magnitude pruning ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["uniform", "erk", "global"])
def test_gmp_follows_the_schedule_and_keeps_pruned_weights_at_zero(budget):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gmp = GradualMagnitudePruning(model, opt, 0.8, begin_step=2, end_step=10, frequency=2, budget=budget)
    prev = {n: m.clone() for n, m in gmp.masks.items()}
    total = sum(m.numel() for m in prev.values())
    for t in range(14):
        assert gmp.needs_dense_gradient() == (t in (2, 4, 6, 8, 10))
        train(model, opt, gmp, 1, start=t)
        active = sum(int(m.sum()) for m in gmp.masks.values())
        last = max([s for s in gmp.prune_steps() if s <= t], default=0)  # s_t holds between pruning steps
        expected = math.floor((1 - gmp.schedule.sparsity(last)) * total + 0.5)
        assert active == expected or budget == "uniform" and abs(active - expected) <= 2
        for n, m in gmp.masks.items():
            assert not bool((m & ~prev[n]).any()), "a pruned weight came back"
            p = dict(model.named_parameters())[n]
            assert bool((p[~m] == 0).all())
            buf = opt.state[p]["momentum_buffer"]
            assert bool((buf[~m] == 0).all()), "momentum of pruned weights must be zeroed"
            prev[n] = m.clone()
    assert gmp.active_fraction == pytest.approx(0.2, abs=2e-3)
    assert gmp.mask_version == 4  # step 2 prunes to s_i = 0: nothing changes


def test_gmp_uniform_prunes_every_layer_to_the_same_sparsity_and_taylor_scores_use_gradients():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = GradualMagnitudePruning(model, opt, 0.75, begin_step=0, end_step=0, frequency=1, budget="uniform")
    train(model, opt, gmp, 1)
    assert {n: round(m.float().mean().item(), 2) for n, m in gmp.masks.items()} == \
        {n: 0.25 for n in gmp.masks}
    # taylor: the score is |w * g| averaged over the window; with one step it is this step's |w * g|
    model = mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gmp = GradualMagnitudePruning(model, opt, 0.5, begin_step=0, end_step=0, frequency=1, budget="global",
                                  score="taylor")
    x, y = batch(0)
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = prune_masks([(w * w.grad).abs() for w in weights(ref).values()],
                           [torch.ones_like(w, dtype=torch.bool) for w in weights(ref).values()],
                           list(weights(ref)), 0.5, "global")
    train(model, opt, gmp, 1)
    for m, e in zip(gmp.masks.values(), expected):
        assert torch.equal(m, e)


def test_gmp_resume_from_state_dict_is_exact():
    def fresh():
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, GradualMagnitudePruning(model, opt, 0.9, begin_step=3, end_step=12, frequency=3,
                                                   budget="erk", score="taylor")
    (model, opt, gmp), saved, (model3, opt3, gmp3) = check_resume(fresh, 16, 8)
    assert saved["taylor"]["steps"] == 1  # saved within the window 7..9 of pruning step 9
    assert gmp3.step_count == 16 and gmp3.mask_version >= 1
    assert "GradualMagnitudePruning" in repr(gmp3) and "budget='erk'" in repr(gmp3)


def test_gmp_rejects_bad_arguments():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown score"):
        GradualMagnitudePruning(model, opt, 0.9, begin_step=0, end_step=10, score="hessian")
    with pytest.raises(ValueError, match="end_step"):
        GradualMagnitudePruning(model, opt, 0.9, begin_step=10, end_step=5)
    with pytest.raises(TypeError, match="budget"):
        GradualMagnitudePruning(model, opt, 0.9, begin_step=0, end_step=10, budget=0.5)


# -- prune-retrain ---------------------------------------------------------------------------------------
def _pr(weights_mode, rounds=1, **kw):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pr = PruneRetrain(model, opt, 0.75, train_steps=6, retrain_steps=4, rounds=rounds, weights=weights_mode,
                      lr_schedule=lambda t: 1.0 / (1 + t), remove_dead=False, **kw)
    return model, opt, pr


def test_prune_retrain_timeline_lr_rewinding_and_kept_weights():
    model, opt, pr = _pr("keep", rounds=2)
    assert pr.prune_steps() == [6, 10] and pr.total_steps == 14
    assert [pr.target_density(t) for t in (6, 10)] == pytest.approx([0.5, 0.25])
    lrs = []
    for t in range(14):
        if t == 6:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, opt, pr, 1, start=t)
        lrs.append(opt.param_groups[0]["lr"])
        if t == 6:  # pruning step: no update; the survivors keep their trained values exactly
            for n, p in model.named_parameters():
                m = pr.masks.get(n)
                keep = torch.ones_like(p, dtype=torch.bool) if m is None else m
                assert torch.equal(p[keep], before[n][keep])
                assert bool((p[~keep] == 0).all())
    assert lrs[:6] == pytest.approx([0.1 / (1 + t) for t in range(6)])
    assert lrs[6:10] == pytest.approx([0.1 / (1 + t) for t in range(4)])  # replayed from rewind_step 0
    assert pr.active_fraction == pytest.approx(0.25, abs=1e-3)
    _, opt2, fixed = _pr("keep", retrain_lr=0.1)
    train(fixed._model, opt2, fixed, 8)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)


def test_weight_rewinding_and_reinit():
    model, opt, pr = _pr("rewind", rewind_step=2)
    train(model, opt, pr, 2)
    at2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, pr, 5, start=2)  # through the pruning step 6
    for n, p in model.named_parameters():
        m = pr.masks.get(n, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p[m], at2[n][m]) and bool((p[~m] == 0).all())
    assert len(opt.state) == 0  # optimizer state cleared with the rewind
    model, opt, pr = _pr("reinit", seed=5)
    train(model, opt, pr, 7)
    reinit = {n: p.detach().clone() for n, p in model.named_parameters()}
    model2, opt2, pr2 = _pr("reinit", seed=5)
    train(model2, opt2, pr2, 7)
    for n, p in model2.named_parameters():  # same seed: same re-initialisation
        assert torch.equal(p, reinit[n])
    first = mlp()
    assert not torch.equal(dict(first.named_parameters())["1.bias"], reinit["1.bias"])
    with pytest.raises(ValueError, match="rewind_step"):
        _pr("rewind", rewind_step=7)


# -- dead neurons ----------------------------------------------------------------------------------------
def test_dead_neuron_removal_keeps_the_function_exactly():
    model = mlp()
    model.eval()
    pairs = find_layer_pairs(model)
    assert [(p.producer, p.consumer) for p in pairs] == [("1", "3"), ("3", "5")]
    masks = {f"{n}.weight": torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.3
             for n, m in linears(model).items()}
    masks["1.weight"][[0, 5]] = False  # neurons 0 and 5 of layer 1: no inputs (constant relu(bias))
    masks["3.weight"][:, 7] = False  # neuron 7 of layer 1: no outputs
    masks["5.weight"][:, 2] = False  # neuron 2 of layer 3: no outputs
    with torch.no_grad():
        model[1].bias[0] = 0.7  # a positive bias: relu passes it, so it must be folded into layer 3's bias
        model[1].bias[5] = -0.4
        for n, m in linears(model).items():
            m.weight.mul_(masks[f"{n}.weight"])
    x = torch.randn(64, 1, 6, 6)
    want = model(x)
    new, removed = remove_dead_neurons(model, masks, pairs)
    with torch.no_grad():
        for n, m in linears(model).items():
            m.weight.mul_(new[f"{n}.weight"])
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert not new["3.weight"][:, [0, 5]].any() and not new["1.weight"][7].any() and not new["3.weight"][2].any()
    assert removed == {"1": 3, "3": 1}
    for n in masks:
        assert not bool((new[n] & ~masks[n]).any())


def test_state_dict_validation_names_the_problem():
    model, opt, pr = _pr("rewind")
    state = pr.state_dict()
    state["snapshot"] = {"nope": torch.zeros(1)}
    with pytest.raises(ValueError, match="snapshot"):
        _pr("rewind")[2].load_state_dict(state)
    assert sparsedist.PruneRetrain is PruneRetrain and sparsedist.GradualMagnitudePruning is GradualMagnitudePruning


def test_prune_retrain_resume_from_state_dict_is_exact():
    def fresh():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pr = PruneRetrain(model, opt, 0.8, train_steps=6, retrain_steps=4, rounds=2, weights="rewind", rewind_step=3,
                          lr_schedule=lambda t: 1.0 / (1 + t), score="taylor", score_window=3)
        return model, opt, pr
    (model, opt, pr), saved, (model3, opt3, pr3) = check_resume(fresh, 14, 8)
    assert saved["snapshot"] is not None and saved["step"] == 8  # after the first pruning; snapshot of step 3
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_prune_retrain_on_an_untraceable_model_says_what_to_do():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="remove_dead=False"):
        PruneRetrain(model, opt, 0.5, train_steps=2, retrain_steps=2)
    pr = PruneRetrain(model, opt, 0.5, train_steps=2, retrain_steps=2, remove_dead=False)
    assert pr.prune_steps() == [2]
