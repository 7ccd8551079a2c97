"""comm_bridge coordinator: registration, address book, barrier, KV, auth, failure notification."""

import threading
import time

import pytest

from comm_bridge.client import CoordinatorClient
from comm_bridge.coordinator import MAX_KV_VALUE_BYTES, Coordinator
from comm_bridge.errors import AuthenticationError, CoordinatorError

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cret-job-token"


@pytest.fixture
def coordinator():
    server = Coordinator(TOKEN, world_size=3, heartbeat_timeout=1.5)
    server.start()
    yield server
    server.stop()


def clients(server, n=3, token=TOKEN):
    return [CoordinatorClient(server.address, token, rank, timeout=10) for rank in range(n)]


def test_binds_loopback_by_default(coordinator):
    assert coordinator.address.startswith("127.0.0.1:")


def test_registration_address_book_kv_and_barrier(coordinator):
    workers = clients(coordinator)
    for rank, client in enumerate(workers):
        client.register(island=["a800", "ascend"][rank % 2], endpoints=[f"tcp://127.0.0.1:{7000 + rank}"],
                        host_id="h", local_rank=rank // 2)
    book = workers[0].address_book(timeout=5)
    assert sorted(book) == [0, 1, 2]
    assert book[1]["island"] == "ascend" and book[2]["endpoints"] == ["tcp://127.0.0.1:7002"]

    workers[0].kv_set("plan", '{"stages": 2}')
    assert workers[2].kv_get("plan") == '{"stages": 2}'
    with pytest.raises(CoordinatorError, match="never set"):
        workers[1].kv_get("missing", timeout=0.2)

    # Nobody leaves the barrier before everyone arrived; generations advance.
    order = []
    def arrive(client, delay):
        time.sleep(delay)
        order.append(("in", client.rank))
        client.barrier("step", timeout=10)
        order.append(("out", client.rank))
    threads = [threading.Thread(target=arrive, args=(c, 0.3 * c.rank)) for c in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [kind for kind, _ in order[:3]] == ["in"] * 3 and len(order) == 6
    for client in workers:
        client.close()


def test_address_book_times_out_naming_missing_ranks(coordinator):
    client = clients(coordinator, 1)[0]
    client.register(endpoints=[])
    with pytest.raises(CoordinatorError, match="never registered: 1, 2"):
        client.address_book(timeout=0.3)
    client.close()


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_wrong_or_missing_token_is_refused(coordinator, token):
    intruder = CoordinatorClient(coordinator.address, token or "x", 0, timeout=5)
    if not token:
        intruder._metadata = ()  # no token at all
    with pytest.raises(AuthenticationError, match="refused"):
        intruder.register(endpoints=["tcp://127.0.0.1:1"])
    with pytest.raises(AuthenticationError):
        intruder.heartbeat()
    reason, other = ("wrong_token", "missing_token") if token else ("missing_token", "wrong_token")
    assert coordinator.refusals[reason] == 2 and coordinator.refusals[other] == 0
    assert coordinator.refused == 2
    assert 0 not in coordinator.workers
    intruder.close()


def test_bad_requests_are_refused_not_crashing(coordinator):
    client = clients(coordinator, 1)[0]
    with pytest.raises(CoordinatorError, match="INVALID_ARGUMENT"):
        client._call("Register", {"rank": 99, "endpoints": []})
    with pytest.raises(CoordinatorError, match="INVALID_ARGUMENT"):
        client._call("Register", {"rank": 0, "endpoints": "tcp://x"})
    with pytest.raises(CoordinatorError, match="INVALID_ARGUMENT"):
        client._call("KVSet", {"key": "k", "value": "x" * (MAX_KV_VALUE_BYTES + 1)})
    client.register(endpoints=[])  # still serving
    client.close()


def test_silent_worker_is_declared_failed_and_every_peer_is_told(coordinator):
    workers = clients(coordinator)
    for client in workers:
        client.register(endpoints=[])
    seen = {0: threading.Event(), 1: threading.Event()}
    reasons = {}
    for rank in (0, 1):
        workers[rank].on_failure(lambda dead, why, me=rank: (reasons.setdefault(me, (dead, why)), seen[me].set()))
        workers[rank].start_heartbeats(interval=0.2)
    # Rank 2 never heartbeats: it is the worker that died.
    start = time.monotonic()
    assert seen[0].wait(10) and seen[1].wait(10)
    assert time.monotonic() - start < 1.5 + 3.0
    assert reasons[0][0] == 2 and "no heartbeat" in reasons[0][1]
    # Barriers no longer hang on a dead rank.
    with pytest.raises(CoordinatorError, match="rank 2 failed"):
        workers[0].barrier("after", timeout=10)
    for client in workers:
        client.close()


def test_leave_is_reported_to_peers(coordinator):
    workers = clients(coordinator)
    for client in workers:
        client.register(endpoints=[])
    got = threading.Event()
    workers[0].on_failure(lambda rank, why: got.set() if rank == 1 and "left" in why else None)
    workers[0].start_heartbeats(interval=0.2)
    workers[2].start_heartbeats(interval=0.2)
    workers[1].close(leave=True)
    assert got.wait(5)
    workers[0].close()
    workers[2].close()
