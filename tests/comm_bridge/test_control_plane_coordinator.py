"""The coordinator as a control plane: one job per port, and a key-value store only the job's token opens."""

import socket
import threading

import pytest

from comm_bridge.client import CoordinatorClient
from comm_bridge.coordinator import MAX_KV_KEY_BYTES, Coordinator
from comm_bridge.errors import AddressInUseError, AuthenticationError, CoordinatorError, CoordinatorTimeoutError

pytestmark = pytest.mark.timeout(60)
TOKEN = "control-plane-token"


@pytest.fixture
def coordinator():
    server = Coordinator(TOKEN, world_size=2, heartbeat_timeout=5.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(coordinator):
    kv = CoordinatorClient(coordinator.address, TOKEN, 0, timeout=10)
    yield kv
    kv.close()


def test_a_second_coordinator_on_the_same_port_fails_and_the_first_keeps_every_client(coordinator):
    port = int(coordinator.address.rsplit(":", 1)[1])
    second = Coordinator("another-job", world_size=2, port=port)
    with pytest.raises(AddressInUseError) as caught:
        second.start()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "another job may hold it" in message and "\n" not in message
    second.stop()
    # Every new connection still reaches the first job: none is split off to a second server.
    clients = [CoordinatorClient(coordinator.address, TOKEN, rank % 2, timeout=5) for rank in range(12)]
    try:
        for n, kv in enumerate(clients):
            kv.kv_set(f"k{n}", str(n))
        assert [clients[-1 - n].kv_get(f"k{n}") for n in range(12)] == [str(n) for n in range(12)]
    finally:
        for kv in clients:
            kv.close()
    assert coordinator.refused == 0


def test_a_port_some_other_program_holds_fails_the_same_way():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = Coordinator(TOKEN, world_size=1, port=port)
        with pytest.raises(AddressInUseError, match=f"127.0.0.1:{port} is already in use"):
            server.start()
        server.stop()


def test_atomic_and_blocking_operations(client):
    assert client.kv_add("n", 2) == 2 and client.kv_add("n", -5) == -3
    assert client.kv_get("n") == "-3"                       # an added key holds its decimal text
    client.kv_set_bytes("raw", b"\x00\xff\x10")
    assert client.kv_get_bytes("raw") == b"\x00\xff\x10"

    # compare-and-set: TCPStore's rules.
    assert client.kv_compare_set("cas", b"", b"first") == b"first"        # absent + empty expected: set
    assert client.kv_compare_set("cas", b"wrong", b"second") == b"first"  # mismatch: current value
    assert client.kv_compare_set("cas", b"first", b"second") == b"second"
    assert client.kv_compare_set("absent", b"x", b"y") == b"x"            # absent + other expected: expected
    assert not client.kv_check(["absent"])

    assert client.kv_check(["n", "raw"]) and not client.kv_check(["n", "later"])
    with pytest.raises(CoordinatorTimeoutError, match="keys never set: 'later'"):
        client.kv_wait(["n", "later"], timeout=0.2)
    setter = threading.Timer(0.3, client.kv_set, ("later", "now"))
    setter.start()
    client.kv_wait(["n", "later"], timeout=10)              # returns once the key appears
    assert client.kv_get_bytes("later") == b"now"
    setter.join()

    before = client.kv_count()
    assert client.kv_count("ca") == 1
    assert client.kv_delete("cas") and not client.kv_delete("cas")
    assert client.kv_count() == before - 1
    with pytest.raises(CoordinatorTimeoutError, match="never set"):
        client.kv_get("cas", timeout=0.1)


def test_bad_kv_requests_are_invalid_arguments(client):
    client.kv_set("text", "abc")
    with pytest.raises(CoordinatorError, match="not an integer"):
        client.kv_add("text", 1)
    for method, body in [("KVSet", {"key": "x" * (MAX_KV_KEY_BYTES + 1), "value": ""}),
                         ("KVSet", {"key": "", "value": ""}),
                         ("KVSet", {"key": "k", "b64": "not base64!"}),
                         ("KVAdd", {"key": "k", "amount": 1.5}),
                         ("KVGet", {"key": "k", "timeout": float("nan")}),
                         ("KVWait", {"keys": [], "timeout": 1}),
                         ("KVCompareSet", {"key": "k", "expected_b64": 1, "desired_b64": ""})]:
        with pytest.raises(CoordinatorError, match="INVALID_ARGUMENT"):
            client._call(method, body)
    client.kv_set("still", "serving")
    assert client.kv_get("still") == "serving"


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_every_kv_operation_refuses_a_client_without_the_token(coordinator, client, token):
    client.kv_set("secret", "launch state")
    client.kv_add("counter", 1)
    intruder = CoordinatorClient(coordinator.address, token or "x", 0, timeout=5)
    if token is None:
        intruder._metadata = ()
    operations = [lambda: intruder.kv_set("secret", "forged"), lambda: intruder.kv_get("secret"),
                  lambda: intruder.kv_set_bytes("new", b"x"), lambda: intruder.kv_get_bytes("secret"),
                  lambda: intruder.kv_add("counter", 100), lambda: intruder.kv_compare_set("secret", b"", b"x"),
                  lambda: intruder.kv_wait(["secret"], 0.1), lambda: intruder.kv_check(["secret"]),
                  lambda: intruder.kv_delete("secret"), lambda: intruder.kv_count()]
    for operation in operations:
        with pytest.raises(AuthenticationError, match="UNAUTHENTICATED|job token"):
            operation()
    intruder.close()
    reason = "wrong_token" if token else "missing_token"
    assert coordinator.refusals[reason] == len(operations)
    # Nothing changed, nothing was created.
    assert client.kv_get("secret") == "launch state" and client.kv_add("counter", 0) == 1
    assert not client.kv_check(["new"])
