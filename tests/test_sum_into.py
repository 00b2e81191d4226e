"""SparCML's algorithms, the global top-k, the dense sum, the values allreduce and ``sparse_allreduce`` write their
sum into a caller's vector (``out=``, e.g. the bucket buffer), with the same values as into a new one: on real gloo
processes at 1, 2 and 3 ranks, fp32 and fp16 values, the buffer filled with garbage first (every element must be
written)."""

from __future__ import annotations

import pytest
import torch

from sparsedist.collectives import sparse_allreduce
from sparsedist.collectives.backend import TorchBackend
from sparsedist.collectives.dense import ValuesAllreduce
from sparsedist.collectives.registry import COLLECTIVES
from sparsedist.collectives.sparcml import dsar_split_allgather, ssar_recursive_double, ssar_split_allgather
from sparsedist.testing import run_distributed

ALGORITHMS = {"ssar_recursive_double": ssar_recursive_double, "ssar_split_allgather": ssar_split_allgather,
              "dsar_split_allgather": dsar_split_allgather}


def _input(rank: int, numel: int, count: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.randperm(numel, generator=g)[:count]
    return idx, torch.randn(count, generator=g).to(dtype)


def _worker(rank, ws):
    be = TorchBackend(timeout=60)
    res = []
    for dtype in (torch.float32, torch.float16):
        for count in (30, 3000):  # sparse streams, and past SparCML's dense switch
            idx, val = _input(rank, 4000, count, dtype)
            for name, fn in ALGORITHMS.items():
                bounds = [None, "balanced"] if name != "ssar_recursive_double" else [None]
                for sb in bounds:
                    kw = {} if sb is None else {"split_bounds": sb}
                    fresh = fn(be, idx, val, 4000, **kw)
                    out = torch.full((4000,), 7.0, dtype=torch.float32)
                    got = fn(be, idx, val, 4000, out=out, **kw)
                    res.append((name, str(dtype), count, sb, got is out, torch.equal(got, fresh.float())))
            for name in ("ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather", "gtopk", "dense"):
                extra = {"k": count // 2} if name == "gtopk" else {}
                fresh = COLLECTIVES[name]().reduce(idx, val, 4000, be, **extra)
                out = torch.full((4000,), 7.0, dtype=torch.float32)
                got = COLLECTIVES[name]().reduce(idx, val, 4000, be, out=out, **extra)
                res.append((name + ".reduce", str(dtype), count, None, got.total is out,
                            torch.equal(got.total, fresh.total) and got.finite == fresh.finite))
    idx, val = _input(rank, 4000, 30, torch.float32)
    nan = COLLECTIVES["ssar_split_allgather"]().reduce(idx, val, 4000, be, finite=rank != 1,
                                                        out=torch.zeros(4000))
    errors = []
    for bad in (torch.zeros(3999), torch.zeros(4000, dtype=torch.int64)):
        try:
            ssar_recursive_double(be, idx, val, 4000, out=bad)
        except ValueError as e:
            errors.append(str(e))
    try:
        COLLECTIVES["ssar_recursive_double"]().reduce(idx, val, 4000, be, out=torch.zeros(4000, dtype=torch.float64))
    except ValueError as e:
        errors.append(str(e))
    return {"res": res, "nan_finite": bool(nan.finite), "errors": errors}


@pytest.mark.parametrize("ws", [2, 3])
def test_the_sum_written_into_a_callers_vector_is_the_same(ws):
    out = run_distributed(_worker, ws, timeout=240)
    for r in out:
        assert len(r["res"]) == 2 * 2 * (1 + 2 + 2 + 5)
        for name, dtype, count, bounds, same_object, same_values in r["res"]:
            assert same_object, (name, dtype, count, bounds)
            assert same_values, (name, dtype, count, bounds)
        assert r["nan_finite"] is False  # one rank's non-finite gradient reaches every rank through out= too
        assert len(r["errors"]) == 3
        assert "out must be a (4000,) tensor of a floating dtype" in r["errors"][0]
        assert "got (3999,)" in r["errors"][0] and "torch.int64" in r["errors"][1]
        assert "out must be a (4000,) tensor of torch.float32, got (4000,) torch.float64" in r["errors"][2]


def _public_worker(rank, ws):
    """``sparse_allreduce(out=)`` for every algorithm, and the values allreduce's synchronous ``out=``."""
    be = TorchBackend(timeout=60)
    res = []
    for dtype in (torch.float32, torch.float16):
        for count in (30, 3000):
            idx, val = _input(rank, 4000, count, dtype)
            for name in ("allgather", "dense", "ssar_recursive_double", "ssar_split_allgather",
                         "dsar_split_allgather"):
                fresh = sparse_allreduce(idx, val, 4000, algorithm=name, backend=be)
                out = torch.full((4000,), 7.0, dtype=dtype)
                got = sparse_allreduce(idx, val, 4000, algorithm=name, backend=be, out=out)
                res.append((name, str(dtype), count, got is out, got.dtype == dtype and torch.equal(got, fresh)))
        shared, vals = _input(0, 4000, 300, dtype)[0], _input(rank, 4000, 300, dtype)[1]  # the same indices
        fresh = ValuesAllreduce().reduce(shared, vals, 4000, be)
        out = torch.full((4000,), 7.0, dtype=torch.float32)
        got = ValuesAllreduce().reduce(shared, vals, 4000, be, out=out)
        res.append(("values_allreduce", str(dtype), 300, got.total is out, torch.equal(got.total, fresh.total)))
    errors = []
    idx, val = _input(rank, 4000, 30, torch.float16)
    for bad in (torch.zeros(4000), torch.zeros(4001, dtype=torch.float16)):
        try:
            sparse_allreduce(idx, val, 4000, algorithm="allgather", backend=be, out=bad)
        except ValueError as e:
            errors.append(str(e))
    try:
        ValuesAllreduce().reduce(idx, val, 4000, be, out=torch.zeros(4000, dtype=torch.float16))
    except ValueError as e:
        errors.append(str(e))
    return {"res": res, "errors": errors}


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_sparse_allreduce_and_the_values_allreduce_write_into_out(ws):
    out = run_distributed(_public_worker, ws, timeout=240)
    for r in out:
        assert len(r["res"]) == 2 * (2 * 5 + 1)
        for name, dtype, count, same_object, same_values in r["res"]:
            assert same_object, (name, dtype, count)
            assert same_values, (name, dtype, count)
        assert len(r["errors"]) == 3  # refused on every rank before any collective: no hang
        assert "out must be a (4000,) tensor of torch.float16, got (4000,) torch.float32" in r["errors"][0]
        assert "got (4001,) torch.float16" in r["errors"][1]
        assert "out must be a (4000,) tensor of torch.float32, got (4000,) torch.float16" in r["errors"][2]
