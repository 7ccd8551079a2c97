"""The control plane server: one gRPC coordinator per job, on the head node.

It keeps the address book (global rank -> island, host, data-plane endpoints),
a barrier, a small key-value store and heartbeats; when a worker misses its
heartbeats (or leaves) every watcher is told, so calls waiting on that worker
fail instead of hanging. Only small JSON messages travel here; tensors never do.

No protobuf code generation: methods are generic handlers taking and returning
JSON-encoded bytes. Every call must carry the job token in metadata
(`x-hetero-job-token`); a wrong or missing token is refused and counted by
reason (`refusals`: missing_token, wrong_token).
The server binds 127.0.0.1 unless told to bind all interfaces, and never
shares its port (SO_REUSEPORT off): a port in use fails `start()` with
AddressInUseError instead of splitting another job's connections.

The key-value store holds bytes, bounded in key size, value size, key count
and total size. Besides set/get (get may wait for the key) it has what a
torch.distributed Store needs: add, compare-and-set, wait for keys, check,
delete and count. Values travel as UTF-8 text ("value") or base64 ("b64").
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import json
import math
import queue
import socket
import threading
import time
from concurrent import futures
from typing import NoReturn

import grpc

from comm_bridge.errors import AddressInUseError

SERVICE = "hetero.bridge.Coordinator"
TOKEN_METADATA = "x-hetero-job-token"
MAX_REQUEST_BYTES = 1 << 20
MAX_KV_KEY_BYTES = 4 << 10
MAX_KV_VALUE_BYTES = 256 << 10
MAX_KV_KEYS = 1 << 16
MAX_KV_TOTAL_BYTES = 64 << 20
MAX_WAIT_S = 3600.0
DEFAULT_HEARTBEAT_TIMEOUT = 5.0
METHODS_UNARY = ("Register", "AddressBook", "Barrier", "Heartbeat", "Leave",
                 "KVSet", "KVGet", "KVAdd", "KVCompareSet", "KVWait", "KVCheck", "KVDelete", "KVCount")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message


def _abort(context, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code`: grpc's ServicerContext.abort always raises (says so here, for the
    type checker: grpc ships no stubs)."""
    context.abort(code, message)
    raise AssertionError("grpc's ServicerContext.abort returned")


