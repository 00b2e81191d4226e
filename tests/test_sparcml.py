"""sparse_allreduce (SparCML algorithms, allgather, dense, auto) and GlobalTopK on real gloo processes.

One spawn per world size (2, 3, 4, 5) runs every case: each rank builds every rank's input from shared seeds,
so it computes the dense reference (the sum of every rank's dense vector, in fp64) itself and reports per case
the largest error and a checksum of its result; the parent checks the errors and that every rank got bitwise
the same result. The same file is an MPI program: ``test_sparcml_under_mpirun`` runs the algorithms over
:class:`~sparsedist.integrations.mpi.MPIBackend` with ``mpirun``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedist.collectives.backend import Backend
from sparsedist.collectives.choose import CostModel, predict
from sparsedist.collectives.gtopk import GlobalTopK
from sparsedist.collectives.sparse_allreduce import sparse_allreduce
from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ["allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather", "dense", "auto"]
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# inputs: every rank can build every rank's vector
# ----------------------------------------------------------------------------------------------------------
def _values(g, n, dtype):
    if dtype in HALF:  # quarter-integers in [-2, 2]: every partial sum is exact in fp16 and bf16
        return (torch.randint(-8, 9, (n,), generator=g).float() / 4).to(dtype)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def make_input(kind: str, rank: int, ws: int, numel: int, dtype, idx_dtype, seed: int):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    if kind == "random":
        k = int(torch.randint(0, max(1, numel // 8), (1,), generator=g))
        idx = torch.randperm(numel, generator=g)[:k]
    elif kind == "disjoint":
        m = numel // ws
        idx = torch.arange(rank * m, (rank + 1) * m)[::2]
    elif kind == "identical":
        gi = torch.Generator().manual_seed(seed)
        idx = torch.randperm(numel, generator=gi)[: max(1, numel // 20)]
    elif kind == "empty_some":
        idx = torch.empty(0, dtype=torch.int64) if rank % 2 == 0 else torch.randperm(numel, generator=g)[:numel // 10]
    elif kind == "only_last":
        idx = torch.randperm(numel, generator=g)[: numel // 3] if rank == ws - 1 else torch.empty(0, dtype=torch.int64)
    elif kind == "all_empty":
        idx = torch.empty(0, dtype=torch.int64)
    elif kind == "full":  # every rank dense: the sum is dense from the first merge on
        idx = torch.randperm(numel, generator=g)
    elif kind == "fill":  # a third of the positions each: the sum of two is past the default switch (1/2)
        idx = torch.randperm(numel, generator=g)[: numel // 3]
    elif kind == "dups":  # duplicates within a rank, unsorted
        idx = torch.randint(0, numel, (numel // 4,), generator=g)
    else:
        raise ValueError(kind)
    return idx.to(idx_dtype), _values(g, idx.numel(), dtype)


def _reference(kind, ws, numel, dtype, idx_dtype, seed):
    ref = torch.zeros(numel, dtype=torch.float64)
    for r in range(ws):
        i, v = make_input(kind, r, ws, numel, dtype, idx_dtype, seed)
        ref.index_add_(0, i.long(), v.double())
    return ref


def _cases():
    f32, f64, i32, i64 = torch.float32, torch.float64, torch.int32, torch.int64
    out = []
    seed = 0
    formats = ((997, f32, i64), (256, torch.float16, i32), (300, torch.bfloat16, i64))
    kinds = ("random", "disjoint", "identical", "empty_some", "only_last", "all_empty", "full", "fill", "dups")
    for j, kind in enumerate(kinds):  # every kind in two of the three formats
        for numel, dtype, idt in (formats[j % 3], formats[(j + 1) % 3]):
            seed += 1
            out.append((kind, numel, dtype, idt, None, seed))
    seed += 1
    out += [("random", 500, f64, i32, None, seed), ("random", 3, f32, i64, None, seed + 1),
            ("random", 1, f32, i64, None, seed + 2), ("all_empty", 0, f32, i64, None, seed + 3),
            ("full", 2, f32, i32, None, seed + 4), ("random", 256, torch.float16, i64, None, seed + 5)]
    # the dense switch: always dense (0), never (inf), early (fill-in passes 2 % after one merge), default
    for th in (0.0, float("inf"), 0.02, None):
        for kind in ("random", "fill", "disjoint"):
            seed += 1
            out.append((kind, 800, f32, i64, th, seed))
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _err(res: torch.Tensor, ref: torch.Tensor, dtype) -> float:
    if dtype in HALF:  # exact inputs: the result must equal the reference exactly
        return float((res.double() - ref.to(dtype).double()).abs().max()) if ref.numel() else 0.0
    return float((res.double() - ref).abs().max()) if ref.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------
# distributed worker: all sparse_allreduce cases, the model's byte counts, and GlobalTopK
# ----------------------------------------------------------------------------------------------------------
def _allreduce_worker(rank: int, ws: int):
    from sparsedist.collectives.backend import TorchBackend

    backend = TorchBackend(timeout=60)
    rows = []
    for kind, numel, dtype, idt, th, seed in _cases():
        idx, val = make_input(kind, rank, ws, numel, dtype, idt, seed)
        ref = _reference(kind, ws, numel, dtype, idt, seed)
        for algo in ALGOS + ["ssar_split_allgather/balanced", "dsar_split_allgather/balanced"]:
            backend.reset_counters()
            name, _, bounds = algo.partition("/")
            res = sparse_allreduce(idx, val, numel, algorithm=name, backend=backend, dense_threshold=th,
                                   split_bounds=bounds or None)
            sent, recv = backend.reset_counters()
            ok_meta = res.shape == (numel,) and res.dtype == dtype and res.device == val.device
            rows.append({"case": f"{kind}/{numel}/{dtype}/{idt}/th={th}/{algo}", "err": _err(res, ref, dtype),
                         "half": dtype in HALF, "meta": ok_meta, "digest": _digest(res),
                         "sent": sent, "recv": recv})
    return {"rows": rows, "model": _model_bytes(backend, rank, ws), "gtopk": _gtopk_checks(backend, rank, ws)}


def _model_bytes(backend, rank, ws):
    """Counted bytes against the cost model where the model is exact (known supports)."""
    out = []
    numel, k = 4000, 100
    gi = torch.Generator().manual_seed(7)
    idx = torch.randperm(numel, generator=gi)[:k]  # identical supports on every rank: union = k
    val = torch.randn(k, generator=torch.Generator().manual_seed(rank))
    for algo in ("dense", "allgather", "ssar_recursive_double"):
        backend.reset_counters()
        sparse_allreduce(idx, val, numel, algorithm=algo, backend=backend)
        sent, recv = backend.reset_counters()
        pred = predict(numel, k, ws, alpha=1e-5, beta=1e-9, union_nnz=k, algorithms=(algo,))[algo]
        out.append((algo, sent, recv, pred.bytes))
    # auto follows the model: with a slow link and cheap latency it must run the model's pick
    model = CostModel(alpha=1e-6, beta=1e-6)
    pick = model.choose(numel, k, ws).algorithm
    backend.reset_counters()
    sparse_allreduce(idx, val, numel, algorithm="auto", backend=backend, cost_model=model)
    auto_bytes = backend.reset_counters()
    sparse_allreduce(idx, val, numel, algorithm=pick, backend=backend)
    pick_bytes = backend.reset_counters()
    head = (ws - 1) * 16  # auto's count allgather
    out.append(("auto", auto_bytes[0] - head, auto_bytes[1] - head, float(pick_bytes[0]), pick, pick_bytes[1]))
    return out


def _gtopk_data(rank, ws, numel, k_local, step, seed):
    """A slowly drifting gradient per rank: shared large coordinates plus rank noise; its local top-k."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g) * torch.rand(numel, generator=g) ** 4
    gr = torch.Generator().manual_seed(seed * 100 + rank * 10 + step)
    grad = base * (1 + 0.05 * step) + 0.3 * torch.randn(numel, generator=gr)
    idx = grad.abs().topk(k_local).indices
    return idx, grad[idx]


