"""Real SLURM on this one machine: munged, slurmctld and slurmd started by the test, jobs submitted with sbatch.

The fixture writes a private slurm.conf (own ports, own munge socket and key, state in a temp dir), starts the
three daemons in the foreground as children of this process, and in a ``finally`` cancels its jobs and stops
exactly those daemons by pid. Nothing system-wide (``/etc/munge``, ``/run/munge``, system services) is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sparsedist.dist import slurm_port

ROOT = Path(__file__).resolve().parents[1]
# The MNIST runs the sbatch jobs do: the project's example with a sparsifying top-k hook (prints its JSON
# summary), and launch/mnist_smoke.py (DDP + allreduce_hook, prints "RESULT {json}", lighter).
# _check_training() understands both, so either job can use either.
MNIST_EXAMPLE = ["examples/mnist.py", "--compressor", "topk", "--density", "0.01", "--steps", "40", "--quiet"]
MNIST_SMOKE = ["launch/mnist_smoke.py", "--steps", "30"]

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("slurmctld") is None,
                       reason="slurmctld not installed (run scripts/install_system.sh: apt-get install slurmctld "
                              "slurmd slurm-client munge)"),
]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _stop(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _wait_for(cond, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    text = "\n".join(f"--- {p}:\n{Path(p).read_text()[-3000:]}" for p in logs if Path(p).exists())
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s\n{text}")


@pytest.fixture(scope="module")
def slurm():
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (run scripts/install_system.sh)")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root to start job steps; run the system tests as root")
    tmp = Path(tempfile.mkdtemp(prefix="sparsedist-slurm-"))
    procs: list[tuple[str, subprocess.Popen]] = []
    env = dict(os.environ, SLURM_CONF=str(tmp / "slurm.conf"))
    for k in list(env):
        if k.startswith("SLURM_") and k != "SLURM_CONF":  # the test may itself run inside a SLURM job
            del env[k]
    try:
        key = tmp / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        sock = tmp / "munge.sock"
        procs.append(("munged", subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={tmp / 'munged.pid'}", f"--seed-file={tmp / 'munged.seed'}",
             f"--log-file={tmp / 'munged.log'}"],
            stdout=open(tmp / "munged.out", "w"), stderr=subprocess.STDOUT)))
        _wait_for(sock.exists, 20, "munged", [tmp / "munged.out"])

        host = socket.gethostname()
        ctld_port, d_port = _free_ports(2)
        for sub in ("state", "spool"):
            (tmp / sub).mkdir()
        (tmp / "slurm.conf").write_text(f"""\
ClusterName=sparsedist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
StateSaveLocation={tmp / 'state'}
SlurmdSpoolDir={tmp / 'spool'}
SlurmctldPidFile={tmp / 'slurmctld.pid'}
SlurmdPidFile={tmp / 'slurmd.pid'}
SlurmctldLogFile={tmp / 'slurmctld.log'}
SlurmdLogFile={tmp / 'slurmd.log'}
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        procs.append(("slurmctld", subprocess.Popen(["slurmctld", "-D", "-i"], env=env,
                                                    stdout=open(tmp / "slurmctld.out", "w"),
                                                    stderr=subprocess.STDOUT)))
        procs.append(("slurmd", subprocess.Popen(["slurmd", "-D"], env=env, stdout=open(tmp / "slurmd.out", "w"),
                                                 stderr=subprocess.STDOUT)))

        def idle():
            for name, p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n"
                                       f"{(tmp / (name + '.out')).read_text()[-3000:]}")
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        _wait_for(idle, 40, "SLURM node", [tmp / "slurmctld.out", tmp / "slurmd.out"])
        yield {"env": env, "tmp": tmp, "host": host}
    finally:
        try:
            if any(n == "slurmctld" and p.poll() is None for n, p in procs):
                # cancel whatever this test submitted, and let the steps end before slurmd goes
                subprocess.run(["scancel", "--full", "--quiet", "--user=root"], env=env, timeout=15,
                               capture_output=True)
                _wait_for(lambda: subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                                                 timeout=10).stdout.strip() == "", 20, "job cancellation")
        except Exception:  # noqa: BLE001 - stopping the daemons below matters more
            pass
        for name, p in reversed(procs):
            _stop(p, name)
        shutil.rmtree(tmp, ignore_errors=True)