class Coordinator:
    """Run with `start()`; `address` is then host:port. Thread-safe."""

    def __init__(self, token: str, world_size: int, *, host: str = "127.0.0.1", port: int = 0,
                 bind_all: bool = False, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT):
        if not token:
            raise ValueError("the coordinator needs a non-empty job token")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self._token = token.encode()
        self.world_size = world_size
        self.heartbeat_timeout = float(heartbeat_timeout)
        self._bind = f"{'0.0.0.0' if bind_all else host}:{port}"
        self._host = host
        self._cond = threading.Condition()
        self.workers: dict[int, dict] = {}
        self._last_seen: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.finished: set[int] = set()
        self._kv: dict[str, bytes] = {}
        self._kv_bytes = 0          # sum of len(key) + len(value) over the store
        self._barriers: dict[str, dict] = {}
        self._watchers: list[queue.Queue] = []
        self.refusals: dict[str, int] = {"missing_token": 0, "wrong_token": 0}
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.address: str | None = None

    # --------------------------------------------------------------- lifecycle
    def start(self) -> str:
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._unary(getattr(self, f"_do_{name}")))
                    for name in METHODS_UNARY}
        handlers["Watch"] = grpc.unary_stream_rpc_method_handler(self._watch)
        # Barrier, KVGet, KVWait and Watch park a thread each (workers and island agents).
        pool = futures.ThreadPoolExecutor(max_workers=max(16, 4 * self.world_size + 16),
                                          thread_name_prefix="coordinator")
        self._server = grpc.server(pool, options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                                  ("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        _check_free(self._bind)   # before grpc, which would also log the failure to stderr
        try:
            port = self._server.add_insecure_port(self._bind)
        except RuntimeError:
            port = 0
        if port == 0:
            raise AddressInUseError(_in_use_message(self._bind))
        self._server.start()
        self.address = f"{self._host}:{port}"
        threading.Thread(target=self._monitor, name="coordinator-monitor", daemon=True).start()
        return self.address

    def stop(self, grace: float = 0.5) -> None:
        self._stopping.set()
        with self._cond:
            for watcher in self._watchers:
                watcher.put(None)
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 5)

    def __enter__(self) -> "Coordinator":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ plumbing
    @property
    def refused(self) -> int:
        """Every refused call, whatever the reason (see `refusals` for the split)."""
        with self._cond:
            return sum(self.refusals.values())

    def _authorized(self, context) -> bool:
        reason = "missing_token"
        for key, value in context.invocation_metadata():
            if key == TOKEN_METADATA:
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._token):
                    return True
                reason = "wrong_token"
        with self._cond:
            self.refusals[reason] += 1
        return False

    def _unary(self, method):
        def handle(request: bytes, context) -> bytes:
            if not self._authorized(context):
                _abort(context, grpc.StatusCode.UNAUTHENTICATED, "job token missing or wrong")
            try:
                body = json.loads(request.decode("utf-8")) if request else {}
                if not isinstance(body, dict):
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object")
                return json.dumps(method(body)).encode()
            except _Abort as exc:
                _abort(context, exc.code, exc.message)
            except (ValueError, KeyError, TypeError) as exc:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}")
        return handle

    def _rank(self, body: dict) -> int:
        rank = body["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank must be an integer in [0, {self.world_size})")
        return rank

    def _mark_failed(self, rank: int, reason: str) -> None:
        # Caller holds self._cond.
        if rank in self.failed:
            return
        self.failed[rank] = reason
        event = {"event": "failed", "rank": rank, "reason": reason}
        for watcher in self._watchers:
            watcher.put(event)
        self._cond.notify_all()

    def _monitor(self) -> None:
        while not self._stopping.wait(min(0.25, self.heartbeat_timeout / 4)):
            now = time.monotonic()
            with self._cond:
                for rank, seen in self._last_seen.items():
                    if rank not in self.failed and now - seen > self.heartbeat_timeout:
                        self._mark_failed(rank, f"no heartbeat for {now - seen:.1f}s "
                                                f"(timeout {self.heartbeat_timeout:.1f}s)")

    def _wait(self, ready, timeout: float, what) -> None:
        """Wait (holding self._cond) until ready(); raise on timeout, failure or stop."""
        deadline = time.monotonic() + min(float(timeout), 3600.0)
        while not ready():
            if self.failed and what.get("fail_fast", True):
                rank, reason = next(iter(self.failed.items()))
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"rank {rank} failed: {reason}")
            if self._stopping.is_set():
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "coordinator is shutting down")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, what["message"]())
            self._cond.wait(min(left, 0.5))

    # -------------------------------------------------------------- methods
    def _do_Register(self, body: dict) -> dict:
        rank = self._rank(body)
        endpoints = body.get("endpoints", [])
        if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "endpoints must be a list of strings")
        info = {"rank": rank, "island": str(body.get("island", "")), "host": str(body.get("host", "")),
                "host_id": str(body.get("host_id", "")), "endpoints": endpoints,
                "local_rank": int(body.get("local_rank", 0))}
        with self._cond:
            if rank in self.workers and rank not in self.failed and self.workers[rank] != info:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"rank {rank} is already registered by a live worker")
            self.workers[rank] = info
            self._last_seen[rank] = time.monotonic()
            self.failed.pop(rank, None)
            self._cond.notify_all()
        return {"world_size": self.world_size, "heartbeat_timeout": self.heartbeat_timeout}

    def _do_AddressBook(self, body: dict) -> dict:
        with self._cond:
            self._wait(lambda: len(self.workers) >= self.world_size, body.get("timeout", 60),
                       {"message": lambda: "ranks never registered: "
                        + ", ".join(str(r) for r in range(self.world_size) if r not in self.workers),
                        "fail_fast": False})
            return {"workers": {str(r): w for r, w in sorted(self.workers.items())}}

    def _do_Barrier(self, body: dict) -> dict:
        rank = self._rank(body)
        name = str(body.get("name", ""))
        with self._cond:
            barrier = self._barriers.setdefault(name, {"generation": 0, "arrived": set()})
            generation = barrier["generation"]
            barrier["arrived"].add(rank)
            if len(barrier["arrived"]) >= self.world_size:
                barrier["generation"] += 1
                barrier["arrived"] = set()
                self._cond.notify_all()
                return {"generation": generation}
            self._wait(lambda: barrier["generation"] != generation, body.get("timeout", 60),
                       {"message": lambda: f"barrier '{name}' timed out; missing ranks: " + ", ".join(
                           str(r) for r in range(self.world_size) if r not in barrier["arrived"])})
            return {"generation": generation}

    # ------------------------------------------------------- key-value store
    def _do_KVSet(self, body: dict) -> dict:
        key, value = _key(body["key"]), _value(body)
        with self._cond:
            self._put(key, value)
        return {}

    def _do_KVGet(self, body: dict) -> dict:
        key = _key(body["key"])
        with self._cond:
            self._wait(lambda: key in self._kv, _timeout(body),
                       {"message": lambda: f"key '{key}' was never set", "fail_fast": False})
            return _reply(self._kv[key], body)

    def _do_KVAdd(self, body: dict) -> dict:
        key, amount = _key(body["key"]), body["amount"]
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "amount must be an integer")
        with self._cond:
            try:
                total = int(self._kv.get(key, b"0")) + amount
            except ValueError:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"key '{key}' holds a value that is not an integer") from None
            self._put(key, str(total).encode())
        return {"value": total}

    def _do_KVCompareSet(self, body: dict) -> dict:
        """Set `desired` if the key holds `expected` (or is absent and `expected` is empty).

        Returns what the key holds afterwards; for an absent key and a non-empty
        `expected`, returns `expected` (torch's TCPStore semantics)."""
        key = _key(body["key"])
        expected, desired = _b64(body["expected_b64"]), _b64(body["desired_b64"])
        with self._cond:
            current = self._kv.get(key)
            if (current is None and not expected) or current == expected:
                self._put(key, desired)
                current = desired
            elif current is None:
                current = expected
        return {"b64": base64.b64encode(current).decode()}

    def _do_KVWait(self, body: dict) -> dict:
        keys = _keys(body["keys"])
        with self._cond:
            self._wait(lambda: all(k in self._kv for k in keys), _timeout(body),
                       {"message": lambda: "keys never set: " + ", ".join(
                           f"'{k}'" for k in keys[:8] if k not in self._kv), "fail_fast": False})
        return {}

    def _do_KVCheck(self, body: dict) -> dict:
        keys = _keys(body["keys"])
        with self._cond:
            return {"ready": all(k in self._kv for k in keys)}

    def _do_KVDelete(self, body: dict) -> dict:
        key = _key(body["key"])
        with self._cond:
            value = self._kv.pop(key, None)
            if value is not None:
                self._kv_bytes -= len(key) + len(value)
        return {"deleted": value is not None}

    def _do_KVCount(self, body: dict) -> dict:
        prefix = body.get("prefix", "")
        if not isinstance(prefix, str):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "prefix must be a string")
        with self._cond:
            return {"count": sum(1 for k in self._kv if k.startswith(prefix))}

    def _put(self, key: str, value: bytes) -> None:
        """Store a value within the store's bounds and wake every waiter. Caller holds self._cond."""
        old = self._kv.get(key)
        grown = len(value) - (len(old) if old is not None else -len(key))
        if old is None and len(self._kv) >= MAX_KV_KEYS:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the key-value store is full ({MAX_KV_KEYS} keys)")
        if self._kv_bytes + grown > MAX_KV_TOTAL_BYTES:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the key-value store is full ({MAX_KV_TOTAL_BYTES >> 20} MiB)")
        self._kv[key] = value
        self._kv_bytes += grown
        self._cond.notify_all()

    def _do_Heartbeat(self, body: dict) -> dict:
        rank = self._rank(body)
        with self._cond:
            if rank not in self.failed:
                self._last_seen[rank] = time.monotonic()
            return {"failed": {str(r): why for r, why in self.failed.items()}}

    def _do_Leave(self, body: dict) -> dict:
        rank = self._rank(body)
        with self._cond:
            self._last_seen.pop(rank, None)
            if body.get("finished") is True:
                self.finished.add(rank)     # a clean end of work, not a fault
            else:
                self._mark_failed(rank, "left the job")
        return {}

    def _watch(self, request: bytes, context):
        if not self._authorized(context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "job token missing or wrong")
        events: queue.Queue = queue.Queue()
        with self._cond:
            for rank, reason in self.failed.items():
                events.put({"event": "failed", "rank": rank, "reason": reason})
            self._watchers.append(events)
        try:
            yield json.dumps({"event": "hello"}).encode()
            while context.is_active() and not self._stopping.is_set():
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event is None:
                    return
                yield json.dumps(event).encode()
        finally:
            with self._cond:
                self._watchers.remove(events)


