"""Measure the cost model's parameters on the running job: link latency and bandwidth, local work, per-call costs."""

from __future__ import annotations

import statistics
import time

import torch

from .backend import Backend, ring_allreduce_bytes
from .choose import CostModel

__all__ = ["probe"]


def _time_allreduce(backend: Backend, t: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        backend.barrier()
        t0 = time.perf_counter()
        backend.allreduce(t)
        times.append(time.perf_counter() - t0)
    return min(times)  # contention only ever adds time: the fastest repeat is the link's cost


def probe(backend: Backend, *, sizes=(1, 2**12, 2**16, 2**20), repeats: int = 5, local_work: bool = True,
          call_latency: bool = True, device: torch.device | str | None = None) -> CostModel:
    """Measure ``alpha`` and ``beta`` (and the local-work terms) at start-up; a collective call.

    Times ``repeats`` fp32 allreduces at each of ``sizes`` elements (the fastest of each), fits
    ``t = 2(P-1) alpha + 2(P-1)/P * bytes * beta`` by least squares, times ``torch.unique`` on 65536 entries
    (``gamma``) and an add of ``2**20`` elements (``gamma_dense``), times one tiny call of each primitive
    (``call_latency``), and averages everything over ranks with an allreduce so that every rank gets the same
    model (identical choices). Every timing is the fastest of ``repeats`` (contention only adds time). The
    backend's byte counters are left as they were. About 0.1-0.5 s on loopback.

    Args:
        backend: the communicator (every rank must call).
        sizes: allreduce sizes in elements (at least two distinct).
        repeats: timings per size.
        local_work: also measure ``gamma`` and ``gamma_dense`` (else they are 0).
        call_latency: also measure the per-call cost of each primitive (for predictions at this world size).
        device: where the probe tensors live (default CPU; pass the GPU for NCCL).

    Returns:
        A :class:`CostModel`; ``measured`` holds this rank's fastest time per size (``allreduce_s``).
    """
    if len(set(sizes)) < 2 or repeats < 1:
        raise ValueError("probe() needs at least two distinct sizes and repeats >= 1")
    counters = (backend.bytes_sent, backend.bytes_received)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    P = backend.size
    alpha = beta = 0.0
    fastest = {}
    if P > 1:
        _time_allreduce(backend, torch.zeros(max(sizes), device=dev), 1)  # warm-up
        xs, ys = [], []
        for n in sizes:
            t = _time_allreduce(backend, torch.zeros(int(n), device=dev), repeats)
            fastest[int(n)] = t
            xs.append(ring_allreduce_bytes(int(n), 4, P))
            ys.append(t)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        beta = max(slope, 1e-13)
        intercept = my - beta * mx
        if intercept <= 0:  # noisy fit: take the smallest allreduce as pure latency
            intercept = min(ys)
        alpha = max(intercept / (2 * (P - 1)), 1e-8)
    gamma = gamma_dense = 0.0
    if local_work:
        g = torch.Generator().manual_seed(0)
        m = 65536
        idx = torch.randint(0, 64 * m, (2 * m,), generator=g).to(dev)
        val = torch.randn(2 * m, generator=g).to(dev)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
            torch.zeros(uniq.numel(), device=dev).index_add_(0, inv, val)
            ts.append(time.perf_counter() - t0)
        gamma = min(ts) / (2 * m)
        a = torch.ones(2**20, device=dev)
        b = torch.ones(2**20, device=dev)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            a.add_(b)
            ts.append(time.perf_counter() - t0)
        gamma_dense = min(ts) / 2**20
    calls = [0.0, 0.0, 0.0, 0.0]
    if P > 1 and call_latency:
        tiny = torch.zeros(2, device=dev)
        right, left = (backend.rank + 1) % P, (backend.rank - 1) % P
        ops = (lambda: backend.allreduce(tiny), lambda: backend.allgather(tiny),
               lambda: backend.sendrecv(tiny, right, torch.empty(2, device=dev), left),
               lambda: backend.alltoall_v([tiny[:1]] * P, [1] * P))
        for j, op in enumerate(ops):
            ts = []
            for _ in range(repeats):
                backend.barrier()
                t0 = time.perf_counter()
                op()
                ts.append(time.perf_counter() - t0)
            calls[j] = min(ts)
    params = torch.tensor([alpha, beta, gamma, gamma_dense] + calls, dtype=torch.float64, device=dev)
    if P > 1:
        backend.allreduce(params)
        params /= P
    backend.bytes_sent, backend.bytes_received = counters
    vals = [float(v) for v in params.tolist()]
    cl = dict(zip(("allreduce", "allgather", "sendrecv", "alltoall"), vals[4:])) if P > 1 and call_latency \
        else None
    return CostModel(*vals[:4], call_latency=cl, world_size=P if cl else None,
                     measured={"allreduce_s": fastest, "world_size": P})
