"""``mean_seconds``: the timing that the probe's curves and ``python -m sparsedist estimate --measure`` use.

Each timed call is collective, so every rank must make the same number of calls whatever its own times: the
test gives the ranks different speeds (so their own totals cross the budget at different rounds) and a collective
inside the op, which would hang (and time out) if they did not agree.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from sparsedist.collectives.backend import TorchBackend
from sparsedist.collectives.measure import mean_seconds
from sparsedist.testing import run_distributed


class _Clock:
    """An op whose calls take ``seconds[i % len]`` (a sleep), each after an allreduce of one value."""

    def __init__(self, backend, seconds):
        self.backend, self.seconds, self.calls = backend, seconds, 0

    def __call__(self):
        if self.backend is not None:
            self.backend.allreduce(torch.ones(1))
        time.sleep(self.seconds[self.calls % len(self.seconds)])
        self.calls += 1


def _worker(rank, ws):
    be = TorchBackend(timeout=30)
    slow = 0.004 * (rank + 1)  # rank r alone would stop after a different number of rounds
    op = _Clock(be, [slow])
    mean = mean_seconds(be, op, repeats=3, budget_s=0.05)
    capped = _Clock(be, [0.0])
    mean_seconds(be, capped, repeats=4, budget_s=10.0, max_repeats=10)
    no_budget = _Clock(be, [0.0])
    mean_seconds(be, no_budget, repeats=5)
    return {"calls": op.calls, "mean": mean, "slow": slow, "capped": capped.calls, "no_budget": no_budget.calls}


@pytest.mark.parametrize("ws", [2, 3])
def test_every_rank_makes_the_same_number_of_calls(ws):
    res = run_distributed(_worker, ws, timeout=120)
    calls = {r["calls"] for r in res}
    assert len(calls) == 1, f"ranks made different numbers of collective calls: {calls}"
    n = calls.pop()
    assert n % 3 == 0 and n >= 3  # whole rounds of `repeats`
    # the ranks stop once their mean total reaches the budget, not before, and not a round later
    mean_total = statistics.fmean(r["slow"] for r in res) * n
    assert mean_total >= 0.05 * 0.9 and statistics.fmean(r["slow"] for r in res) * (n - 3) < 0.05 * 1.5
    for r in res:
        assert r["slow"] <= r["mean"] < r["slow"] + 0.05  # the mean of this rank's own calls
        assert r["capped"] == 12, "rounds of 4 until at least max_repeats=10 calls"
        assert r["no_budget"] == 5


def test_a_mixture_of_call_times_gives_its_mean_not_its_median():
    op = _Clock(None, [0.001, 0.001, 0.009])  # two fast calls, then a slow one (a scheduler tick, say)
    mean = mean_seconds(None, op, repeats=3)
    assert mean == pytest.approx((0.001 + 0.001 + 0.009) / 3, abs=0.002)  # the median would say 0.001


class _Recorder:
    """A stand-in backend of world size 2 whose other rank spent as long as this one; records where the agreement
    tensor lived."""

    size = 2

    def __init__(self):
        self.devices = []

    def barrier(self):
        pass

    def allreduce(self, t):
        self.devices.append(t.device.type)
        return torch.full((1,), 2 * 1e-3, dtype=torch.float64)  # 1 ms spent so far on each rank


def test_the_agreement_tensor_lives_on_the_backends_device():
    be = _Recorder()
    mean_seconds(be, lambda: None, repeats=2, budget_s=0.5, max_repeats=6, device="meta")
    assert be.devices == ["meta", "meta"], "a GPU backend (NCCL) needs the tensor it reduces on the GPU"
