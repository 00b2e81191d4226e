"""The Horovod program of tests/test_horovod.py, run as ``horovodrun -np P --gloo python horovod_job.py OUT SCENARIOS``.

Every rank runs the comma-separated scenarios and writes its results to ``OUT/rank{r}.pt``; the assertions run
in pytest. Scenarios batch many checks into one launch, because starting horovodrun costs seconds. A
torch.distributed gloo group is started beside Horovod (rendezvous address broadcast with Horovod), so the same
training can also run through the DDP hook and the same primitives through ``TorchBackend`` for comparison.
The model, data and mass-conservation set-up are those of tests/test_hook_ddp.py, imported from it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from sparsedist.collectives.backend import TorchBackend  # noqa: E402
from sparsedist.collectives.choose import CostModel  # noqa: E402
import sparsedist.optim as so  # noqa: E402
from sparsedist.horovod import DistributedOptimizer, HorovodBackend  # noqa: E402
from test_hook_ddp import CONFIGS, Linear1, Net, _batches, _flat, _train  # noqa: E402

CE = nn.functional.cross_entropy


def _hvd_train(rank, compressor, opts, steps=4, momentum=0.0):
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    named = model if compressor == "variance" else model.named_parameters()
    opt = DistributedOptimizer(base, named_parameters=named, compressor=compressor, **opts)
    for x, y in _batches(rank, steps):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    return _flat(model), opt.stats(), opt


# ---------------------------------------------------------------------------------------------------------------
# scenarios: each returns plain data (tensors, numbers, dicts)

# the hook's sparse collectives (SparCML, global top-k) through Horovod; recursive doubling (and 'auto', which may
# pick it) only at a power-of-two number of ranks. 'auto' with the model alone (auto_trials=0) and one configured
# model: measured choices and probed link parameters depend on timing, and the Horovod and DDP runs compared here
# are two separate runs (a dense choice sends everything, unselected, so different choices give different sums).
COLLECTIVES = [("topk", {"density": 0.05, "collective": "ssar_split_allgather"}),
               ("topk", {"density": 0.05, "collective": "dsar_split_allgather"}),
               ("threshold", {"threshold": 0.01, "collective": "ssar_split_allgather"}),
               ("topk", {"density": 0.05, "collective": "gtopk"})]
POWER_OF_TWO = [("topk", {"density": 0.05, "collective": "ssar_recursive_double"}),
                ("topk", {"density": 0.05, "collective": "auto", "auto_trials": 0,
                          "cost_model": CostModel(alpha=20e-6, beta=1e-9)})]


def sc_parity(rank, size):
    """Every configuration of the DDP hook's tests through the Horovod optimizer, and through the DDP hook."""
    out = {}
    configs = CONFIGS + COLLECTIVES + (POWER_OF_TWO if size & (size - 1) == 0 else [])
    for i, (name, opts) in enumerate(configs):
        flat, stats, _ = _hvd_train(rank, name, opts)
        ddp_flat = _train(rank, name, opts)[0]
        out[i] = {"name": name, "opts": dict(opts), "hvd": flat, "stats": stats,
                  "ddp": ddp_flat}
    return out


def sc_bytes(rank, size):
    """Per-step bytes from stats() and the number of elements sent (one buffer per step, so counts are exact)."""
    out = {}
    for name, opts in (("topk", {"density": 0.1}), ("threshold", {"threshold": 0.02}), ("randk", {"density": 0.1})):
        model = Net()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), name,
                                   **opts)
        per_step = []
        for x, y in _batches(rank, 3):
            opt.zero_grad()
            before = opt.stats()["bytes_sent"]
            CE(model(x), y).backward()
            opt.step()
            s = opt.stats()
            nnz = round(s["last_density"] * sum(p.numel() for p in model.parameters()))
            per_step.append((s["bytes_sent"] - before, nnz, s["bytes_received"]))
        out[name] = (per_step, [p.numel() for p in model.parameters()], opt.stats())
    return out


def sc_mass(rank, size):
    """Error feedback conserves gradient mass: P*(w0 - wT)/lr + sum_r residual_r = sum_r sum_t g_r,t."""
    out = {}
    for name, opts in (("topk", {"density": 0.05}), ("threshold", {"threshold": 0.8}),
                       ("randk", {"density": 0.05}),  # (Wangni's rand-k runs without error feedback)
                       ("dgc", {"density": 0.05, "momentum": 0.0, "warmup_steps": 0})):
        model = Linear1(300)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(), name,
                                   **opts)
        g = torch.Generator().manual_seed(7 + rank)
        raw = torch.zeros(300)
        for _ in range(6):
            c = torch.randn(300, generator=g) * (1 + rank)
            raw += c
            opt.zero_grad()
            model(c).backward()
            opt.step()
        residual = opt.sparsify_state.feedback.residuals["w"].clone()
        out[name + str(opts.get("variant", ""))] = (-model.w.detach().clone(), residual, raw)
    return out


