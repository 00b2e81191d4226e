"""MPIBackend under a real ``mpirun`` (Open MPI), at 2 and 3 ranks.

The test starts ``mpirun -np P python tests/test_mpi_backend.py``; this file is then the MPI program. Every rank
builds every rank's inputs from the same seeds, so it can compute the numpy reference of each collective
locally, and checks the result and the byte counters. It then runs sparsedist's sparse allreduce algorithms
(the allgather path and SparCML's) over MPI, runs ``sparsedist.dist.init()`` (Open MPI variables, address agreed
over mpi4py), and checks that the same calls over a TorchBackend (gloo) give identical results and byte counts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# The MPI program
# ----------------------------------------------------------------------------------------------------------

def _data(rank: int, n: int, dtype, seed: int):
    import torch

    g = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        return torch.randint(0, 50, (n,), generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.7
    return torch.randn(n, generator=g).to(dtype)


def _exercise(backend, rank: int, size: int) -> dict:
    """Run every primitive on ``backend``, check against numpy references, return results and byte counts."""
    import numpy as np
    import torch

    from sparsedist.collectives.backend import ring_allreduce_bytes

    out: dict = {"checks": []}
    backend.reset_counters()
    sent = recv = 0

    def account(s, r):
        nonlocal sent, recv
        sent += s
        recv += r
        assert (backend.bytes_sent, backend.bytes_received) == (sent, recv), (
            f"byte counters {(backend.bytes_sent, backend.bytes_received)} != expected {(sent, recv)}")

    # allreduce: several dtypes, odd lengths, in place
    for seed, (dtype, n) in enumerate([(torch.float32, 1001), (torch.float64, 17), (torch.int64, 33),
                                       (torch.int32, 5), (torch.float16, 64), (torch.bfloat16, 64),
                                       (torch.bool, 20), (torch.float32, 0)]):
        t = _data(rank, n, dtype, seed)
        ptr = t.data_ptr()
        res = backend.allreduce(t)
        assert res is t and t.data_ptr() == ptr and t.dtype == dtype, "allreduce must work in place"
        inputs = [_data(r, n, dtype, seed) for r in range(size)]
        if dtype == torch.bool:
            ref = np.logical_or.reduce([x.numpy() for x in inputs])
            assert np.array_equal(t.numpy(), ref), f"allreduce {dtype}"
        elif dtype in (torch.float16, torch.bfloat16):
            ref = np.sum([x.float().numpy() for x in inputs], axis=0)
            np.testing.assert_allclose(t.float().numpy(), ref, rtol=1e-2, atol=1e-2, err_msg=f"allreduce {dtype}")
        elif dtype.is_floating_point:
            ref = np.sum([x.numpy() for x in inputs], axis=0)
            np.testing.assert_allclose(t.numpy(), ref, rtol=1e-6, atol=1e-6, err_msg=f"allreduce {dtype}")
        else:
            ref = np.sum([x.numpy() for x in inputs], axis=0)
            assert np.array_equal(t.numpy(), ref), f"allreduce {dtype}"
        b = ring_allreduce_bytes(n, t.element_size(), size)
        account(b, b)
        out["checks"].append(f"allreduce-{dtype}")

    # allgather: equal sizes
    for seed, dtype in enumerate([torch.float32, torch.int64, torch.bfloat16], start=20):
        t = _data(rank, 13, dtype, seed)
        rows = backend.allgather(t)
        assert rows.shape == (size, 13) and rows.dtype == dtype
        for r in range(size):
            assert torch.equal(rows[r], _data(r, 13, dtype, seed)), f"allgather row {r} {dtype}"
        account(13 * t.element_size() * (size - 1), 13 * t.element_size() * (size - 1))
        out["checks"].append(f"allgather-{dtype}")

    # allgather_v: per-rank counts with zeros (rank 1 has nothing), then everyone empty
    counts = [(5 * r + 3) if r != 1 else 0 for r in range(size)]
    t = _data(rank, counts[rank], torch.float32, 30)
    parts = backend.allgather_v(t)
    assert [p.numel() for p in parts] == counts, f"allgather_v counts {[p.numel() for p in parts]} != {counts}"
    for r in range(size):
        assert torch.equal(parts[r], _data(r, counts[r], torch.float32, 30)), f"allgather_v part {r}"
    width = max(counts)
    account(8 * (size - 1) + width * 4 * (size - 1), 8 * (size - 1) + width * 4 * (size - 1))
    parts = backend.allgather_v(torch.empty(0, dtype=torch.int64))
    assert [p.numel() for p in parts] == [0] * size and all(p.dtype == torch.int64 for p in parts)
    account(8 * (size - 1), 8 * (size - 1))
    out["checks"].append("allgather_v")

    # sendrecv around a ring, message length depends on the sender; then the reverse ring with int64
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    send = _data(rank, 10 + rank, torch.float32, 40)
    buf = torch.full((10 + prv,), -1.0)
    got = backend.sendrecv(send, nxt, buf, prv)
    assert got is buf and torch.equal(buf, _data(prv, 10 + prv, torch.float32, 40)), "sendrecv ring"
    account(send.numel() * 4, buf.numel() * 4)
    send = _data(rank, 3, torch.int64, 41)
    buf = torch.zeros(3, dtype=torch.int64)
    backend.sendrecv(send, prv, buf, nxt)
    assert torch.equal(buf, _data(nxt, 3, torch.int64, 41)), "sendrecv reverse ring"
    account(24, 24)
    # empty messages are neither sent nor awaited: rank 0 sends nothing to rank 1, which expects nothing
    send = torch.empty(0) if rank == 0 else _data(rank, 4, torch.float32, 42)
    buf = torch.empty(0) if rank == 1 else torch.zeros(4)
    backend.sendrecv(send, nxt, buf, prv)
    if rank != 1:
        assert torch.equal(buf, _data(prv, 4, torch.float32, 42)), "sendrecv with empty peers"
    account(send.numel() * 4, buf.numel() * 4)
    out["checks"].append("sendrecv")

    # alltoall_v: rank s sends (s + d) % 3 elements to rank d (zeros included)
    def chunk(s, d):
        return (_data(s, 8, torch.float32, 50 + d)[: (s + d) % 3] + 100 * s + d)

    chunks = [chunk(rank, d) for d in range(size)]
    recv_counts = [(s + rank) % 3 for s in range(size)]
    got = backend.alltoall_v(chunks, recv_counts)
    assert [g.numel() for g in got] == recv_counts
    for s in range(size):
        assert torch.equal(got[s], chunk(s, rank)), f"alltoall_v from {s}"
    account(4 * sum(c.numel() for d, c in enumerate(chunks) if d != rank),
            4 * sum(n for s, n in enumerate(recv_counts) if s != rank))
    out["checks"].append("alltoall_v")

    backend.barrier()
    account(0, 0)
    out["bytes"] = [backend.bytes_sent, backend.bytes_received]
    return out


def _exercise_sparse(backend, rank: int, size: int) -> dict:
    """sparsedist's sparse allreduce algorithms (allgather, SparCML) over ``backend``, against a numpy sum."""
    import hashlib

    import numpy as np
    import torch

    from sparsedist.collectives.sparse_allreduce import sparse_allreduce

    def vector(r: int, numel: int, nnz: int, seed: int):
        g = torch.Generator().manual_seed(7000 + 100 * seed + r)
        idx = torch.randperm(numel, generator=g)[:nnz]
        return idx, torch.randn(nnz, generator=g)

    out: dict = {"checks": [], "digests": []}
    backend.reset_counters()
    # rank 1 contributes nothing; the last case is dense enough for SparCML's switch to dense blocks
    for seed, (numel, nnz_of) in enumerate([(1000, lambda r: 0 if r == 1 else 30 + 10 * r),
                                            (777, lambda r: 5), (1000, lambda r: 600)]):
        inputs = [vector(r, numel, nnz_of(r), seed) for r in range(size)]
        ref = np.zeros(numel, dtype=np.float64)
        for idx, val in inputs:
            np.add.at(ref, idx.numpy(), val.double().numpy())
        for algorithm in ("allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather",
                          "dense"):
            idx, val = inputs[rank]
            got = sparse_allreduce(idx, val, numel, algorithm=algorithm, backend=backend)
            assert got.shape == (numel,) and got.dtype == torch.float32, (algorithm, got.shape, got.dtype)
            np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{algorithm} numel={numel}")
            out["checks"].append(f"{algorithm}-{seed}")
            # "dense" is MPI's/gloo's own allreduce, whose summation order differs between libraries
            if algorithm != "dense":
                out["digests"].append(hashlib.sha256(got.numpy().tobytes()).hexdigest()[:16])
    out["bytes"] = [backend.bytes_sent, backend.bytes_received]
    return out


