"""The islands' rendezvous and process-group store: the job coordinator's authenticated key-value store.

torch elastic's static rendezvous runs a TCPStore that listens on every
interface and answers anyone. Here the island agents meet, and the workers
initialise their island's process group, through `CoordinatorStore`: a
`torch.distributed.Store` whose keys live in the coordinator (comm_bridge),
reached over gRPC with the job token on every call. Nothing extra listens.

Keys are namespaced: `hetero.store/rdzv/<run id>/` for an island's agents
(the run id names the job, island and attempt), `hetero.store/pg/<island>/<attempt>/`
for its workers' process group, so islands and attempts never collide.

`register_rendezvous()` makes the backend "hetero" known to torch elastic:
fixed node ranks (the static rendezvous's), this store, and the island's
first node as MASTER_ADDR/MASTER_PORT for scripts that init via env://.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)

from comm_bridge.client import CoordinatorClient
from comm_bridge.errors import CoordinatorTimeoutError

NAMESPACE = "hetero.store/"
RDZV_BACKEND = "hetero"
TOKEN_ENV = "HETERO_JOB_TOKEN"
COORDINATOR_ENV = "HETERO_COORDINATOR"
# torch's C++ side holds a Store without keeping its Python object alive, and a Python
# Store whose object is gone fails every call ("Not implemented"): every open store stays
# referenced here until close().
_OPEN: set = set()


class CoordinatorStore(dist.Store):
    """A torch.distributed Store kept in the coordinator's key-value store, under `prefix`.

    get and wait block up to the store's timeout (`set_timeout`) and then raise
    torch's DistStoreError, as TCPStore does; a wrong token raises
    comm_bridge's AuthenticationError on the first call. The store stays alive
    (even when only torch holds it, e.g. `init_process_group(store=CoordinatorStore(...))`)
    until close()."""

    def __init__(self, address: str, token: str, prefix: str, *, timeout: float = 300.0, rank: int = 0):
        super().__init__()
        self.address = address
        self.prefix = NAMESPACE + prefix
        self._client = CoordinatorClient(address, token, rank, timeout=30.0)
        self.set_timeout(datetime.timedelta(seconds=timeout))
        _OPEN.add(self)

    # -- the Store interface (torch calls these; C++ callers use deleteKey/getNumKeys) --
    def set(self, key: str, value) -> None:
        self._client.kv_set_bytes(self._key(key), _bytes(value))

    def get(self, key: str) -> bytes:
        try:
            return self._client.kv_get_bytes(self._key(key), self._seconds())
        except CoordinatorTimeoutError as exc:
            raise dist.DistStoreError(f"store {self.address}: {exc}") from None

    def add(self, key: str, amount: int) -> int:
        return self._client.kv_add(self._key(key), amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._client.kv_compare_set(self._key(key), _bytes(expected), _bytes(desired))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = self._seconds() if timeout is None else timeout.total_seconds()
        try:
            self._client.kv_wait([self._key(k) for k in keys], seconds)
        except CoordinatorTimeoutError as exc:
            raise dist.DistStoreError(f"store {self.address}: {exc}") from None

    def check(self, keys: list[str]) -> bool:
        return self._client.kv_check([self._key(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self._client.kv_delete(self._key(key))

    def num_keys(self) -> int:
        return self._client.kv_count(self.prefix)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.get(key) for key in keys]

    def multi_set(self, keys: list[str], values: list) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    deleteKey = delete_key      # the names torch's C++ side (PrefixStore) looks up
    getNumKeys = num_keys

    def close(self) -> None:
        _OPEN.discard(self)
        self._client.close()

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _seconds(self) -> float:
        return self.timeout.total_seconds()   # type: ignore[attr-defined]  # torch sets it (set_timeout); its stubs lack it


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def worker_store(timeout: float, name: str = "") -> CoordinatorStore:
    """The process-group store of this worker's island and attempt (from the launcher's environment);
    `name` keeps apart several stores of one attempt."""
    island = os.environ["HETERO_ISLAND"]
    attempt = os.environ.get("HETERO_RESTART_COUNT", "0")
    return CoordinatorStore(os.environ[COORDINATOR_ENV], os.environ[TOKEN_ENV], f"pg/{island}/{attempt}/{name}",
                            timeout=timeout, rank=int(os.environ.get("HETERO_GLOBAL_RANK", "0")))


_env_rendezvous_calls = 0


def env_rendezvous(url: str, timeout: datetime.timedelta = datetime.timedelta(minutes=30), **kwargs):
    """torch's env:// rendezvous (init_process_group's default) for a worker under a hetero
    launcher: rank and world size as torch's own handler reads them (the URL's query, else RANK and
    WORLD_SIZE), the store in the coordinator instead of a TCPStore that island rank 0 would open
    on MASTER_PORT, on every interface, for anyone. Each call in a process gets a store of its own
    (every rank makes the same calls in the same order), so a script may init, destroy and init again."""
    global _env_rendezvous_calls
    from urllib.parse import parse_qs, urlparse

    query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
    rank = int(query.get("rank", os.environ.get("RANK", "")) or _missing("RANK"))
    world_size = int(query.get("world_size", os.environ.get("WORLD_SIZE", "")) or _missing("WORLD_SIZE"))
    _env_rendezvous_calls += 1
    yield worker_store(timeout.total_seconds(), f"env{_env_rendezvous_calls}/"), rank, world_size
    raise RuntimeError("Unable to perform re-rendezvous using env:// method")


def _missing(var: str):
    raise ValueError(f"env:// rendezvous: environment variable {var} expected, but not set")


def install_env_rendezvous() -> bool:
    """Route env:// through `env_rendezvous` in this process, when it runs under a hetero launcher
    (HETERO_COORDINATOR and HETERO_JOB_TOKEN set); True if it did."""
    if not (os.environ.get(COORDINATOR_ENV) and os.environ.get(TOKEN_ENV) and os.environ.get("HETERO_ISLAND")):
        return False
    import importlib

    # The module, not the function torch.distributed exports under the same name;
    # its register_rendezvous_handler refuses to replace a scheme, so set the table's entry.
    module = importlib.import_module("torch.distributed.rendezvous")
    module._rendezvous_handlers["env"] = env_rendezvous
    return True


class CoordinatorRendezvous(RendezvousHandler):
    """One island's agents meet in the coordinator's store: node `rank` of `world_size`, fixed.

    next_rendezvous returns once every node has joined (or raises
    RendezvousTimeoutError naming how many did)."""

    def __init__(self, store: CoordinatorStore, rank: int, world_size: int, run_id: str, timeout: float,
                 master_addr: str, master_port: int):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.timeout = timeout
        self.master = RendezvousStoreInfo(master_addr, master_port)

    def get_backend(self) -> str:
        return RDZV_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return False   # there is no agent TCPStore for workers to join

    def next_rendezvous(self) -> RendezvousInfo:
        joined = self.store.add("joined", 1)
        if joined == self.world_size:
            self.store.set("all-joined", b"1")
        try:
            self.store.wait(["all-joined"], datetime.timedelta(seconds=self.timeout))
        except dist.DistStoreError:
            count = self.store.add("joined", 0)
            raise RendezvousTimeoutError(f"only {count} of {self.world_size} nodes joined rendezvous "
                                         f"{self.run_id} within {self.timeout:.0f} s") from None
        return RendezvousInfo(self.store, self.rank, self.world_size, self.master)

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        self.store.close()
        return True


def create_rendezvous(params: RendezvousParameters) -> CoordinatorRendezvous:
    """torch elastic's handler factory. endpoint: the coordinator's host:port; config: rank (this
    node's), timeout (s), master_addr and master_port (MASTER_* for the workers); the token is
    read from the environment (HETERO_JOB_TOKEN), never from the logged configuration."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"rendezvous backend '{RDZV_BACKEND}' needs the job token in {TOKEN_ENV}")
    timeout = float(params.get("timeout", 300))
    store = CoordinatorStore(params.endpoint, token, f"rdzv/{params.run_id}/", timeout=timeout,
                             rank=int(params.get("rank")))
    return CoordinatorRendezvous(store, int(params.get("rank")), params.max_nodes, params.run_id, timeout,
                                 str(params.get("master_addr")), int(params.get("master_port")))


def loopback_store(port: int, rank: int, world_size: int, timeout: float = 30.0) -> dist.TCPStore:
    """A TCPStore on 127.0.0.1:`port` for processes of one host that meet without a coordinator
    (hetero check's link probes, hetero bench bridge). TCPStore's own server would listen on every
    interface, so rank 0 binds loopback itself and hands the socket over."""
    import socket

    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout=datetime.timedelta(seconds=timeout))
    listener = socket.create_server(("127.0.0.1", port), backlog=max(16, world_size))
    return dist.TCPStore("127.0.0.1", port, world_size, True, timeout=datetime.timedelta(seconds=timeout),
                         master_listen_fd=listener.detach())


def register_rendezvous() -> str:
    """Make the "hetero" rendezvous backend known to torch elastic (idempotent); return its name."""
    from torch.distributed.elastic.rendezvous.registry import handler_registry

    handler_registry.register(RDZV_BACKEND, create_rendezvous)
    return RDZV_BACKEND
