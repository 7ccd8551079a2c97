"""Bridge across real processes: coordinator-driven discovery, transfer, and peer death."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.timeout(120)
TOKEN = "mp-token"
HEARTBEAT_TIMEOUT = 2.0


def _peer(address, conn, shm):
    from comm_bridge.channel import Endpoint
    from comm_bridge.client import CoordinatorClient
    endpoint = Endpoint(1, TOKEN, shm=shm, chunk_bytes=256 << 10)
    client = CoordinatorClient(address, TOKEN, 1)
    client.register_endpoint(endpoint, island="ascend")
    client.start_heartbeats()
    endpoint.add_peers(client.address_book().values())
    x = endpoint.recv(0, 0, timeout=60)
    endpoint.send(x * 2, 0, 1)          # echo, doubled, so the parent can check the bytes
    conn.send("ready-to-die")
    time.sleep(600)                     # until killed


@pytest.mark.parametrize("shm", [False, True])
def test_transfer_then_peer_death_raises_within_heartbeat_timeout(shm):
    from comm_bridge.channel import Endpoint
    from comm_bridge.client import CoordinatorClient
    from comm_bridge.coordinator import Coordinator
    from comm_bridge.errors import PeerFailedError
    from comm_bridge.shm import job_hex_of, ring_path

    with Coordinator(TOKEN, world_size=2, heartbeat_timeout=HEARTBEAT_TIMEOUT) as coordinator:
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_peer, args=(coordinator.address, child_conn, shm), daemon=True)
        proc.start()
        endpoint = Endpoint(0, TOKEN, shm=shm, chunk_bytes=256 << 10)
        client = CoordinatorClient(coordinator.address, TOKEN, 0)
        try:
            client.register_endpoint(endpoint, island="a800")
            client.start_heartbeats()
            endpoint.add_peers(client.address_book(timeout=60).values())
            x = torch.randn(3, 1 << 20)  # 12 MiB: many chunks, both stripes / the shm ring
            endpoint.send(x, 1, 0, timeout=60)
            assert torch.equal(endpoint.recv(1, 1, timeout=60), x * 2)
            assert parent_conn.poll(30) and parent_conn.recv() == "ready-to-die"

            pending = [endpoint.irecv(1, tag) for tag in (5, 6)]
            os.kill(proc.pid, signal.SIGKILL)
            start = time.monotonic()
            for handle in pending:
                with pytest.raises(PeerFailedError, match="peer rank 1 failed"):
                    handle.wait(30)
            elapsed = time.monotonic() - start
            assert elapsed < HEARTBEAT_TIMEOUT + 5.0, elapsed
            assert endpoint.stats()["rejected_total"] == 0
            if shm:  # each receiver unlinked its ring once mapped: the killed peer left none behind
                assert [p for p in (ring_path(job_hex_of(TOKEN), 0, 1), ring_path(job_hex_of(TOKEN), 1, 0))
                        if os.path.exists(p)] == []
        finally:
            client.close()
            endpoint.close()
            proc.kill()
            proc.join(10)
