"""scripts/gpu_checks.sh, the one call a session makes when a GPU is lent, dry-run on the CPU (DEVICE=cpu, SMALL=1):
every step runs and leaves its log, and the one-rank overlap JSON comes back."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_script_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in (tmp_path / "test_cuda.log").read_text()
    assert "topk (exact)" in (tmp_path / "selection.log").read_text()
    rows = json.loads((tmp_path / "overlap_cpu_1rank.json").read_text())
    assert len(rows) == 4 and all(r["device"] == "cpu" and r["ranks"] == 1 and r["exchange_s"] > 0 for r in rows)
