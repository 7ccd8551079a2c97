"""Resharding at a TP mismatch: the overlap mapping, exhaustively, and over real endpoints."""

import pytest
import torch

from comm_bridge.channel import Endpoint
from comm_bridge.reshard import overlap_plan, receive_share, send_share, share

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