def _gtopk_checks(backend, rank, ws):
    import torch.distributed as dist

    res = []
    numel, k = 20000, 200

    def reference(step, seed, kl):
        ref = torch.zeros(numel, dtype=torch.float64)
        support = torch.zeros(numel, dtype=torch.bool)
        for r in range(ws):
            i, v = _gtopk_data(r, ws, numel, kl, step, seed)
            ref.index_add_(0, i, v.double())
            support[i] = True
        return ref, support

    def conservation(out, idx, val, ref):
        dropped = torch.zeros(numel, dtype=torch.float64)
        dropped.index_add_(0, idx[out.dropped].long(), val[out.dropped].double())
        dist.all_reduce(dropped)
        return float((out.to_dense().double() + dropped - ref).abs().max())

    # 1. every call exact
    gt = GlobalTopK(threshold_interval=1)
    for step in range(2):
        idx, val = _gtopk_data(rank, ws, numel, k, step, 11)
        ref, support = reference(step, 11, k)
        out = gt(idx, val, numel, k, backend=backend)
        top = torch.where(support, ref.abs(), torch.tensor(-1.0, dtype=torch.float64)).topk(k).indices.sort().values
        res.append({"name": f"exact/{step}", "same_set": torch.equal(top, out.indices),
                    "val_err": float((out.values.double() - ref[out.indices]).abs().max()),
                    "kept_ok": torch.equal(out.kept, torch.isin(idx, out.indices)),
                    "conserve": conservation(out, idx, val, ref), "exact": out.exact, "m": out.indices.numel(),
                    "digest": _digest(out.to_dense())})
    # 2. threshold reuse across drifting steps, ranges reused and recomputed
    gt = GlobalTopK(threshold_interval=4, repartition_interval=3)
    for step in range(8):
        idx, val = _gtopk_data(rank, ws, numel, k, step, 12)
        ref, support = reference(step, 12, k)
        out = gt(idx, val, numel, k, backend=backend)
        if out.exact:
            top = torch.where(support, ref.abs(), torch.tensor(-1.0, dtype=torch.float64)).topk(k).indices
            expect = top.sort().values
        else:  # every position of the sum's support whose |sum| passes the (refined) reused threshold
            summed = ref.float().double().abs()
            expect = torch.nonzero(support & (summed >= out.threshold)).view(-1)
        res.append({"name": f"reuse/{step}", "same_set": torch.equal(expect, out.indices),
                    "val_err": float((out.values.double() - ref[out.indices]).abs().max()) if out.indices.numel()
                    else 0.0, "kept_ok": torch.equal(out.kept, torch.isin(idx, out.indices)),
                    "conserve": conservation(out, idx, val, ref), "exact": out.exact, "m": out.indices.numel(),
                    "sent": out.bytes_sent, "recv": out.bytes_received, "digest": _digest(out.to_dense())})
    # 3. state_dict round trip: a restored instance continues exactly like the original
    a = GlobalTopK(threshold_interval=3)
    for step in range(2):
        i, v = _gtopk_data(rank, ws, numel, k, step, 13)
        a(i, v, numel, k, backend=backend)
    b = GlobalTopK()
    b.load_state_dict(a.state_dict())
    i, v = _gtopk_data(rank, ws, numel, k, 2, 13)
    oa, ob = a(i, v, numel, k, backend=backend), b(i, v, numel, k, backend=backend)
    res.append({"name": "state_dict", "same_set": torch.equal(oa.indices, ob.indices) and oa.exact == ob.exact,
                "val_err": float((oa.values - ob.values).abs().max()), "kept_ok": torch.equal(oa.kept, ob.kept),
                "conserve": 0.0, "exact": ob.exact, "m": ob.indices.numel(), "digest": _digest(ob.to_dense())})
    # 4. edge cases: empty ranks, all empty, k = 0, k beyond the support, int32 + duplicates, fp16
    edge = [("empty_some", 200, torch.float32, torch.int64, 15), ("all_empty", 200, torch.float32, torch.int64, 5),
            ("random", 200, torch.float32, torch.int64, 0), ("random", 200, torch.float32, torch.int64, 10000),
            ("dups", 200, torch.float32, torch.int32, 20), ("random", 256, torch.float16, torch.int32, 12),
            ("random", 3, torch.float32, torch.int64, 2)]
    for j, (kind, n, dtype, idt, kk) in enumerate(edge):
        idx, val = make_input(kind, rank, ws, n, dtype, idt, 500 + j)
        ref = _reference(kind, ws, n, dtype, idt, 500 + j)
        support = torch.zeros(n, dtype=torch.bool)
        for r in range(ws):
            support[make_input(kind, r, ws, n, dtype, idt, 500 + j)[0].long()] = True
        out = GlobalTopK()(idx, val, n, kk, backend=backend)
        m = min(kk, int(support.sum()))
        # the k largest |sum| over the support; ties (quarter-integer values) are broken by the lower index
        key = torch.where(support, ref.to(dtype).double().abs(), torch.tensor(-1.0, dtype=torch.float64))
        order = torch.sort(key, descending=True, stable=True).indices[:m].sort().values
        dropped = torch.zeros(n, dtype=torch.float64)
        dropped.index_add_(0, idx.long()[out.dropped], val.double()[out.dropped])
        dist.all_reduce(dropped)
        res.append({"name": f"edge/{kind}/{n}/{dtype}/k={kk}", "same_set": torch.equal(order, out.indices),
                    "val_err": float((out.values.double() - ref[out.indices]).abs().max()) if m else 0.0,
                    "kept_ok": torch.equal(out.kept, torch.isin(idx.long(), out.indices)) and out.kept.numel() ==
                    idx.numel(), "conserve": float((out.to_dense().double() + dropped - ref).abs().max())
                    if n else 0.0, "exact": out.exact, "m": out.indices.numel(),
                    "digest": _digest(out.to_dense())})
    return res