def sc_zero_count(rank, size):
    """Threshold steps where every rank, or one rank, sends nothing: no hang, ranks stay identical."""
    model = Linear1(200)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(), "threshold",
                               threshold=1.0)
    g = torch.Generator().manual_seed(3)
    densities = []
    for t in range(5):
        scale = 0.0 if (t < 2 or rank == 0) else 3.0  # steps 0-1: nobody sends; later rank 0 never does
        c = torch.randn(200, generator=g) * scale
        opt.zero_grad()
        model(c).backward()
        opt.step()
        densities.append(opt.stats()["last_density"])
    return model.w.detach().clone(), densities


def sc_dense(rank, size):
    """compressor='none' against plain hvd.DistributedOptimizer (SGD with momentum, 4 steps)."""
    out = {}
    for label in ("sparsedist", "horovod"):
        model = Net()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if label == "sparsedist":
            opt = DistributedOptimizer(base, model.named_parameters(), "none")
        else:
            opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
        for x, y in _batches(rank, 4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
        out[label] = _flat(model)
        if label == "sparsedist":
            out["stats"] = opt.stats()
    return out


def sc_optim(rank, size):
    """sparsedist.optim's AdamW and SGD (exchange-aware: the update goes on the wire, 2 dense warm-up steps) through
    the Horovod optimizer, against sparsedist.optim.ReferenceExchange over torch.distributed, 6 steps."""
    out = {}
    for kind in ("adamw", "sgd", "adamw-reset"):
        for path in ("horovod", "reference"):
            model = Net()
            base = (so.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=2,
                             max_grad_norm=1.0, error_reset=kind == "adamw-reset", sync_every=3 if
                             kind == "adamw-reset" else None) if kind.startswith("adamw") else
                    so.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, warmup_steps=2))
            if path == "horovod":  # error reset localises the module's parameters: it needs the module
                opt = DistributedOptimizer(base, model if base.error_reset else model.named_parameters(), "topk",
                                           density=0.1)
            else:
                opt, exchange = base, so.ReferenceExchange(model, base, density=0.1)
            for x, y in _batches(rank, 6):
                opt.zero_grad()
                CE(model(x), y).backward()
                if path == "reference":
                    exchange()
                opt.step()
            out[(kind, path)] = _flat(model)
            if path == "horovod":
                out[(kind, "stats")] = opt.stats()
    return out


class _Branchy(nn.Module):
    """Net plus a layer that only rank 0 uses: rank 1's gradient for it is None."""

    def __init__(self):
        super().__init__()
        self.net = Net()
        self.extra = nn.Linear(4, 4)

    def forward(self, x, use_extra):
        y = self.net(x)
        return self.extra(y) if use_extra else y


