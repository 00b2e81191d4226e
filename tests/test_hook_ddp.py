"""The DDP hook with real processes over gloo, at 1, 2 and 3 ranks.

Scenarios are batched into one spawn per world size (spawning costs seconds); each returns plain data and the
assertions run in the parent.
"""

import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives.wire import payload_bytes
from sparsedist.testing import run_distributed

CONFIGS = [
    ("topk", {"density": 0.05}),
    ("topk", {"density": 0.05, "mode": "sampled"}),
    ("topk", {"density": 0.05, "granularity": "bucket"}),
    ("topk", {"density": 0.05, "value_dtype": "float16", "dense_below": 100}),
    ("threshold", {"threshold": 0.01}),
    ("threshold", {"threshold": 0.01, "quantize": False}),
    ("randk", {"density": 0.1}),
    ("randk", {"density": 0.1, "variant": "wangni"}),
    ("dgc", {"density": 0.05, "momentum": 0.9, "warmup_steps": 2, "clip_norm": 5.0}),
    ("variance", {"alpha": 1.0}),
    ("topk", {"density": 0.05, "error_feedback": False}),
]


class Net(nn.Module):
    def __init__(self, unused=False, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)
        self.unused = nn.Linear(32, 32) if unused else None
        self.to(dtype)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(rank, steps, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(n, 12, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def _flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _train(rank, compressor=None, opts=None, steps=4, ddp_kwargs=None, dtype=torch.float32, micro=1,
           unused=False, optimizer_momentum=0.0):
    model = Net(unused=unused, dtype=dtype)
    ddp = DDP(model, bucket_cap_mb=0.002, **(ddp_kwargs or {}))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=optimizer_momentum)
    state = None
    if compressor is not None:
        opts = dict(opts or {})
        if compressor == "dgc":
            opts["optimizer"] = opt
        state = sparsedist.register(ddp, compressor, **opts)
    for x, y in _batches(rank, steps * micro, dtype):
        pass
    data = _batches(rank, steps * micro, dtype)
    for s in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x, y = data[s * micro + m]
            if m < micro - 1:
                with ddp.no_sync():
                    nn.functional.cross_entropy(ddp(x).float(), y).backward()
            else:
                nn.functional.cross_entropy(ddp(x).float(), y).backward()
        opt.step()
    return _flat(model), (state.stats() if state is not None else None), state


# --------------------------------------------------------------------------------------------------------------
# scenarios


def sc_parity(rank, ws):
    ref = _train(rank)[0]
    none = _train(rank, "none")[0]
    full = _train(rank, "topk", {"density": 1.0})[0]
    return {"ref": ref, "none": none, "full": full}


def sc_identical(rank, ws):
    out = {}
    for i, (name, opts) in enumerate(CONFIGS):
        flat, stats, _ = _train(rank, name, opts)
        out[i] = (flat, stats)
    return out


def sc_contract(rank, ws):
    """no_sync, gradient_as_bucket_view, find_unused_parameters, static_graph: density 1.0 equals plain DDP."""
    out = {}
    variants = {
        "no_sync": dict(micro=2),
        "bucket_view": dict(ddp_kwargs={"gradient_as_bucket_view": True}),
        "unused": dict(ddp_kwargs={"find_unused_parameters": True}, unused=True),
        "static": dict(ddp_kwargs={"static_graph": True}),
    }
    for label, kw in variants.items():
        ref = _train(rank, **kw)[0]
        full = _train(rank, "topk", {"density": 1.0}, **kw)[0]
        sparse, stats, _ = _train(rank, "topk", {"density": 0.1}, **kw)
        out[label] = (ref, full, sparse, stats["steps"])
    return out


def sc_lowp(rank, ws):
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        for name, opts in (("topk", {"density": 0.1}), ("threshold", {"threshold": 0.01}), ("randk", {"density": 0.1})):
            flat, stats, state = _train(rank, name, opts, dtype=dtype)
            res_dtypes = {str(r.dtype) for r in state.feedback.residuals.values()}
            out[(str(dtype), name)] = (flat, bool(torch.isfinite(flat).all()), res_dtypes)
    return out


def sc_bytes(rank, ws):
    """stats() byte counts equal the encoded payload sizes (one bucket, so the count is exact)."""
    out = {}
    for name, opts in (("topk", {"density": 0.1}), ("threshold", {"threshold": 0.02}), ("randk", {"density": 0.1})):
        model = Net()
        ddp = DDP(model, bucket_cap_mb=100)
        state = sparsedist.register(ddp, name, **opts)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        per_step = []
        for x, y in _batches(rank, 3):
            opt.zero_grad()
            before = state.stats()["bytes_sent"]
            nn.functional.cross_entropy(ddp(x), y).backward()
            s = state.stats()
            nnz = round(s["last_density"] * sum(p.numel() for p in model.parameters()))
            per_step.append((s["bytes_sent"] - before, nnz, s["bytes_received"]))
            opt.step()
        sizes = [p.numel() for p in model.parameters()]
        out[name] = (per_step, sizes, state.stats())
    return out


class Linear1(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, c):
        return (self.w * c).sum()


def sc_mass(rank, ws):
    """Error feedback conserves gradient mass: P*(w0 - wT)/lr + sum_r residual_r = sum_r sum_t g_r,t."""
    out = {}
    for name, opts in (("topk", {"density": 0.05}), ("threshold", {"threshold": 0.8}),
                       ("randk", {"density": 0.05})):  # (Wangni's rand-k runs without error feedback)
        model = Linear1(300)
        ddp = DDP(model)
        state = sparsedist.register(ddp, name, **opts)
        opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
        g = torch.Generator().manual_seed(7 + rank)
        raw = torch.zeros(300)
        for t in range(6):
            c = torch.randn(300, generator=g) * (1 + rank)
            raw += c
            opt.zero_grad()
            ddp(c).backward()
            opt.step()
        residual = state.feedback.residuals["w"].clone()
        out[name + str(opts.get("variant", ""))] = (-model.w.detach().clone(), residual, raw)
    return out


def sc_zero_count(rank, ws):
    """Threshold steps where one rank, or every rank, sends nothing: no hang, ranks stay identical."""
    model = Linear1(200)
    ddp = DDP(model)
    state = sparsedist.register(ddp, "threshold", threshold=1.0)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(3)
    densities = []
    for t in range(5):
        scale = 0.0 if (t < 2 or rank == 0) else 3.0  # steps 0-1: nobody sends; later rank 0 never does
        c = torch.randn(200, generator=g) * scale
        opt.zero_grad()
        ddp(c).backward()
        opt.step()
        densities.append(state.stats()["last_density"])
    return model.w.detach().clone(), densities


def sc_overflow(rank, ws):
    """A non-finite gradient on one rank: GradScaler skips the step everywhere, residuals are not poisoned."""
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    state = sparsedist.register(ddp, "topk", density=0.1, grad_scaler=scaler)
    log = []
    for t, (x, y) in enumerate(_batches(rank, 4)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        if t == 2 and rank == ws - 1:
            loss = loss * float("inf")
        res_before = {k: v.clone() for k, v in state.feedback.residuals.items()}
        params_before = _flat(model)
        scale_before = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        res_same = all(torch.equal(res_before[k], state.feedback.residuals[k]) for k in res_before)
        log.append((torch.equal(params_before, _flat(model)), res_same, scale_before, scaler.get_scale(),
                    all(bool(torch.isfinite(r).all()) for r in state.feedback.residuals.values())))
    return _flat(model), log, state.stats()["overflow_steps"]


def sc_state(rank, ws):
    """Pickling without the process group; state_dict round trip by parameter name; resume equals straight run."""
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = sparsedist.register(ddp, "dgc", density=0.1, optimizer=opt)
    data = _batches(rank, 6)
    for x, y in data[:3]:
        opt.zero_grad(); nn.functional.cross_entropy(ddp(x), y).backward(); opt.step()
    blob = pickle.dumps(state)
    restored = pickle.loads(blob)
    sd = state.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    for x, y in data[3:]:
        opt.zero_grad(); nn.functional.cross_entropy(ddp(x), y).backward(); opt.step()
    straight = _flat(model)

    model2 = Net()
    model2.load_state_dict(saved_model)
    ddp2 = DDP(model2, bucket_cap_mb=0.002)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    state2 = sparsedist.register(ddp2, "dgc", density=0.1, optimizer=opt2)
    state2.load_state_dict(sd)
    for x, y in data[3:]:
        opt2.zero_grad(); nn.functional.cross_entropy(ddp2(x), y).backward(); opt2.step()
    names = sorted(sd["feedback"]["residuals"])
    return straight, _flat(model2), names, restored.options.process_group is None, restored.step


def sc_errors(rank, ws):
    """Bad input raises at construction, naming the option."""
    model = Net()
    ddp = DDP(model)
    msgs = {}
    cases = {
        "unknown_compressor": lambda: sparsedist.register(ddp, "topkk"),
        "unknown_option": lambda: sparsedist.register(ddp, "topk", densty=0.1),
        "bad_density": lambda: sparsedist.register(ddp, "topk", density=0.0),
        "nan_density": lambda: sparsedist.register(ddp, "topk", density=float("nan")),
        "negative_threshold": lambda: sparsedist.register(ddp, "threshold", threshold=-1),
        "dgc_without_optimizer": lambda: sparsedist.register(ddp, "dgc", density=0.01),
        "dgc_with_momentum": lambda: sparsedist.register(
            ddp, "dgc", density=0.01, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
        "not_ddp": lambda: sparsedist.register(model, "topk"),
        "bad_granularity": lambda: sparsedist.register(ddp, "topk", granularity="row"),
    }
    for label, fn in cases.items():
        try:
            fn()
            msgs[label] = None
        except (TypeError, ValueError) as exc:
            msgs[label] = f"{type(exc).__name__}: {exc}"
    # momentum switched on after registration is caught before the next optimizer step
    ddp2 = DDP(Net())
    opt = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    sparsedist.register(ddp2, "dgc", density=0.1, optimizer=opt)
    opt.param_groups[0]["momentum"] = 0.9
    x, y = _batches(rank, 1)[0]
    nn.functional.cross_entropy(ddp2(x), y).backward()
    try:
        opt.step()
        msgs["late_momentum"] = None
    except ValueError as exc:
        msgs["late_momentum"] = str(exc)
    return msgs


SCENARIOS = {f.__name__: f for f in (sc_parity, sc_identical, sc_contract, sc_lowp, sc_bytes, sc_mass,
                                     sc_zero_count, sc_overflow, sc_state, sc_errors)}


def run_scenarios(rank, ws, names):
    return {n: SCENARIOS[n](rank, ws) for n in names}


@pytest.fixture(scope="module")
def two():
    return run_distributed(run_scenarios, 2, args=(list(SCENARIOS),), timeout=400)


@pytest.fixture(scope="module")
def three():
    names = ["sc_parity", "sc_identical", "sc_bytes", "sc_mass", "sc_zero_count", "sc_overflow"]
    return run_distributed(run_scenarios, 3, args=(names,), timeout=400)


@pytest.fixture(params=["two", "three"])
def results(request):
    return request.getfixturevalue(request.param)


def test_none_is_plain_ddp_and_density_one_matches(results):
    for r in results:
        p = r["sc_parity"]
        assert torch.equal(p["none"], p["ref"]), "compressor 'none' must give plain DDP's parameters exactly"
        torch.testing.assert_close(p["full"], p["ref"], rtol=1e-6, atol=1e-6)


def test_every_configuration_keeps_ranks_identical(results):
    for i, (name, opts) in enumerate(CONFIGS):
        flats = [r["sc_identical"][i][0] for r in results]
        for f in flats[1:]:
            assert torch.equal(flats[0], f), f"ranks diverged with {name} {opts}"
        assert torch.isfinite(flats[0]).all()
        stats = results[0]["sc_identical"][i][1]
        assert stats["steps"] == 4
        for key in ("steps", "bytes_sent", "bytes_received", "bytes_dense", "density", "residual_norm"):
            assert key in stats
        if opts.get("error_feedback") is False or opts.get("variant") == "wangni":  # no error feedback
            assert stats["residual_norm"] == 0.0
        else:
            assert stats["residual_norm"] > 0.0
        assert 0 < stats["density"] < 1 or name in ("threshold", "variance")


def test_sparse_training_differs_from_dense(two):
    """A guard against a hook that silently sends everything: top-k at 5% must not equal dense DDP."""
    ref = two[0]["sc_parity"]["ref"]
    assert not torch.allclose(two[0]["sc_identical"][0][0], ref)


def test_hook_contract_variants(two):
    for label in ("no_sync", "bucket_view", "unused", "static"):
        per_rank = [r["sc_contract"][label] for r in two]
        for ref, full, sparse, steps in per_rank:
            torch.testing.assert_close(full, ref, rtol=1e-6, atol=1e-6, msg=f"density 1.0 != DDP under {label}")
            assert steps == 4
        assert torch.equal(per_rank[0][2], per_rank[1][2]), f"ranks diverged under {label}"


def test_half_precision_gradients(two):
    for key, (flat, finite, res_dtypes) in two[0]["sc_lowp"].items():
        assert finite, key
        assert torch.equal(flat, two[1]["sc_lowp"][key][0]), key
        assert res_dtypes <= {"torch.float32"}, f"residuals of half gradients are kept in fp32: {key} {res_dtypes}"


def test_stats_bytes_equal_encoded_payload_sizes(results):
    world = len(results)
    for name in ("topk", "threshold", "randk"):
        steps = [r["sc_bytes"][name][0] for r in results]
        sizes = results[0]["sc_bytes"][name][1]
        for t in range(3):
            nnz = [steps[r][t][1] for r in range(world)]
            for r in range(world):
                sent = steps[r][t][0]
                if name == "topk":  # a fixed count: one allgather of k entries, no size header (overlapped)
                    k = sum(max(1, -(-s // 10)) for s in sizes)
                    expected = (world - 1) * payload_bytes(k, torch.float32)
                elif name == "threshold":  # packed 4-byte words, padded to the largest rank
                    expected = (world - 1) * (16 + max(payload_bytes(n, torch.float32, packed=True) for n in nnz))
                else:  # values-only ring allreduce of k values + the flag element
                    k = sum(max(1, -(-s // 10)) for s in sizes)
                    expected = round(2 * (world - 1) / world * (k + 1) * 4)
                assert sent == expected, (name, t, r, sent, expected)
        stats = results[0]["sc_bytes"][name][2]
        assert stats["bytes_dense"] == 3 * round(2 * (world - 1) / world * sum(sizes) * 4)
        # top-k and rand-k (fixed counts) overlap the backward pass; threshold (variable count) cannot
        assert stats["overlapped"] == (0 if name == "threshold" else stats["buckets"]) and stats["buckets"] == 3


def test_error_feedback_conserves_mass(results):
    world = len(results)
    for label in results[0]["sc_mass"]:
        delta = results[0]["sc_mass"][label][0]  # w0 - wT (w0 = 0, lr = 1): the sum of averaged updates
        total_res = sum(r["sc_mass"][label][1] for r in results)
        total_raw = sum(r["sc_mass"][label][2] for r in results)
        torch.testing.assert_close(world * delta + total_res, total_raw, rtol=1e-4, atol=1e-4, msg=label)


def test_zero_count_steps(results):
    ws = [r["sc_zero_count"][0] for r in results]
    for w in ws[1:]:
        assert torch.equal(ws[0], w)
    d0 = results[0]["sc_zero_count"][1]
    assert d0[0] == 0.0 and d0[1] == 0.0 and all(d == 0.0 for d in d0)  # rank 0 never sends
    assert any(d > 0 for d in results[-1]["sc_zero_count"][1][2:])  # the others do from step 2


def test_overflow_reaches_gradscaler_and_spares_residuals(results):
    flats = [r["sc_overflow"][0] for r in results]
    for f in flats[1:]:
        assert torch.equal(flats[0], f)
    for r in results:
        _, log, overflow_steps = r["sc_overflow"]
        assert overflow_steps == 1
        unchanged, res_same, scale_before, scale_after, finite = log[2]
        assert unchanged, "the overflow step must be skipped on every rank"
        assert res_same, "residuals must not change on an overflow step"
        assert scale_after < scale_before, "GradScaler must see the overflow and lower the scale"
        assert all(entry[4] for entry in log), "residuals stay finite"
        assert not log[1][0] and not log[3][0], "normal steps update the parameters"


def test_state_pickles_and_resumes_exactly(two):
    for r in two:
        straight, resumed, names, pg_none, step = r["sc_state"]
        assert torch.equal(straight, resumed)
        assert pg_none and step == 3
        assert "fc1.weight" in names


def test_bad_input_errors(two):
    msgs = two[0]["sc_errors"]
    expect = {
        "unknown_compressor": "valid names", "unknown_option": "densty", "bad_density": "density",
        "nan_density": "density", "negative_threshold": "threshold", "dgc_without_optimizer": "optimizer",
        "dgc_with_momentum": "momentum", "not_ddp": "DistributedDataParallel", "bad_granularity": "granularity",
        "late_momentum": "momentum",
    }
    for label, needle in expect.items():
        assert msgs[label] is not None, f"{label} was accepted"
        assert needle in msgs[label], (label, msgs[label])


def world_one(rank, ws):
    flat, stats, _ = _train(rank, "topk", {"density": 0.1})
    flat_t, stats_t, _ = _train(rank, "threshold", {"threshold": 0.01})
    return flat, stats, stats_t


def test_world_size_one_still_compresses():
    (flat, stats, stats_t), = run_distributed(world_one, 1, timeout=120)
    assert stats["steps"] == 4 and stats["bytes_sent"] == 0 and stats["bytes_dense"] == 0
    assert 0.09 < stats["density"] < 0.2
    assert stats["residual_norm"] > 0
    assert torch.isfinite(flat).all()
