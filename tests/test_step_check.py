"""auto's whole-step check (sparsedist.collectives.StepCheck): the schedule and verdicts with a synthetic clock,
and in DDP at 2 and 3 ranks: a dense verdict sends every bucket in full through the asynchronous allreduce
(residuals flushed, DGC's momentum kept, variance's statistics paused), a sparse verdict keeps auto's choices,
and every rank ends each step with identical parameters."""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives import StepCheck
from sparsedist.compressors import SelectContext, build_compressor
from sparsedist.testing import run_distributed


class OneRank:
    """The part of a Backend that StepCheck uses, for one process."""

    size = 1

    def allreduce(self, t):
        return t


def drive(check, steps, sparse_s, dense_s, settled_from=0, start_step=0, clock=0.0):
    """Call begin_step for each step as a training loop would; each step takes the time of its mode."""
    modes = []
    for step in range(start_step, start_step + steps):
        check.begin_step(step, step >= settled_from, OneRank(), now=clock)
        modes.append(check.mode(step))
        clock += sparse_s if modes[-1] == "sparse" else dense_s
    return modes, clock


def test_window_alternates_then_the_faster_mode_wins_and_the_period_doubles():
    check = StepCheck(window=2, every=3, max_every=12, margin=0.1, start=2)
    modes, _ = drive(check, 24, sparse_s=2.0, dense_s=1.0, settled_from=3)
    # not settled at step 2: the first window is steps 3-6, decided at step 7; then 3 steps, window 10-13 ...
    assert modes[:3] == ["sparse"] * 3
    assert modes[3:7] == ["sparse", "dense", "sparse", "dense"]
    assert modes[7:10] == ["dense"] * 3
    assert modes[10:14] == ["sparse", "dense", "sparse", "dense"]
    first, second = check.checks[:2]
    assert first == {"step": 3, "sparse_step_s": 2.0, "dense_step_s": 1.0, "verdict": "dense"}
    assert second["step"] == 10 and second["verdict"] == "dense"
    assert check.window_start == 14 + 6  # confirmed: the period doubled from 3 to 6
    assert check.report()["verdict"] == "dense" and check.report()["next_check"] == 20


def test_sparse_must_beat_dense_by_the_margin():
    for sparse_s, verdict in ((0.95, "dense"), (0.85, "sparse")):
        check = StepCheck(window=3, every=10, margin=0.1, start=0)
        drive(check, 7, sparse_s=sparse_s, dense_s=1.0)
        assert check.checks[0]["verdict"] == verdict, (sparse_s, check.checks)
        assert check.checks[0]["sparse_step_s"] == pytest.approx(sparse_s)


def test_a_changed_verdict_resets_the_period():
    check = StepCheck(window=1, every=4, max_every=64, start=0)
    _, clock = drive(check, 3, sparse_s=2.0, dense_s=1.0)       # window 0-1, decided at 2: dense; next at 6
    assert check.verdict == "dense" and check.window_start == 6
    drive(check, 10, sparse_s=0.5, dense_s=1.0, start_step=3, clock=clock)  # window 6-7, decided at 8: sparse
    assert [c["verdict"] for c in check.checks] == ["dense", "sparse"]
    assert check.window_start == 8 + 4


def test_outliers_do_not_decide_medians_do():
    check = StepCheck(window=3, every=10, start=0)
    clock = 0.0
    costs = {0: 1.0, 1: 1.2, 2: 9.0, 3: 1.2, 4: 1.0, 5: 1.2}  # one slow sparse step (an evaluation, a GC pause)
    for step in range(7):
        check.begin_step(step, True, OneRank(), now=clock)
        clock += costs.get(step, 1.0)
    assert check.checks[0]["sparse_step_s"] == 1.0 and check.verdict == "sparse"


def test_state_round_trip_mid_window():
    a = StepCheck(window=2, every=3, start=0)
    _, clock = drive(a, 3, sparse_s=2.0, dense_s=1.0)
    b = StepCheck()
    b.load_state_dict(a.state_dict())
    for check in (a, b):
        drive(check, 4, sparse_s=2.0, dense_s=1.0, start_step=3, clock=clock + 5.0)
    # the resumed clock loses the interrupted step's time, nothing else: same verdicts and schedule
    assert [c["verdict"] for c in a.checks] == [c["verdict"] for c in b.checks] == ["dense"]
    assert a.window_start == b.window_start


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"every": 0}, {"every": 8, "max_every": 4}, {"margin": 1.0},
                                    {"margin": -0.1}, {"start": -1}, {"window": 2.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="StepCheck"):
        StepCheck(**kwargs)


def test_state_option_is_validated():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="auto_step_check"):
        sparsedist.SparsifyState(model, build_compressor("topk", density=0.1), collective="auto",
                                 auto_step_check="yes")


# --------------------------------------------------------------------------------- DGC's and variance's dense step

