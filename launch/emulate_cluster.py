#!/usr/bin/env python
"""An emulated cluster on one Linux machine: N ranks, each in its own network namespace, behind rate-limited links.

Honest communication benchmarks need a slow network; loopback is far faster than any cluster's. This tool
builds one, runs a training command on every rank, and reports what crossed each link::

    sudo python launch/emulate_cluster.py -n 4 --rate 100mbit -- python launch/allreduce_probe.py --numel 1000000
    sudo python launch/emulate_cluster.py -n 4 --rate 1gbit --torchrun -- examples/mnist.py --steps 50

Topology (all of it inside namespaces this run creates; the host's own network is never touched)::

    rank 0 netns  eth0 10.77.0.1 --veth-- p0 ┐
    rank 1 netns  eth0 10.77.0.2 --veth-- p1 ├ br0 (a bridge in its own netns)
    ...                                      ┘

Every link is limited to ``rate`` in each direction with ``tc qdisc ... tbf`` on both ends of the veth pair
(``netem`` delay/loss is not assumed to exist). Each rank's command runs with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK=0``, ``LOCAL_WORLD_SIZE=1``, ``MASTER_ADDR=10.77.0.1``, ``MASTER_PORT`` and
``GLOO_SOCKET_IFNAME=eth0`` (so :func:`sparsedist.dist.init` and ``torch.distributed``'s ``env://`` work) and,
unless set already, ``OMP_NUM_THREADS`` = cores // N (the ranks share this machine's cores), or,
with ``--torchrun``, as ``torchrun --nnodes=N --node_rank=i --nproc_per_node=1 --master_addr=10.77.0.1`` (the
command is then the script and its arguments).

Reported: the bytes and packets each rank's interface sent and received while the command ran (the kernel's
interface counters before and after: everything on the wire, i.e. payload plus TCP/IP/Ethernet headers, ACKs
and the rendezvous), and the wall-clock from start to the last rank's exit.

Cleanup: every namespace (and with it every veth and the bridge) is deleted and every process started in them
is killed on normal exit, on error, on Ctrl-C and on SIGTERM/SIGHUP. Names carry a per-run prefix
``sdemu-<pid>-<random>-``, so runs in parallel do not collide; namespaces left by a run that was killed with
SIGKILL are removed by the next run (its pid is gone), or with ``--cleanup``. Needs root (or CAP_NET_ADMIN and
CAP_SYS_ADMIN) and iproute2 (``ip``, ``tc``, ``bridge``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

__all__ = ["emulate_cluster", "ClusterResult", "LinkStats", "cleanup_stale", "parse_rate"]

NS_PREFIX = "sdemu-"
SUBNET = "10.77.0"          # 10.77.0.1 .. 10.77.0.8, only inside this run's namespaces
MIN_RANKS, MAX_RANKS = 2, 8
HEADER_BYTES = 14 + 20 + 32  # Ethernet + IPv4 + TCP with timestamps, per packet
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$", re.IGNORECASE)
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(rate: str) -> float:
    """``"100mbit"`` -> ``1e8`` (bits per second). Units: bit, kbit, mbit, gbit, tbit (tc's, powers of 1000)."""
    m = _RATE_RE.match(str(rate).strip())
    if not m:
        raise ValueError(f"rate must look like 100mbit, 1gbit or 10gbit (tc units bit/kbit/mbit/gbit), got {rate!r}")
    bps = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if bps < 8000:
        raise ValueError(f"rate {rate!r} is below 8kbit; tc tbf cannot shape that slowly in a useful way")
    return bps


@dataclass
class LinkStats:
    """What crossed one rank's link while the command ran (rank side of the veth pair: tx = sent by the rank)."""

    rank: int
    address: str
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int

    @property
    def tx_payload_bytes(self) -> int:
        """Estimated TCP payload sent: ``tx_bytes - 66 * tx_packets``.

        66 bytes is what each packet carries besides payload here: Ethernet (14) + IPv4 (20) + TCP with the
        timestamp option Linux uses by default (32). Exact for TCP over IPv4 without segmentation offload (the
        default); pure ACKs count as zero payload. (A physical link adds 24 bytes of preamble, FCS and
        inter-frame gap per frame that no interface counter shows.)
        """
        return self.tx_bytes - HEADER_BYTES * self.tx_packets

    @property
    def rx_payload_bytes(self) -> int:
        """Estimated TCP payload received: ``rx_bytes - 66 * rx_packets`` (see :attr:`tx_payload_bytes`)."""
        return self.rx_bytes - HEADER_BYTES * self.rx_packets


@dataclass
class ClusterResult:
    """The outcome of :func:`emulate_cluster`.

    Attributes:
        world_size: number of ranks.
        rate: the link rate as given (e.g. ``"100mbit"``), each direction of each link.
        wall_s: seconds from starting the ranks to the last one exiting.
        returncodes: exit status per rank (negative: killed by that signal).
        links: per-rank :class:`LinkStats`.
        outputs: per-rank combined stdout/stderr.
    """

    world_size: int
    rate: str
    wall_s: float
    returncodes: list[int]
    links: list[LinkStats]
    outputs: list[str] = field(repr=False)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    @property
    def total_tx_bytes(self) -> int:
        return sum(link.tx_bytes for link in self.links)

    def to_dict(self, with_outputs: bool = False) -> dict:
        d = asdict(self)
        if not with_outputs:
            d.pop("outputs")
        for link, row in zip(self.links, d["links"]):
            row["tx_payload_bytes"] = link.tx_payload_bytes
            row["rx_payload_bytes"] = link.rx_payload_bytes
        d["total_tx_bytes"] = self.total_tx_bytes
        d["ok"] = self.ok
        return d


# -- small helpers around ip/tc -------------------------------------------------------------------------------

def _run(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _list_namespaces() -> list[str]:
    out = _run("ip", "-j", "netns", "list", check=False).stdout.strip()
    if not out:
        return []
    try:
        return [entry["name"] for entry in json.loads(out)]
    except (ValueError, KeyError, TypeError):
        return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process still running in namespace ``ns`` (only processes this tool started live there)."""
    for _ in range(5):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _run("ip", "netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by emulate_cluster runs whose process no longer exists; returns their names."""
    removed = []
    for ns in _list_namespaces():
        m = re.match(rf"^{re.escape(NS_PREFIX)}(\d+)-", ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


def _counters(ns: str, dev: str) -> dict:
    out = _run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev).stdout
    stats = json.loads(out)[0]["stats64"]
    return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}


def _disable_ipv6(ns: str) -> None:
    # No IPv6 router/neighbour solicitations in the byte counts. Best effort: a kernel without IPv6 has none.
    _run("ip", "netns", "exec", ns, "sh", "-c",
         "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; "
         "do [ -w $f ] && echo 1 > $f; done; true", check=False)


def _tbf(ns: str, dev: str, bps: float, rate: str, burst_ms: float = 10.0) -> None:
    # the token bucket: burst_ms at line rate (10 ms: 100mbit 125 kB, 1gbit 1.25 MB), at least 32 kB
    burst = max(32 * 1024, int(bps / 8 * burst_ms / 1000))
    _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
         "rate", rate, "burst", str(burst), "latency", "50ms")


