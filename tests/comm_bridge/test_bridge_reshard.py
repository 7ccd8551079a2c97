"""Resharding at a TP mismatch: the overlap mapping, exhaustively, and over real endpoints."""

import pytest
import torch

from comm_bridge.channel import Endpoint
from comm_bridge.reshard import (
    Reshard,
    assemble,
    overlap_plan,
    post_pieces,
    receive_share,
    send_pieces,
    send_share,
    share,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("senders", range(1, 9))
@pytest.mark.parametrize("receivers", range(1, 9))
def test_overlap_plan_tiles_exactly(senders, receivers):
    for length in range(0, 41):
        pieces = overlap_plan(length, senders, receivers)
        covered = [0] * length
        for p in pieces:
            assert p.start < p.stop
            s0, s1 = share(length, senders, p.sender)
            r0, r1 = share(length, receivers, p.receiver)
            assert s0 <= p.start and p.stop <= s1 and r0 <= p.start and p.stop <= r1
            for x in range(p.start, p.stop):
                covered[x] += 1
        assert covered == [1] * length
        # Load spreads: each sender ships exactly its share, each receiver gets exactly its share.
        for i in range(senders):
            s0, s1 = share(length, senders, i)
            assert sum(p.stop - p.start for p in pieces if p.sender == i) == s1 - s0
        for j in range(receivers):
            r0, r1 = share(length, receivers, j)
            assert sum(p.stop - p.start for p in pieces if p.receiver == j) == r1 - r0
        # Never more pieces than the two cut-point sets allow.
        assert len(pieces) <= senders + receivers - 1


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("a, b", [(1, 2), (3, 2), (2, 5)])
def test_send_post_assemble_moves_every_piece_once(a, b, whole):
    """The pieces the engine's stage links carry (hetero.engine.transport.StageLink), through an
    in-memory mailbox: each receiver assembles its span (its share, or everything when `whole`:
    sender j mod a serves receiver j, and nobody all-gathers)."""
    full = torch.randn(3, 11, 2)
    plan = Reshard(11, a, b, whole=whole)
    assert plan.gathers == (not whole)
    mailbox = {}
    for i in range(a):
        send_pieces(plan, i, full, 1, lambda chunk, piece: mailbox.setdefault(piece, chunk.clone()))
    spans = []
    for j in range(b):
        arrived = [(piece, mailbox.pop(key)) for piece, key in post_pieces(plan, j, lambda piece: piece)]
        if whole:
            assert [piece.sender for piece, _ in arrived] == [j % a]
        spans.append(assemble(plan, j, arrived, full.shape, 1, torch.empty))
    assert not mailbox   # every piece sent was received, once
    if whole:
        assert all(torch.equal(span, full) for span in spans)
    else:
        assert torch.equal(torch.cat(spans, dim=1), full)


@pytest.mark.parametrize("a, b", [(2, 4), (4, 2), (1, 3), (3, 2)])
def test_reshard_over_endpoints(a, b):
    """Sender TP a -> receiver TP b; concatenating the receivers' shares (what the
    intra-island all-gather does) gives back the full activation."""
    endpoints = [Endpoint(rank, "reshard", shm=False, chunk_bytes=4096, default_timeout=60)
                 for rank in range(a + b)]
    try:
        for endpoint in endpoints:
            endpoint.add_peers([e.address() for e in endpoints])
        senders, receivers = list(range(a)), list(range(a, a + b))
        full = torch.randn(4, 37, 24)  # split dim 1: 37 is not divisible by any of the TP sizes
        sends = []
        for i in range(a):
            sends += send_share(endpoints[senders[i]], full, 1, i, a, receivers, tag=3)
        shares = [receive_share(endpoints[receivers[j]], full.shape, full.dtype, 1, j, b, senders, 3, timeout=60)
                  for j in range(b)]
        for handle in sends:
            handle.wait(60)
        assert torch.equal(torch.cat(shares, dim=1), full)
        # Every sender put the same number of bytes on the bridge (within one row).
        sent = [endpoints[s].stats().get("bytes_sent", 0) for s in senders]
        assert max(sent) - min(sent) <= 4 * 24 * 4
    finally:
        for endpoint in endpoints:
            endpoint.close()


# ---------------------------------------- receivers as processes with their own gloo group
FULL_SHAPE = (4, 37, 24)  # split dim 1; 37 is not divisible by any TP size below


def full_activation() -> torch.Tensor:
    return torch.randn(FULL_SHAPE, generator=torch.Generator().manual_seed(5))


def _receiver(tp_rank, tp_size, senders, gloo_port, conn):
    import os

    import torch.distributed as dist

    from comm_bridge.reshard import all_gather_shares
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=tp_rank,
                            world_size=tp_size)
    endpoint = Endpoint(senders + tp_rank, "reshard", shm=False, chunk_bytes=4096, default_timeout=60)
    try:
        conn.send(endpoint.address())
        endpoint.add_peers(conn.recv())
        mine = receive_share(endpoint, FULL_SHAPE, torch.float32, 1, tp_rank, tp_size,
                             list(range(senders)), tag=3, timeout=60)
        full = all_gather_shares(mine, FULL_SHAPE[1], 1, tp_size)
        conn.send({"share": mine.numpy().copy(), "full": full.numpy().copy(),
                   "bytes_received": endpoint.stats().get("bytes_received", 0)})
    except BaseException as exc:
        conn.send({"error": f"receiver {tp_rank}: {type(exc).__name__}: {exc}"})
        raise
    finally:
        endpoint.close()
        dist.destroy_process_group()  # gloo may abort at exit otherwise


@pytest.mark.parametrize("a, b", [(2, 4), (3, 2)])
def test_reshard_end_to_end_with_receiver_all_gather_across_processes(a, b):
    """Sender TP a (endpoints here) -> receiver TP b (b processes, one gloo world):
    every receiver ends with the whole activation, having taken only its share off the bridge."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    senders = [Endpoint(rank, "reshard", shm=False, chunk_bytes=4096, default_timeout=60) for rank in range(a)]
    procs, conns = [], []
    try:
        for j in range(b):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_receiver, args=(j, b, a, port, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns.append(parent)
        book = [e.address() for e in senders]
        for conn in conns:
            assert conn.poll(60), "a receiver did not start within 60 s"
            book.append(conn.recv())
        for conn in conns:
            conn.send(book)
        for endpoint in senders:
            endpoint.add_peers(book)
        full = full_activation()
        receivers = list(range(a, a + b))
        handles = []
        for i in range(a):
            handles += send_share(senders[i], full, 1, i, a, receivers, tag=3)
        for handle in handles:
            handle.wait(60)
        results = []
        for conn in conns:
            assert conn.poll(90), "a receiver did not finish within 90 s"
            results.append(conn.recv())
        errors = [r["error"] for r in results if "error" in r]
        assert not errors, errors
        row_bytes = FULL_SHAPE[0] * FULL_SHAPE[2] * 4
        for j, result in enumerate(results):
            lo, hi = share(FULL_SHAPE[1], b, j)
            assert torch.equal(torch.from_numpy(result["share"]), full[:, lo:hi])
            assert torch.equal(torch.from_numpy(result["full"]), full), f"receiver {j}"
            # Its share, and only its share (in rows of the split dim), crossed the bridge to it.
            assert result["bytes_received"] == (hi - lo) * row_bytes
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        for endpoint in senders:
            endpoint.close()