@pytest.fixture(scope="module", params=[2, 3, 4, 5])
def world(request):
    ws = request.param
    return ws, run_distributed(_allreduce_worker, ws, timeout=240)


def test_sums_exact_every_case(world):
    ws, results = world
    rows0 = results[0]["rows"]
    assert len(rows0) == len(_cases()) * (len(ALGOS) + 2)
    for r in range(ws):
        for row in results[r]["rows"]:
            assert row["meta"], f"P={ws} rank {r} {row['case']}: wrong shape/dtype/device"
            tol = 0.0 if row["half"] else 1e-5
            assert row["err"] <= tol, f"P={ws} rank {r} {row['case']}: error {row['err']}"


def test_every_rank_gets_the_same_bits(world):
    ws, results = world
    for j, row in enumerate(results[0]["rows"]):
        digests = {results[r]["rows"][j]["digest"] for r in range(ws)}
        assert len(digests) == 1, f"P={ws} {row['case']}: ranks disagree"


def test_byte_counters_match_the_model_where_it_is_exact(world):
    ws, results = world
    for r in range(ws):
        model = results[r]["model"]
        for algo, sent, recv, pred, *rest in model[:3]:
            if algo == "ssar_recursive_double" and ws & (ws - 1):
                continue  # non-power-of-two: folded ranks differ from the busiest one the model describes
            assert sent == recv == pred, f"P={ws} rank {r} {algo}: counted {sent}/{recv}, model {pred}"
        algo, auto_sent, auto_recv, pick_sent, pick, pick_recv = model[3]
        assert (auto_sent, auto_recv) == (pick_sent, pick_recv), f"auto did not run the model's pick {pick}"