def sc_api(rank, size):
    out = {}
    data = _batches(rank, 8)

    # backward_passes_per_step=2 (two local passes, one exchange) == one pass on the summed loss
    flats = []
    for bpps in (2, 1):
        model = Net()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   model.named_parameters(), "none", backward_passes_per_step=bpps)
        for s in range(3):
            opt.zero_grad()
            (x1, y1), (x2, y2) = data[2 * s], data[2 * s + 1]
            if bpps == 2:
                CE(model(x1), y1).backward()
                CE(model(x2), y2).backward()
            else:
                (CE(model(x1), y1) + CE(model(x2), y2)).backward()
            opt.step()
        flats.append(_flat(model))
        out[f"bpps{bpps}_steps"] = opt.stats()["steps"]
    out["bpps"] = flats

    # more backward passes than declared: a clear error before any communication (so every rank raises alike)
    model = Net()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "topk",
                               density=0.1)
    for x, y in data[:2]:
        CE(model(x), y).backward()
    try:
        opt.step()
        out["too_many_passes"] = None
    except RuntimeError as exc:
        out["too_many_passes"] = str(exc)

    # synchronize(), clip, step() inside skip_synchronize(): one exchange; repeated synchronize() is a no-op
    model = Net()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "topk",
                               density=0.1)
    x, y = data[0]
    CE(model(x), y).backward()
    opt.synchronize()
    after_sync = [p.grad.clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    with opt.skip_synchronize():
        opt.step()
    steps_a = opt.stats()["steps"]
    opt.zero_grad()
    x, y = data[1]
    CE(model(x), y).backward()
    opt.synchronize()
    opt.synchronize()
    opt.step()
    out["sync"] = (steps_a, opt.stats()["steps"], after_sync, _flat(model))

    # state_dict(): stop after 2 steps, resume in a fresh model and optimizer, bit-identical to not stopping
    def make(state=None):
        model = Net()
        if state is not None:
            model.load_state_dict(state)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   model.named_parameters(), "topk", density=0.05)
        return model, opt

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()

    model, opt = make()
    run(model, opt, data[:2])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, data[2:4])
    straight = _flat(model)
    model2, opt2 = make(saved_model)
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, data[2:4])
    out["resume"] = (straight, _flat(model2), opt.stats()["steps"], opt2.stats()["steps"],
                     sorted(saved_opt["sparsedist"]["feedback"]["residuals"]), sorted(saved_opt))

    # a layer only rank 0 uses: rank 1 takes part with zero gradients, ranks stay identical
    model = _Branchy()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "topk",
                               density=0.2)
    for x, y in data[:3]:
        opt.zero_grad()
        CE(model(x, rank == 0), y).backward()
        opt.step()
    out["branchy"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    # LR scheduler on the wrapper
    model = Net()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "topk",
                               density=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in data[:2]:
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        sched.step()
    out["lr"] = opt.param_groups[0]["lr"]

    # Horovod's own broadcast helpers with the wrapper
    model = Net()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(),
                               "topk", density=0.1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    out["broadcast"] = (len(opt.state), opt.stats()["steps"])

    # collectives that need a power-of-two number of ranks over Horovod are refused at other sizes
    refused = {}
    for collective in ("ssar_recursive_double", "auto"):
        try:
            DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "topk",
                                 collective=collective)
            refused[collective] = None
        except ValueError as exc:
            refused[collective] = str(exc)
    out["refused"] = refused
    return out


def sc_backend(rank, size):
    """HorovodBackend's primitives, checked against references by test_mpi_backend's exercisers, and compared
    with TorchBackend (gloo) doing the same calls; then a timeout that fires while a peer is late."""
    from test_mpi_backend import _exercise, _exercise_sparse

    from sparsedist.collectives.sparse_allreduce import sparse_allreduce

    out = {"hvd": _exercise(HorovodBackend(), rank, size),
           "hvd_timeout": _exercise(HorovodBackend(timeout=60), rank, size),
           "torch": _exercise(TorchBackend(), rank, size)}
    if size & (size - 1) == 0:  # all of SparCML's algorithms (recursive doubling needs no folding here)
        out["hvd_sparse"] = _exercise_sparse(HorovodBackend(), rank, size)
        out["torch_sparse"] = _exercise_sparse(TorchBackend(), rank, size)
    # the algorithms every rank takes part in at any size, bitwise against gloo
    digests = {}
    g = torch.Generator().manual_seed(500 + rank)
    idx = torch.randperm(1000, generator=g)[: 40 + 20 * rank]
    val = torch.randn(idx.numel(), generator=g)
    for algorithm in ("allgather", "ssar_split_allgather", "dsar_split_allgather"):
        for label, backend in (("hvd", HorovodBackend()), ("torch", TorchBackend())):
            got = sparse_allreduce(idx, val, 1000, algorithm=algorithm, backend=backend)
            digests[(algorithm, label)] = (hashlib.sha256(got.numpy().tobytes()).hexdigest()[:16],
                                           backend.bytes_sent)
    out["split_digests"] = digests

    # timeout: rank 0 waits at most 1 s for an allreduce rank 1 joins only after 2.5 s
    late = HorovodBackend(timeout=1.0)
    t = torch.ones(3)
    start = time.monotonic()
    if rank == 0:
        try:
            late.allreduce(t)
            out["timeout"] = None
        except RuntimeError as exc:
            out["timeout"] = (str(exc), time.monotonic() - start)
    else:
        time.sleep(2.5)
        late.allreduce(t)  # completes: rank 0's request is still queued in Horovod
        out["timeout"] = t.tolist()
    hvd.barrier()
    return out


SCENARIOS = {f.__name__[3:]: f for f in (sc_parity, sc_bytes, sc_mass, sc_zero_count, sc_dense, sc_optim,
                                          sc_api, sc_backend)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    try:
        port = hvd.broadcast_object(_free_port() if rank == 0 else None, root_rank=0, name="job.port")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=60))
        results = {"rank": rank, "size": size}
        for name in names:
            start = time.perf_counter()
            results[name] = SCENARIOS[name](rank, size)
            results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        print(f"rank {rank} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
