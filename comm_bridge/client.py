"""A worker's view of the coordinator: register, look peers up, sync, heartbeat.

`start_heartbeats()` runs two daemon threads: one sends heartbeats, one holds a
Watch stream open. Either way a failed peer reaches every `on_failure`
callback (typically `Endpoint.fail_peer`) within the heartbeat timeout; losing
the coordinator itself fails every peer, so nothing waits forever.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Callable

import grpc

from comm_bridge.coordinator import SERVICE, TOKEN_METADATA
from comm_bridge.errors import AuthenticationError, CoordinatorError, CoordinatorTimeoutError


class CoordinatorClient:
    def __init__(self, address: str, token: str, rank: int, *, timeout: float = 60.0):
        self.address = address
        self.rank = int(rank)
        self.timeout = float(timeout)
        self._metadata = ((TOKEN_METADATA, token),)
        self._channel = grpc.insecure_channel(address)
        self._calls: dict[str, Callable] = {}
        self._callbacks: list[Callable[[int, str], None]] = []
        self._failed: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.heartbeat_timeout = 5.0
        self.world_size: int | None = None

    # ----------------------------------------------------------------- calls
    def _call(self, method: str, body: dict, timeout: float | None = None) -> dict:
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            reply = call(json.dumps(body).encode(), metadata=self._metadata,
                         timeout=(timeout if timeout is not None else self.timeout) + 5.0)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthenticationError(f"coordinator {self.address} refused rank {self.rank}: {exc.details()}") from None
            error = CoordinatorTimeoutError if code == grpc.StatusCode.DEADLINE_EXCEEDED else CoordinatorError
            raise error(f"coordinator {self.address}: {method} failed "
                                   f"({code.name if code else 'unknown'}): {exc.details()}") from None
        return json.loads(reply.decode())

    def register(self, *, island: str = "", endpoints=(), host: str = "", host_id: str = "",
                 local_rank: int = 0) -> dict:
        reply = self._call("Register", {"rank": self.rank, "island": island, "endpoints": list(endpoints),
                                        "host": host, "host_id": host_id, "local_rank": local_rank})
        self.world_size = reply["world_size"]
        self.heartbeat_timeout = float(reply["heartbeat_timeout"])
        return reply

    def register_endpoint(self, endpoint, *, island: str = "", local_rank: int = 0) -> dict:
        """Register a comm_bridge Endpoint's address and wire failures into it."""
        address = endpoint.address()
        self.on_failure(endpoint.fail_peer)
        return self.register(island=island, endpoints=address["endpoints"], host_id=address["host_id"],
                             local_rank=local_rank)

    def address_book(self, timeout: float | None = None) -> dict[int, dict]:
        timeout = self.timeout if timeout is None else timeout
        reply = self._call("AddressBook", {"timeout": timeout}, timeout)
        return {int(rank): info for rank, info in reply["workers"].items()}

    def barrier(self, name: str = "", timeout: float | None = None) -> int:
        timeout = self.timeout if timeout is None else timeout
        return self._call("Barrier", {"rank": self.rank, "name": name, "timeout": timeout}, timeout)["generation"]

    # ------------------------------------------------------- key-value store
    def kv_set(self, key: str, value: str) -> None:
        self._call("KVSet", {"key": key, "value": value})

    def kv_get(self, key: str, timeout: float = 0.0) -> str:
        """The key's value; waits up to `timeout` s for it to be set (CoordinatorTimeoutError after)."""
        return self._call("KVGet", {"key": key, "timeout": timeout}, timeout)["value"]

    def kv_set_bytes(self, key: str, value: bytes) -> None:
        self._call("KVSet", {"key": key, "b64": _b64(value)})

    def kv_get_bytes(self, key: str, timeout: float = 0.0) -> bytes:
        reply = self._call("KVGet", {"key": key, "timeout": timeout, "encoding": "b64"}, timeout)
        return base64.b64decode(reply["b64"])

    def kv_add(self, key: str, amount: int) -> int:
        """Add to the integer a key holds (absent: 0), atomically; return the new value."""
        return int(self._call("KVAdd", {"key": key, "amount": int(amount)})["value"])

    def kv_compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set `desired` if the key holds `expected` (absent counts as b""); return what it holds then."""
        reply = self._call("KVCompareSet", {"key": key, "expected_b64": _b64(expected), "desired_b64": _b64(desired)})
        return base64.b64decode(reply["b64"])

    def kv_wait(self, keys: list[str], timeout: float) -> None:
        """Return once every key is set; CoordinatorTimeoutError after `timeout` s."""
        self._call("KVWait", {"keys": list(keys), "timeout": timeout}, timeout)

    def kv_check(self, keys: list[str]) -> bool:
        return bool(self._call("KVCheck", {"keys": list(keys)})["ready"])

    def kv_delete(self, key: str) -> bool:
        return bool(self._call("KVDelete", {"key": key})["deleted"])

    def kv_count(self, prefix: str = "") -> int:
        return int(self._call("KVCount", {"prefix": prefix})["count"])

    def heartbeat(self) -> dict[int, str]:
        reply = self._call("Heartbeat", {"rank": self.rank}, 5.0)
        return {int(r): why for r, why in reply["failed"].items()}

    def leave(self, finished: bool = False) -> None:
        """Leave the job: as a failure peers must hear of, or (finished) as a clean end."""
        self._call("Leave", {"rank": self.rank, "finished": finished}, 5.0)

    # ------------------------------------------------------------- failures
    def on_failure(self, callback: Callable[[int, str], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            known = dict(self._failed)
        for rank, reason in known.items():
            callback(rank, reason)

    def failed(self) -> dict[int, str]:
        with self._lock:
            return dict(self._failed)

    def _report(self, failed: dict[int, str]) -> None:
        fresh = []
        with self._lock:
            for rank, reason in failed.items():
                if rank != self.rank and rank not in self._failed:
                    self._failed[rank] = reason
                    fresh.append((rank, reason))
            callbacks = list(self._callbacks)
        for rank, reason in fresh:
            for callback in callbacks:
                callback(rank, reason)

    def start_heartbeats(self, interval: float | None = None) -> None:
        interval = interval if interval is not None else max(0.05, self.heartbeat_timeout / 5)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watch")):
            thread = threading.Thread(target=target, args=(interval,), name=f"coordinator-{name}-{self.rank}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _heartbeat_loop(self, interval: float) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self._report(self.heartbeat())
                last_ok = time.monotonic()
            except (CoordinatorError, AuthenticationError) as exc:
                if time.monotonic() - last_ok > self.heartbeat_timeout and self.world_size:
                    self._report({r: f"coordinator unreachable: {exc}" for r in range(self.world_size)})
                    return

    def _watch_loop(self, interval: float) -> None:
        stream = self._channel.unary_stream(f"/{SERVICE}/Watch")
        while not self._stop.is_set():
            try:
                self._watch_call = stream(b"{}", metadata=self._metadata)
                for message in self._watch_call:
                    event = json.loads(message.decode())
                    if event.get("event") == "failed":
                        self._report({int(event["rank"]): str(event["reason"])})
            except grpc.RpcError:
                pass  # the heartbeat loop decides when the coordinator is gone
            self._stop.wait(interval)

    def close(self, leave: bool = False, finished: bool = False) -> None:
        if leave:
            try:
                self.leave(finished)
            except Exception:
                pass
        self._stop.set()
        call = getattr(self, "_watch_call", None)
        if call is not None:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
        self._channel.close()


def _b64(value: bytes) -> str:
    return base64.b64encode(bytes(value)).decode()