def test_dgc_dense_steps_are_momentum_sgd_and_commit_only_when_told():
    torch.manual_seed(0)
    for nesterov in (False, True):
        dgc = build_compressor("dgc", density=0.01, momentum=0.9, nesterov=nesterov)
        u = torch.zeros(50)
        for step in range(4):
            g = torch.randn(50)
            grad = g.clone()
            dgc.dense_step(grad, None, SelectContext(step=0, key=0))
            u_new = 0.9 * (u + g) if nesterov else 0.9 * u + g
            torch.testing.assert_close(grad, u_new + g if nesterov else u_new)
            if step == 2:   # an abandoned step (non-finite sum somewhere): the momentum stays as it was
                dgc.discard_pending(0)
                continue
            dgc.after_send_all(0)
            u = u_new
            torch.testing.assert_close(dgc.state_dict()["momentum"][0], u)


def test_dgc_dense_step_adds_the_residual_and_clips_first():
    dgc = build_compressor("dgc", density=0.01, momentum=0.5, clip_norm=1.0)
    grad = torch.full((4,), 10.0)  # norm 20, clipped to 1
    dgc.dense_step(grad, torch.ones(4), SelectContext(step=0, key=0))
    torch.testing.assert_close(grad, torch.full((4,), 0.5 + 1.0))


def test_variance_dense_step_drops_its_variance():
    var = build_compressor("variance", alpha=1.0)
    var._v[0] = torch.ones(3)
    grad = torch.zeros(3)
    var.dense_step(grad, torch.full((3,), 2.0), SelectContext(step=0, key=0))
    var.after_send_all(0)
    torch.testing.assert_close(grad, torch.full((3,), 2.0))
    assert 0 not in var.state_dict()["variance"]


# ------------------------------------------------------------------------------------------------- in DDP

class Skewed(StepCheck):
    """A StepCheck whose clock says each step took ``cost[mode]`` seconds (deterministic verdicts in tests)."""

    def __init__(self, sparse_s, dense_s, **kwargs):
        super().__init__(**kwargs)
        self.cost = {"sparse": sparse_s, "dense": dense_s}
        self.clock = 0.0

    def begin_step(self, step, settled, backend, now=None):
        if step > 0:
            self.clock += self.cost[self.mode(step - 1)]
        super().begin_step(step, settled, backend, now=self.clock)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _train(rank, ws, compressor, opts, dense_faster, steps=14):
    torch.manual_seed(0)
    model = Mlp()
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets
    lr_opts = {"momentum": 0.0} if compressor == "dgc" else {"momentum": 0.9}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, **lr_opts)
    check = Skewed(2.0, 1.0, window=2, every=4, start=2) if dense_faster else Skewed(1.0, 2.0, window=2, every=4,
                                                                                       start=2)
    extra = {"optimizer": opt} if compressor == "dgc" else {}
    # auto_trials=0: the model alone per bucket, so the check's first window starts at step 2
    state = sparsedist.register(ddp, compressor, collective="auto", auto_trials=0, auto_step_check=check, **opts,
                                **extra)
    g = torch.Generator().manual_seed(100 + rank)
    modes, residual_after_dense, flats = [], [], []
    for step in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
        modes.append(check.mode(step))
        residual_after_dense.append(modes[-1] == "dense" and state.feedback.norm() == 0.0)
        flats.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    paused = state.second_moment.paused if state.second_moment is not None else None
    return modes, residual_after_dense, flats, state.stats(), (paused, check.mode(steps))


CASES = [("topk", {"density": 0.05}), ("randk", {"density": 0.05}), ("dgc", {"density": 0.05}),
         ("variance", {"alpha": 1.0}), ("threshold", {"threshold": 0.01})]


def _scenario(rank, ws):
    return {(c, fast): _train(rank, ws, c, opts, fast) for c, opts in CASES for fast in (True, False)}


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return run_distributed(_scenario, request.param, timeout=400)


@pytest.mark.parametrize("compressor", [c for c, _ in CASES])
def test_dense_verdict_sends_everything_and_ranks_stay_identical(results, compressor):
    modes, flushed, flats, stats, (paused, next_mode) = results[0][(compressor, True)]
    for r in results[1:]:
        assert r[(compressor, True)][0] == modes
        assert all(torch.equal(a, b) for a, b in zip(flats, r[(compressor, True)][2])), "ranks diverged"
    assert stats["step_check"]["checks"][0]["verdict"] == "dense"
    after = stats["step_check"]["checks"][0]["step"] + 4  # the first step of the verdict (after the window)
    assert all(m == "dense" for m in modes[after:after + 3])
    assert all(flushed[i] for i, m in enumerate(modes) if m == "dense"), "a dense step left a residual behind"
    assert stats["collectives"].get("dense", 0) > 0
    if compressor == "variance":  # no per-example statistics for a step that will be sent densely
        assert paused is (next_mode == "dense")
    assert all(torch.isfinite(f).all() for f in flats)


@pytest.mark.parametrize("compressor", [c for c, _ in CASES])
def test_sparse_verdict_keeps_auto_choices(results, compressor):
    modes, _, flats, stats, _ = results[0][(compressor, False)]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(flats, r[(compressor, False)][2])), "ranks diverged"
    assert [c["verdict"] for c in stats["step_check"]["checks"]] == ["sparse"] * len(stats["step_check"]["checks"])
    windows = [c["step"] for c in stats["step_check"]["checks"]] + [stats["step_check"]["next_check"]]
    dense = [i for i, m in enumerate(modes) if m == "dense"]
    assert dense and all(any(0 <= i - w < 4 and (i - w) % 2 == 1 for w in windows) for i in dense), \
        "dense outside the check windows' dense steps"
