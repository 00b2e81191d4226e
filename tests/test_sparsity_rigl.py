"""StaticSparsity / SET / RigL: the update rule, the optimizer hooks, resume parity, and data parallelism
with real processes (gloo, 2 and 3 ranks)."""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsedist.sparsity import SET, RigL, StaticSparsity
from sparsedist.testing import run_distributed


class Tiny(nn.Module):
    """Conv + two Linear layers: 36 + 2048 + 160 sparsifiable weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def batch(step, rank=0, n=8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)  # L2 through the gradient
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decoupled decay
    raise ValueError(name)


def train_step(model, opt, sparse, step, rank=0):
    x, y = batch(step, rank)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sparse.step()


# -- the update rule, by hand ----------------------------------------------------------------------------
def _handmade(opt_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    p = model[0].weight
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam([p], lr=0.1)
    rigl = RigL(model, opt, density=0.5, distribution="uniform", update_every=1, total_steps=10, stop_at=1.0,
                drop_fraction=0.25, drop_fraction_anneal="constant")
    assert rigl.layer_counts == {"0.weight": 8}
    # step 0: an ordinary step, creates the optimizer state
    p.grad = torch.ones(4, 4)
    opt.step()
    rigl.step()
    # hand-set masks, weights, optimizer slots and gradient for the update at step 1
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:8] = True
    with torch.no_grad():
        rigl.masks["0.weight"].copy_(mask.view(4, 4))
        p.copy_(torch.tensor([0.1, -5, 3, -0.05, 2, 4, -6, 1] + [0.0] * 8).view(4, 4))
    slots = [k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape]
    for k in slots:
        opt.state[p][k].fill_(7.0)
    g = torch.full((16,), 0.5)
    g[1] = 100.0  # kept weight: never "grown"
    g[3] = 10.0  # just dropped (|w| = 0.05), regrows and keeps its value and slots
    g[10] = 9.0  # ties with 12: the lower index wins
    g[12] = 9.0
    p.grad = g.view(4, 4).clone()
    return model, p, opt, rigl, slots


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("via_optimizer", [True, False])
def test_rigl_update_rule_by_hand(opt_name, via_optimizer):
    model, p, opt, rigl, slots = _handmade(opt_name)
    assert rigl.is_update_step(1) and rigl.needs_dense_gradient()
    adam_step = opt.state[p].get("step", torch.tensor(-1.0)).clone()
    before = p.detach().clone()
    version = rigl.mask_version
    if via_optimizer:
        opt.step()  # the hook updates the masks and hides the gradients: no weight moves
        assert p.grad is not None and p.grad.view(-1)[3] == 10.0  # gradients are put back
    rigl.step()
    new = rigl.masks["0.weight"].view(-1)
    # dropped: 0 (|w| = 0.1) and 3 (|w| = 0.05); grown: 3 (|g| = 10) and 10 (tie with 12, lower index)
    assert sorted(torch.nonzero(new).flatten().tolist()) == [1, 2, 3, 4, 5, 6, 7, 10]
    assert rigl.mask_version == version + 1
    w = p.detach().view(-1)
    assert w[3] == -0.05  # regrown: keeps its value
    assert w[10] == 0.0 and w[0] == 0.0  # grown starts at 0, dropped is zeroed
    assert torch.equal(w[[1, 2, 4, 5, 6, 7]], before.view(-1)[[1, 2, 4, 5, 6, 7]])  # no weight update
    assert set(slots) >= ({"momentum_buffer"} if opt_name == "sgd" else {"exp_avg", "exp_avg_sq"})
    for k in slots:
        s = opt.state[p][k].view(-1)
        assert s[10] == 0.0  # fresh slots for the new connection
        assert s[3] == 7.0 and s[1] == 7.0  # regrown and kept weights keep theirs
    if opt_name == "adam":
        assert torch.equal(opt.state[p]["step"], adam_step)  # the optimizer state did not advance


def _set_case(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    p = model[0].weight
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    set_ = SET(model, opt, density=0.5, distribution="uniform", update_every=1, total_steps=10, stop_at=1.0,
               drop_fraction=0.25, drop_fraction_anneal="constant", seed=seed)
    assert not set_.needs_dense_gradient()
    p.grad = torch.randn(8, 8)
    opt.step()
    set_.step()  # step 0: ordinary
    old = set_.masks["0.weight"].clone().view(-1)
    w = p.detach().clone().view(-1)
    assert set_.is_update_step(1) and not set_.needs_dense_gradient()  # SET's growth needs no gradient
    p.grad = torch.randn(8, 8)
    opt.step()
    set_.step()  # step 1: update
    return old, w, set_.masks["0.weight"].clone().view(-1), p.detach().clone().view(-1)


def test_set_grows_at_random_among_not_kept():
    old, w, new, after = _set_case(seed=3)
    active = torch.nonzero(old).flatten()
    dropped = active[torch.sort(w[active].abs(), stable=True).indices[:8]]  # floor(0.25 * 32) smallest |w|
    kept = old.clone()
    kept[dropped] = False
    assert int(new.sum()) == 32
    assert new[kept].all()  # everything kept stays
    grown = new & ~kept
    assert int(grown.sum()) == 8
    assert torch.equal(after[kept], w[kept])  # no weight update on the update step
    assert (after[grown & ~old] == 0).all()  # new connections start at zero
    assert torch.equal(after[grown & old], w[grown & old])  # regrown ones keep their value
    # step-keyed randomness: the same seed gives the same masks, another seed other masks
    assert torch.equal(_set_case(seed=3)[2], new)
    assert not torch.equal(_set_case(seed=4)[2], new)


# -- invariants over a run, single process ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [StaticSparsity, SET, RigL])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_invariants_every_step(cls, opt_name):
    torch.manual_seed(0)
    model = Tiny()
    opt = make_opt(opt_name, model.parameters())
    kw = {} if cls is StaticSparsity else dict(update_every=3, total_steps=30, stop_at=0.75, drop_fraction=0.5)
    sp = cls(model, opt, density=0.2, **kw)
    counts = sp.layer_counts
    assert sum(counts.values()) == round(0.2 * (36 + 2048 + 160))
    params = dict(model.named_parameters())
    ever = {n: m.clone() for n, m in sp.masks.items()}
    versions = []
    for t in range(30):
        assert sp.needs_dense_gradient() == (cls is RigL and t in (3, 6, 9, 12, 15, 18, 21))
        train_step(model, opt, sp, t)
        for n, m in sp.masks.items():
            assert int(m.sum()) == counts[n], (t, n)  # exact count after every step
            off = params[n].detach()[~m]
            assert torch.equal(off, torch.zeros_like(off)) and not torch.signbit(off).any(), (t, n)
            ever[n] |= m
            # gradients are masked before the optimizer runs: no momentum / moment ever builds up at positions
            # that were never active
            for k, v in opt.state[params[n]].items():
                if torch.is_tensor(v) and v.shape == m.shape:
                    assert (v[~ever[n]] == 0).all(), (t, n, k)
        versions.append(sp.mask_version)
    if cls is StaticSparsity:
        assert versions == [0] * 30
    else:
        changed_at = [t for t in range(30) if versions[t] != (versions[t - 1] if t else 0)]
        assert changed_at[:3] == [3, 6, 9] and set(changed_at) <= {3, 6, 9, 12, 15, 18, 21}, changed_at
        assert versions[-1] == len(changed_at)  # nothing from stop_at * total_steps = 22 on


def test_default_names_and_mask_of():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = StaticSparsity(model, opt, density=0.5)
    assert list(sp.masks) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert sp.mask_of(model.fc1.weight) is sp.masks["fc1.weight"]
    assert sp.mask_of(model.fc1.bias) is None
    assert sp.mask_of(torch.nn.Parameter(torch.zeros(32, 64))) is None
    assert sp.masks["fc1.weight"].dtype == torch.bool and sp.masks["fc1.weight"].shape == (32, 64)


def test_bad_arguments():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        RigL(model, opt, density=0.1)
    with pytest.raises(TypeError, match="Optimizer"):
        RigL(model, None, density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="density"):
        RigL(model, opt, density=0.0, total_steps=10)
    with pytest.raises(ValueError, match="update_every"):
        RigL(model, opt, density=0.1, total_steps=10, update_every=0)
    sp = RigL(model, opt, density=0.1, total_steps=10)
    state = sp.state_dict()
    state["masks"] = {"fc1.weight": state["masks"]["fc1.weight"]}
    with pytest.raises(ValueError, match="mask names differ"):
        sp.load_state_dict(state)


def test_sparse_gradient_is_refused_by_name():
    """A masked parameter with a sparse gradient (Embedding(sparse=True)) after another masked parameter: the
    error names it (it used to be lost to a tensor comparison inside the error message's own lookup)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4, sparse=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    StaticSparsity(model, opt, density=0.5)
    model[1](torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"parameter '1\.weight' has a sparse gradient"):
        opt.step()


# -- resume parity ---------------------------------------------------------------------------------------
def _build(cls, opt_name, init_seed):
    torch.manual_seed(init_seed)
    model = Tiny()
    opt = make_opt(opt_name, model.parameters())
    sp = cls(model, opt, density=0.2, update_every=3, total_steps=24, stop_at=0.75, drop_fraction=0.5, seed=11)
    return model, opt, sp


@pytest.mark.parametrize("cls", [SET, RigL])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_resume_reproduces_uninterrupted_run(cls, opt_name):
    model, opt, sp = _build(cls, opt_name, 0)
    for t in range(24):
        train_step(model, opt, sp, t)
    model_a, opt_a, sp_a = _build(cls, opt_name, 0)
    for t in range(12):
        train_step(model_a, opt_a, sp_a, t)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sparse": sp_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_b, opt_b, sp_b = _build(cls, opt_name, 123)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sp_b.load_state_dict(ckpt["sparse"])
    assert sp_b.step_count == 12
    for t in range(12, 24):
        train_step(model_b, opt_b, sp_b, t)
    assert sp.mask_version > 0
    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n
    for n in sp.masks:
        assert torch.equal(sp.masks[n], sp_b.masks[n]), n


# -- data parallel (real processes) ----------------------------------------------------------------------
def _ddp_worker(rank, world_size):
    from sparsedist.sparsity.masks import mask_checksum

    out = {}
    for opt_name in ("sgd", "adam", "adamw"):
        torch.manual_seed(rank)  # different init per rank: DDP broadcasts rank 0's parameters
        model = Tiny()
        ddp = DDP(model)
        opt = make_opt(opt_name, ddp.parameters())
        rigl = RigL(ddp, opt, density=0.3, update_every=4, total_steps=40, stop_at=0.75, drop_fraction=0.5)
        assert list(rigl.masks) == ["module.conv.weight", "module.fc1.weight", "module.fc2.weight"]
        assert rigl.mask_of(model.fc1.weight) is rigl.masks["module.fc1.weight"]  # by identity
        counts = rigl.layer_counts
        params = dict(ddp.named_parameters())
        record, grown_total = [], 0
        for t in range(40):
            x, y = batch(t, rank)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            due = rigl.is_update_step(t)
            assert rigl.needs_dense_gradient() == due
            before = {n: p.detach().clone() for n, p in params.items()}
            old = {n: m.clone() for n, m in rigl.masks.items()}
            steps_before = {n: opt.state[p]["step"].clone() for n, p in params.items() if "step" in opt.state[p]}
            opt.step()
            rigl.step()
            for n, m in rigl.masks.items():
                assert int(m.sum()) == counts[n], (opt_name, t, n)
                off = params[n].detach()[~m]
                assert torch.equal(off, torch.zeros_like(off)), (opt_name, t, n)
            if due:
                for n, p in params.items():
                    if n in rigl.masks:  # no weight update: kept and regrown keep values, the rest is 0
                        expect = before[n].masked_fill(~rigl.masks[n], 0)
                        grown = rigl.masks[n] & ~old[n]
                        grown_total += int(grown.sum())
                        for k, v in opt.state[p].items():
                            if torch.is_tensor(v) and v.shape == p.shape:
                                assert (v[grown] == 0).all(), (opt_name, t, n, k)
                    else:
                        expect = before[n]
                    assert torch.equal(p.detach(), expect), (opt_name, t, n)
                for n, s in steps_before.items():
                    assert torch.equal(opt.state[params[n]]["step"], s)
            record.append((rigl.mask_version, [mask_checksum(m).tolist() for m in rigl.masks.values()]))
        assert grown_total > 0
        versions = [v for v, _ in record]
        changed_at = [t for t in range(40) if versions[t] != (versions[t - 1] if t else 0)]
        assert changed_at[:3] == [4, 8, 12] and set(changed_at) <= {4, 8, 12, 16, 20, 24, 28}, changed_at
        out[opt_name] = (record, {n: p.detach().clone() for n, p in params.items()})
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_masks_identical_and_invariants(world_size):
    results = run_distributed(_ddp_worker, world_size, timeout=180)
    for opt_name in ("sgd", "adam", "adamw"):
        rec0, params0 = results[0][opt_name]
        for r in range(1, world_size):
            rec, params = results[r][opt_name]
            assert rec == rec0, (opt_name, r)  # identical masks after every step
            for n in params0:
                assert torch.equal(params[n], params0[n]), (opt_name, r, n)


def _divergence_worker(rank, world_size):
    out = {}

    def fresh(**kw):
        torch.manual_seed(0)  # identical weights on every rank, no DDP
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay identical; gradients differ per rank
        return model, opt, RigL(model, opt, density=0.3, update_every=1, total_steps=10, stop_at=1.0, **kw)

    # 1. not DDP: RigL averages the gradients itself, so different local gradients still give identical masks
    model, opt, rigl = fresh()
    for t in range(3):
        train_step(model, opt, rigl, t, rank)
    out["averaged_version"] = rigl.mask_version
    rigl.remove()
    # 2. without averaging, the local gradients differ: the checksum catches it on every rank
    model, opt, rigl = fresh(average_gradients=False)
    train_step(model, opt, rigl, 0, rank)
    try:
        train_step(model, opt, rigl, 1, rank)
        out["unaveraged"] = None
    except RuntimeError as e:
        out["unaveraged"] = str(e)
    rigl.remove()
    # 3. one rank's mask perturbed (same count, one weight moved): verify_masks names the layer
    model, opt, rigl = fresh()
    if rank == 1:
        m = rigl.masks["fc1.weight"].view(-1)
        on, off = int(m.nonzero()[0]), int((~m).nonzero()[0])
        m[on], m[off] = False, True
    try:
        rigl.verify_masks()
        out["perturbed"] = None
    except RuntimeError as e:
        out["perturbed"] = str(e)
    dist.barrier()
    return out


def test_divergence_is_detected_on_every_rank():
    results = run_distributed(_divergence_worker, 2, timeout=120)
    assert results[0]["averaged_version"] == results[1]["averaged_version"] == 2
    for r in range(2):
        msg = results[r]["unaveraged"]
        assert msg is not None and "masks differ across ranks at step 1" in msg, msg
        msg = results[r]["perturbed"]
        assert msg is not None and "layer 'fc1.weight'" in msg and "rank 1" in msg, msg