def _mpi_main() -> None:
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))

    from sparsedist.collectives.backend import TorchBackend
    from sparsedist.dist import init, shutdown
    from sparsedist.integrations.mpi import MPIBackend

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    try:
        report = {"rank": rank, "size": size}
        mpi = MPIBackend()
        assert (mpi.rank, mpi.size) == (rank, size)
        report["mpi"] = _exercise(mpi, rank, size)
        report["mpi_timeout"] = _exercise(MPIBackend(timeout=60), rank, size)
        report["mpi_sparse"] = _exercise_sparse(mpi, rank, size)

        # sparsedist.dist.init() from Open MPI's variables; MASTER_ADDR/PORT agreed over mpi4py
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            assert key not in os.environ, f"{key} must not be set for this test"
        info = init(backend="gloo", timeout=60)
        assert tuple(info) == (rank, size, int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])), info
        assert init() == info, "init() must be idempotent"
        report["torch"] = _exercise(TorchBackend(), rank, size)
        report["torch_sparse"] = _exercise_sparse(TorchBackend(), rank, size)
        report["master"] = [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]]
        shutdown()
        # a file per rank: mpirun forwards each rank's stdout in chunks, so a long line from one rank can be
        # split by another rank's output (seen in CI with this ~2.5 kB report)
        out = Path(os.environ["SD_REPORT_DIR"]) / f"rank{rank}.json"
        out.with_suffix(".tmp").write_text(json.dumps(report))
        out.with_suffix(".tmp").rename(out)
    except BaseException:
        import traceback

        print(f"rank {rank} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        world.Abort(1)


# ----------------------------------------------------------------------------------------------------------
# The pytest side
# ----------------------------------------------------------------------------------------------------------

def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("mpirun") is None,
                       reason="mpirun not installed (run scripts/install_system.sh: apt-get install openmpi-bin)"),
    pytest.mark.skipif(not _have_mpi4py(), reason="mpi4py not installed (run scripts/install_system.sh)"),
]


