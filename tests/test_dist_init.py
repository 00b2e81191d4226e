"""sparsedist.dist: launcher detection (pure), and real multi-process initialisation.

The multi-process tests start this file as a script (``python tests/test_dist_init.py --worker``) under the
launcher being tested, with that launcher's variables only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import sparsedist.dist

from sparsedist.dist import LaunchEnv, detect, expand_hostlist, init, shutdown, slurm_port

ROOT = Path(__file__).resolve().parents[1]

LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCALRANKID")


# -- host lists and ports ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[1-2],c", ["a1", "b1", "b2", "c"]),
    ("gpu-[8-10]", ["gpu-8", "gpu-9", "gpu-10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("rack[1-2]-node[01-02].cluster", ["rack1-node01.cluster", "rack1-node02.cluster",
                                       "rack2-node01.cluster", "rack2-node02.cluster"]),
    ("x[3],y[0-0]", ["x3", "y0"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["", "  ", "node[1-2", "node1-2]", "node[a-b]", "node[3-1]", "a,,b", "n[[1]]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


def test_slurm_port_is_deterministic_and_in_range():
    ports = {slurm_port(j) for j in range(20000)}
    assert len(ports) == 20000 and min(ports) == 12000 and max(ports) == 31999
    assert slurm_port("4242") == slurm_port(4242) == 12000 + 4242
    assert slurm_port(4242, 0) == slurm_port(4242, "batch") == slurm_port(4242)
    assert slurm_port(4242, 1) != slurm_port(4242, 0)
    with pytest.raises(ValueError, match="job id"):
        slurm_port("abc")


# -- detection (pure) ----------------------------------------------------------------------------------------

def test_detect_nothing():
    assert detect({"PATH": "/usr/bin", "HOME": "/root"}) is None


def test_detect_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500",
           "TORCHELASTIC_RUN_ID": "x",
           # torchrun under srun: torchrun's variables win over SLURM's per-node task id
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "9"}
    assert detect(env) == LaunchEnv("torchrun", 3, 8, 1, "h0", 29500)


def test_detect_torchrun_needs_master():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})


def test_detect_slurm_batch_shell_is_not_a_launch(monkeypatch):
    """The sbatch script's own shell has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step: not rank 0 of N."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "vm",
           "SLURM_JOB_ID": "7", "SLURM_NPROCS": "2"}
    assert detect(env) is None
    _clean_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="inside SLURM job 7 but not in an srun step"):
        init()


def test_detect_openmpi_wins_over_slurm_batch_step():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "PMIX_RANK": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "5"}
    assert detect(env) == LaunchEnv("openmpi", 2, 4, 0, None, None)
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    assert detect(env) == LaunchEnv("openmpi", 2, 4, 0, "10.0.0.1", 1234)


def test_detect_mpich_and_pmix():
    assert detect({"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1"}) == \
        LaunchEnv("mpich", 1, 3, 1, None, None)
    # srun --mpi=pmix: size and local rank from SLURM
    assert detect({"PMIX_RANK": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == \
        LaunchEnv("pmix", 5, 8, 1, None, None)
    # bare PMIx: the size is asked from mpi4py at init time
    assert detect({"PMIX_RANK": "0"}) == LaunchEnv("pmix", 0, None, 0, None, None)


def test_detect_slurm_derives_master_from_nodelist_and_job_id():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEPID": "0",
           "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_ID": "123456"}
    assert detect(env) == LaunchEnv("slurm", 5, 8, 1, "gpu07", slurm_port(123456))
    # the step's node list and task count win over the job's (a step on part of the allocation)
    env.update(SLURM_STEP_NODELIST="gpu[08,11]", SLURM_STEP_NUM_TASKS="6", SLURM_STEP_ID="2")
    assert detect(env) == LaunchEnv("slurm", 5, 6, 1, "gpu08", slurm_port(123456, 2))
    env.update(MASTER_ADDR="login1", MASTER_PORT="4000")
    assert detect(env) == LaunchEnv("slurm", 5, 6, 1, "login1", 4000)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, r"rank 2 is outside \[0, 2\)"),
    ({"RANK": "0", "WORLD_SIZE": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "world size must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "a", "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"}, "SLURM_JOB_ID"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-",
      "SLURM_JOB_ID": "1"}, "host list"),
])
def test_detect_rejects_bad_variables(env, match):
    with pytest.raises(ValueError, match=match):
        detect(env)


def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key in LAUNCHER_KEYS or key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)


def test_init_without_launcher_says_how_to_start(monkeypatch):
    import torch.distributed as dist

    _clean_env(monkeypatch)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="(?s)no launcher detected.*torchrun.*srun.*mpirun"):
        init()
    with pytest.raises(ValueError, match="timeout"):
        init(timeout=-1)
    with pytest.raises(TypeError, match="backend"):
        init(backend=3)
    assert not dist.is_initialized()


# -- real processes ------------------------------------------------------------------------------------------