class _Cluster:
    """Creates the namespaces and links; ``close()`` removes them (idempotent)."""

    def __init__(self, nranks: int, rate: str, offload: bool = True, burst_ms: float = 10.0):
        self.offload = offload
        self.burst_ms = burst_ms
        self.prefix = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-"
        self.bridge_ns = self.prefix + "br"
        self.rank_ns = [f"{self.prefix}r{i}" for i in range(nranks)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nranks)]
        self.created: list[str] = []
        self.nranks = nranks
        self.rate = rate
        self.bps = parse_rate(rate)

    def _add_ns(self, ns: str) -> None:
        self.created.append(ns)  # recorded first: a half-made namespace is still removed
        _run("ip", "netns", "add", ns)
        _disable_ipv6(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.rank_ns):
            self._add_ns(ns)
            port = f"p{i}"
            # Without offload (gso_max_segs 1) the kernel hands the link one MTU-sized packet at a time, as a
            # real NIC puts them on the wire, so the counters include every packet's headers; with offload a
            # 64 kB super-packet is counted with one set of headers (tbf still charges every segment's).
            nogso = ["gso_max_segs", "1"] if not self.offload else []
            _run("ip", "-n", ns, "link", "add", "eth0", *nogso, "type", "veth", "peer", "name", port, *nogso,
                 "netns", br)
            _run("ip", "-n", br, "link", "set", port, "master", "br0")
            _run("ip", "-n", br, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _tbf(ns, "eth0", self.bps, self.rate, self.burst_ms)   # rank -> bridge
            _tbf(br, port, self.bps, self.rate, self.burst_ms)     # bridge -> rank
        self._wait_forwarding()

    def _wait_forwarding(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            out = _run("bridge", "-n", self.bridge_ns, "-j", "link", "show", check=False).stdout.strip()
            try:
                states = {e["ifname"]: e.get("state") for e in json.loads(out or "[]")}
            except ValueError:
                states = {}
            up = [_run("ip", "-n", ns, "-j", "link", "show", "dev", "eth0").stdout for ns in self.rank_ns]
            if (len(states) == self.nranks and all(s == "forwarding" for s in states.values())
                    and all('"operstate":"UP"' in u for u in up)):
                return
            time.sleep(0.1)
        raise RuntimeError(f"emulated links did not come up within {timeout:.0f} s: bridge ports {states}")

    def close(self) -> None:
        for ns in reversed(self.created):
            _delete_namespace(ns)
        self.created = []


class _Interrupted(BaseException):
    """SIGTERM/SIGHUP while the cluster runs: unwinds through the finally that removes the namespaces."""


def _check_prerequisites() -> None:
    missing = [tool for tool in ("ip", "tc", "bridge") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"emulate_cluster needs iproute2 ({', '.join(missing)} not found): "
                           f"apt-get install iproute2")
    if os.geteuid() != 0:
        raise PermissionError("emulate_cluster creates network namespaces and needs root (or CAP_NET_ADMIN and "
                              "CAP_SYS_ADMIN): run it with sudo")


def emulate_cluster(
    command: Sequence[str],
    nranks: int,
    rate: str = "1gbit",
    *,
    torchrun: bool = False,
    port: int = 29500,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    echo: bool = False,
    check: bool = True,
    grace: float = 10.0,
    offload: bool = True,
    burst_ms: float = 10.0,
) -> ClusterResult:
    """Run ``command`` on ``nranks`` emulated machines joined by ``rate``-limited links; report link bytes and time.

    Args:
        command: the program and its arguments (with ``torchrun=True``: the script and its arguments).
        nranks: number of ranks, 2..8; one network namespace each.
        rate: link rate in tc units, e.g. ``"100mbit"``, ``"1gbit"``, ``"10gbit"``; applies to each direction
            of each rank's link.
        torchrun: start each rank as ``torchrun --nnodes=nranks --node_rank=i --nproc_per_node=1``.
        port: ``MASTER_PORT`` on rank 0's address (namespaces are private, so any port is free).
        timeout: seconds for the whole run; then every rank is killed and ``TimeoutError`` raised.
        env: extra environment variables for every rank (on top of this process's environment).
        cwd: working directory of the ranks.
        echo: print every rank's output as it comes, prefixed ``[rN]``.
        check: raise ``RuntimeError`` with the failing ranks' output if any rank exits non-zero.
        grace: seconds the other ranks may keep running after one fails (they are usually stuck waiting for
            it) before they are killed.
        offload: segmentation offload on the veth links (default on). On, the kernel passes up to 64 kB per
            packet: little CPU per byte, so the link rate and not the CPU limits the ranks; tbf still charges
            the headers of every 1500-byte segment, but the interface counters show one set of headers per
            64 kB (``tx_bytes`` ~ payload + 0.3%). Off, every packet is at most one MTU as on a real Ethernet
            link and ``tx_bytes`` includes every packet's headers (payload + ~4.6% + ACKs), at several times
            the CPU cost per byte (on a small machine, 1gbit becomes CPU-bound). ``tx_payload_bytes`` is the
            TCP payload either way.
        burst_ms: the tbf token bucket, in milliseconds at line rate (at least 32 kB). After an idle spell a
            link passes that much at memory speed; a real NIC has no such bucket (docs/estimate.md).

    Returns:
        :class:`ClusterResult` (``links[r].tx_bytes`` etc. are bytes on rank r's wire, headers included).

    Raises:
        ValueError/TypeError: bad arguments. PermissionError: not root. RuntimeError: iproute2 missing, set-up
        failed, or (``check``) a rank failed. TimeoutError: the run exceeded ``timeout``.
    """
    if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
        raise TypeError("command must be a non-empty list of strings, e.g. ['python', 'train.py']")
    if isinstance(nranks, bool) or not isinstance(nranks, int) or not MIN_RANKS <= nranks <= MAX_RANKS:
        raise ValueError(f"nranks must be an integer in {MIN_RANKS}..{MAX_RANKS}, got {nranks!r}")
    parse_rate(rate)
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not burst_ms > 0:
        raise ValueError(f"burst_ms must be positive, got {burst_ms}")
    _check_prerequisites()
    cleanup_stale()

    cluster = _Cluster(nranks, rate, offload, burst_ms)
    procs: list[subprocess.Popen] = []
    outputs: list[list[str]] = [[] for _ in range(nranks)]
    readers: list[threading.Thread] = []
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum, frame):
            raise _Interrupted(f"emulate_cluster: received signal {signum}; removing the emulated cluster")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, _on_signal)
    try:
        cluster.build()
        before = [_counters(ns, "eth0") for ns in cluster.rank_ns]
        base_env = dict(os.environ)
        base_env.update(env or {})
        # N "machines" share this machine's cores: give each rank its share of threads, as torchrun does for
        # several processes per node, unless the caller chose. Without this each rank's intra-op pool takes every
        # core, and the spinning pools starve DDP's communication thread (measured: char-GPT, 4 ranks on 2 cores,
        # plain DDP 1.77 s/step at 10gbit against 0.24 s/step with one thread per rank).
        base_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nranks)))
        master = cluster.addresses[0]
        start = time.monotonic()
        for i, ns in enumerate(cluster.rank_ns):
            rank_env = dict(base_env, GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0",
                            MASTER_ADDR=master, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
            if torchrun:
                for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                    rank_env.pop(key, None)
                argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nranks}", f"--node_rank={i}",
                        "--nproc_per_node=1", f"--master_addr={master}", f"--master_port={port}", *command]
            else:
                rank_env.update(RANK=str(i), WORLD_SIZE=str(nranks), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
                argv = list(command)
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=rank_env, cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, errors="replace", start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p, outputs[i], f"[r{i}] " if echo else None), daemon=True)
            t.start()
            readers.append(t)

        deadline = start + timeout
        failed_at = None
        ends: list[float | None] = [None] * nranks
        while any(e is None for e in ends):
            now = time.monotonic()
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = now
                    if p.returncode != 0 and failed_at is None:
                        failed_at = now
            if now > deadline:
                raise TimeoutError(f"emulate_cluster: ranks {[i for i, e in enumerate(ends) if e is None]} still "
                                   f"running after {timeout:.0f} s; all ranks killed\n" + _tails(outputs))
            if failed_at is not None and now > failed_at + grace:
                for i, p in enumerate(procs):
                    if ends[i] is None:
                        _kill_group(p)
            time.sleep(0.02)
        wall = max(e for e in ends if e is not None) - start
        for t in readers:
            t.join(timeout=5)
        after = [_counters(ns, "eth0") for ns in cluster.rank_ns]
        links = [LinkStats(i, cluster.addresses[i], **{k: after[i][k] - before[i][k] for k in before[i]})
                 for i in range(nranks)]
        result = ClusterResult(nranks, rate, wall, [p.returncode for p in procs], links,
                               ["".join(lines) for lines in outputs])
        if check and not result.ok:
            raise RuntimeError(f"emulate_cluster: exit codes {result.returncodes}\n" + _tails(outputs))
        return result
    finally:
        # Cleanup must not itself be interrupted: hold off SIGINT/SIGTERM/SIGHUP until it is done (< 1 s).
        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for p in procs:
                if p.poll() is None:
                    _kill_group(p)
            cluster.close()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)


