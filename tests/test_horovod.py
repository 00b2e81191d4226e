"""``sparsedist.horovod`` under a real ``horovodrun`` (Gloo controller), at 2 and 3 ranks.

One launch per world size runs tests/jobs/horovod_job.py, which batches every multi-rank check (horovodrun costs
seconds to start) and writes each rank's results to a file; the assertions run here. Then the MNIST example
runs under ``horovodrun -np 2``, and one single-process Horovod run checks the errors and the import guard.
Horovod comes from ``bash scripts/build_horovod.sh``; the tests skip only when ``import horovod.torch`` fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedist.collectives.backend import ring_allreduce_bytes
from sparsedist.collectives.wire import payload_bytes
from sparsedist.compressors.base import count_for_density

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "horovod_job.py"
SCENARIOS = "parity,bytes,mass,zero_count,dense,optim,api,backend"
MNIST_MLP_SIZES = [784 * 512, 512, 512 * 256, 256, 256 * 10, 10]  # the MLP of examples/mnist.py


def _have_horovod() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not _have_horovod(),
                       reason="Horovod with PyTorch support is not installed (import horovod.torch failed): "
                              "run bash scripts/build_horovod.sh"),
]


def _horovodrun() -> str:
    exe = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    assert Path(exe).exists(), "horovod.torch imports but horovodrun is missing: reinstall with scripts/build_horovod.sh"
    return exe


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _launch(np_: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [_horovodrun(), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"horovodrun -np {np_} did not finish within {timeout} s:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"horovodrun -np {np_} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def results(request, tmp_path_factory):
    np_ = request.param
    out = tmp_path_factory.mktemp(f"hvd{np_}")
    _launch(np_, [str(JOB), str(out), SCENARIOS], timeout=240)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(np_)]
    assert [r["rank"] for r in res] == list(range(np_)) and all(r["size"] == np_ for r in res)
    return res


def test_ranks_identical_and_equal_to_the_ddp_hook(results):
    """Every compressor through the Horovod optimizer keeps ranks bit-identical, and trains exactly as the DDP
    hook does (same selection, feedback and wire format)."""
    world = len(results)
    parity = results[0]["parity"]
    names = {e["name"] for e in parity.values()}
    assert {"topk", "threshold", "randk", "dgc", "variance"} <= names
    collectives = {e["opts"].get("collective", "allgather") for e in parity.values()}
    assert collectives == {"allgather", "ssar_split_allgather", "dsar_split_allgather", "gtopk"} | (
        {"ssar_recursive_double", "auto"} if world == 2 else set()), collectives
    for i, entry in parity.items():
        label = (entry["name"], entry["opts"])
        for r in results[1:]:
            assert torch.equal(r["parity"][i]["hvd"], entry["hvd"]), f"ranks differ: {label}"
        assert torch.isfinite(entry["hvd"]).all(), label
        stats = entry["stats"]
        collective = entry["opts"].get("collective", "allgather")
        assert stats["steps"] == 4 and stats["bytes_sent"] > 0, (label, stats)
        assert stats["compression_ratio"] > 1 or collective == "auto", (label, stats)  # 'auto' may go dense
        if entry["opts"].get("granularity") == "bucket" or collective == "gtopk":
            continue  # select across DDP's buckets, which differ from the optimizer's one buffer
        if collective == "auto":
            assert sum(stats["collectives"].values()) == 4, (label, stats)
        else:
            path = "values_allreduce" if entry["name"] == "randk" and "variant" not in entry["opts"] else collective
            assert stats["collectives"] == {path: 4}, (label, stats)
        shared = entry["name"] == "randk" and entry["opts"].get("variant", "uniform") == "uniform"
        if world > 2 and (shared or collective != "allgather"):
            # Horovod's ring, gloo's ring and SparCML's ranges over DDP's buckets sum three ranks in different orders
            torch.testing.assert_close(entry["hvd"], entry["ddp"], rtol=1e-6, atol=1e-7, msg=str(label))
        else:
            assert torch.equal(entry["hvd"], entry["ddp"]), f"Horovod optimizer differs from the DDP hook: {label}"


def test_stats_bytes_equal_encoded_payload_sizes(results):
    world = len(results)
    for name in ("topk", "threshold", "randk"):
        steps = [r["bytes"][name][0] for r in results]
        sizes = results[0]["bytes"][name][1]
        k = sum(max(1, -(-s // 10)) for s in sizes)  # density 0.1 per parameter
        for t in range(3):
            nnz = [steps[r][t][1] for r in range(world)]
            for r in range(world):
                sent = steps[r][t][0]
                if name == "topk":  # 16-byte header allgather, then int32 index + fp32 value per entry
                    expected = (world - 1) * (16 + payload_bytes(k, torch.float32))
                elif name == "threshold":  # packed 4-byte words, padded to the largest rank
                    expected = (world - 1) * (16 + max(payload_bytes(n, torch.float32, packed=True) for n in nnz))
                else:  # values-only ring allreduce of k values + the overflow flag
                    expected = ring_allreduce_bytes(k + 1, 4, world)
                assert sent == expected, (name, t, r, sent, expected)
        stats = results[0]["bytes"][name][2]
        assert stats["bytes_dense"] == 3 * ring_allreduce_bytes(sum(sizes), 4, world)
        assert stats["bytes_received"] == stats["bytes_sent"]


def test_error_feedback_conserves_mass(results):
    world = len(results)
    assert set(results[0]["mass"]) == {"topk", "threshold", "randk", "dgc"}
    for label in results[0]["mass"]:
        delta = results[0]["mass"][label][0]  # w0 - wT (w0 = 0, lr = 1): the sum of averaged updates
        for r in results[1:]:
            assert torch.equal(r["mass"][label][0], delta), label
        total_res = sum(r["mass"][label][1] for r in results)
        total_raw = sum(r["mass"][label][2] for r in results)
        assert total_res.abs().sum() > 0, label  # something was held back
        torch.testing.assert_close(world * delta + total_res, total_raw, rtol=1e-4, atol=1e-4, msg=label)


def test_zero_count_steps_do_not_hang(results):
    for r in results[1:]:
        assert torch.equal(r["zero_count"][0], results[0]["zero_count"][0])
    assert results[0]["zero_count"][1] == [0.0] * 5  # rank 0 never sends
    assert results[1]["zero_count"][1][:2] == [0.0, 0.0] and all(d > 0 for d in results[1]["zero_count"][1][2:])


def test_dense_path_equals_horovod_distributed_optimizer(results):
    world = len(results)
    for r in results:
        d = r["dense"]
        torch.testing.assert_close(d["sparsedist"], d["horovod"], rtol=1e-6, atol=1e-7)
        s = d["stats"]
        assert s["collectives"] == {"allreduce": 4} and s["compression_ratio"] == 1.0
        assert s["bytes_sent"] == s["bytes_dense"] == 4 * ring_allreduce_bytes(d["sparsedist"].numel(), 4, world)


def test_exchange_aware_optimizer_sends_its_update_as_the_reference_does(results):
    """sparsedist.optim.AdamW / SGD wrapped by the Horovod optimizer: dense warm-up, then each rank's update on the
    wire, bit for bit what ReferenceExchange computes (at 3 ranks Horovod's ring sums the warm-up in another
    order), with identical ranks."""
    world = len(results)
    for kind in ("adamw", "sgd", "adamw-reset"):  # adamw-reset: error reset, consolidated every 3 sparse steps
        for r in results:
            hvd_flat, ref = r["optim"][(kind, "horovod")], r["optim"][(kind, "reference")]
            assert torch.equal(hvd_flat, results[0]["optim"][(kind, "horovod")]), kind
            if world == 2:
                assert torch.equal(hvd_flat, ref), kind
            else:
                torch.testing.assert_close(hvd_flat, ref, rtol=1e-5, atol=1e-6, msg=kind)
            stats = r["optim"][(kind, "stats")]
            assert stats["optimizer"]["warmup_steps"] == 2 and stats["optimizer"]["warmup_over"], stats
            assert stats["collectives"].get("allgather", 0) == 4, stats  # 6 steps: 2 dense, 4 sparse
            assert stats["optimizer"]["consolidations"] == (1 if kind == "adamw-reset" else 0), stats


def test_optimizer_api(results):
    for r in results:
        api = r["api"]
        # backward_passes_per_step=2 equals one pass over the summed loss, with one exchange per step
        torch.testing.assert_close(api["bpps"][0], api["bpps"][1], rtol=1e-6, atol=1e-6)
        assert api["bpps2_steps"] == api["bpps1_steps"] == 3
        assert "computed 2 times" in api["too_many_passes"] and "backward_passes_per_step=1" in api["too_many_passes"]
        # synchronize() + skip_synchronize(): one exchange; a repeated synchronize() does not exchange again
        steps_a, steps_b, _, _ = api["sync"]
        assert (steps_a, steps_b) == (1, 2)
        # state_dict() resumes bit-identically, residuals named by parameter
        straight, resumed, n1, n2, names, keys = api["resume"]
        assert torch.equal(straight, resumed) and n1 == n2 == 4
        assert keys == ["param_groups", "sparsedist", "state"]
        assert names == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "out.bias", "out.weight"]
        # an LR scheduler drives the wrapper's (the wrapped optimizer's) param groups
        assert api["lr"] == pytest.approx(0.1 * 0.25)
        # hvd.broadcast_optimizer_state accepts the wrapper: it initialises the momentum buffers with one
        # exchange of zero gradients on every rank (counted in stats())
        assert api["broadcast"] == (6, 1)
        for collective, error in api["refused"].items():
            if len(results) & (len(results) - 1):
                assert "power-of-two" in error and "ssar_split_allgather" in error, (collective, error)
            else:
                assert error is None, (collective, error)
    for r in results[1:]:
        # a layer only rank 0 uses: the others take part with zeros and stay identical
        assert torch.equal(r["api"]["branchy"], results[0]["api"]["branchy"])
        # the averaged gradients after synchronize() are the same everywhere
        for a, b in zip(r["api"]["sync"][2], results[0]["api"]["sync"][2]):
            assert torch.equal(a, b)
        assert torch.equal(r["api"]["sync"][3], results[0]["api"]["sync"][3])


def test_horovod_backend_primitives(results):
    world = len(results)
    for r in results:
        b = r["backend"]
        # every primitive checked against numpy references on every rank (bf16 and bool included), with and
        # without a timeout, and the same byte accounting as TorchBackend
        assert b["hvd"]["checks"] == b["torch"]["checks"] == b["hvd_timeout"]["checks"]
        assert len(b["hvd"]["checks"]) == 14
        assert b["hvd"]["bytes"] == b["torch"]["bytes"] == b["hvd_timeout"]["bytes"] and b["hvd"]["bytes"][0] > 0
        # sparse allreduce algorithms over Horovod: bitwise equal to the same algorithms over gloo, same bytes
        for algorithm in ("allgather", "ssar_split_allgather", "dsar_split_allgather"):
            assert b["split_digests"][(algorithm, "hvd")] == b["split_digests"][(algorithm, "torch")], algorithm
        if world == 2:  # every SparCML algorithm, recursive doubling included (no folding at a power of two)
            assert b["hvd_sparse"]["checks"] == b["torch_sparse"]["checks"] and len(b["hvd_sparse"]["checks"]) == 15
            assert b["hvd_sparse"]["digests"] == b["torch_sparse"]["digests"]
            assert b["hvd_sparse"]["bytes"] == b["torch_sparse"]["bytes"]
    # the timeout fires on the waiting rank with a clear error; the late ranks still complete the operation
    msg, waited = results[0]["backend"]["timeout"]
    assert "did not complete within 1.0 s" in msg and "allreduce" in msg and 0.9 < waited < 2.4
    for r in results[1:]:
        assert r["backend"]["timeout"] == [float(world)] * 3


def test_mnist_example_under_horovodrun():
    proc = _launch(2, ["examples/mnist_horovod.py", "--compressor", "topk", "--density", "0.01", "--steps", "40",
                       "--quiet"], timeout=240)
    lines = [line.split("]<stdout>:", 1)[-1] for line in proc.stdout.splitlines() if '"compressor"' in line]
    assert len(lines) == 1, f"expected one summary line from rank 0:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(lines[0])
    assert res["launcher"] == "horovodrun" and res["world_size"] == 2 and res["steps"] == 40
    assert res["test_accuracy"] > 30.0, res  # percent; chance is 10
    assert res["compression_ratio"] > 40, res
    assert res["collectives"] == {"allgather": 40}, res
    # every step: a 16-byte header allgather, then the top-1% entries of every layer (int32 index + fp32 value)
    k = sum(count_for_density(n, 0.01) for n in MNIST_MLP_SIZES)
    assert res["bytes_sent"] == 40 * (16 + payload_bytes(k, torch.float32)), res
    assert res["bytes_dense"] == 40 * ring_allreduce_bytes(sum(MNIST_MLP_SIZES), 4, 2), res


SINGLE = r"""
import sys, torch
import sparsedist
assert "sparsedist.horovod" not in sys.modules and "horovod" not in sys.modules, "import sparsedist pulled in Horovod"
# without Horovod, importing sparsedist.horovod says how to install it
sys.modules["horovod"] = None
try:
    import sparsedist.horovod