def test_dense_switch_cuts_bytes_on_fill_in(world):
    """Inputs of density 1/3 fill in past 1/2 once two are summed: with the default switch the merged streams
    travel dense and cost fewer bytes than with the switch off; with the switch at 0 everything is dense."""
    ws, results = world
    for r in range(ws):
        by_case = {row["case"]: row for row in results[r]["rows"]}
        case = "fill/800/torch.float32/torch.int64/th={}/{}"
        for algo in ("ssar_recursive_double", "ssar_split_allgather"):
            p2 = 1 << (ws.bit_length() - 1)
            if algo == "ssar_recursive_double" and not (r < p2 and (r < ws - p2 or p2 >= 4)):
                continue  # this rank never sends a merged stream (P = 2, folded-in ranks, ...)
            default, never = by_case[case.format(None, algo)], by_case[case.format(float("inf"), algo)]
            assert default["sent"] < never["sent"], (ws, r, algo, default["sent"], never["sent"])
        # switch at 0: recursive doubling sends dense 800-value blocks (+ 8-byte header, + 8-byte size) only
        rd = by_case[case.format(0.0, "ssar_recursive_double")]
        if r < p2 and r >= ws - p2:  # an unfolded rank: log2(P') dense rounds
            assert rd["sent"] == (p2.bit_length() - 1) * (8 + 8 + 800 * 4), (ws, r, rd["sent"])


