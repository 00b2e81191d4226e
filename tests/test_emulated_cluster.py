"""launch/emulate_cluster.py: real network namespaces, veth links and tc tbf rate limits.

Runs the allreduce probe on 2, 3 and 4 emulated machines at 100 Mbit/s and checks the bytes on each link
against the ring-allreduce volume (the backend's own counters), the time against the link rate, and that every
namespace and process is gone afterwards, also after a failure, a timeout and Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "launch" / "emulate_cluster.py"
PROBE = ROOT / "launch" / "allreduce_probe.py"

_spec = importlib.util.spec_from_file_location("sparsedist_emulate_cluster", TOOL)
emu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = emu
_spec.loader.exec_module(emu)

_missing = [t for t in ("ip", "tc", "bridge") if shutil.which(t) is None]
_MARKS = [
    pytest.mark.system,
    pytest.mark.skipif(bool(_missing), reason=f"iproute2 not installed ({', '.join(_missing)} missing): "
                                              f"run scripts/install_system.sh"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run the system tests as root)"),
]


def needs_netns(fn):
    for mark in _MARKS:
        fn = mark(fn)
    return fn

ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _ours() -> list[str]:
    """Namespaces of emulate_cluster runs started by this process."""
    return [ns for ns in emu._list_namespaces() if ns.startswith(f"{emu.NS_PREFIX}{os.getpid()}-")]


def _results(res) -> list[dict]:
    out = []
    for text in res.outputs:
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, text
        out.append(json.loads(lines[0][7:]))
    return sorted(out, key=lambda r: r["rank"])


def _ring_bytes(numel: int, world: int) -> int:
    return round(2 * (world - 1) / world * numel * 4)


@needs_netns
@pytest.mark.parametrize("world, offload, torchrun", [(2, True, True), (3, True, False), (4, False, False)])
def test_allreduce_bytes_and_rate_at_100mbit(world, offload, torchrun, record_property):
    """Ranks started directly (RANK/WORLD_SIZE/MASTER_ADDR) or through torchrun --nnodes=N --node_rank=i."""
    numel = 250_000  # 1 MB of float32
    command = [str(PROBE)] if torchrun else [sys.executable, str(PROBE)]
    res = emu.emulate_cluster([*command, "--numel", str(numel), "--repeats", "2"], world, "100mbit",
                              torchrun=torchrun, env=ENV, cwd=str(ROOT), timeout=120, port=29555, offload=offload)
    assert res.ok and res.world_size == world and len(res.links) == world
    assert _ours() == [], "namespaces left behind"
    results = _results(res)
    expected = 2 * _ring_bytes(numel, world)  # two allreduces, each 2(P-1)/P * n * 4 bytes per rank each way
    overhead = []
    for r, link in zip(results, res.links):
        # the backend's counters follow the formula ...
        assert r["bytes_sent"] == r["bytes_received"] == expected, r
        # ... and the TCP payload on the wire is that, plus a few kB of rendezvous and connection set-up
        # (torchrun's agents add their own store traffic)
        slack = 60_000 if torchrun else 30_000
        assert expected <= link.tx_payload_bytes <= expected * 1.005 + slack, (link, expected)
        assert expected <= link.rx_payload_bytes <= expected * 1.005 + slack, (link, expected)
        if offload:  # one set of headers per (up to 64 kB) packet
            assert expected < link.tx_bytes <= 1.02 * expected + slack, (link, expected)
        else:  # 66 bytes of headers per <= 1448-byte segment (4.6%), plus ACKs
            assert 1.04 * expected <= link.tx_bytes <= 1.09 * expected + slack, (link, expected)
        overhead.append(link.tx_bytes / expected - 1)
        # the link really is 100 Mbit/s: the payload alone needs bytes*8/1e8 seconds
        assert r["seconds"] >= 0.95 * expected * 8 / 1e8, (r, expected)
        assert r["busbw_gbit_s"] < 0.1 / 0.95  # the same bound as above (tbf's burst lets a short run reach 0.1)
    record_property("wire_overhead", [round(o, 4) for o in overhead])


@needs_netns
def test_cli_report(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(TOOL), "-n", "2", "--rate", "1gbit", "--json", str(report), "--",
                           "sh", "-c", 'echo "hello from $RANK of $WORLD_SIZE via $MASTER_ADDR:$MASTER_PORT on '
                                       '$GLOO_SOCKET_IFNAME"'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] and data["world_size"] == 2 and data["rate"] == "1gbit" and data["returncodes"] == [0, 0]
    assert [link["address"] for link in data["links"]] == ["10.77.0.1", "10.77.0.2"]
    assert set(data["links"][0]) >= {"tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "tx_payload_bytes"}
    for r in range(2):
        assert f"[r{r}] hello from {r} of 2 via 10.77.0.1:29500 on eth0" in proc.stdout
    assert "2 ranks at 1gbit" in proc.stdout and "tx payload" in proc.stdout
    bad = subprocess.run([sys.executable, str(TOOL), "-n", "2", "--", "sh", "-c", "exit 4"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "exit codes [4, 4]" in bad.stdout


@needs_netns
def test_failure_and_timeout_clean_up():
    fail = ["sh", "-c", 'if [ "$RANK" = 1 ]; then echo boom; exit 3; fi; sleep 30']
    with pytest.raises(RuntimeError, match=r"exit codes \[-9, 3\]"):
        emu.emulate_cluster(fail, 2, "100mbit", timeout=60, grace=0.5)
    assert _ours() == []
    res = emu.emulate_cluster(fail, 2, "100mbit", timeout=60, grace=0.5, check=False)
    assert res.returncodes == [-9, 3] and not res.ok and "boom" in res.outputs[1]
    assert _ours() == []
    t0 = time.monotonic()
    marker = f"{30 + os.getpid() % 1000 / 1000:.3f}"  # a sleep argument no other process uses
    with pytest.raises(TimeoutError, match="still running"):
        emu.emulate_cluster(["sleep", marker], 3, "1gbit", timeout=1.5)
    assert time.monotonic() - t0 < 20
    assert _ours() == []
    assert _processes_running(["sleep", marker]) == [], "processes left running"


def _processes_running(argv: list[str]) -> list[int]:
    """Pids of live (non-zombie) processes whose command line is exactly ``argv``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if [c.decode(errors="replace") for c in cmdline] == argv and state != "Z":
            found.append(int(entry.name))
    return found