def _mpirun(np_: int, report_dir: Path, timeout: float = 90):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               # no network interfaces other than loopback are needed on one node
               OMPI_MCA_btl="self,vader,tcp", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
               # containers often forbid the cross-memory-attach single copy (ptrace scope)
               OMPI_MCA_btl_vader_single_copy_mechanism="none",
               SD_REPORT_DIR=str(report_dir))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
           sys.executable, str(Path(__file__).resolve()), "--mpi-worker"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"mpirun -np {np_} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    files = sorted(report_dir.glob("rank*.json"))
    assert len(files) == np_, f"expected {np_} reports, found {[f.name for f in files]}:\n{proc.stdout}\n{proc.stderr}"
    reports = [json.loads(f.read_text()) for f in files]
    assert sorted(r["rank"] for r in reports) == list(range(np_)), proc.stdout + proc.stderr
    return reports


@pytest.mark.parametrize("np_", [2, 3])
def test_mpi_backend_under_mpirun(np_, tmp_path):
    reports = _mpirun(np_, tmp_path)
    for rep in reports:
        assert rep["size"] == np_
        # every primitive ran and was checked on every rank, over MPI (both modes) and over gloo
        assert rep["mpi"]["checks"] == rep["torch"]["checks"] == rep["mpi_timeout"]["checks"]
        assert len(rep["mpi"]["checks"]) == 14
        # identical byte accounting whichever backend moved the data
        assert rep["mpi"]["bytes"] == rep["torch"]["bytes"] == rep["mpi_timeout"]["bytes"]
        assert rep["mpi"]["bytes"][0] > 0
        # the sparse allreduce algorithms (allgather path, SparCML) run over MPI: correct (checked against
        # numpy in the worker), bitwise identical to the same algorithms over gloo (except the dense
        # allreduce, whose summation order is the library's), same bytes
        assert rep["mpi_sparse"]["checks"] == rep["torch_sparse"]["checks"] and len(rep["mpi_sparse"]["checks"]) == 15
        assert rep["mpi_sparse"]["digests"] == rep["torch_sparse"]["digests"]
        assert rep["mpi_sparse"]["bytes"] == rep["torch_sparse"]["bytes"] and rep["mpi_sparse"]["bytes"][0] > 0
    # rank 0 published one rendezvous address that all ranks used
    assert len({tuple(r["master"]) for r in reports}) == 1


