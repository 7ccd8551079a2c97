"""`hetero-strict`: a torch.distributed backend on gloo that keeps NCCL's and HCCL's contract.

gloo forgives what NCCL, HCCL and BKCL refuse, so CPU tests of an island pass
on code that would fail on the first real multi-chip island. This backend runs
the same data over gloo but refuses and reports what the vendor libraries do.
It is the default backend of emulated islands (the emulated accelerator's
`dist_backend`); `backend: gloo` on an emulated island opts out of it:

    import accelerators.strict_backend as strict
    strict.register()                                  # importing `accelerators` does it once torch is loaded
    dist.init_process_group(strict.BACKEND_NAME, store=store, rank=r, world_size=n)

Enforced (NCCL/HCCL rules):

- **Device tensors only.** Every tensor of every collective and point-to-point
  op must live in the island's device memory, decided by `is_device_tensor`
  (pluggable: `set_device_tensor_predicate`). By default: the current
  accelerator's `is_device_memory` when it has one (the emulated chip: its
  memory ledger holds the tensor's storage); otherwise a non-`cpu` tensor.
  A host tensor raises `HostTensorRefused` naming the op and the tensor.
- **Rendezvous.** A send completes only once the peer's matching receive is
  running: the receive announces itself in the group's store, the send waits
  for that, and only then do both post to gloo (a few store round trips per
  op: about twice gloo's latency for small messages on loopback).
- **Issue order per pair.** The point-to-point operations between two ranks run
  one after the other, in the order each rank issued them, sends and receives
  alike (PyTorch's NCCL runs each pair's ops on one stream): a receive issued
  after a send to the same peer does not start before that send completes.
- **Tags carry no meaning.** The n-th send from A to B matches B's n-th receive
  from A, whatever tags either side passed. `recv` from any source is refused.
- **Batches.** The ops of one `dist.batch_isend_irecv` call toward one peer run
  as one unit (NCCL's group call), so a batched exchange in both directions
  completes where the same ops issued one by one deadlock.
- **Deadlocks are reported.** When both ranks of a pair have an operation
  running toward each other and neither can match the other (two sends, two
  receives), or when an operation has waited `HETERO_STRICT_TIMEOUT` seconds
  (default 300) without completing, the operation fails with `P2PDeadlock`
  naming both ranks and their pending operations, instead of hanging. The
  pair stays failed; later operations on it raise the same error.

Not enforced (documented differences from the vendors):

- small messages: real NCCL completes a send that fits its buffers (a few MB)
  before the receive runs, so some crossing sends pass there and fail here
  (this backend is the stricter one);
- ordering between different peers, between point-to-point ops and collectives
  (NCCL puts them on different streams), and a batch's coupling across peers;
- matching sizes and dtypes of a send and its receive beyond what gloo checks;
- collectives are gloo's (after the device check): their order across ranks and
  their results are gloo's; a blocking one is charged to the emulated chip's
  compute queue (strict_stream_time.py), an asynchronous one nothing; a
  collective some rank never calls waits for the group's timeout (as under NCCL's watchdog) and is
  not reported by the pair watchdog above;
- `set_device` (which device a process drives): the emulated accelerator's
  strict mode checks that, not this backend; stream semantics of the returned
  work objects: `wait()` blocks the host (its timeout argument is ignored: the
  pair's watchdog bounds it).

Parts (one job each): strict_errors.py (the name and the errors), strict_device.py
(which tensors are device memory), strict_stream_time.py (a blocking collective's device
time, a send's order after compute), strict_p2p.py (the per-pair ordered streams and their
rendezvous), strict_watchdog.py (deadlock reports); this module is the process group that
dispatches to them and to gloo, and its registration.

Notes: a crossing is reported about a second after both sides stall (they
publish their running entries in the store; a peer's entry must look stuck on
two looks half a second apart). A batch is recognised by its caller's frame
(`dist.batch_isend_irecv` issues a Python group's ops one by one). Object
collectives (`all_gather_object`, `broadcast_object_list`) stage through host
tensors and are refused, as a device-only backend's would need device ones.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, GroupName

from accelerators.strict_device import check_device, is_device_tensor, set_device_tensor_predicate
from accelerators.strict_errors import BACKEND_NAME, HostTensorRefused, P2PDeadlock, StrictBackendError
from accelerators.strict_p2p import Entry, Op, P2PWork, PairStream, PointToPoint, calling_batch
from accelerators.strict_stream_time import on_compute_stream
from accelerators.strict_watchdog import TIMEOUT_ENV, WATCH_INTERVAL_S, PairWatchdog

__all__ = ["BACKEND_NAME", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "WATCH_INTERVAL_S", "HostTensorRefused",
           "P2PDeadlock", "StrictBackendError", "StrictProcessGroup", "deadlock_timeout", "is_device_tensor",
           "register", "set_device_tensor_predicate"]

DEFAULT_TIMEOUT_S = 300.0

Tensors = list[torch.Tensor]


class _Gloo(PointToPoint, Protocol):
    """The gloo backend's calls this group makes: pybind methods of c10d's Backend that torch's
    stubs leave out (they declare them on ProcessGroup only), in the (tensors, opts) form."""

    def allreduce(self, tensors: Tensors, opts: dist.AllreduceOptions) -> dist.Work: ...
    def allreduce_coalesced(self, tensors: Tensors, opts: dist.AllreduceCoalescedOptions) -> dist.Work: ...
    def broadcast(self, tensors: Tensors, opts: dist.BroadcastOptions) -> dist.Work: ...
    def reduce(self, tensors: Tensors, opts: dist.ReduceOptions) -> dist.Work: ...
    def allgather(self, outputs: list[Tensors], inputs: Tensors, opts: AllgatherOptions) -> dist.Work: ...
    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                        opts: AllgatherOptions) -> dist.Work: ...
    def reduce_scatter(self, outputs: Tensors, inputs: list[Tensors],
                       opts: dist.ReduceScatterOptions) -> dist.Work: ...
    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                             opts: dist.ReduceScatterOptions) -> dist.Work: ...
    def gather(self, outputs: list[Tensors], inputs: Tensors, opts: dist.GatherOptions) -> dist.Work: ...
    def shutdown(self) -> None: ...
    def scatter(self, outputs: Tensors, inputs: list[Tensors], opts: dist.ScatterOptions) -> dist.Work: ...
    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                      output_split_sizes: list[int], input_split_sizes: list[int],
                      opts: dist.AllToAllOptions) -> dist.Work: ...
    def barrier(self, opts: dist.BarrierOptions) -> dist.Work: ...


class StrictProcessGroup(dist.ProcessGroup):
    """A process group with NCCL/HCCL's contract, moving data through gloo.

    torch hands a Python group its collectives in the (tensors, opts) form only; the other
    overloads torch's stubs declare on ProcessGroup never reach it, hence the override ignores."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta):
        super().__init__(rank, size)  # type: ignore[call-arg]  # pylint: disable=no-value-for-parameter  # pybind overload (rank, size)
        gloo = dist.ProcessGroupGloo(dist.PrefixStore(f"{BACKEND_NAME}/gloo/", store), rank, size, timeout)
        self.gloo = cast(_Gloo, gloo)   # the same object, typed with the calls torch's stubs omit
        self.state_store = dist.PrefixStore(f"{BACKEND_NAME}/p2p/", store)
        self._streams: dict[int, PairStream] = {}
        self._streams_lock = threading.Lock()
        self._batch: tuple[list, list[P2PWork]] | None = None  # (p2p_op_list, works not yet handed out)
        self._watchdog = PairWatchdog(rank, self._live_streams, deadlock_timeout())

    def getBackendName(self) -> str:  # noqa: N802  (torch's name)
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    # torch keeps a group's name on its C++ backends, which a Python group has none of.
    def _set_group_name(self, name: str) -> None:
        self._group_name = GroupName(name)

    @property
    def group_name(self) -> GroupName:
        return getattr(self, "_group_name", GroupName(""))

    # Point-to-point ------------------------------------------------------------------
    def send(self, tensors: Tensors, dst: int, tag: int = 0) -> dist.Work:
        check_device("send", tensors)
        return self._p2p("send", tensors, dst, tag)

    def recv(self, tensors: Tensors, src: int, tag: int = 0) -> dist.Work:
        check_device("recv", tensors)
        return self._p2p("recv", tensors, src, tag)

    def recv_anysource(self, tensors: Tensors, tag: int = 0) -> dist.Work:
        raise StrictBackendError(f"{BACKEND_NAME}: recv without a source is not supported by NCCL/HCCL; "
                                 "name the peer")

    def _p2p(self, kind: str, tensors: Tensors, peer: int, tag: int) -> P2PWork:
        if len(tensors) != 1:
            raise StrictBackendError(f"{BACKEND_NAME}: {kind} takes one tensor, got {len(tensors)}")
        if not 0 <= peer < self.size() or peer == self.rank():
            raise StrictBackendError(f"{BACKEND_NAME}: {kind} peer {peer} is not another rank of this "
                                     f"group of {self.size()} (this is rank {self.rank()})")
        batch = calling_batch()
        if batch is not None:
            return self._batched(batch)
        stream = self._stream(peer)
        op = stream.new_op(kind, tensors[0], tag)
        stream.issue(Entry([op]))
        return P2PWork(op)

    def _batched(self, p2p_op_list: list) -> P2PWork:
        """Inside dist.batch_isend_irecv: issue the whole batch on its first op, one entry per peer."""
        if self._batch is None or self._batch[0] is not p2p_op_list:
            for p2p in p2p_op_list:  # all refused or none issued: a half-issued batch would shift the order
                check_device(f"batch_isend_irecv {'send' if p2p.op is dist.isend else 'recv'}", [p2p.tensor])
            entries: dict[int, list[Op]] = {}
            works = []
            for p2p in p2p_op_list:
                kind = "send" if p2p.op is dist.isend else "recv"
                peer = p2p.group_peer
                op = self._stream(peer).new_op(kind, p2p.tensor, p2p.tag)
                entries.setdefault(peer, []).append(op)
                works.append(P2PWork(op))
            for peer, ops in entries.items():
                self._stream(peer).issue(Entry(ops))
            self._batch = (p2p_op_list, works)
        work = self._batch[1].pop(0)
        if not self._batch[1]:
            self._batch = None
        return work

    def _stream(self, peer: int) -> PairStream:
        with self._streams_lock:
            if peer not in self._streams:
                self._streams[peer] = PairStream(self.rank(), peer, self.state_store, self.gloo)
            return self._streams[peer]

    def _live_streams(self) -> list[PairStream]:
        with self._streams_lock:
            return list(self._streams.values())

    # Collectives: gloo's, after the device check -------------------------------------
    def allreduce(self, tensors: Tensors, opts: Any = None) -> dist.Work:  # type: ignore[override]  # list form only
        check_device("all_reduce", tensors)
        opts = opts or dist.AllreduceOptions()
        return on_compute_stream(opts, lambda: self.gloo.allreduce(tensors, opts))

    def allreduce_coalesced(self, tensors: Tensors, opts: Any = None) -> dist.Work:
        check_device("all_reduce_coalesced", tensors)
        opts = opts or dist.AllreduceCoalescedOptions()
        return on_compute_stream(opts, lambda: self.gloo.allreduce_coalesced(tensors, opts))

    def broadcast(self, tensors: Tensors, opts: Any = None) -> dist.Work:  # type: ignore[override]  # list form only
        check_device("broadcast", tensors)
        opts = opts or dist.BroadcastOptions()
        return on_compute_stream(opts, lambda: self.gloo.broadcast(tensors, opts))

    def reduce(self, tensors: Tensors, opts: Any = None) -> dist.Work:  # type: ignore[override]  # list form only
        check_device("reduce", tensors)
        opts = opts or dist.ReduceOptions()
        return on_compute_stream(opts, lambda: self.gloo.reduce(tensors, opts))

    def allgather(self, output_lists: list[Tensors], inputs: Tensors,  # type: ignore[override]  # list form only
                  opts: Any = None) -> dist.Work:
        check_device("all_gather", [output_lists, inputs])
        opts = opts or AllgatherOptions()
        return on_compute_stream(opts, lambda: self.gloo.allgather(output_lists, inputs, opts))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                          opts: Any = None) -> dist.Work:
        check_device("all_gather_into_tensor", [output, input])
        opts = opts or AllgatherOptions()
        return on_compute_stream(opts, lambda: self.gloo._allgather_base(output, input, opts),  # pylint: disable=protected-access
                                 staged_bytes=output.nbytes)

    _allgather_base = all_gather_single

    def reduce_scatter(self, outputs: Tensors, input_lists: list[Tensors],  # type: ignore[override]  # list form only
                       opts: Any = None) -> dist.Work:
        check_device("reduce_scatter", [outputs, input_lists])
        opts = opts or dist.ReduceScatterOptions()
        return on_compute_stream(opts, lambda: self.gloo.reduce_scatter(outputs, input_lists, opts))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                              opts: Any = None) -> dist.Work:
        check_device("reduce_scatter_tensor", [output, input])
        opts = opts or dist.ReduceScatterOptions()
        return on_compute_stream(opts, lambda: self.gloo._reduce_scatter_base(output, input, opts),  # pylint: disable=protected-access
                                 staged_bytes=input.nbytes)

    # torch's stub names the base's parameters outputTensor/inputTensor; torch passes them by position
    _reduce_scatter_base = reduce_scatter_single  # type: ignore[assignment]

    def gather(self, output_lists: list[Tensors], inputs: Tensors,  # type: ignore[override]  # list form only
               opts: Any = None) -> dist.Work:
        check_device("gather", [output_lists, inputs])
        opts = opts or dist.GatherOptions()
        return on_compute_stream(opts, lambda: self.gloo.gather(output_lists, inputs, opts))

    def scatter(self, outputs: Tensors, input_lists: list[Tensors],  # type: ignore[override]  # list form only
                opts: Any = None) -> dist.Work:
        check_device("scatter", [outputs, input_lists])
        opts = opts or dist.ScatterOptions()
        return on_compute_stream(opts, lambda: self.gloo.scatter(outputs, input_lists, opts))

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,  # pylint: disable=redefined-builtin
                      output_split_sizes: list[int], input_split_sizes: list[int], opts: Any = None) -> dist.Work:
        check_device("all_to_all_single", [output, input])
        opts = opts or dist.AllToAllOptions()
        return on_compute_stream(opts, lambda: self.gloo.alltoall_base(output, input, output_split_sizes,
                                                                       input_split_sizes, opts))

    def barrier(self, opts: Any = None) -> dist.Work:
        return self.gloo.barrier(opts or dist.BarrierOptions())

    # Teardown ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the watchdog and the pair streams (destroy_process_group calls this)."""
        self._watchdog.stop()
        streams = self._live_streams()
        for stream in streams:
            if stream.pending:  # ops the peer never matched: fail them rather than wait forever
                stream.fail_all(StrictBackendError(
                    f"{BACKEND_NAME}: the process group was destroyed while rank {self.rank()} still had "
                    f"point-to-point operations toward rank {stream.peer} pending"))
            stream.stop()
        for stream in streams:
            stream.thread.join(timeout=5)
        # gloo's worker threads are joined here, not in a destructor at interpreter exit
        # (torch 2.13: a joinable thread destroyed there aborts the process after its work is done)
        self.gloo.shutdown()


def deadlock_timeout() -> float:
    """Seconds an operation may wait before it is reported (HETERO_STRICT_TIMEOUT, default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise StrictBackendError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _create(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> StrictProcessGroup:
    return StrictProcessGroup(store, rank, size, timeout)


def register() -> str:
    """Make `hetero-strict` known to torch.distributed (idempotent); return its name."""
    if dist.is_available() and BACKEND_NAME.upper() not in dist.Backend._plugins:  # pylint: disable=protected-access
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu"])
    return BACKEND_NAME
