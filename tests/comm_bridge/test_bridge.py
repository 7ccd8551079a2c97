"""comm_bridge.Endpoint: p2p correctness, ordering, bad frames, faults, bounded memory.

Both endpoints live in this process (each has its own zmq context and I/O thread),
which exercises the same sockets and wire format as two processes; the
multi-process paths are in test_bridge_multiprocess.py.
"""

import os
import threading
import time

import pytest
import torch
import zmq

from comm_bridge import frames as F
from comm_bridge.errors import BridgeTimeoutError, PeerFailedError, TransferMismatchError

pytestmark = pytest.mark.timeout(120)
TOKEN = "test-token"


@pytest.fixture(params=["tcp", "shm", "zmq"])
def endpoints(request, connected_endpoints):
    # tcp: plain-TCP stream; shm: same-host ring (+ zmq for small messages);
    # zmq: striped zmq chunks (stream off). Small chunks so that modest tensors
    # still cross many chunks and both stripes.
    return connected_endpoints(shm=request.param == "shm", stream=request.param != "zmq", chunk_bytes=64 << 10,
                               default_timeout=30)


def sample(dtype, shape):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


SHAPES = [(), (0,), (5, 0, 3), (7,), (33, 17), (2, 3, 4, 5), (300, 257)]


@pytest.mark.parametrize("dtype", list(F.DTYPE_CODES))
def test_every_dtype_and_shape_arrives_intact(endpoints, dtype):
    a, b = endpoints
    for tag, shape in enumerate(SHAPES):
        x = sample(dtype, shape)
        pending = b.irecv(0, tag)
        a.isend(x, 1, tag).wait(30)
        y = pending.wait(30)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(y, x), (dtype, shape)


def test_non_contiguous_and_preallocated_out(endpoints):
    a, b = endpoints
    x = torch.randn(64, 300)
    for view in (x.t(), x[:, ::3], x[5:40:2, 7:200]):
        assert not view.is_contiguous()
        out = torch.empty(view.shape)
        pending = b.irecv(0, 4, out=out)
        a.send(view, 1, 4)
        assert pending.wait(30) is out
        assert torch.equal(out, view)
    # A non-contiguous out buffer is filled too.
    target = torch.zeros(300, 64).t()
    pending = b.irecv(0, 5, out=target)
    a.send(x, 1, 5)
    pending.wait(30)
    assert torch.equal(target, x)


def test_message_sent_before_irecv_is_held_and_delivered(endpoints):
    a, b = endpoints
    xs = [torch.randn(1000 * (i + 1)) for i in range(5)]
    for x in xs:
        a.isend(x, 1, 9).wait(30)
    time.sleep(0.2)
    assert b.stats()["unexpected_bytes"] > 0
    for x in xs:
        assert torch.equal(b.recv(0, 9, timeout=30), x)
    assert b.stats()["unexpected_bytes"] == 0


def test_ordering_under_concurrency(endpoints):
    """Per (source, tag) messages match receives in send order, whatever the threads do."""
    a, b = endpoints
    per_tag = 40
    sizes = [10, 70_000, 3, 200_000]  # mixes single-chunk, striped and (shm) ring messages

    def sender(tag):
        handles = [a.isend(torch.full((sizes[i % 4],), float(i)), 1, tag) for i in range(per_tag)]
        for handle in handles:
            handle.wait(60)

    receives = {tag: [b.irecv(0, tag) for _ in range(per_tag)] for tag in range(4)}
    threads = [threading.Thread(target=sender, args=(tag,)) for tag in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for tag, handles in receives.items():
        for i, handle in enumerate(handles):
            y = handle.wait(60)
            assert y.shape == (sizes[i % 4],) and bool((y == i).all()), (tag, i)


def test_mismatched_out_buffer_raises_clear_error(endpoints):
    a, b = endpoints
    pending = b.irecv(0, 1, out=torch.empty(10, dtype=torch.float64))
    a.send(torch.ones(12), 1, 1)
    with pytest.raises(TransferMismatchError, match="float32"):
        pending.wait(30)
    # The channel still works afterwards.
    a.send(torch.arange(5.0), 1, 1)
    assert torch.equal(b.recv(0, 1, timeout=30), torch.arange(5.0))


def test_fail_peer_wakes_every_waiter_and_refuses_new_calls(endpoints):
    a, b = endpoints
    waiting = [b.irecv(0, tag) for tag in range(3)]
    errors = []

    def waiter(handle):
        try:
            handle.wait(30)
        except PeerFailedError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(h,)) for h in waiting]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    b.fail_peer(0, "no heartbeat for 5.0s")
    for thread in threads:
        thread.join(10)
    assert len(errors) == 3 and time.monotonic() - start < 5
    assert "rank 0" in str(errors[0]) and "no heartbeat" in str(errors[0])
    with pytest.raises(PeerFailedError):
        b.irecv(0, 0)
    with pytest.raises(PeerFailedError):
        b.isend(torch.ones(1), 0)