def test_global_topk(world):
    ws, results = world
    k = 200
    for r in range(ws):
        for row in results[r]["gtopk"]:
            assert row["same_set"], f"P={ws} rank {r} {row['name']}: wrong kept set"
            assert row["val_err"] <= 1e-4, f"P={ws} rank {r} {row['name']}: values off by {row['val_err']}"
            assert row["kept_ok"], f"P={ws} rank {r} {row['name']}: wrong kept mask"
            assert row["conserve"] <= 1e-4, f"P={ws} rank {r} {row['name']}: something was lost ({row['conserve']})"
            if row["name"].startswith("exact"):
                assert row["exact"] and row["m"] == k
            if row["name"].startswith("reuse") and not row["exact"]:
                assert k / 2 <= row["m"] <= k
                # Ok-Topk's bound, 6k(P-1)/P 32-bit words, plus the size/count/header messages
                bound = 4 * 6 * k * (ws - 1) / ws + (8 + 8 + 72 + 8) * (ws - 1)
                assert row["sent"] <= bound and row["recv"] <= bound, (row["sent"], row["recv"], bound)
            if row["name"].startswith("reuse") and row["exact"]:
                # an estimation call stays under the same bound plus its selection's counts and the <= 64 entries
                # of the final bracket (gathering every owner's top-k candidates would move (P-1)k entries)
                bound = 4 * 6 * k * (ws - 1) / ws + 96 * (ws - 1) + 64 * 8
                assert row["sent"] <= bound and row["recv"] <= bound, (row["sent"], row["recv"], bound)
    names = [row["name"] for row in results[0]["gtopk"]]
    reuse = [row for row in results[0]["gtopk"] if row["name"].startswith("reuse")]
    assert any(not row["exact"] for row in reuse), "threshold reuse never happened"
    for j, name in enumerate(names):
        assert len({results[r]["gtopk"][j]["digest"] for r in range(ws)}) == 1, f"{name}: ranks disagree"


# ----------------------------------------------------------------------------------------------------------
# single-process: validation and world size 1
# ----------------------------------------------------------------------------------------------------------
class _Solo(Backend):
    rank, size = 0, 1


def test_world_size_one_and_validation():
    be = _Solo()
    idx = torch.tensor([3, 1, 3], dtype=torch.int32)
    val = torch.tensor([1.0, 2.0, 4.0])
    for algo in ALGOS:
        out = sparse_allreduce(idx, val, 5, algorithm=algo, backend=be)
        assert torch.equal(out, torch.tensor([0.0, 2.0, 0.0, 5.0, 0.0]))
    out = GlobalTopK()(idx, val, 5, 1, backend=be)
    assert out.indices.tolist() == [3] and out.values.tolist() == [5.0] and out.kept.tolist() == [True, False, True]
    bad = [
        (dict(indices=idx.float()), TypeError, "integer"),
        (dict(values=torch.tensor([1, 2, 3])), TypeError, "floating"),
        (dict(indices=idx.view(3, 1)), ValueError, "1-D"),
        (dict(values=val[:2]), ValueError, "pair up"),
        (dict(numel=3), ValueError, "outside"),
        (dict(indices=torch.tensor([-1, 0, 1])), ValueError, "outside"),
        (dict(numel=-1), ValueError, ">= 0"),
        (dict(numel=5.0), TypeError, "numel"),
        (dict(algorithm="ring"), ValueError, "unknown algorithm"),
        (dict(dense_threshold=-0.5), ValueError, "dense_threshold"),
        (dict(backend="gloo"), TypeError, "Backend"),
    ]
    from sparsedist.collectives.sparcml import ssar_split_allgather
    from sparsedist.collectives.streams import balanced_bounds

    assert balanced_bounds(be, torch.tensor([1, 2, 3]), 5) == [0, 5]
    with pytest.raises(ValueError, match="split bounds"):
        ssar_split_allgather(be, idx, val, 5, split_bounds=[0, 3])
    with pytest.raises(ValueError, match="split_bounds"):
        ssar_split_allgather(be, idx, val, 5, split_bounds="even")
    for over, exc, words in bad:
        kw = dict(indices=idx, values=val, numel=5, algorithm="allgather", backend=be)
        kw.update(over)
        with pytest.raises(exc, match=words):
            sparse_allreduce(**kw)
    with pytest.raises(ValueError, match="k must be"):
        GlobalTopK()(idx, val, 5, -1, backend=be)
    with pytest.raises(ValueError, match="threshold_interval"):
        GlobalTopK(threshold_interval=0)