def _pump(proc: subprocess.Popen, sink: list[str], prefix: str | None) -> None:
    for line in proc.stdout:
        sink.append(line)
        if prefix is not None:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tails(outputs: list[list[str]], lines: int = 30) -> str:
    return "\n".join(f"--- rank {i} (last {lines} lines):\n" + "".join(out[-lines:]) for i, out in enumerate(outputs))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run a command on N ranks in network namespaces joined by rate-limited links "
                    "(tc tbf); report the bytes that crossed each link and the wall-clock.",
        usage="%(prog)s -n N [--rate 100mbit] [--torchrun] [options] -- COMMAND [ARGS...]")
    p.add_argument("-n", "--nranks", type=int, help=f"number of ranks ({MIN_RANKS}..{MAX_RANKS})")
    p.add_argument("--rate", default="1gbit", help="link rate each way, tc units: 100mbit, 1gbit, 10gbit (default 1gbit)")
    p.add_argument("--torchrun", action="store_true",
                   help="start each rank as torchrun --nnodes=N --node_rank=i (COMMAND is then SCRIPT [ARGS])")
    p.add_argument("--port", type=int, default=29500, help="MASTER_PORT (default 29500)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before every rank is killed (default 600)")
    p.add_argument("--no-offload", dest="offload", action="store_false",
                   help="MTU-sized packets, so the byte counters include every packet's headers as on a real "
                        "link (several times the CPU per byte; at 1gbit+ the CPU may become the limit)")
    p.add_argument("--burst-ms", type=float, default=10.0,
                   help="tbf token bucket in ms at line rate (default 10; at least 32 kB): traffic after an idle "
                        "spell passes this much at memory speed")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="do not echo the ranks' output")
    p.add_argument("--cleanup", action="store_true",
                   help="only remove namespaces left by emulate_cluster runs that no longer exist, then exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    if args.cleanup:
        _check_prerequisites()
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespace(s)" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nranks is None:
        p.error("give -n N and a command after --")
    try:
        res = emulate_cluster(command, args.nranks, args.rate, torchrun=args.torchrun, port=args.port,
                              timeout=args.timeout, echo=not args.quiet, check=False,
                              offload=args.offload, burst_ms=args.burst_ms)
    except (ValueError, TypeError, PermissionError, RuntimeError, TimeoutError) as exc:
        print(f"emulate_cluster: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emulate_cluster: interrupted; the emulated cluster was removed", file=sys.stderr)
        return 130
    except _Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 143
    report = res.to_dict()
    print(f"\n{res.world_size} ranks at {res.rate}: wall {res.wall_s:.2f} s, exit codes {res.returncodes}")
    print(f"{'rank':>4} {'address':>11} {'tx bytes':>14} {'rx bytes':>14} {'tx pkts':>9} {'rx pkts':>9} "
          f"{'tx payload':>14}")
    for link in res.links:
        print(f"{link.rank:>4} {link.address:>11} {link.tx_bytes:>14,} {link.rx_bytes:>14,} "
              f"{link.tx_packets:>9,} {link.rx_packets:>9,} {link.tx_payload_bytes:>14,}")
    print(f"total sent on all links: {res.total_tx_bytes:,} bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
