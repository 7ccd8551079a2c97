"""Cross-island all-reduce: the ring alone (threads), and 2 islands x 2 ranks as 4 processes.

In the multi-process test each island is its own gloo world (the islands' native
collectives cannot talk, as with NCCL vs HCCL); only the bridge joins them.
"""

import multiprocessing as mp
import os
import threading

import pytest
import torch
from tests.conftest import free_port

from comm_bridge.allreduce import cross_island_all_reduce, ring_all_reduce
from comm_bridge.channel import Endpoint
from comm_bridge.direct_sum import DIRECT_MAX_BYTES

pytestmark = pytest.mark.timeout(120)
TOKEN = "allreduce-token"
ISLANDS, LOCAL = 2, 2


def rank_input(rank: int, shape, integer: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    if integer:  # sums of small integers are exact in fp32 whatever the order
        return torch.randint(-50, 50, shape, generator=gen).float()
    return torch.randn(shape, generator=gen)


# ------------------------------------------------------------ ring, in-process
def run_ring(connected_endpoints, n, length, wire_dtype=None):
    endpoints = connected_endpoints(n, shm=False, chunk_bytes=4096, default_timeout=30)
    bufs = [rank_input(r, (length,), integer=wire_dtype is None) for r in range(n)]
    expected = torch.stack(bufs).sum(0)
    errors = []

    def member(r):
        try:
            ring_all_reduce(bufs[r], endpoints[r], list(range(n)), wire_dtype=wire_dtype, timeout=30)
        except BaseException as exc:  # surfaces in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return bufs, expected, [e.stats()["messages_sent"] for e in endpoints]


# up to DIRECT_MAX_BYTES (16,384 fp32) one round of direct exchange, the ring above it
@pytest.mark.parametrize("n, length", [(2, 1), (3, 1000), (4, 10_001), (5, 3), (2, 16_385), (3, 20_000), (4, 40_001)])
def test_ring_all_reduce_is_the_exact_sum_on_every_rank(n, length, connected_endpoints):
    bufs, expected, _ = run_ring(connected_endpoints, n, length)
    for buf in bufs:
        assert torch.equal(buf, expected)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_small_vector_is_summed_in_one_round_a_large_one_by_the_ring(n, connected_endpoints):
    """A small sum sends each peer its vector once (n-1 messages, one hop of latency); the
    ring sends 2(n-1) messages one after another (at least: a large piece goes in chunks)."""
    _, _, small = run_ring(connected_endpoints, n, DIRECT_MAX_BYTES // 4)
    assert small == [n - 1] * n
    _, _, large = run_ring(connected_endpoints, n, DIRECT_MAX_BYTES // 4 + 1)
    assert all(sent >= 2 * (n - 1) for sent in large)


def test_the_direct_sum_adds_in_one_order_everywhere(connected_endpoints):
    """Floats summed in different orders differ in their last bits; every peer must end with the
    same bits (replicas must not drift), and the sum is the one in peer order."""
    endpoints = connected_endpoints(4, shm=False, chunk_bytes=4096, default_timeout=30)
    # element 0 sums to 0 in the peers' order [2, 0, 3, 1] and to 1 in rank order (ulp(1e8) is 8)
    values = [torch.tensor([[1.0, 1e8, -1e8, 1.0][k], 0.1 * k, 3.0 * k], dtype=torch.float32) for k in range(4)]
    bufs = [v.clone() for v in values]
    threads = [threading.Thread(target=ring_all_reduce, args=(bufs[r], endpoints[r], [2, 0, 3, 1]),
                                kwargs={"timeout": 30}) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ordered = torch.zeros(3)
    for r in [2, 0, 3, 1]:
        ordered += values[r]
    assert ordered[0] == 0.0
    for buf in bufs:
        assert torch.equal(buf, ordered)


@pytest.mark.parametrize("length", [5000, 40_000])     # direct (10 kB of bf16) and ring (80 kB)
def test_ring_all_reduce_bf16_wire_is_close_and_identical_everywhere(length, connected_endpoints):
    bufs, expected, _ = run_ring(connected_endpoints, 3, length, wire_dtype=torch.bfloat16)
    for buf in bufs:
        assert buf.dtype == torch.float32
        assert torch.equal(buf, bufs[0])  # replicas must not drift apart
    # bf16 keeps 8 mantissa bits: each wire hop may round by 2**-8 relative.
    assert torch.allclose(bufs[0], expected, rtol=2e-2, atol=2e-2)
    assert not torch.equal(bufs[0], expected)  # it really went through bf16


def test_ring_refuses_a_rank_outside_its_peers():
    with Endpoint(7, TOKEN, shm=False) as endpoint:
        with pytest.raises(ValueError, match="rank 7"):
            cross_island_all_reduce(torch.ones(3), endpoint, [0, 1])


# ------------------------------------------------- 2 islands x 2 ranks, 4 processes
CASES = {
    # name: (shape, integer-valued input, wire dtype, average, non-contiguous)
    "exact": ((37, 29), True, None, False, False),        # 1073 elements: uneven shards
    "noncontig": ((16, 9), True, None, False, True),
    "random": ((4099,), False, None, False, False),
    "average": ((64,), True, None, True, False),
    "bf16": ((3000,), False, torch.bfloat16, False, False),
}


def _island_worker(coordinator, gloo_port, island, local, conn):
    import torch.distributed as dist

    from comm_bridge.client import CoordinatorClient
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    rank = island * LOCAL + local
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=local,
                            world_size=LOCAL)
    endpoint = Endpoint(rank, TOKEN, shm=False, chunk_bytes=16 << 10, default_timeout=60)
    client = CoordinatorClient(coordinator, TOKEN, rank)
    try:
        client.register_endpoint(endpoint, island=f"island{island}", local_rank=local)
        endpoint.add_peers(client.address_book(timeout=60).values())
        peers = [i * LOCAL + local for i in range(ISLANDS)]  # same local rank in every island
        results = {}
        for name, (shape, integer, wire, average, noncontig) in CASES.items():
            x = rank_input(rank, shape, integer)
            if noncontig:
                x = x.t()
            out = cross_island_all_reduce(x, endpoint, peers, wire_dtype=wire, average=average, timeout=60)
            assert out is x
            results[name] = x.contiguous().numpy().copy()
        results["bytes_sent"] = endpoint.stats().get("bytes_sent", 0)
        conn.send(results)
    except BaseException as exc:
        conn.send({"error": f"rank {rank}: {type(exc).__name__}: {exc}"})
        raise
    finally:
        client.close()
        endpoint.close()
        dist.destroy_process_group()  # gloo may abort at exit otherwise


def test_cross_island_all_reduce_over_four_processes_equals_the_sum():
    from comm_bridge.coordinator import Coordinator
    world = ISLANDS * LOCAL
    with Coordinator(TOKEN, world_size=world, heartbeat_timeout=30) as coordinator:
        ctx = mp.get_context("spawn")
        ports = [free_port() for _ in range(ISLANDS)]
        procs, conns = [], []
        for island in range(ISLANDS):
            for local in range(LOCAL):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_island_worker, daemon=True,
                                   args=(coordinator.address, ports[island], island, local, child))
                proc.start()
                procs.append(proc)
                conns.append(parent)
        try:
            results = []
            for conn in conns:
                assert conn.poll(90), "a worker did not report within 90 s"
                results.append(conn.recv())
            errors = [r["error"] for r in results if "error" in r]
            assert not errors, errors
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    for name, (shape, integer, wire, average, noncontig) in CASES.items():
        inputs = [rank_input(r, shape, integer) for r in range(world)]
        expected = torch.stack(inputs).sum(0)
        if average:
            expected /= world
        if noncontig:
            expected = expected.t()
        got = [torch.from_numpy(r[name]) for r in results]
        for rank, tensor in enumerate(got):
            assert tensor.shape == expected.shape, (name, rank)
            assert torch.equal(tensor, got[0]), f"{name}: rank {rank} differs from rank 0"
        if wire is None and integer:
            assert torch.equal(got[0], expected), name
        elif wire is None:
            assert torch.allclose(got[0], expected, rtol=1e-5, atol=1e-5), name
        else:
            assert torch.allclose(got[0], expected, rtol=2e-2, atol=3e-2), name
            assert not torch.equal(got[0], expected), "bf16 wire left no trace: was it used?"
    # No leader: every rank put bytes on the bridge, and about the same number.
    sent = [r["bytes_sent"] for r in results]
    assert min(sent) > 0 and max(sent) <= 1.1 * min(sent), sent