@needs_netns
def test_ctrl_c_removes_everything():
    marker = f"{60 + os.getpid() % 1000 / 1000:.3f}"  # a sleep argument no other process uses
    proc = subprocess.Popen([sys.executable, str(TOOL), "-n", "2", "--rate", "100mbit", "--",
                             "sh", "-c", f"exec sleep {marker}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"{emu.NS_PREFIX}{proc.pid}-"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = [ns for ns in emu._list_namespaces() if ns.startswith(prefix)]
            pids = [p for ns in names for p in emu._run("ip", "netns", "pids", ns, check=False).stdout.split()]
            if len(names) == 3 and len(pids) >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"emulated cluster did not start: {emu._list_namespaces()}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    assert [ns for ns in emu._list_namespaces() if ns.startswith(prefix)] == []
    assert _processes_running(["sleep", marker]) == [], "rank processes survived Ctrl-C"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@needs_netns
def test_stale_namespaces_of_dead_runs_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{emu.NS_PREFIX}{dead.pid}-beef-br"
    live = f"{emu.NS_PREFIX}{os.getpid()}-beef-br"  # this process is alive: must be left alone
    emu._run("ip", "netns", "add", stale)
    emu._run("ip", "netns", "add", live)
    try:
        removed = emu.cleanup_stale()
        names = emu._list_namespaces()
        assert stale in removed and stale not in names
        assert live in names and live not in removed
    finally:
        emu._run("ip", "netns", "del", stale, check=False)
        emu._run("ip", "netns", "del", live, check=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"command": ["true"], "nranks": 1}, ValueError, "2..8"),
    ({"command": ["true"], "nranks": 9}, ValueError, "2..8"),
    ({"command": "python x.py", "nranks": 2}, TypeError, "list of strings"),
    ({"command": ["true"], "nranks": 2, "rate": "fast"}, ValueError, "100mbit"),
    ({"command": ["true"], "nranks": 2, "rate": "10mbps"}, ValueError, "tc units"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        emu.emulate_cluster(**kwargs)


def test_parse_rate():
    assert emu.parse_rate("100mbit") == 1e8
    assert emu.parse_rate("1gbit") == 1e9
    assert emu.parse_rate("10GBIT") == 1e10
    assert emu.parse_rate("2.5gbit") == 2.5e9