def _worker_main() -> None:
    """Run under a launcher: init(), check it against the launcher's own view, allreduce, init() again."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    expect = json.loads(os.environ["SD_EXPECT"])
    standalone = bool(expect.get("standalone"))
    info = init(timeout=60, standalone=standalone)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    rank, world, local = info
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
    assert world == expect["world_size"], (world, expect)
    if "rank" in expect:
        assert rank == expect["rank"]
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2, t
    again = init()
    assert again == info, (again, info)
    os.write(1, ("RESULT " + json.dumps({"rank": rank, "world_size": world, "local_rank": local,
                                  "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]],
                                  "sum": t.item()}) + "\n").encode())  # one write: lines of several ranks never interleave
    shutdown()
    assert not dist.is_initialized()


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not (k in LAUNCHER_KEYS or k.startswith(LAUNCHER_PREFIXES))}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    return env


def _free_port(lo: int = 1024, hi: int = 65535) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _results(procs, timeout: float = 90) -> list[dict]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker failed ({p.returncode}):\n{out}\n{err}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = [json.loads(line[7:]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(res, key=lambda r: r["rank"])


def _spawn(envs: list[dict]):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    return [subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for e in envs]


def test_init_under_torchrun_single_script():
    """launch/torchrun_single.sh starts 2 workers; each init() reads torchrun's variables."""
    env = _base_env()
    env.update(SD_EXPECT=json.dumps({"world_size": 2}), NPROC="2", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/torchrun_single.sh", str(Path(__file__).resolve()), "--worker"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                 key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in res] == [(0, 2, 0), (1, 2, 1)]
    assert all(r["sum"] == 3.0 for r in res)


def test_mnist_under_torchrun_multi_script():
    """launch/torchrun_multi.sh on two "nodes" (two torchrun agents here), c10d rendezvous, MNIST DDP."""
    port = _free_port(29400)
    procs = []
    for node in range(2):
        env = _base_env()
        env.update(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", RDZV_HOST="127.0.0.1",
                   RDZV_PORT=str(port), PYTHON=sys.executable)
        procs.append(subprocess.Popen(["bash", "launch/torchrun_multi.sh", "launch/mnist_smoke.py", "--steps", "20"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, out + err
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, outs
    res = json.loads(lines[0][7:])
    assert res["launcher"] == "torchrun" and res["world_size"] == 2 and res["params_identical"] is True
    assert res["last_loss"] < res["first_loss"]


@pytest.mark.system
@pytest.mark.skipif(shutil.which("horovodrun") is None or importlib.util.find_spec("horovod") is None,
                    reason="Horovod not installed (run scripts/build_horovod.sh)")
def test_horovodrun_script(tmp_path):
    """launch/horovodrun.sh (gloo controller) starts 2 Horovod ranks that allreduce."""
    script = tmp_path / "hvd_check.py"
    script.write_text(
        "import horovod.torch as hvd, torch\n"
        "hvd.init()\n"
        "s = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)\n"
        "print('RESULT', hvd.rank(), hvd.size(), hvd.local_rank(), s.item(), flush=True)\n")
    env = _base_env()
    env.update(NP="2", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/horovodrun.sh", str(script)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sorted(line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT " in line)
    assert got == ["0 2 0 3.0", "1 2 1 3.0"], proc.stdout


@pytest.mark.parametrize("world", [2, 3])
def test_init_from_slurm_variables(world):
    """SLURM's variables as srun sets them: address from the node list, port from the job id."""
    port = _free_port(12000, 31999)
    envs = []
    for r in range(world):
        e = _base_env()
        e.update(SLURM_PROCID=str(r), SLURM_NTASKS=str(world), SLURM_LOCALID=str(r), SLURM_STEP_ID="0",
                 SLURM_JOB_NODELIST="localhost,node[2-3]", SLURM_JOB_ID=str(port - 12000),
                 SD_EXPECT=json.dumps({"world_size": world, "rank": r}))
        envs.append(e)
    res = _results(_spawn(envs))
    assert [(x["rank"], x["world_size"], x["local_rank"]) for x in res] == [(r, world, r) for r in range(world)]
    assert all(x["master"] == ["localhost", str(port)] for x in res)
    assert all(x["sum"] == world * (world + 1) / 2 for x in res)


def test_init_standalone():
    e = _base_env()
    e["SD_EXPECT"] = json.dumps({"world_size": 1, "rank": 0, "standalone": True})
    res = _results(_spawn([e]))
    assert [(x["rank"], x["world_size"], x["local_rank"], x["sum"]) for x in res] == [(0, 1, 0, 1.0)]


def _agent_env(**extra):
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3", "GROUP_WORLD_SIZE": "1",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_elastic_store_scopes_each_restart_in_keys_of_its_own():
    """torch's shared agent store keeps the previous attempt's keys (pytorch#135712): one prefix per attempt."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    server.set("default_pg/0//rank_1", "stale address of the killed attempt")
    store = sparsedist.dist.elastic_store("127.0.0.1", server.port, 2, timedelta(seconds=10), _agent_env())
    assert isinstance(store, torch.distributed.PrefixStore)
    store.set("default_pg/0//rank_1", "fresh")
    assert server.get("sparsedist/attempt-2/default_pg/0//rank_1") == b"fresh"
    assert server.get("default_pg/0//rank_1") == b"stale address of the killed attempt"
    # a key of the previous attempt is invisible to this one
    with pytest.raises(Exception):
        torch.distributed.PrefixStore("sparsedist/attempt-3", server).wait(["default_pg/0//rank_1"],
                                                                           timedelta(milliseconds=200))


@pytest.mark.parametrize("env", [
    {},  # not torchrun with a shared store
    {"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"},  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"},  # no restarts: nothing stale
])
def test_elastic_store_leaves_other_launches_to_env_rendezvous(env):
    assert sparsedist.dist.elastic_store("127.0.0.1", 1, 2, timedelta(seconds=1), env) is None


def test_elastic_store_warns_with_the_remedy_on_several_nodes():
    with pytest.warns(RuntimeWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert sparsedist.dist.elastic_store("127.0.0.1", 1, 4, timedelta(seconds=1),
                                             _agent_env(GROUP_WORLD_SIZE="2")) is None


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()