except ImportError as e:
    assert "bash scripts/build_horovod.sh" in str(e), str(e)
    print("ok", type(e).__name__, e)
del sys.modules["horovod"]
import horovod.torch as hvd
import sparsedist.horovod as sh
try:
    sh.DistributedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
except RuntimeError as e:
    print("ok", "hvd.init" in str(e), e)
hvd.init()
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
sgd = lambda m=0.0: torch.optim.SGD(model.parameters(), lr=0.1, momentum=m)
named = lambda: model.named_parameters()
cases = [
    (lambda: sh.DistributedOptimizer(model, named()), TypeError, "torch.optim.Optimizer"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "nope"), ValueError, "unknown compressor"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "topk", densty=0.1), ValueError, "densty"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "topk", compression=hvd.Compression.fp16), ValueError,
     "value_dtype"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "topk", backend=None), ValueError, "register"),
    (lambda: sh.DistributedOptimizer(sgd(0.9), named(), "dgc", momentum=0.9), ValueError, "momentum=0"),
    (lambda: sh.DistributedOptimizer(sgd(), list(named())[:2], "topk"), ValueError, "does not name 2"),
    (lambda: sh.DistributedOptimizer(sgd(), [("a", p) for _, p in named()], "topk"), ValueError, "duplicated"),
    (lambda: sh.DistributedOptimizer(sgd(), [p for p in model.parameters()], "topk"), TypeError, "named_parameters"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "variance"), ValueError, "named_parameters=model"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), backward_passes_per_step=0), ValueError, "backward_passes"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), "topk").step(lambda: 0.0), ValueError, "closure"),
    (lambda: sh.DistributedOptimizer(sgd(), named()).load_state_dict({"x": 1}), ValueError, "expected"),
    (lambda: sh.DistributedOptimizer(sgd(), named(), check_every=5), ValueError, "named_parameters=model"),
    (lambda: sh.HorovodBackend(timeout=0), ValueError, "timeout"),
    (lambda: sh.HorovodBackend().sendrecv(torch.ones(1), 1, torch.ones(1), 0), ValueError, "not a rank"),
    (lambda: sh.HorovodBackend().alltoall_v([torch.ones(1)] * 2, [1, 1]), ValueError, "one chunk"),
]
for make, exc, words in cases:
    try:
        make()
    except exc as e:
        assert words in str(e), (words, str(e))
        print("ok", type(e).__name__, e)
    else:
        raise SystemExit(f"no {exc.__name__} for case expecting {words!r}")
# one rank: the exchange still runs (selection and feedback), sends no bytes, and checkpoints load back
opt = sh.DistributedOptimizer(sgd(), model, "topk", density=0.2)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
s = opt.stats()
assert s["steps"] == 3 and s["bytes_sent"] == 0 and 0.2 <= s["density"] < 0.5 and s["residual_norm"] > 0, s
sd = opt.state_dict()
opt.load_state_dict(sd)
assert set(sd) == {"state", "param_groups", "sparsedist"}, set(sd)
opt.load_state_dict({k: v for k, v in sd.items() if k != "sparsedist"})  # a plain torch optimizer state dict
sgd().load_state_dict(sd)  # and a plain torch optimizer loads the wrapper's
print("DONE")
"""


def test_errors_single_process_and_import_guard():
    proc = subprocess.run([sys.executable, "-c", SINGLE], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 19, proc.stdout


def test_error_reset_needs_the_module():
    """Error reset localises the model's parameters in a forward pre-hook: named parameters alone are refused,
    before Horovod starts."""
    import sparsedist.horovod as shvd
    import sparsedist.optim as so
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="pass named_parameters=model"):
        shvd.DistributedOptimizer(so.AdamW(layer.parameters(), error_reset=True), layer.named_parameters())
