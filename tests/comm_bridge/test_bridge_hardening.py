"""comm_bridge hardening: idle-connection floods on a stream port, bound addresses, and
shared-memory rings that outlive nothing.

Everything listens on loopback. Run as a script (`python tests/comm_bridge/test_bridge_hardening.py`)
it prints the RSS cost of 1,000 idle connections to one endpoint's stream port.
"""

import json
import os
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest
import torch
import zmq

from comm_bridge import shm as M
from comm_bridge import stream as S
from comm_bridge.channel import Endpoint

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "hardening-token"
IDLE = 1000
LIMIT_BYTES = 20 << 20  # the goal for 1,000 idle connections


def wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def hung_up(sock, timeout=10.0) -> bool:
    """True once the other end has closed (a reset counts)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def room_for_fds(needed: int) -> None:
    """Raise the soft open-file limit to `needed` (skip if the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def seen(endpoint: Endpoint) -> int:
    """Connections the endpoint has accepted and holds unauthenticated, or refused."""
    stats = endpoint.stats()
    return stats["streams_unauthenticated"] + stats["rejected_total"]


def idle_connections(endpoint: Endpoint, count: int, batch: int = 32) -> list[socket.socket]:
    """`count` connections to the endpoint's stream port that never say a word, opened a
    batch at a time, each batch taken by the endpoint before the next (idle connections,
    not a SYN flood: a full accept queue would cost each connect a 1 s SYN retry)."""
    address = S.parse_address(endpoint.stream_address)
    clients = []
    while len(clients) < count:
        clients += [socket.create_connection(address, timeout=10) for _ in range(min(batch, count - len(clients)))]
        opened = len(clients)
        assert wait_for(lambda opened=opened: seen(endpoint) >= opened), (opened, endpoint.stats())
    return clients


def transfers(a: Endpoint, b: Endpoint, tensors) -> bool:
    """Send each tensor from a to b; True if every one arrived intact."""
    for tag, x in enumerate(tensors):
        pending = b.irecv(0, tag)
        a.send(x, 1, tag, timeout=30)
        if not torch.equal(pending.wait(30), x):
            return False
    return True


# ------------------------------------------------- idle connections on a stream port
def test_1000_idle_connections_cost_a_hello_sized_buffer_each():
    """Without the cap (raised past 1,000), every idle connection is held: together they
    cost far under 20 MB, measured by tracemalloc and by the endpoint's own buffer sum."""
    room_for_fds(2 * IDLE + 256)
    endpoint = Endpoint(0, TOKEN, shm=False, hello_timeout=60, max_unauthenticated=2 * IDLE)
    clients = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        clients = idle_connections(endpoint, IDLE)
        assert wait_for(lambda: endpoint.stats()["streams_unauthenticated"] == IDLE), endpoint.stats()
        cost = tracemalloc.get_traced_memory()[0] - before
        stats = endpoint.stats()
        assert stats["stream_buffer_bytes"] == IDLE * S.HELLO_BYTES, stats
        assert cost < LIMIT_BYTES, f"{IDLE} idle connections cost {cost} bytes"
        assert stats["rejected_total"] == 0, stats
    finally:
        tracemalloc.stop()
        for sock in clients:
            sock.close()
        endpoint.close()


def test_connections_over_the_cap_are_closed_and_counted_and_a_real_peer_still_gets_through(connected_endpoints):
    room_for_fds(2 * IDLE + 256)
    a, b = connected_endpoints(default_timeout=30, shm=False)
    assert b.max_unauthenticated == S.MAX_UNAUTHENTICATED == 64
    clients = [connected_endpoints.closing(sock) for sock in idle_connections(b, IDLE)]
    over = IDLE - b.max_unauthenticated
    assert wait_for(lambda: b.stats()["rejected"].get("unauthenticated_cap") == over), b.stats()
    stats = b.stats()
    assert stats["streams_unauthenticated"] == b.max_unauthenticated, stats
    assert stats["stream_buffer_bytes"] == b.max_unauthenticated * S.HELLO_BYTES, stats
    # The endpoint closed exactly the ones over the cap: they read EOF, the rest hear nothing.
    poller = select.poll()
    for sock in clients:
        poller.register(sock.fileno(), select.POLLIN)
    assert wait_for(lambda: len(poller.poll(0)) == over), len(poller.poll(0))
    for fd, _ in poller.poll(0):
        assert os.read(fd, 1) == b""
    # Once the knockers leave, a real peer connects and transfers, small and big.
    for sock in clients:
        sock.close()
    assert wait_for(lambda: b.stats()["streams_unauthenticated"] == 0), b.stats()
    assert b.stats()["rejected"].get("no_hello") == b.max_unauthenticated
    assert transfers(a, b, [torch.arange(10.0), torch.randn(300, 1000)])
    assert b.stats()["stream_buffer_bytes"] == S.READ_AHEAD_BYTES  # the real peer's stream, full size


def test_knockers_holding_the_cap_cannot_keep_a_real_peer_out(connected_endpoints):
    """The cap closes the oldest silent connection, not the newcomer: a peer that says its
    hello at once gets through while a full cap of idle knockers is still held open."""
    a, b = connected_endpoints(default_timeout=30, shm=False, max_unauthenticated=8)
    for sock in idle_connections(b, 8, batch=8):
        connected_endpoints.closing(sock)
    assert b.stats()["streams_unauthenticated"] == 8
    assert transfers(a, b, [torch.arange(10.0), torch.randn(200, 100)])
    stats = b.stats()
    assert stats["rejected"].get("unauthenticated_cap") == 1, stats   # the oldest knocker made room
    assert stats["streams_unauthenticated"] == 7, stats
    assert stats["messages_received"] == 2, stats


def test_a_connection_without_a_hello_is_closed_at_the_deadline_and_counted(connected_endpoints):
    a, b = connected_endpoints(default_timeout=30, shm=False, hello_timeout=0.2)
    silent = connected_endpoints.closing(socket.create_connection(S.parse_address(b.stream_address), timeout=10))
    partial = connected_endpoints.closing(socket.create_connection(S.parse_address(b.stream_address), timeout=10))
    partial.sendall(S.HELLO_MAGIC)  # the start of a hello, never the rest
    assert hung_up(silent) and hung_up(partial)
    assert wait_for(lambda: b.stats()["rejected"].get("hello_timeout") == 2), b.stats()
    # A real peer says hello at once and is not timed out, however long it then idles.
    assert transfers(a, b, [torch.ones(3)])
    time.sleep(0.5)
    assert transfers(a, b, [torch.randn(64, 64), torch.arange(5)])
    assert b.stats()["rejected"] == {"hello_timeout": 2}, b.stats()


def test_an_inbound_stream_gets_the_full_read_ahead_only_after_its_hello():
    from comm_bridge import frames as F
    for token, grows in ((TOKEN, True), ("intruder", False)):
        listener = S.listen("127.0.0.1")
        there = socket.create_connection(listener.getsockname(), timeout=10)
        assert wait_for(lambda listener=listener: select.select([listener], [], [], 0)[0])
        here = listener.accept()[0]
        listener.close()
        try:
            conn = S.Inbound(here)
            assert conn.buffer_bytes() == S.HELLO_BYTES
            there.sendall(struct.pack(f"<4sI{F.AUTH_BYTES}s", S.HELLO_MAGIC, 3, F.auth_tag(token)) + b"x" * 100)
            assert wait_for(lambda conn=conn: conn.buffered() or conn.fill())
            assert conn.buffered() == S.HELLO_BYTES  # never more than the hello before it checks out
            raw = conn.take(S.HELLO_BYTES)
            if grows:
                conn.check_hello(raw, F.auth_tag(TOKEN))
                assert conn.rank == 3 and conn.buffer_bytes() == S.READ_AHEAD_BYTES
                assert wait_for(lambda conn=conn: conn.buffered() or conn.fill()) and conn.buffered() == 100
            else:
                with pytest.raises(F.FrameError, match="job tag"):
                    conn.check_hello(raw, F.auth_tag(TOKEN))
                assert conn.rank is None and conn.buffer_bytes() == S.HELLO_BYTES
        finally:
            here.close()
            there.close()


def test_a_garbage_hello_is_refused_and_counted(connected_endpoints):
    a, b = connected_endpoints(default_timeout=30, shm=False)
    sock = connected_endpoints.closing(socket.create_connection(S.parse_address(b.stream_address), timeout=10))
    sock.sendall(os.urandom(S.HELLO_BYTES) + b"\0" * 4096)  # garbage, and more behind it
    assert hung_up(sock)
    assert wait_for(lambda: b.stats()["rejected"].get("bad_magic") == 1), b.stats()
    assert transfers(a, b, [torch.randn(1000)])


@pytest.mark.parametrize("option, value", [("hello_timeout", 0), ("max_unauthenticated", 0)])
def test_endpoint_refuses_nonsense_hello_limits(option, value):
    with pytest.raises(ValueError, match=option):
        Endpoint(0, TOKEN, shm=False, **{option: value})


# ------------------------------------------------------------------ bound addresses
def zmq_host(endpoint: str) -> str:
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_every_listener_binds_the_given_address(host):
    endpoint = Endpoint(0, TOKEN, host=host)
    try:
        bound = [zmq_host(sock.getsockopt_string(zmq.LAST_ENDPOINT)) for sock in endpoint._zmq.pulls]
        assert bound == [host] * endpoint.stripes
        assert endpoint._streams.listener.getsockname()[0] == host
        advertised = endpoint.address()["endpoints"]
        assert all(re.match(rf"^(tcp|stream\+tcp)://{re.escape(host)}:\d+$", e) for e in advertised), advertised
        # What the kernel says: every listening socket of this endpoint is on `host`.
        ports = {int(e.rsplit(":", 1)[1]) for e in advertised}
        assert listening_hosts(ports) == {host}
    finally:
        endpoint.close()


def listening_hosts(ports: set[int]) -> set[str]:
    """Local addresses of this machine's IPv4/IPv6 listening TCP sockets on `ports` (/proc/net)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    hosts.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    hosts.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return hosts


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_a_wildcard_host_is_refused_unless_bind_all(host):
    with pytest.raises(ValueError, match="every interface"):
        Endpoint(0, TOKEN, host=host)


# ------------------------------------------------------------ shared-memory rings
def fresh_token() -> str:
    return f"hardening-{uuid.uuid4().hex}"


def job_rings(job_hex: str) -> list[str]:
    return sorted(name for name in os.listdir(M.shm_dir()) if name.startswith(f"{M.RING_PREFIX}{job_hex}-"))


needs_shm = pytest.mark.skipif(M.shm_dir() is None, reason="no writable /dev/shm")


@needs_shm
@pytest.mark.parametrize("stream", [True, False])
def test_ring_is_unlinked_once_mapped_and_keeps_working(stream, connected_endpoints):
    token = fresh_token()
    job_hex = M.job_hex_of(token)
    a, b = connected_endpoints(token=token, default_timeout=30, shm=True, stream=stream, chunk_bytes=64 << 10,
                               shm_slots=4)
    big = [torch.randn(100_000) for _ in range(3)]  # 400 KB each: 7 chunks through a 4-slot ring
    assert transfers(a, b, big[:1])
    assert job_rings(job_hex) == []
    assert transfers(a, b, big[1:] + [torch.arange(7)])  # the unlinked ring still carries them
    assert job_rings(job_hex) == []
    assert b.stats()["rejected_total"] == 0
    if stream:  # the bytes went through the ring: the stream carried only doorbells
        assert b.stats()["stream_bytes_received"] < 3 * 100_000
    assert job_rings(job_hex) == []


CHILD = """
import sys, time, torch
from comm_bridge.channel import Endpoint
a = Endpoint(0, sys.argv[1], chunk_bytes=64 << 10)
b = Endpoint(1, sys.argv[1], chunk_bytes=64 << 10)
a.add_peers([b.address()]); b.add_peers([a.address()])
for peer_from, peer_to, src, dst in ((a, b, 0, 1), (b, a, 1, 0)):
    x = torch.randn(100_000)
    pending = peer_to.irecv(src, 0)
    peer_from.send(x, dst, 0, timeout=60)
    assert torch.equal(pending.wait(60), x)
print("attached", flush=True)
time.sleep(600)
"""


@needs_shm
def test_a_killed_process_leaves_no_ring():
    token = fresh_token()
    job_hex = M.job_hex_of(token)
    child = subprocess.Popen([sys.executable, "-c", CHILD, token], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
        assert job_rings(job_hex) == []  # both rings mapped at both ends: already unlinked
        child.kill()
        child.wait(30)
        assert job_rings(job_hex) == []
    finally:
        child.kill()
        child.wait(30)
        child.stdout.close()
        M.remove_job_rings(job_hex)


@needs_shm
def test_remove_job_rings_removes_that_jobs_rings_only():
    ours, theirs = M.job_hex_of(fresh_token()), M.job_hex_of(fresh_token())
    names = [f"hetero-bridge-{ours}-0-1", f"hetero-bridge-{ours}-12-3", f"hetero-bridge-{theirs}-0-1",
             f"hetero-bridge-{ours}-0-1.bak", f"hetero-bridge-{ours}x-0-1", f"hetero-bridge-{ours}-a-b"]
    paths = [os.path.join(M.shm_dir(), name) for name in names]
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert M.remove_job_rings(ours) == 2
        assert [os.path.exists(p) for p in paths] == [False, False, True, True, True, True]
        assert M.remove_job_rings(ours) == 0
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.parametrize("job_hex", ["", "*", "../etc", "ABCDEF012345", "0123456789abc"])
def test_remove_job_rings_refuses_anything_but_a_job_hex(job_hex):
    with pytest.raises(ValueError, match="job_hex"):
        M.remove_job_rings(job_hex)


@needs_shm
def test_launcher_sweep_removes_a_ring_its_receiver_never_mapped():
    """A job killed between the sender's first ring write and the receiver's map leaves the
    ring; job_hex_of(token) names it and remove_job_rings takes it away."""
    token = fresh_token()
    ctx = zmq.Context()
    doorbells = ctx.socket(zmq.PULL)  # a receiver that takes doorbells but never maps the ring
    port = doorbells.bind_to_random_port("tcp://127.0.0.1")
    sender = Endpoint(0, token, shm=True, stream=False, default_timeout=30)
    try:
        sender.add_peers([{"rank": 1, "endpoints": [f"tcp://127.0.0.1:{port}"], "host_id": sender.host_id}])
        sender.isend(torch.randn(100_000), 1, 0)
        assert doorbells.poll(30_000) and doorbells.recv_multipart()
        assert job_rings(M.job_hex_of(token)) == [os.path.basename(M.ring_path(M.job_hex_of(token), 0, 1))]
        assert M.remove_job_rings(M.job_hex_of(token)) == 1
        assert job_rings(M.job_hex_of(token)) == []
    finally:
        sender.close()
        doorbells.close(linger=0)
        ctx.term()


def test_job_hex_of_is_what_the_endpoint_names_its_rings_by():
    assert re.fullmatch(r"[0-9a-f]{12}", M.job_hex_of(TOKEN))
    assert M.job_hex_of(TOKEN) != M.job_hex_of("another-token")
    with Endpoint(0, TOKEN, shm=False) as endpoint:
        assert endpoint.job_hex == M.job_hex_of(TOKEN)


# ------------------------------------------------------------------ measurement
RSS_CHILD = """
import json, sys, time
from comm_bridge.channel import Endpoint
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
endpoint = Endpoint(0, "rss", shm=False, hello_timeout=600, max_unauthenticated=int(sys.argv[1]))
time.sleep(0.5)
print(json.dumps({"address": endpoint.stream_address, "rss": rss()}), flush=True)
for line in sys.stdin:  # "N": answer once N connections are held or refused
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = endpoint.stats()
        if stats["streams_unauthenticated"] + stats["rejected_total"] >= int(line):
            break
        time.sleep(0.01)
    print(json.dumps({"rss": rss(), "stats": endpoint.stats()}), flush=True)
"""


def measure_idle_rss(count: int = IDLE, cap: int = 2 * IDLE, batch: int = 32) -> dict:
    """RSS of a process holding one endpoint, before and after `count` idle connections
    to its stream port (opened from this process a batch at a time), with at most `cap`
    of them unauthenticated."""
    room_for_fds(count + 256)  # the child inherits the limit
    child = subprocess.Popen([sys.executable, "-c", RSS_CHILD, str(cap)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    clients = []
    try:
        first = json.loads(child.stdout.readline())
        address = S.parse_address(first["address"])
        while len(clients) < count:
            clients += [socket.create_connection(address, timeout=10) for _ in range(min(batch, count - len(clients)))]
            child.stdin.write(f"{len(clients)}\n")
            child.stdin.flush()
            last = json.loads(child.stdout.readline())
        time.sleep(0.5)
        child.stdin.write(f"{count}\n")
        child.stdin.flush()
        last = json.loads(child.stdout.readline())
    finally:
        for sock in clients:
            sock.close()
        child.kill()
        child.wait(30)
        child.stdin.close()
        child.stdout.close()
    stats = last["stats"]
    return {"connections": count, "cap": cap, "rss_before": first["rss"], "rss_after": last["rss"],
            "rss_cost": last["rss"] - first["rss"], "held": stats["streams_unauthenticated"],
            "refused": stats["rejected"].get("unauthenticated_cap", 0),
            "buffer_bytes": stats["stream_buffer_bytes"]}


def test_rss_of_1000_idle_connections_stays_under_20_mb():
    numbers = measure_idle_rss()
    assert numbers["held"] == IDLE, numbers
    assert numbers["rss_cost"] < LIMIT_BYTES, numbers


if __name__ == "__main__":
    for cap in (2 * IDLE, S.MAX_UNAUTHENTICATED):
        print(json.dumps(measure_idle_rss(IDLE, cap)))