def _job_state(env, job_id: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                       timeout=10)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _run_job(slurm, argv: list[str], timeout: float = 100, extra_env: dict | None = None) -> tuple[dict, str]:
    """Submit (argv prints the job id with --parsable), wait for a final state, return (state, output)."""
    env = dict(slurm["env"], PYTHONPATH=str(ROOT), PYTHON=sys.executable, **(extra_env or {}))
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"submission failed: {r.stdout}\n{r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit(), r.stdout
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = _job_state(slurm["env"], job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                     "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], env=slurm["env"], timeout=10)
        pytest.fail(f"job {job_id} did not finish within {timeout:.0f} s: {state}")
    out_path = Path(state.get("StdOut", ""))
    output = out_path.read_text() if out_path.is_file() else ""
    assert state["JobState"] == "COMPLETED" and state.get("ExitCode") == "0:0", (
        f"job {job_id} ended {state.get('JobState')} exit {state.get('ExitCode')}:\n{output}")
    state["JobId"] = job_id
    return state, output


def _check_training(output: str, launcher: str) -> None:
    """Rank 0's report: ``RESULT {json}`` from mnist_smoke.py, or the JSON summary of examples/mnist.py."""
    smoke = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if smoke:
        assert len(smoke) == 1, f"expected one RESULT line from rank 0:\n{output}"
        res = json.loads(smoke[0][len("RESULT "):])
        assert res["launcher"] == launcher and res["world_size"] == 2 and res["backend"] == "gloo"
        assert res["params_identical"] is True
        assert res["last_loss"] < 0.75 * res["first_loss"], res
        assert res["test_accuracy"] > 0.5, res
        return
    summaries = [json.loads(line) for line in output.splitlines()
                 if line.startswith("{") and '"compressor"' in line]
    assert len(summaries) == 1, f"expected one summary line from rank 0:\n{output}"
    res = summaries[0]
    assert res["world_size"] == 2 and res["steps"] > 0, res
    assert res["test_accuracy"] > 20.0, res  # percent; 10 is chance
    if res["compressor"] not in ("ddp", "none"):
        assert res["bytes_sent"] > 0 and res["compression_ratio"] > 5, res


def test_sbatch_one_task_per_slot(slurm):
    """Template (a): 2 srun tasks, ranks from SLURM_PROCID/SLURM_NTASKS, MNIST DDP with a top-k sparsifying hook."""
    state, output = _run_job(slurm, ["bash", "slurm/submit.sh", "srun", *MNIST_EXAMPLE], extra_env={
        "NODES": "1", "TASKS_PER_NODE": "2", "TIME": "5", "PARTITION": "debug",
        "OUTPUT": str(slurm["tmp"] / "a-%j.out"), "SBATCH_EXTRA": "--parsable"})
    assert state["NumTasks"] == "2" and state["Partition"] == "debug", state
    assert f"2 tasks on {slurm['host']}" in output
    _check_training(output, "slurm")


def test_sbatch_torchrun_per_node(slurm):
    """Template (b): srun starts one torchrun (c10d rendezvous) that starts 2 workers."""
    state, output = _run_job(slurm, ["bash", "slurm/submit.sh", "torchrun", *MNIST_EXAMPLE], extra_env={
        "NODES": "1", "TASKS_PER_NODE": "2", "TIME": "5",
        "OUTPUT": str(slurm["tmp"] / "b-%j.out"), "SBATCH_EXTRA": "--parsable"})
    assert state["NumTasks"] == "1" and state["NumCPUs"] == "2", state
    _check_training(output, "torchrun")


def test_srun_derives_rendezvous_from_slurm(slurm):
    """No MASTER_ADDR/PORT: sparsedist.dist.init() takes the first node of the node list and the job-id port."""
    worker = ["tests/test_dist_init.py", "--worker"]
    state, output = _run_job(slurm, [
        "sbatch", "--parsable", "-n", "2", "-t", "5", f"--output={slurm['tmp'] / 'c-%j.out'}",
        "--wrap", f"unset MASTER_ADDR MASTER_PORT; srun {sys.executable} {' '.join(worker)}"],
        extra_env={"SD_EXPECT": json.dumps({"world_size": 2}), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    results = sorted((json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in results] == [(0, 2, 0), (1, 2, 1)], output
    port = slurm_port(state["JobId"], 0)
    assert all(r["master"] == [slurm["host"], str(port)] for r in results), (results, port)
