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
  their results are gloo's, with no device time charged; a collective some rank
  never calls waits for the group's timeout (as under NCCL's watchdog) and is
  not reported by the pair watchdog above;
- `set_device` (which device a process drives): the emulated accelerator's
  strict mode checks that, not this backend; stream semantics of the returned
  work objects: `wait()` blocks the host (its timeout argument is ignored: the
  pair's watchdog bounds it).

Notes: a crossing is reported about a second after both sides stall (they
publish their running entries in the store; a peer's entry must look stuck on
two looks half a second apart). A batch is recognised by its caller's frame
(`dist.batch_isend_irecv` issues a Python group's ops one by one). Object
collectives (`all_gather_object`, `broadcast_object_list`) stage through host
tensors and are refused, as a device-only backend's would need device ones.
"""

from __future__ import annotations

import datetime
import inspect
import itertools
import json
import os
import queue
import sys
import threading
import time
import types
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

BACKEND_NAME = "hetero-strict"
TIMEOUT_ENV = "HETERO_STRICT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
WATCH_INTERVAL_S = 0.1

_BATCH_CODE = inspect.unwrap(dist.batch_isend_irecv).__code__
_predicate: Callable[[torch.Tensor], bool] | None = None


class StrictBackendError(RuntimeError):
    """An operation NCCL/HCCL would refuse or hang on."""


class HostTensorRefused(StrictBackendError):
    """A host tensor was handed to the island's collective backend."""


class P2PDeadlock(StrictBackendError):
    """Two ranks wait on each other's point-to-point operations."""


# Device-tensor predicate -------------------------------------------------------------

def set_device_tensor_predicate(predicate: Callable[[torch.Tensor], bool] | None) -> None:
    """Decide device memory with `predicate` (tests, other devices); None restores the default."""
    global _predicate
    _predicate = predicate


def is_device_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives in the island's device memory (see the module docstring)."""
    if _predicate is not None:
        return bool(_predicate(tensor))
    from accelerators import registry

    accel = registry._current  # pylint: disable=protected-access  # never select one from here
    ask = getattr(accel, "is_device_memory", None) or getattr(accel, "is_device_tensor", None)
    if ask is not None:
        return bool(ask(tensor))
    ledger = getattr(accel, "ledger", None)
    if ledger is not None:  # an emulated chip without the query: ask its ledger directly
        return tensor.untyped_storage().data_ptr() in ledger._live  # pylint: disable=protected-access
    return tensor.device.type != "cpu"


def _check_device(op: str, tensors: Iterable[Any]) -> None:
    for tensor in _flatten(tensors):
        if not is_device_tensor(tensor):
            raise HostTensorRefused(
                f"{BACKEND_NAME}: {op} was given a host tensor ({_describe(tensor)}); NCCL/HCCL take only "
                "tensors in the island's device memory: allocate it on the accelerator's device "
                "(inside its device scope on an emulated chip) or copy it there first")


def _flatten(items: Iterable[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found.extend(_flatten(item))
    return found


def _describe(tensor: torch.Tensor) -> str:
    dtype = str(tensor.dtype).replace("torch.", "")
    return f"{dtype}{list(tensor.shape)} on {tensor.device}"


# Point-to-point: per-pair ordered streams ----------------------------------------------

class _Abandoned(Exception):
    """The pair failed while this entry waited for its peer."""


_POLL_MIN_S, _POLL_MAX_S = 0.0005, 0.02  # how often a waiting entry looks at the store
_QUEUED_SHOWN = 4  # queued ops a deadlock report lists per rank


class _Op:
    """One send or receive toward a peer, with its per-direction sequence number."""

    def __init__(self, kind: str, tensor: torch.Tensor, seq: int, tag: int):
        self.kind, self.tensor, self.seq, self.tag = kind, tensor, seq, tag
        self.future: torch.futures.Future = torch.futures.Future()
        self.error: Exception | None = None
        self.done = False

    def describe(self, me: int, peer: int) -> str:
        where = f"to rank {peer}" if self.kind == "send" else f"from rank {peer}"
        return f"{self.kind} #{self.seq} {where} (tag {self.tag}, {_describe(self.tensor)})"


class _P2PWork(dist.Work):
    """The work of one send or receive: `wait()` blocks until it completes and raises its error."""

    def __init__(self, op: _Op):
        super().__init__()
        self.op = op

    def wait(self, timeout=None) -> bool:  # pylint: disable=unused-argument  # the pair's watchdog bounds it
        try:
            self.op.future.wait()
        except Exception:
            if self.op.error is not None:
                raise self.op.error from None
            raise
        return True

    def is_completed(self) -> bool:
        return self.op.future.done()

    def is_success(self) -> bool:
        return self.op.future.done() and self.op.error is None

    def get_future(self) -> torch.futures.Future:
        return self.op.future


class _Entry:
    """What one rank runs toward one peer at once: a single op, or a batch's ops to that peer."""

    _ids = itertools.count()

    def __init__(self, ops: list[_Op]):
        self.id = next(self._ids)
        self.ops = ops
        self.started: float | None = None


class _PairStream:
    """The ops between this rank and one peer, run one entry at a time in issue order."""

    def __init__(self, pg: "StrictProcessGroup", peer: int):
        self.pg, self.peer = pg, peer
        self.queue: "queue.Queue[_Entry | None]" = queue.Queue()
        self.active: _Entry | None = None
        self.pending: list[_Entry] = []  # issued, not finished (active first)
        self.next_seq = {"send": 0, "recv": 0}
        self.completed = {"send": 0, "recv": 0}
        self.error: StrictBackendError | None = None
        self.published = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"{BACKEND_NAME} {pg.rank()}<->{peer}")
        self.thread.start()

    def issue(self, entry: _Entry) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            self.pending.append(entry)
        self.queue.put(entry)

    def new_op(self, kind: str, tensor: torch.Tensor, tag: int) -> _Op:
        with self.lock:
            seq = self.next_seq[kind]
            self.next_seq[kind] += 1
        return _Op(kind, tensor, seq, tag)

    def _run(self) -> None:
        while True:
            entry = self.queue.get()
            if entry is None:
                return
            with self.lock:
                if self.error is not None:
                    self._fail(entry, self.error)
                    continue
                entry.started = time.monotonic()
                self.active = entry
            try:
                self._rendezvous_and_move(entry)
            except _Abandoned:  # reported as a deadlock: its waiters already raised
                continue
            except Exception as exc:  # gloo or the store failed (peer gone, their timeout)
                with self.lock:
                    self.error = self.error or StrictBackendError(
                        f"{BACKEND_NAME}: rank {self.pg.rank()} <-> rank {self.peer}: transport failed: {exc}")
                self._fail(entry, self.error)
                continue
            with self.lock:
                self.active = None
                self.pending.remove(entry)
                failed = self.error
            if failed is not None:
                continue
            for op in entry.ops:
                op.future.set_result([op.tensor])
            with self.lock:
                if self.published:  # the peer must not read a finished entry as running
                    self.pg.publish(self.peer, None)
                    self.published = False

    def _rendezvous_and_move(self, entry: _Entry) -> None:
        """Run one entry: each receive announces itself; each send waits for its receive's
        announcement, then both post to gloo (so gloo only ever waits on matched pairs).

        Keys (in the group's store): ready/S->R/n, set by R when its n-th receive from S runs;
        go/S->R/n, set by S once it saw ready and posts the n-th send."""
        store, me, peer = self.pg.state_store, self.pg.rank(), self.peer
        waiting = {}
        for op in entry.ops:
            if op.kind == "recv":
                store.set(f"ready/{peer}->{me}/{op.seq}", b"1")  # type: ignore[arg-type]  # Store.set takes bytes too
                waiting[op] = f"go/{peer}->{me}/{op.seq}"
            else:
                waiting[op] = f"ready/{me}->{peer}/{op.seq}"
        works = []
        pause = _POLL_MIN_S
        while waiting:
            if self.error is not None:
                raise _Abandoned()
            moved = [op for op, key in waiting.items() if store.check([key])]
            for op in moved:
                store.delete_key(waiting.pop(op))
                if op.kind == "send":
                    store.set(f"go/{me}->{peer}/{op.seq}", b"1")  # type: ignore[arg-type]  # Store.set takes bytes too
                    works.append((op, self.pg.gloo.send([op.tensor], peer, op.seq)))  # type: ignore[attr-defined]  # pybind method
                else:
                    works.append((op, self.pg.gloo.recv([op.tensor], peer, op.seq)))  # type: ignore[attr-defined]  # pybind method
            if waiting and not moved:  # poll: a store wait with a timeout logs a warning per expiry
                time.sleep(pause)
                pause = min(2 * pause, _POLL_MAX_S)
        for op, work in works:
            work.wait()
            with self.lock:
                op.done = True
                self.completed[op.kind] += 1

    def _fail(self, entry: _Entry, error: Exception) -> None:
        for op in entry.ops:
            if not op.future.done():
                op.error = error
                op.future.set_exception(error)

    def fail_all(self, error: StrictBackendError) -> None:
        """Fail every issued op of this pair; the pair stays failed."""
        with self.lock:
            self.error = self.error or error
            entries = list(self.pending)
        for entry in entries:
            self._fail(entry, self.error)

    def snapshot(self) -> dict | None:
        """The running entry's unfinished ops, if it has been running a while."""
        with self.lock:
            entry = self.active
            if entry is None or entry.started is None:
                return None
            queued = [op.describe(self.pg.rank(), self.peer) for later in self.pending[1:] for op in later.ops]
            return {"entry": entry.id, "since": entry.started,
                    "completed": dict(self.completed),
                    "ops": [{"kind": op.kind, "seq": op.seq, "text": op.describe(self.pg.rank(), self.peer)}
                            for op in entry.ops if not op.done],
                    "queued": queued[:_QUEUED_SHOWN] + ([f"{len(queued) - _QUEUED_SHOWN} more"]
                                                        if len(queued) > _QUEUED_SHOWN else [])}


class StrictProcessGroup(dist.ProcessGroup):
    """A process group with NCCL/HCCL's contract, moving data through gloo."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta):
        super().__init__(rank, size)  # type: ignore[call-arg]  # pylint: disable=no-value-for-parameter  # pybind overload (rank, size)
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore(f"{BACKEND_NAME}/gloo/", store), rank, size, timeout)
        self.state_store = dist.PrefixStore(f"{BACKEND_NAME}/p2p/", store)
        self.deadlock_timeout = deadlock_timeout()
        self.stall_s = min(1.0, self.deadlock_timeout / 4)
        self._streams: dict[int, _PairStream] = {}
        self._streams_lock = threading.Lock()
        self._batch: tuple[list, list] | None = None  # (p2p_op_list, works not yet handed out)
        self._stop = threading.Event()
        self._seen: dict[int, tuple] = {}
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name=f"{BACKEND_NAME} watchdog")
        self._watchdog.start()

    def getBackendName(self) -> str:  # noqa: N802  (torch's name)
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    # torch keeps a group's name on its C++ backends, which a Python group has none of.
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property  # type: ignore[override]  # torch declares a method; its callers read an attribute
    def group_name(self) -> str:
        return getattr(self, "_group_name", "")

    # Point-to-point ------------------------------------------------------------------
    def send(self, tensors, dst: int, tag: int = 0):
        _check_device("send", tensors)
        return self._p2p("send", tensors, dst, tag)

    def recv(self, tensors, src: int, tag: int = 0):
        _check_device("recv", tensors)
        return self._p2p("recv", tensors, src, tag)

    def recv_anysource(self, tensors, tag: int = 0):
        raise StrictBackendError(f"{BACKEND_NAME}: recv without a source is not supported by NCCL/HCCL; "
                                 "name the peer")

    def _p2p(self, kind: str, tensors, peer: int, tag: int):
        if len(tensors) != 1:
            raise StrictBackendError(f"{BACKEND_NAME}: {kind} takes one tensor, got {len(tensors)}")
        if not 0 <= peer < self.size() or peer == self.rank():
            raise StrictBackendError(f"{BACKEND_NAME}: {kind} peer {peer} is not another rank of this "
                                     f"group of {self.size()} (this is rank {self.rank()})")
        batch = _calling_batch()
        if batch is not None:
            return self._batched(batch)
        stream = self._stream(peer)
        op = stream.new_op(kind, tensors[0], tag)
        stream.issue(_Entry([op]))
        return _P2PWork(op)

    def _batched(self, p2p_op_list: list):
        """Inside dist.batch_isend_irecv: issue the whole batch on its first op, one entry per peer."""
        if self._batch is None or self._batch[0] is not p2p_op_list:
            for p2p in p2p_op_list:  # all refused or none issued: a half-issued batch would shift the order
                _check_device(f"batch_isend_irecv {'send' if p2p.op is dist.isend else 'recv'}", [p2p.tensor])
            entries: dict[int, list[_Op]] = {}
            works = []
            for p2p in p2p_op_list:
                kind = "send" if p2p.op is dist.isend else "recv"
                peer = p2p.group_peer
                op = self._stream(peer).new_op(kind, p2p.tensor, p2p.tag)
                entries.setdefault(peer, []).append(op)
                works.append(_P2PWork(op))
            for peer, ops in entries.items():
                self._stream(peer).issue(_Entry(ops))
            self._batch = (p2p_op_list, works)
        work = self._batch[1].pop(0)
        if not self._batch[1]:
            self._batch = None
        return work

    def _stream(self, peer: int) -> _PairStream:
        with self._streams_lock:
            if peer not in self._streams:
                self._streams[peer] = _PairStream(self, peer)
            return self._streams[peer]

    # Deadlock watch ------------------------------------------------------------------
    def publish(self, peer: int, snapshot: dict | None) -> None:
        self.state_store.set(f"{self.rank()}->{peer}", json.dumps(snapshot or {}))

    def _peer_state(self, peer: int) -> dict:
        key = f"{peer}->{self.rank()}"
        if not self.state_store.check([key]):
            return {}
        return json.loads(self.state_store.get(key))

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            with self._streams_lock:
                streams = list(self._streams.values())
            for stream in streams:
                if stream.error is None:
                    try:
                        self._check(stream)
                    except Exception:  # the store went away (shutdown): stop watching
                        return

    def _check(self, stream: _PairStream) -> None:
        mine = stream.snapshot()
        if mine is None:
            self._seen.pop(stream.peer, None)
            return
        waited = time.monotonic() - mine["since"]
        if waited < self.stall_s:
            return
        with stream.lock:
            if not stream.published and stream.active is not None and stream.active.id == mine["entry"]:
                self.publish(stream.peer, mine)
                stream.published = True
        theirs = self._peer_state(stream.peer)
        if _stuck(mine, theirs, stream.completed):
            key = (mine["entry"], theirs["entry"])
            first = self._seen.setdefault(stream.peer, (key, time.monotonic()))
            if first[0] != key:
                self._seen[stream.peer] = (key, time.monotonic())
            elif time.monotonic() - first[1] >= self.stall_s / 2:  # the same two entries, stuck a while
                stream.fail_all(self._deadlock(stream.peer, mine, theirs, "neither can match the other"))
                return
        else:
            self._seen.pop(stream.peer, None)
        if waited >= self.deadlock_timeout:
            stream.fail_all(self._deadlock(stream.peer, mine, theirs,
                                           f"no progress in {self.deadlock_timeout:g} s ({TIMEOUT_ENV})"))

    def _deadlock(self, peer: int, mine: dict, theirs: dict, why: str) -> P2PDeadlock:
        me = self.rank()
        return P2PDeadlock(
            f"{BACKEND_NAME}: point-to-point deadlock between rank {me} and rank {peer} ({why}): "
            f"rank {me} is running {_pending_text(mine)}, "
            f"rank {peer} is running {_pending_text(theirs)}. NCCL/HCCL would hang here: each pair's ops run in "
            "issue order and a send waits for its receive. Exchange in both directions with "
            "dist.batch_isend_irecv, or have one side receive first.")

    # Collectives: gloo's, after the device check -------------------------------------
    def allreduce(self, tensors, opts=None):
        _check_device("all_reduce", tensors)
        return self.gloo.allreduce(tensors, opts or dist.AllreduceOptions())

    def allreduce_coalesced(self, tensors, opts=None):
        _check_device("all_reduce_coalesced", tensors)
        return self.gloo.allreduce_coalesced(tensors, opts or dist.AllreduceCoalescedOptions())

    def broadcast(self, tensors, opts=None):
        _check_device("broadcast", tensors)
        return self.gloo.broadcast(tensors, opts or dist.BroadcastOptions())

    def reduce(self, tensors, opts=None):
        _check_device("reduce", tensors)
        return self.gloo.reduce(tensors, opts or dist.ReduceOptions())

    def allgather(self, output_lists, inputs, opts=None):
        _check_device("all_gather", [output_lists, inputs])
        return self.gloo.allgather(output_lists, inputs, opts or dist.AllgatherOptions())

    def all_gather_single(self, output, input, opts=None):  # pylint: disable=redefined-builtin
        _check_device("all_gather_into_tensor", [output, input])
        return self.gloo._allgather_base(output, input, opts or dist.AllgatherOptions())  # pylint: disable=protected-access

    _allgather_base = all_gather_single

    def reduce_scatter(self, outputs, input_lists, opts=None):
        _check_device("reduce_scatter", [outputs, input_lists])
        return self.gloo.reduce_scatter(outputs, input_lists, opts or dist.ReduceScatterOptions())

    def reduce_scatter_single(self, output, input, opts=None):  # pylint: disable=redefined-builtin
        _check_device("reduce_scatter_tensor", [output, input])
        return self.gloo._reduce_scatter_base(output, input, opts or dist.ReduceScatterOptions())  # pylint: disable=protected-access

    _reduce_scatter_base = reduce_scatter_single

    def gather(self, output_lists, inputs, opts=None):
        _check_device("gather", [output_lists, inputs])
        return self.gloo.gather(output_lists, inputs, opts or dist.GatherOptions())

    def scatter(self, outputs, input_lists, opts=None):
        _check_device("scatter", [outputs, input_lists])
        return self.gloo.scatter(outputs, input_lists, opts or dist.ScatterOptions())

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):  # pylint: disable=redefined-builtin
        _check_device("all_to_all_single", [output, input])
        return self.gloo.alltoall_base(output, input, output_split_sizes, input_split_sizes,
                                       opts or dist.AllToAllOptions())

    def barrier(self, opts=None):
        return self.gloo.barrier(opts or dist.BarrierOptions())

    # Teardown ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the watchdog and the pair streams (destroy_process_group calls this)."""
        self._stop.set()
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            if stream.pending:  # ops the peer never matched: fail them rather than wait forever
                stream.fail_all(StrictBackendError(
                    f"{BACKEND_NAME}: the process group was destroyed while rank {self.rank()} still had "
                    f"point-to-point operations toward rank {stream.peer} pending"))
            stream.queue.put(None)
        for stream in streams:
            stream.thread.join(timeout=5)


def _pending_text(state: dict) -> str:
    """'[running ops]' plus what is queued behind them, from a published snapshot."""
    running = "; ".join(op["text"] for op in state.get("ops", [])) or "nothing toward it"
    queued = state.get("queued") or []
    return f"[{running}]" + (f" with [{'; '.join(queued)}] queued behind" if queued else "")


def _calling_batch() -> list | None:
    """The p2p_op_list of the dist.batch_isend_irecv call this op comes from, if any."""
    frame: types.FrameType | None = sys._getframe(2)  # pylint: disable=protected-access
    for _ in range(6):
        if frame is None:
            return None
        if frame.f_code is _BATCH_CODE:
            return frame.f_locals.get("p2p_op_list")
        frame = frame.f_back
    return None


def _stuck(mine: dict, theirs: dict, completed: dict) -> bool:
    """Whether two running entries can never match: no send of one is a receive of the other.

    The peer's entry is stale (it finished meanwhile) if it lists an op this rank already
    completed the other half of; a stale entry is not called stuck."""
    if not theirs.get("ops"):
        return False
    my_sends = {op["seq"] for op in mine["ops"] if op["kind"] == "send"}
    my_recvs = {op["seq"] for op in mine["ops"] if op["kind"] == "recv"}
    their_sends = {op["seq"] for op in theirs["ops"] if op["kind"] == "send"}
    their_recvs = {op["seq"] for op in theirs["ops"] if op["kind"] == "recv"}
    if any(seq < completed["send"] for seq in their_recvs) or any(seq < completed["recv"] for seq in their_sends):
        return False
    return not (my_sends & their_recvs or their_sends & my_recvs)


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


def _create(store, rank: int, size: int, timeout: datetime.timedelta) -> StrictProcessGroup:
    return StrictProcessGroup(store, rank, size, timeout)


def register() -> str:
    """Make `hetero-strict` known to torch.distributed (idempotent); return its name."""
    if dist.is_available() and BACKEND_NAME.upper() not in dist.Backend._plugins:  # pylint: disable=protected-access
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu"])
    return BACKEND_NAME