def test_wait_times_out_with_a_clear_error(connected_endpoints):
    a, b = connected_endpoints(shm=False)
    with pytest.raises(BridgeTimeoutError, match="irecv from rank 0 tag 3"):
        b.irecv(0, 3).wait(0.3)


# ------------------------------------------------------------- bad frames
def raw_push(endpoint, stripe=0):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint.endpoints[stripe])
    return sock


def test_malformed_frames_are_rejected_counted_and_survived(connected_endpoints):
    a, b = connected_endpoints(shm=False, chunk_bytes=4096, default_timeout=30)
    sock = connected_endpoints.closing(raw_push(b))
    auth = F.auth_tag(TOKEN)
    good = F.Header(sender=0, tag=0, seq=100, dtype=torch.float32, shape=(2048,), nbytes=8192)
    hdr = F.pack_header(good, auth)
    junk = [
        [b"garbage"],                                                          # bad_length
        [F.pack_header(good, F.auth_tag("intruder")), F.pack_chunk(F.Chunk(0, 2, 4096)), b"\0" * 4096],
        [hdr, F.pack_chunk(F.Chunk(0, 2, 4096)), b"\0" * 100],                 # truncated chunk
        [hdr, F.pack_chunk(F.Chunk(0, 2, 4096))],                              # missing payload
        [hdr, F.pack_chunk(F.Chunk(5, 2, 4096)), b"\0" * 4096],                # chunk index out of range
        [F.pack_header(F.Header(sender=0, tag=0, seq=101, dtype=torch.uint8, shape=(1 << 40,),
                                nbytes=1 << 40), auth)],                       # oversized
    ]
    for message in junk:
        sock.send_multipart(message)
    deadline = time.monotonic() + 20
    while b.stats()["rejected_total"] < len(junk) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = b.stats()
    assert stats["rejected_total"] == len(junk), stats
    assert {"bad_length", "unauthenticated", "truncated", "oversized", "bad_chunk"} <= set(stats["rejected"])
    # The receiver is alive and the real sender still gets through.
    x = torch.randn(5000)
    pending = b.irecv(0, 0)
    a.send(x, 1, 0)
    assert torch.equal(pending.wait(30), x)


def test_truncated_message_fails_the_receive_instead_of_delivering_partial_data(connected_endpoints):
    a, b = connected_endpoints(shm=False, chunk_bytes=4096, default_timeout=30)
    sock = connected_endpoints.closing(raw_push(b))
    auth = F.auth_tag(TOKEN)
    pending = b.irecv(0, 0)
    hdr = F.pack_header(F.Header(sender=0, tag=0, seq=0, dtype=torch.uint8, shape=(8192,), nbytes=8192), auth)
    sock.send_multipart([hdr, F.pack_chunk(F.Chunk(0, 2, 4096)), b"\1" * 4096])
    sock.send_multipart([hdr, F.pack_chunk(F.Chunk(1, 2, 4096)), b"\1" * 10])
    with pytest.raises(TransferMismatchError, match="truncated"):
        pending.wait(20)
    assert b.stats()["rejected"].get("truncated") == 1