# ----------------------------------------------------------------------------------------------------------
# the same algorithms over MPIBackend under mpirun
# ----------------------------------------------------------------------------------------------------------
def _mpi_main() -> None:
    from sparsedist.integrations.mpi import MPIBackend

    backend = MPIBackend(timeout=60)
    rank, ws = backend.rank, backend.size
    worst = 0.0
    digests = []
    for kind, numel, dtype, idt, th, seed in _cases():
        idx, val = make_input(kind, rank, ws, numel, dtype, idt, seed)
        ref = _reference(kind, ws, numel, dtype, idt, seed)
        for algo in ALGOS:
            res = sparse_allreduce(idx, val, numel, algorithm=algo, backend=backend, dense_threshold=th)
            e = _err(res, ref, dtype)
            worst = max(worst, e if dtype in HALF else max(0.0, e - 1e-5))
            digests.append(_digest(res))
    gt = GlobalTopK(threshold_interval=2)
    kept_ok = True
    for step in range(4):
        i, v = _gtopk_data(rank, ws, 5000, 50, step, 3)
        out = gt(i, v, 5000, 50, backend=backend)
        kept_ok &= torch.equal(out.kept, torch.isin(i, out.indices))
        digests.append(_digest(out.to_dense()))
    result = {"rank": rank, "worst": worst, "kept_ok": bool(kept_ok),
              "digest": hashlib.sha1("".join(digests).encode()).hexdigest()}
    Path(os.environ["SPARCML_TEST_OUT"], f"rank{rank}.json").write_text(json.dumps(result))


def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.system
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (run scripts/install_system.sh)")
@pytest.mark.skipif(not _have_mpi4py(), reason="mpi4py not installed (run scripts/install_system.sh)")
def test_sparcml_under_mpirun(tmp_path):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), SPARCML_TEST_OUT=str(tmp_path))
    proc = subprocess.run(["mpirun", "--oversubscribe", "-np", "3", sys.executable, __file__], env=env,
                          capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for res in results:
        assert res["worst"] == 0.0 and res["kept_ok"], res
    assert len({res["digest"] for res in results}) == 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    _mpi_main()


def test_accumulate_without_the_support_sums_the_same():
    """DSAR asks for no support flags (``support=False``): the same sums, no flags built."""
    from sparsedist.collectives.streams import Block, Codec, accumulate

    codec = Codec(10, torch.float16, torch.device("cpu"))
    blocks = [Block(4, 6, torch.tensor([5, 8]), torch.tensor([1.0, 2.0], dtype=torch.float16)),
              Block(4, 6, dense=torch.arange(6, dtype=torch.float16)),
              Block(4, 6, torch.tensor([4, 5]), torch.tensor([0.5, -1.0], dtype=torch.float16))]
    sums, touched = accumulate(codec, blocks, 4, 6)
    bare, none = accumulate(codec, blocks, 4, 6, support=False)
    assert none is None and torch.equal(bare, sums) and bare.dtype == torch.float32
    assert sums.tolist() == [0.5, 1.0, 2.0, 3.0, 6.0, 5.0] and bool(touched.all())
    sparse_only, flags = accumulate(codec, blocks[:1], 4, 6)
    assert flags.tolist() == [False, True, False, False, True, False]
