"""The allgather's sum written into a caller's buffer or a new one, the positions it names for averaging, and a
non-finite rank reaching every rank: the asynchronous fixed-size ``launch_fixed`` and the synchronous
``Allgather.reduce``, with real processes."""

import pytest
import torch

from sparsedist.collectives.allgather import Allgather, launch_fixed
from sparsedist.collectives.backend import TorchBackend
from sparsedist.testing import run_distributed

NUMEL, COUNT = 1000, 40


def _entries(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    m = COUNT - rank  # fewer than the bound on every rank but rank 0: padding is exercised
    idx = torch.randperm(NUMEL, generator=g)[:m]
    idx[0] = 7  # a position every rank sends
    return idx, (torch.randint(-8, 9, (m,), generator=g).float() / 4)


def _worker(rank: int, world: int) -> dict:
    backend = TorchBackend()
    expected = torch.zeros(NUMEL)
    for r in range(world):
        expected.index_add_(0, *_entries(r))
    idx, vals = _entries(rank)
    fresh = launch_fixed(backend, idx, vals, NUMEL, COUNT, True, torch.float32).wait()
    buffer = torch.full((NUMEL,), 5.0)  # stale contents: the callback must zero it
    into = launch_fixed(backend, idx, vals, NUMEL, COUNT, True, torch.float32, out=buffer).wait()
    nonfinite = launch_fixed(backend, idx, vals, NUMEL, COUNT, rank != world - 1, torch.float32).wait()
    outside = torch.ones(NUMEL, dtype=torch.bool)
    outside[into.support] = False
    sync_buffer = torch.full((NUMEL,), -3.0)
    sync = Allgather().reduce(idx, vals, NUMEL, backend, out=sync_buffer)
    sync_outside = torch.ones(NUMEL, dtype=torch.bool)
    sync_outside[sync.support] = False
    sync_nonfinite = Allgather().reduce(idx, vals, NUMEL, backend, finite=rank != 0)
    return {"fresh": torch.equal(fresh.total, expected) and fresh.finite is True,
            "into": into.total is buffer and torch.equal(buffer, expected) and into.finite is True,
            "support_covers": bool((expected[outside] == 0).all()) and into.support.numel() == world * COUNT,
            "nonfinite": nonfinite.finite is False,
            "sync_into": sync.total is sync_buffer and torch.equal(sync_buffer, expected) and sync.finite is True
            and bool((expected[sync_outside] == 0).all()),
            "sync_nonfinite": sync_nonfinite.finite is False}


@pytest.mark.parametrize("world", [2, 3])
def test_fixed_allgather_sums_into_the_given_buffer_and_names_what_arrived(world):
    for rank, r in enumerate(run_distributed(_worker, world, timeout=120)):
        assert all(r.values()) and len(r) == 6, (rank, r)


def test_out_of_the_wrong_shape_or_dtype_is_refused_before_anything_is_sent():
    idx, vals = _entries(0)
    with pytest.raises(ValueError, match="out must be"):
        Allgather().reduce(idx, vals, NUMEL, None, out=torch.zeros(NUMEL - 1))
    with pytest.raises(ValueError, match="out must be"):
        launch_fixed(None, idx, vals, NUMEL, COUNT, True, torch.float32, out=torch.zeros(NUMEL + 1))
    with pytest.raises(ValueError, match="out must be"):
        launch_fixed(None, idx, vals, NUMEL, COUNT, True, torch.float32, out=torch.zeros(NUMEL, dtype=torch.float64))