def test_replayed_sequence_number_is_rejected(connected_endpoints):
    a, b = connected_endpoints(shm=False)
    a.send(torch.ones(3), 1, 0)
    assert torch.equal(b.recv(0, 0, timeout=30), torch.ones(3))
    sock = connected_endpoints.closing(raw_push(b))
    hdr = F.pack_header(F.Header(sender=0, tag=0, seq=0, dtype=torch.float32, shape=(3,), nbytes=12),
                        F.auth_tag(TOKEN))
    sock.send_multipart([hdr, F.pack_chunk(F.Chunk(0, 1, b.chunk_bytes)), b"\0" * 12])
    deadline = time.monotonic() + 10
    while not b.stats()["rejected_total"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.stats()["rejected"] == {"replayed": 1}


# ------------------------------------------------------------------ memory
def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("shm", [False, True])
def test_memory_stays_bounded_over_1000_transfers(shm, connected_endpoints):
    a, b = connected_endpoints(shm=shm, chunk_bytes=64 << 10, default_timeout=60)
    x = torch.randn(64 << 10)  # 256 KiB: 4 chunks
    out = torch.empty_like(x)
    for _ in range(20):  # warm the allocators
        b.irecv(0, 0, out=out)
        a.send(x, 1, 0)
    baseline = rss_bytes()
    handles = []
    for _ in range(1000):
        handles.append(b.irecv(0, 0, out=out))
        a.isend(x, 1, 0)
        if len(handles) >= 8:
            handles.pop(0).wait(60)
    for handle in handles:
        handle.wait(60)
    assert torch.equal(out, x)
    growth = rss_bytes() - baseline
    assert growth < 64 << 20, f"RSS grew {growth >> 20} MiB over 1000 transfers"
    for side in (a, b):
        stats = side.stats()
        assert stats["inflight"] == stats["parked"] == stats["posted"] == stats["unexpected_bytes"] == 0, stats
    deadline = time.monotonic() + 10
    while a.stats()["pending_send_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.stats()["pending_send_bytes"] == 0
    assert b.stats()["messages_received"] == 1020


def test_unexpected_messages_are_bounded_by_backpressure(connected_endpoints):
    limit = 1 << 20
    a, b = connected_endpoints(shm=False, chunk_bytes=64 << 10, max_unexpected_bytes=limit, default_timeout=60)
    xs = [torch.full((64 << 10,), float(i)) for i in range(40)]  # 40 x 256 KiB = 10x the limit
    sends = [a.isend(x, 1, 0) for x in xs]
    time.sleep(1.0)
    stats = b.stats()
    held = stats["unexpected_bytes"] + stats["parked_bytes"]
    assert 0 < held <= 2 * limit + (256 << 10), stats
    assert b.stats().get("backpressure_pauses", 0) >= 1
    for i in range(40):
        assert torch.equal(b.recv(0, 0, timeout=60), xs[i])
    for send in sends:
        send.wait(60)


# ------------------------------------------------------- plain-TCP streams
def raw_stream(endpoint, rank=0, token=TOKEN):
    """A plain socket to `endpoint`'s stream port, introduced as `rank` with `token`."""
    import socket
    import struct
    from comm_bridge import stream as S
    sock = socket.create_connection(S.parse_address(endpoint.stream_address), timeout=10)
    sock.sendall(struct.pack(f"<4sI{F.AUTH_BYTES}s", S.HELLO_MAGIC, rank, F.auth_tag(token)))
    return sock


def hung_up(sock) -> bool:
    """True if the other end closed (a reset counts: it closed with our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_tcp_peers_stream_the_payload_and_same_host_shm_peers_only_ring_doorbells_on_it(connected_endpoints):
    for shm in (False, True):
        a, b = connected_endpoints(shm=shm, default_timeout=30)
        x = torch.randn(100_000)
        pending = b.irecv(0, 0)
        a.send(x, 1, 0)
        assert torch.equal(pending.wait(30), x)
        assert wait_for(lambda b=b: b.stats()["streams_in"] == b.stats()["streams_joined"] == 1), (shm, b.stats())
        streamed = b.stats()["stream_bytes_received"]
        if shm:
            assert streamed < 4096, streamed  # header + descriptor per chunk
        else:
            assert streamed >= x.nbytes


@pytest.mark.parametrize("stream", [True, False])
def test_shm_doorbells_that_beat_the_receivers_address_book_still_get_their_slots_back(connected_endpoints, stream):
    # A fast peer may send before this endpoint has called add_peers (a worker still waiting
    # for the coordinator's address book). Its doorbells are read at once; the slots they lend
    # must go back once the peer is known, or the sender waits for credits forever.
    from comm_bridge.channel import Endpoint
    a, b = (connected_endpoints.closing(Endpoint(rank, "test-token", shm=True, stream=stream, chunk_bytes=64 << 10,
                                                 default_timeout=30)) for rank in (0, 1))
    a.add_peers([b.address()])  # b does not know a yet
    x = torch.randn(1 << 20)     # 4 MiB: 64 chunks through 8 slots
    sending = a.isend(x, 1, 7)
    assert wait_for(lambda: b.stats()["shm_credits_owed"] == a.shm_slots), b.stats()
    time.sleep(0.2)
    assert not sending.done() and b.stats()["shm_credits_owed"] == a.shm_slots  # all lent, none returnable
    b.add_peers([a.address()])
    assert torch.equal(b.recv(0, 7, timeout=30), x)
    sending.wait(30)
    assert wait_for(lambda: b.stats()["shm_credits_owed"] == 0), b.stats()
    assert a.stats()["rejected_total"] == b.stats()["rejected_total"] == 0


def test_a_failed_peer_is_owed_no_credits(connected_endpoints):
    from comm_bridge.channel import Endpoint
    a, b = (connected_endpoints.closing(Endpoint(rank, "test-token", shm=True, chunk_bytes=64 << 10,
                                                 default_timeout=30)) for rank in (0, 1))
    a.add_peers([b.address()])
    a.isend(torch.randn(1 << 20), 1, 0)  # b never learns a's address: its slots stay owed
    assert wait_for(lambda: b.stats()["shm_credits_owed"] == a.shm_slots), b.stats()
    b.fail_peer(0, "declared dead by the test")
    assert b.stats()["shm_credits_owed"] == 0


def test_stream_with_a_wrong_token_is_refused_and_counted(connected_endpoints):
    a, b = connected_endpoints(shm=False, default_timeout=30)
    sock = connected_endpoints.closing(raw_stream(b, token="intruder"))
    auth = F.auth_tag("intruder")
    sock.sendall(F.pack_header(F.Header(sender=0, tag=0, seq=0, dtype=torch.uint8, shape=(4,), nbytes=4),
                               auth) + b"\1\2\3\4")
    assert wait_for(lambda: b.stats()["rejected"].get("unauthenticated") == 1), b.stats()
    assert hung_up(sock)
    x = torch.arange(10.0)
    pending = b.irecv(0, 0)
    a.send(x, 1, 0)
    assert torch.equal(pending.wait(30), x)  # nothing the intruder sent was delivered


def test_stream_garbage_header_closes_that_stream_only(connected_endpoints):
    a, b = connected_endpoints(shm=False, default_timeout=30)
    sock = connected_endpoints.closing(raw_stream(b))
    sock.sendall(b"\0" * F.HEADER_BYTES)
    assert wait_for(lambda: b.stats()["rejected"].get("bad_magic") == 1), b.stats()
    assert hung_up(sock)
    x = torch.randn(300, 7)
    pending = b.irecv(0, 2)
    a.send(x, 1, 2)
    assert torch.equal(pending.wait(30), x)


def test_stream_cut_mid_payload_fails_the_receive(connected_endpoints):
    a, b = connected_endpoints(shm=False, default_timeout=30)
    sock = raw_stream(b)
    pending = b.irecv(0, 0)
    header = F.Header(sender=0, tag=0, seq=0, dtype=torch.uint8, shape=(8192,), nbytes=8192)
    sock.sendall(F.pack_header(header, F.auth_tag(TOKEN)) + b"\1" * 4000)
    sock.close()
    with pytest.raises(TransferMismatchError, match="truncated"):
        pending.wait(20)
    assert b.stats()["rejected"].get("truncated") == 1


def test_send_to_a_closed_peer_fails_instead_of_hanging(connected_endpoints):
    a, b = connected_endpoints(shm=False, default_timeout=30)
    b.close()
    with pytest.raises(PeerFailedError, match="rank 1"):
        a.isend(torch.ones(10), 1, 0).wait(20)


def test_small_messages_take_the_lane_into_posted_tensors_intact(connected_endpoints):
    """Between stream peers a small message goes out in one sendmsg and lands straight
    in the posted tensor; every dtype and shape, including empty ones, arrives intact."""
    a, b = connected_endpoints(shm=False, default_timeout=30)
    b.irecv(0, 99)
    a.send(torch.ones(3), 1, 99)  # opens the stream; the lane needs it open
    for tag, dtype in enumerate(F.DTYPE_CODES):
        for shape in SHAPES[:-1]:  # all but the one above the small-message limit
            x = sample(dtype, shape)
            x = x.t() if x.dim() == 2 else x  # non-contiguous too
            out = torch.empty(x.shape, dtype=dtype)
            pending = b.irecv(0, tag, out=out)
            a.isend(x, 1, tag).wait(30)
            assert pending.wait(30) is out
            assert torch.equal(out, x), (dtype, shape)
    # Same bytes, other shape: the bytes land in the caller's tensor as they are.
    out = torch.empty(4, 3)
    pending = b.irecv(0, 0, out=out)
    a.send(torch.arange(12.0).reshape(3, 4), 1, 0)
    assert pending.wait(30) is out and torch.equal(out.flatten(), torch.arange(12.0))
    sent, landed = a.stats()["small_lane_sent"], b.stats()["small_lane_received"]
    assert sent >= len(F.DTYPE_CODES) * (len(SHAPES) - 1) and landed >= sent - 1


def test_small_lane_refuses_a_dtype_mismatch_of_equal_size(connected_endpoints):
    a, b = connected_endpoints(shm=False, default_timeout=30)
    a.send(torch.ones(1), 1, 1)
    b.recv(0, 1, timeout=30)
    pending = b.irecv(0, 2, out=torch.empty(4, dtype=torch.float32))
    a.send(torch.arange(4, dtype=torch.int32), 1, 2)  # 16 bytes either way
    with pytest.raises(TransferMismatchError, match="int32"):
        pending.wait(30)
    a.send(torch.arange(3.0), 1, 2)
    assert torch.equal(b.recv(0, 2, timeout=30), torch.arange(3.0))
