"""Sparsified gradient exchange under Horovod: :class:`DistributedOptimizer` and :class:`HorovodBackend`.

``sparsedist.horovod.DistributedOptimizer`` is the sparse counterpart of ``hvd.DistributedOptimizer``::

    import horovod.torch as hvd
    import sparsedist.horovod

    hvd.init()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hvd.broadcast_optimizer_state(base, root_rank=0)           # the plain torch optimizer, not the wrapper
    opt = sparsedist.horovod.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                                  compressor="topk", density=0.01)
    loss.backward(); opt.step(); opt.zero_grad()
    opt.stats()                                                 # bytes sent, compression ratio, ...

Selection, error feedback, wire encoding, the overflow flag and telemetry are the DDP hook's own
(:meth:`sparsedist.SparsifyState.exchange_flat`); only the transport changes. :class:`HorovodBackend`
implements sparsedist's communication primitives with Horovod's collectives, so the exchange is a Horovod
``allgather`` of the encoded sparse payloads (a 16-byte header allgather first, since counts differ per rank),
or a Horovod ``allreduce`` of the values when every rank selects the same indices (shared-seed rand-k) or the
exchange is dense (``compressor="none"``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from typing import Any, Iterable, Iterator, Sequence

import torch

try:
    import horovod.torch as hvd
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        f"sparsedist.horovod needs Horovod built with PyTorch support, and `import horovod.torch` failed ({exc}). "
        f"Install it with `bash scripts/build_horovod.sh` (builds Horovod 0.28.1 with the C++17 change it needs "
        f"for torch >= 2.1, Gloo and MPI controllers; about 4 minutes), then start jobs with "
        f"`horovodrun -np N python train.py`"
    ) from exc

from sparsedist.collectives.backend import Backend
from sparsedist.compressors import COMPRESSORS, Compressor, build_compressor, compressor_options
from sparsedist.hook import STATE_OPTIONS, SparsifyState

__all__ = ["DistributedOptimizer", "HorovodBackend"]

# dtypes Horovod 0.28.1 reduces (others are summed in a wider type) and moves (others travel as raw bytes)
_REDUCE_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int32, torch.int64}
_MOVE_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                torch.float64}

# Horovod matches operations across ranks by name; names must be unique among the operations in flight and
# identical on every rank. Every rank issues sparsedist's collectives in the same order, so a process-wide
# counter gives the same name to the same operation everywhere.
_op_counter = itertools.count()

# hvd.DistributedOptimizer arguments with no meaning here, and what to do instead
_HOROVOD_ONLY = {
    "compression": "sparsedist compresses by selection; to send values in half precision pass "
                   "value_dtype='float16'",
    "op": "gradients are always averaged over ranks (hvd.Average)",
    "gradient_predivide_factor": "gradients are summed and then divided by the number of ranks",
    "num_groups": "the gradients of one dtype and device are exchanged as one buffer",
    "groups": "the gradients of one dtype and device are exchanged as one buffer",
    "sparse_as_dense": "sparse gradients are not supported; build the layers with sparse=False",
    "process_set": "the exchange runs over all Horovod ranks (hvd.global_process_set)",
    "process_group": "the exchange runs through Horovod, not a torch.distributed process group",
    "backend": "the exchange runs through Horovod (HorovodBackend); use sparsedist.register() for "
               "torch.distributed or MPI backends",
}


def _check_initialized() -> None:
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call hvd.init() (import horovod.torch as hvd) first, in a "
                           "job started by horovodrun")


class HorovodBackend(Backend):
    """sparsedist's communication primitives over Horovod's collectives (all Horovod ranks).

    Args:
        timeout: seconds. ``None`` (default) waits for each operation as Horovod does (its stall inspector warns
            after 60 s). A number polls the operation and raises ``RuntimeError`` naming it when it has not
            completed in time (a peer stopped answering or issued a different operation). Horovod cannot cancel
            an operation, so the job should then end.

    Primitives: ``allreduce`` is ``hvd.allreduce_`` with ``op=hvd.Sum`` (in place; float16/32/64 and int32/64
    natively; bfloat16 is summed in float32 and rounded once, bool reduces with logical or, other integers are
    summed in int64); ``allgather`` is ``hvd.allgather`` of a ``(1, n)`` view; ``alltoall_v`` is ``hvd.alltoall``
    with split sizes; dtypes Horovod cannot move (bfloat16, bool) travel as raw bytes. Horovod has no
    point-to-point messages, so ``sendrecv`` is an ``hvd.alltoall`` in which this rank sends only to ``dst`` and
    receives only from ``src``: it is a *collective* call, and every rank must call it, in the same order. That
    holds for rings and pairwise rounds (SparCML's ring allgatherv and split-allgather algorithms, recursive
    doubling on a power-of-two number of ranks), not for patterns in which some ranks stay idle (SparCML's
    recursive doubling folds the ranks beyond the largest power of two with messages only some ranks take part
    in; over Horovod that fails with a receive-count error or waits until ``timeout``, and
    :class:`DistributedOptimizer` refuses ``collective="ssar_recursive_double"``/``"auto"`` at such sizes). With the
    default ``collective="allgather"`` the exchange uses only allreduce and allgather. Byte accounting is the base
    class's, so counts compare with ``TorchBackend``'s.
    """

    def __init__(self, timeout: float | None = None):
        super().__init__()
        _check_initialized()
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self.rank = hvd.rank()
        self.size = hvd.size()

    # -- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _name(op: str) -> str:
        return f"sparsedist.{op}.{next(_op_counter)}"

    def _wait(self, handle, what: str):
        """``hvd.synchronize(handle)``, bounded by the timeout when one is set; returns the operation's output."""
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout
            pause = 1e-5
            while not hvd.poll(handle):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sparsedist HorovodBackend: {what} did not complete within {self.timeout:.1f} s on rank "
                        f"{self.rank} of {self.size} (a peer stopped answering or issued a different operation); "
                        f"Horovod cannot cancel it: end the job")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        try:
            return hvd.synchronize(handle)
        except RuntimeError as exc:  # HorovodInternalError is a RuntimeError
            raise RuntimeError(f"sparsedist HorovodBackend: {what} failed on rank {self.rank} of {self.size}: "
                               f"{exc}") from exc

    @staticmethod
    def _movable(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``t`` itself, or a uint8 view of its bytes when Horovod cannot move its dtype; and the byte factor."""
        if t.dtype in _MOVE_DTYPES:
            return t, 1
        if t.is_complex():
            raise TypeError(f"HorovodBackend does not move {t.dtype} tensors; use a real dtype")
        return t.view(torch.uint8), t.element_size()

    # -- primitives ----------------------------------------------------------------------------------------
    def _allreduce(self, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:  # every rank has the same shape, so every rank skips
            return
        if tensor.is_complex():
            raise TypeError(f"HorovodBackend.allreduce does not support {tensor.dtype}; use a real dtype")
        if tensor.dtype in _REDUCE_DTYPES and tensor.is_contiguous():
            work = tensor
        elif tensor.dtype in _REDUCE_DTYPES:
            work = tensor.contiguous()
        elif tensor.is_floating_point():
            work = tensor.to(torch.float32)
        elif tensor.dtype == torch.bool:
            work = tensor.to(torch.int32)
        else:
            work = tensor.to(torch.int64)
        name = self._name("allreduce")
        self._wait(hvd.allreduce_async_(work, name=name, op=hvd.Sum), f"allreduce {name}")
        if work is not tensor:
            tensor.copy_(work != 0 if tensor.dtype == torch.bool else work)

    def _allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        row = tensor.contiguous().reshape(1, -1)
        moved, factor = self._movable(row)
        name = self._name("allgather")
        out = self._wait(hvd.allgather_async(moved, name=name), f"allgather {name}")
        if factor != 1:
            out = out.view(tensor.dtype)
        return out.reshape(self.size, tensor.numel())

    def _alltoall_v(self, chunks: Sequence[torch.Tensor], recv_counts: Sequence[int]) -> list[torch.Tensor]:
        if len(chunks) != self.size or len(recv_counts) != self.size:
            raise ValueError(f"alltoall_v needs one chunk and one receive count per rank ({self.size}), got "
                             f"{len(chunks)} chunks and {len(recv_counts)} counts")
        dtypes = {c.dtype for c in chunks}
        if len(dtypes) != 1:
            raise TypeError(f"alltoall_v: every chunk must have the same dtype, got {sorted(map(str, dtypes))}")
        recv_counts = [int(n) for n in recv_counts]
        if any(n < 0 for n in recv_counts):
            raise ValueError(f"alltoall_v: receive counts must be >= 0, got {recv_counts}")
        dtype = chunks[0].dtype
        send = torch.cat([c.reshape(-1) for c in chunks])
        moved, factor = self._movable(send)
        splits = torch.tensor([c.numel() * factor for c in chunks], dtype=torch.int32)
        name = self._name("alltoall")
        out, received = self._wait(hvd.alltoall_async(moved, splits=splits, name=name), f"alltoall {name}")
        got = [int(n) // factor for n in received.tolist()]
        if got != recv_counts:
            raise RuntimeError(f"sparsedist HorovodBackend: alltoall {name} on rank {self.rank} expected "
                               f"{recv_counts} elements from ranks 0..{self.size - 1} but received {got}")
        if factor != 1:
            out = out.view(dtype)
        return list(out.split(recv_counts))

    def _sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        for r, label in ((dst, "dst"), (src, "src")):
            if not 0 <= int(r) < self.size:
                raise ValueError(f"sendrecv: {label}={r} is not a rank of this {self.size}-rank Horovod job")
        # Bytes, so that ranks sending different dtypes (or nothing) still agree on the alltoall's dtype.
        payload = send.detach().contiguous().reshape(-1).view(torch.uint8) if send.numel() else \
            torch.empty(0, dtype=torch.uint8, device=recv.device if recv.numel() else send.device)
        empty = payload.new_empty(0)
        chunks = [payload if r == int(dst) else empty for r in range(self.size)]
        counts = [recv.numel() * recv.element_size() if r == int(src) else 0 for r in range(self.size)]
        try:
            got = self._alltoall_v(chunks, counts)[int(src)]
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}. Over Horovod, sendrecv is collective (an alltoall): every rank must call it, in the same "
                f"order. Algorithms in which some ranks stay idle, such as SparCML's recursive doubling on a "
                f"non-power-of-two number of ranks, cannot run over HorovodBackend: use 'ssar_split_allgather', "
                f"'dsar_split_allgather' or 'allgather'") from exc
        if recv.numel():
            recv.copy_(got.view(recv.dtype).view(recv.shape))

    def _barrier(self) -> None:
        if self.timeout is None:
            hvd.barrier()
        else:
            self._allreduce(torch.zeros(1, dtype=torch.int32))


def _split_options(compressor: str | Compressor | None, options: dict[str, Any]) -> tuple[Compressor | None, dict]:
    """``(compressor object or None, SparsifyState options)`` from a name or object and the user's options.

    The same split as :func:`sparsedist.register`: options named in :data:`sparsedist.hook.STATE_OPTIONS` go to
    the state, the rest to the compressor, and unknown names raise ``ValueError`` listing the valid ones.
    """
    for key in options:
        if key in _HOROVOD_ONLY:
            raise ValueError(f"sparsedist.horovod.DistributedOptimizer does not take {key!r}: {_HOROVOD_ONLY[key]}")
    state_opts = {k: v for k, v in options.items() if k in STATE_OPTIONS}
    comp_opts = {k: v for k, v in options.items() if k not in STATE_OPTIONS}
    if isinstance(compressor, Compressor):
        if comp_opts:
            raise ValueError(f"unknown option(s) {sorted(comp_opts)}: a Compressor object carries its own "
                             f"settings; options accepted here: {sorted(set(STATE_OPTIONS) - set(_HOROVOD_ONLY))}")
        return compressor, state_opts
    if compressor is None:
        compressor = "none"
    if isinstance(compressor, str) and compressor in COMPRESSORS:
        unknown = sorted(set(comp_opts) - set(compressor_options(compressor)))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for compressor {compressor!r}; valid: "
                f"{sorted(compressor_options(compressor))} (compressor) and "
                f"{sorted(set(STATE_OPTIONS) - set(_HOROVOD_ONLY))} (exchange)")
    return build_compressor(compressor, **comp_opts), state_opts


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap a torch optimizer so that :meth:`step` first averages the gradients over Horovod ranks, sparsified.

    The sparse counterpart of ``hvd.DistributedOptimizer``, with sparsedist's compressors and error feedback
    (exactly the DDP hook's: :meth:`sparsedist.SparsifyState.exchange_flat`), exchanged with Horovod's
    collectives through :class:`HorovodBackend`.

    Args:
        optimizer: the torch optimizer over the model's parameters (built on every rank the same way).
        named_parameters: ``model.named_parameters()`` (names the residuals in :meth:`state_dict`; every parameter
            of ``optimizer`` must be named, names unique), or the ``nn.Module`` itself (required by
            ``compressor="variance"``, which hooks the model's layers). ``None``: names ``group{g}.param{i}``.
        compressor: ``"topk"`` (default), ``"threshold"``, ``"randk"``, ``"dgc"``, ``"variance"``, ``"none"``
            (dense averaging) or a :class:`~sparsedist.compressors.Compressor` object.
        backward_passes_per_step: backward passes that accumulate into the gradients (locally, no communication)
            before each :meth:`step`; more passes than this before a step raise ``RuntimeError``, as in Horovod.
            The accumulated gradients are summed over passes and averaged over ranks.
        **options: the compressor's options (``density``, ``threshold``, ``momentum``, ...) and the exchange's
            (:data:`sparsedist.hook.STATE_OPTIONS`: ``error_feedback``, ``value_dtype``, ``granularity``,
            ``dense_below``, ``seed``, ``grad_scaler``, ``timeout``, ``check_every``, ``collective``, ...). With
            ``"dgc"`` the optimizer is checked for momentum (it must have none: DGC applies it) here and before
            every step. ``collective="ssar_recursive_double"`` or ``"auto"`` need a power-of-two number of ranks
            over Horovod (see :class:`HorovodBackend`).

    Exchange: on :meth:`synchronize` (called by :meth:`step`), the gradients of the parameters that require
    them are concatenated into one flat buffer per (device, dtype), in the optimizer's parameter order (the same
    on every rank), and averaged over ranks by ``SparsifyState.exchange_flat``; the result is copied back into
    ``param.grad``. A parameter without a gradient on this rank takes part with zeros (another rank may have
    one), so every rank issues the same collectives; it then holds the averaged gradient, as with
    ``hvd.DistributedOptimizer``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's, so LR schedulers work on the
    wrapper. :meth:`state_dict` is the wrapped optimizer's plus a ``"sparsedist"`` key (residuals differ per
    rank: save one file per rank).

    Raises:
        RuntimeError: Horovod is not initialised.
        TypeError: ``optimizer`` is not a torch optimizer; ``named_parameters`` is not (name, parameter) pairs.
        ValueError: unknown compressor or options, unnamed or duplicated parameters, DGC with a momentum optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module | None = None,
                 compressor: str | Compressor | None = "topk", backward_passes_per_step: int = 1, **options: Any):
        # torch.optim.Optimizer.__init__ is deliberately not called: the wrapped optimizer owns the parameter
        # groups and state; this class only inherits the type, so that LR schedulers and GradScaler accept it.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("optimizer is already a sparsedist DistributedOptimizer; wrap the plain torch optimizer")
        if (isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int)
                or backward_passes_per_step < 1):
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
        _check_initialized()
        comp, state_opts = _split_options(compressor, options)

        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not any(p.requires_grad for p in params):
            raise ValueError("the optimizer has no parameter that requires a gradient")
        for p in params:
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError("sparse parameters are not supported; build the layers with sparse=False")
        module = named_parameters if isinstance(named_parameters, torch.nn.Module) else None
        if comp is not None and comp.needs_second_moment and module is None:
            raise ValueError(f"compressor {comp.name!r} collects per-example statistics with hooks on the model's "
                             f"layers: pass named_parameters=model (the nn.Module itself)")
        named = self._name_parameters(optimizer, params, named_parameters, module)
        if state_opts.get("check_every") and module is None:
            raise ValueError("check_every compares the model's parameters and buffers across ranks: pass "
                             "named_parameters=model (the nn.Module itself)")
        size = hvd.size()
        if state_opts.get("collective") in ("ssar_recursive_double", "auto") and size & (size - 1):
            raise ValueError(f"collective={state_opts['collective']!r} over Horovod needs a power-of-two number of "
                             f"ranks, not {size}: SparCML's recursive doubling folds the extra ranks with messages "
                             f"the others take no part in, and Horovod's sendrecv is collective ('auto' may choose "
                             f"recursive doubling). Use 'allgather', 'ssar_split_allgather', 'dsar_split_allgather', "
                             f"'gtopk' or 'dense'")
        if comp is not None and comp.name == "dgc":
            state_opts["optimizer"] = optimizer
        timeout = state_opts.get("timeout")
        self.optimizer = optimizer
        self.backward_passes_per_step = backward_passes_per_step
        self.sparsify_state = SparsifyState(module if module is not None else named, comp,
                                            backend=HorovodBackend(timeout=timeout), **state_opts)
        if comp is not None and hasattr(comp, "set_world_size"):
            comp.set_world_size(self.sparsify_state.world_size)
        self._synchronized = False
        self._skip = False
        self._passes: dict[int, int] = {}
        self._hooked: set[int] = set()
        self._hook_handles: list = []
        self._register_pass_counters()

    # -- construction helpers ------------------------------------------------------------------------------
    @staticmethod
    def _name_parameters(optimizer, params, named_parameters, module) -> list[tuple[str, torch.Tensor]]:
        if named_parameters is None:
            return [(f"group{g}.param{i}", p) for g, group in enumerate(optimizer.param_groups)
                    for i, p in enumerate(group["params"])]
        pairs = list(module.named_parameters() if module is not None else named_parameters)
        if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
                   for x in pairs):
            raise TypeError("named_parameters must be model.named_parameters() ((name, parameter) pairs) or the "
                            "nn.Module")
        names = [n for n, _ in pairs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"named_parameters has duplicated names {dup[:5]}; parameter names must be unique")
        by_id = {id(p): n for n, p in pairs}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"named_parameters does not name {len(missing)} of the optimizer's {len(params)} "
                             f"parameters (e.g. one of shape {tuple(params[missing[0]].shape)}); pass the "
                             f"named_parameters() of the model the optimizer was built for")
        return [(by_id[id(p)], p) for p in params]

    def _register_pass_counters(self) -> None:
        ref = weakref.ref(self)

        def count(param: torch.Tensor) -> None:
            me = ref()
            if me is not None:
                me._passes[id(param)] = me._passes.get(id(param), 0) + 1

        for p in self._params():
            if p.requires_grad and id(p) not in self._hooked:
                self._hook_handles.append(p.register_post_accumulate_grad_hook(count))
                self._hooked.add(id(p))

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- torch.optim.Optimizer interface, delegated ----------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer (on every rank alike: the exchange follows its order)."""
        self.optimizer.add_param_group(param_group)
        self._register_pass_counters()

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self):
        raise TypeError("a sparsedist.horovod.DistributedOptimizer does not pickle; save state_dict() instead")

    def __repr__(self) -> str:
        comp = self.sparsify_state.compressor
        name = "none" if comp is None else comp.name
        return (f"sparsedist.horovod.DistributedOptimizer(compressor={name!r}, ranks={self.sparsify_state.world_size}, "
                f"optimizer={self.optimizer!r})")

    # -- the exchange ----------------------------------------------------------------------------------------
    def _check_passes(self) -> None:
        most = max(self._passes.values(), default=0)
        if most > self.backward_passes_per_step:
            self._passes.clear()
            raise RuntimeError(f"gradients were computed {most} times before step() but backward_passes_per_step="
                               f"{self.backward_passes_per_step}; call step() after every "
                               f"{self.backward_passes_per_step} backward pass(es), or raise backward_passes_per_step "
                               f"to accumulate more passes locally")

    def _buffers(self) -> list[list[torch.Tensor]]:
        """The parameters that take part, grouped by (device, dtype) in order of first appearance."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in self._params():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse or p.grad.layout != torch.strided:
                raise TypeError("sparse gradients are not supported (e.g. nn.Embedding(sparse=True)); build the "
                                "layers with sparse=False")
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        return list(groups.values())

    def synchronize(self) -> None:
        """Average the gradients over ranks now (sparsified), without stepping.

        For work between the exchange and the update, e.g. clipping the averaged gradients::

            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with opt.skip_synchronize():
                opt.step()

        A second call before :meth:`step` (or :meth:`zero_grad`) does nothing: the gradients are already averaged,
        and exchanging them twice would sparsify the average again.
        """
        if self._synchronized:
            return
        self._check_passes()
        buffers = self._buffers()
        state = self.sparsify_state
        with torch.no_grad():
            for i, params in enumerate(buffers):
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                state.exchange_flat(flat, params, index=i, is_last=i == len(buffers) - 1)
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad.copy_(flat[offset:offset + n].view(p.grad.shape))
                    offset += n
        self._passes.clear()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside this context :meth:`step` updates with the gradients as they are, without exchanging them
        (use after :meth:`synchronize`)."""
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure=None):
        """Exchange the gradients (unless :meth:`synchronize` already did, or inside :meth:`skip_synchronize`),
        then run the wrapped optimizer's step. Closures are not supported."""
        if closure is not None:
            raise ValueError("closures are not supported: a closure recomputes the gradients after they were "
                             "exchanged, so they would not be averaged over ranks")
        if not self._skip:
            self.synchronize()
        self._synchronized = False
        self._passes.clear()
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``; also forgets a :meth:`synchronize` not followed by a step."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._synchronized = False
        self._passes.clear()

    # -- telemetry and checkpoints ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This rank's telemetry (bytes sent/received, ``bytes_dense``, ``compression_ratio``, density, ...); the
        keys are documented in :mod:`sparsedist.stats`."""
        return self.sparsify_state.stats()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict()`` (``state``, ``param_groups``) plus the key ``"sparsedist"``:
        this rank's error-feedback residuals and compressor state (by parameter name) and telemetry.

        The torch keys are unchanged, so a plain torch optimizer loads this dict too (the extra key is ignored), and
        ``hvd.broadcast_optimizer_state`` accepts the wrapper. Residuals differ per rank: save one file per rank to
        resume exactly."""
        out = self.optimizer.state_dict()
        out["sparsedist"] = self.sparsify_state.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a plain torch optimizer state dict restores the optimizer only
        (the residuals stay as they are)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError(f"state_dict has keys {sorted(state_dict)[:6]}; expected the output of "
                             f"DistributedOptimizer.state_dict() or of a torch optimizer's state_dict() "
                             f"('state', 'param_groups')")
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sparsedist"})
        if "sparsedist" in state_dict:
            self.sparsify_state.load_state_dict(state_dict["sparsedist"])
        self._synchronized = False
        self._passes.clear()
