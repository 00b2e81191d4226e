"""Shared by the framework-integration tests (Lightning, Accelerate, Transformers) and their torchrun jobs.

The tests launch a job script under ``torchrun`` (2 CPU processes on gloo, every wait bounded), once to train and
save, once to resume through the framework's own checkpointing. Every rank dumps its hook state at save time
(``ref-step{N}-rank{r}.pt``, taken independently of the integration's own shard files), right after the resume
(``start-resume-rank{r}.pt``) and at the end (``end-{phase}-rank{r}.pt``: parameters, losses, stats); the test
compares them tensor by tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
MNIST_SMALL = ROOT / "tests" / "data" / "mnist_small.npz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 180) -> str:
    """Run ``script`` under torchrun with ``nproc`` CPU processes; returns the combined output.

    The output goes to a file, not a pipe: torch elastic starts its workers in sessions of their own, so killing
    torchrun's session leaves them alive, and a worker holding a pipe would block the test forever. On a timeout
    torchrun is stopped (SIGSTOP), every worker (a process whose command line carries ``args[0]``, each test's own
    output directory) gets SIGABRT in turn, on which Python's faulthandler (``PYTHONFAULTHANDLER=1``) prints every
    thread's stack into the report, then torchrun's session and those processes are killed.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if args:  # where it hangs: every thread's Python stack, from every worker; torchrun is stopped first, or
                # it would terminate the other workers as soon as one dies
                os.kill(proc.pid, signal.SIGSTOP)
                pids = subprocess.run(["pgrep", "-f", str(args[0])], capture_output=True, text=True).stdout.split()
                for pid in (int(p) for p in pids if int(p) != proc.pid):  # one at a time: stacks not interleaved
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGABRT)
                    time.sleep(0.5)
                time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            if args:
                subprocess.run(["pkill", "-9", "-f", str(args[0])], check=False)
            proc.wait(timeout=30)
            log.seek(0)
            raise AssertionError(f"{script.name} {' '.join(args)} did not finish within {timeout:.0f} s:\n"
                                 f"{log.read()[-12000:]}") from None
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def dump(out: Path, name: str, value: Any) -> None:
    """Write one rank's record (``name`` includes the rank)."""
    torch.save(value, Path(out) / f"{name}.pt")


def load(out: Path, name: str) -> Any:
    return torch.load(Path(out) / f"{name}.pt", weights_only=False)


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """``a`` and ``b`` are the same nested structure with bit-identical tensors (compared one by one)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ (max |a-b| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def check_resume(out: Path, save_step: int, world_size: int = 2, factor: float = 0.8) -> None:
    """The assertions every framework shares.

    * the hook state each rank loaded equals, tensor by tensor, what that rank held when the checkpoint was saved;
    * the ranks' residuals differ (so a rank-0-only save could not pass), and compressor state is present;
    * after the resumed training every rank holds identical parameters, the hook exchanged gradients
      (``steps`` > 0), and the mean loss of the resumed run's last five logs is below ``factor`` times that of
      the first run's first five.
    """
    refs = [load(out, f"ref-step{save_step}-rank{r}") for r in range(world_size)]
    for r in range(world_size):
        assert_identical(load(out, f"start-resume-rank{r}"), refs[r], f"rank {r}'s restored state")
    names = sorted(refs[0]["feedback"]["residuals"])
    assert names, "the saved state has no residuals"
    assert any(not torch.equal(refs[0]["feedback"]["residuals"][n], refs[1]["feedback"]["residuals"][n])
               for n in names), "ranks 0 and 1 saved identical residuals: the test could not tell them apart"
    assert refs[0]["compressor"] and all(isinstance(v, torch.Tensor) or v for v in refs[0]["compressor"].values()), \
        f"expected compressor state (DGC momenta, a sampling generator), got {refs[0]['compressor']}"
    ends = [load(out, f"end-resume-rank{r}") for r in range(world_size)]
    for r in range(1, world_size):
        assert_identical(ends[r]["params"], ends[0]["params"], f"rank {r}'s parameters against rank 0's")
    assert ends[0]["stats"]["steps"] > save_step, ends[0]["stats"]
    first = load(out, "end-train-rank0")["losses"]
    last = ends[0]["losses"]
    begin, end = sum(first[:5]) / 5, sum(last[-5:]) / 5
    assert end < factor * begin, f"loss did not decrease: first five {first[:5]}, last five {last[-5:]}"
