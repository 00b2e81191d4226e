"""The torchrun launcher of the integration tests (tests/jobs/integration_common.py): a job that hangs is killed,
its workers included (torch elastic puts them in sessions of their own), and reported with its output and every
process's Python stacks."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))
from integration_common import torchrun  # noqa: E402

HANG = Path(__file__).resolve().parent / "jobs" / "hang_job.py"


def test_a_hanging_job_is_killed_with_its_workers_and_reported(tmp_path):
    out = tmp_path / "hang-output"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 8 s") as err:
        torchrun(HANG, str(out), timeout=8)
    assert time.monotonic() - start < 60
    assert str(err.value).count("rank up") == 2  # the workers' output reached the report
    assert str(err.value).count('hang_job.py", line') >= 2  # and so did where each of them hung
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], f"workers left running: {left}"