# the MLP of examples/mnist.py: 784 -> 512 -> 256 -> 10
MNIST_MLP_SIZES = [784 * 512, 512, 512 * 256, 256, 256 * 10, 10]


@pytest.mark.parametrize("np_", [2, 3])
def test_mnist_example_over_mpi_backend_with_launch_script(np_):
    """launch/mpirun.sh runs examples/mnist.py --comm mpi: init() from Open MPI's variables, DDP with a top-k
    sparsifying hook whose collectives run over MPIBackend (mpi4py)."""
    import torch

    from sparsedist.collectives.wire import payload_bytes
    from sparsedist.compressors.base import count_for_density

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NP=str(np_), PYTHON=sys.executable, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo",
               OMPI_MCA_btl_vader_single_copy_mechanism="none",
               MPIRUN_EXTRA="--mca btl self,vader,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo")
    steps = 30
    proc = subprocess.run(["bash", "launch/mpirun.sh", "examples/mnist.py", "--compressor", "topk", "--density",
                           "0.01", "--steps", str(steps), "--quiet", "--comm", "mpi"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"compressor"' in line]
    assert len(lines) == 1, f"expected one JSON summary from rank 0:\n{proc.stdout}{proc.stderr}"
    res = json.loads(lines[0])
    assert res["compressor"] == "topk" and res["world_size"] == np_ and res["steps"] == steps, res
    assert res["test_accuracy"] > 20.0, res  # percent; chance is 10
    assert res["collectives"] == {"allgather": steps}, res
    # every step: a 16-byte header allgather, then the top-1% entries of every layer (int32 index + fp32 value)
    k = sum(count_for_density(n, 0.01) for n in MNIST_MLP_SIZES)
    assert res["bytes_sent"] == steps * (np_ - 1) * (16 + payload_bytes(k, torch.float32)), res
    assert res["compression_ratio"] > 20, res


def test_mpi_backend_rejects_bad_input():
    """Errors that need no peers, checked in a single-process MPI world (mpi4py singleton init)."""
    code = (
        "import torch, pickle\n"
        "from sparsedist.integrations.mpi import MPIBackend\n"
        "b = MPIBackend()\n"
        "assert (b.rank, b.size) == (0, 1)\n"
        "t = torch.arange(4.0); assert b.allreduce(t) is t and t.tolist() == [0, 1, 2, 3]\n"
        "for bad, exc in [(lambda: MPIBackend(timeout=0), ValueError), (lambda: MPIBackend(comm=3), TypeError),\n"
        "                 (lambda: b.sendrecv(torch.ones(1), 1, torch.ones(1), 0), ValueError),\n"
        "                 (lambda: b.alltoall_v([torch.ones(1), torch.ones(1)], [1]), ValueError),\n"
        "                 (lambda: b._allreduce(torch.ones(2, dtype=torch.complex64)), TypeError)]:\n"
        "    try:\n"
        "        bad()\n"
        "    except exc as e:\n"
        "        print('ok', type(e).__name__, e)\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "c = pickle.loads(pickle.dumps(b)); assert c.rank == 0 and c.comm is not None\n"
        "print('DONE')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 5


if __name__ == "__main__" and "--mpi-worker" in sys.argv:
    _mpi_main()