# ------------------------------------------------------------------ helpers
def _key(key) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KV_KEY_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"key must be a non-empty string of at most {MAX_KV_KEY_BYTES} bytes")
    return key


def _keys(keys) -> list[str]:
    if not isinstance(keys, list) or not keys:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "keys must be a non-empty list of strings")
    return [_key(k) for k in keys]


def _b64(text) -> bytes:
    if not isinstance(text, str):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a b64 value must be a base64 string")
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a b64 value is not valid base64") from None
    if len(value) > MAX_KV_VALUE_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"value must be at most {MAX_KV_VALUE_BYTES} bytes")
    return value


def _value(body: dict) -> bytes:
    """A request's value: text in "value" (UTF-8) or bytes in "b64"."""
    if "b64" in body:
        return _b64(body["b64"])
    value = body["value"]
    if not isinstance(value, str) or len(value.encode()) > MAX_KV_VALUE_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"value must be a string of at most {MAX_KV_VALUE_BYTES} bytes")
    return value.encode()


def _reply(value: bytes, body: dict) -> dict:
    if body.get("encoding") == "b64":
        return {"b64": base64.b64encode(value).decode()}
    return {"value": value.decode("utf-8", errors="replace")}


def _timeout(body: dict) -> float:
    timeout = body.get("timeout", 0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or timeout < 0:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "timeout must be a finite number of seconds >= 0")
    return min(float(timeout), MAX_WAIT_S)


def _in_use_message(bind: str) -> str:
    return f"{bind} is already in use (another job may hold it; give this job another coordinator port)"


def _check_free(bind: str) -> None:
    """Raise AddressInUseError when something already listens on host:port (port 0: any free one)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return   # grpc reports an unknown host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as grpc does: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUseError(_in_use_message(bind)) from None
                raise
