"""This worker's communication: island process groups, the bridge, fleet-wide sums.

`Comms.start()` reads the launcher's environment (torchrun's island-local
RANK/WORLD_SIZE, plus HETERO_*), joins the island's native world through the
coordinator's token-checked store (hetero.launch.store),
creates every TP and DP group of the island in plan order, opens a comm_bridge
endpoint and registers it with the coordinator. `Comms.solo()` is the
one-process stand-in that the reference run and single-chip plans use.

Every collective on the island's native backend runs on the worker's device
(NCCL and HCCL refuse host tensors); only the hop between islands goes through
host memory, because the bridge is CPU-mediated by design.

Every wait here stamps its phase (hetero.engine.progress: bridge send/receive, island
collective, bridge all-reduce), so the head's hang watchdog can say where a rank stuck.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hetero.engine import progress, tags
from hetero.engine.topology import Topology
from hetero.errors import PEER_STOPPED_EXIT_CODE
from hetero.engine.transport import BridgeTransport, NativeTransport, device_scope, to_device, to_host

if TYPE_CHECKING:
    from comm_bridge.channel import Endpoint
    from comm_bridge.client import CoordinatorClient

TIMEOUT_S = float(os.environ.get("HETERO_COMM_TIMEOUT", "300"))
P2P_STREAMS = (("F", False), ("F", True), ("B", False), ("B", True))   # (kind, wrap-around): Comms.p2p_group


class Comms:
    def __init__(self, topology: Topology, rank: int, device: torch.device, accelerator=None):
        self.topology = topology
        self.rank = rank
        self.place = topology.place(rank)
        self.device = device
        self.accelerator = accelerator   # device memory scope and host staging; None: plain torch
        self.tp_group: dist.ProcessGroup | None = None
        self.dp_group: dist.ProcessGroup | None = None
        # Interleaved pipelines: one island-wide group per (kind, wrap) of stage-to-stage traffic
        # (p2p_group), so that each pair of ranks carries one direction of one kind per group.
        self.p2p_groups: dict[tuple[str, bool], dist.ProcessGroup] | None = None
        self.native: NativeTransport | None = None
        self.bridge: BridgeTransport | None = None
        self.endpoint: Endpoint | None = None
        self.client: CoordinatorClient | None = None
        # the hetero-DP sum's bridge dtype (network.bridge.grad_dtype); None: fp32
        self.grad_wire_dtype: torch.dtype | None = None

    # -- construction -------------------------------------------------------
    @classmethod
    def solo(cls, topology: Topology, device: torch.device, accelerator=None) -> "Comms":
        if topology.plan.world_size != 1:
            raise ValueError("a solo run needs a one-rank plan")
        return cls(topology, 0, device, accelerator)

    @classmethod
    def start(cls, topology: Topology, accelerator, device: torch.device, cluster) -> "Comms":
        rank = int(os.environ["HETERO_GLOBAL_RANK"])
        comms = cls(topology, rank, device, accelerator)
        place = comms.place
        island_size = int(os.environ.get("WORLD_SIZE", "1"))
        backend = cluster.island(place.island).backend
        if island_size > 1:
            _init_island_group(backend, int(os.environ["RANK"]), island_size)
            if dist.get_rank() != topology.world_rank(rank):
                raise RuntimeError(f"launcher gave island rank {dist.get_rank()}, "
                                   f"the plan says {topology.world_rank(rank)}")
            comms._make_groups()
            comms._first_collective()
            comms.native = NativeTransport(topology, device, accelerator)
        if topology.plan.world_size > 1 and len({r.island for r in topology.plan.ranks}) > 1:
            comms._open_bridge(accelerator, cluster)
            if cluster.network.bridge.grad_dtype == "bf16":
                comms.grad_wire_dtype = torch.bfloat16
        return comms

    def _make_groups(self) -> None:
        tp_groups, dp_groups = self.topology.island_groups(self.place.island)
        local = self.topology.world_rank(self.rank)
        for members in tp_groups:
            group = dist.new_group(members)
            if local in members:
                self.tp_group = group
        for members in dp_groups:
            group = dist.new_group(members)
            if local in members:
                self.dp_group = group
        if any(p.virtual_stages > 1 for p in self.topology.plan.pipelines):   # alike on every rank
            world = list(range(dist.get_world_size()))
            self.p2p_groups = {key: dist.new_group(world) for key in P2P_STREAMS}

    def _first_collective(self) -> None:
        """One all-reduce over the whole island before any point-to-point: NCCL leaves a batched
        send/receive undefined when it is a group's first operation and not every rank takes part."""
        flag = self._to_device(torch.ones(1), torch.float32)
        with device_scope(self.accelerator):
            dist.all_reduce(flag)
            for group in (self.p2p_groups or {}).values():   # theirs too: p2p is all they carry
                dist.all_reduce(self._to_device(torch.ones(1), torch.float32), group=group)
        answered = int(round(float(self._to_host(flag)[0])))
        if answered != dist.get_world_size():
            raise RuntimeError(f"island world check: {answered} ranks answered, {dist.get_world_size()} expected")

    def _open_bridge(self, accelerator, cluster) -> None:
        from comm_bridge.channel import Endpoint, transport_options
        from comm_bridge.client import CoordinatorClient

        token = os.environ["HETERO_JOB_TOKEN"]
        entry = self.topology.by_rank[self.rank]
        host = cluster.island(entry.island).nodes[entry.node].host
        endpoint = Endpoint(self.rank, token, host=host, accelerator=accelerator, default_timeout=TIMEOUT_S,
                            **transport_options(cluster.network.bridge.transport))
        client = CoordinatorClient(os.environ["HETERO_COORDINATOR"], token, self.rank, timeout=TIMEOUT_S)
        self.endpoint, self.client = endpoint, client
        client.register_endpoint(endpoint, island=entry.island, local_rank=entry.local_rank)
        client.on_failure(_stop_on_peer_failure)
        client.start_heartbeats()
        endpoint.add_peers(client.address_book().values())
        self.bridge = _Stamped(endpoint, self.device, TIMEOUT_S, accelerator)

    # -- use ------------------------------------------------------------------
    def p2p_group(self, kind: str, wrap: bool):
        """The native group of stage-to-stage messages of `kind` ("F" activations, "B" gradients)
        across an ordinary boundary or the interleaved wrap-around; None: the island's world.

        NCCL/HCCL run a pair's operations in issue order and a send waits for its receive. In an
        interleaved pipeline a stage sends an activation long before its neighbour needs it (that
        lag is what shrinks the bubble), and a receive queued behind that send on the same pair
        would wait for it: two stages deadlock (tests/hetero/engine/test_interleave_fleet.py, one island). With a
        group per (kind, wrap), each pair of a group carries messages one way only, in the order
        both sides issue them, and a send no longer holds up anything behind it but later sends."""
        return self.p2p_groups[(kind, wrap)] if self.p2p_groups else None

    def transport_to(self, rank: int):
        """Native inside the island, bridge across islands."""
        return self.native if self.topology.island_of[rank] == self.place.island else self.bridge

    def batch(self):
        """Native point-to-point issued inside the block goes out as one batch (NativeTransport.batch)."""
        return self.native.batch() if self.native is not None else contextlib.nullcontext()

    def fleet_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small host vector over every rank of the job; returns a float64 host vector.

        The island sums on its device (float64 where the device has it, else
        float32); the islands' first ranks ring their sums over the bridge; the
        island broadcasts the total (comm_bridge.allreduce.lane_all_reduce).
        """
        values = values.detach().to("cpu", torch.float64)
        if self.topology.plan.world_size == 1:
            return values
        dtype = torch.float64 if _supports(self.accelerator, torch.float64) else torch.float32
        on_device = self._to_device(values, dtype)
        if self.endpoint is None:  # one island: its native world is the whole job
            with device_scope(self.accelerator), progress.during("island collective"):
                dist.all_reduce(on_device)
        else:
            from comm_bridge.allreduce import lane_all_reduce

            with progress.during("bridge all-reduce"):
                lane_all_reduce(on_device, self.endpoint, self._island_ranks_at(lambda size: 0), 0,
                                island_group=self._island_group(), tag=tags.FLEET_REDUCE, timeout=TIMEOUT_S,
                                accelerator=self.accelerator)
        return self._to_host(on_device).to(torch.float64)

    def bucket_sum(self, islands_of=None) -> "ReplicaSum":
        """The hetero-DP bucket sum: call it on a bucket to sum it in place, or `start` it and
        `finish` later (ReplicaSum); `islands_of(index)`: only the islands holding bucket `index`'s
        values (GradBuckets.holders) sum it, and only their ranks may start it (None: every island)."""
        return ReplicaSum(self, islands_of)

    def owned_ring(self, islands_of=None) -> "OwnedRing | None":
        """The bridge phase of the hetero-DP sum by ownership (hetero.engine.owned_sum), or None
        where that sum does not apply: one process, no bridge, or islands of different sizes
        (ReplicaSum's lane path sums those)."""
        if self.topology.plan.world_size == 1 or self.endpoint is None or len(set(self._island_sizes().values())) != 1:
            return None
        return OwnedRing(self, islands_of)

    def _island_sizes(self, among=None) -> dict[str, int]:
        """Ranks per island, in plan order; `among`: only those islands."""
        islands = [i for i in dict.fromkeys(r.island for r in self.topology.plan.ranks) if among is None or i in among]
        return {i: sum(1 for r in self.topology.plan.ranks if r.island == i) for i in islands}

    def _same_rank_peers(self, among=None) -> list[int]:
        """Bridge ranks of this rank's peers at the same island world rank, one per island of
        `among` (None: every island), this rank included: the ring of an island-sharded sum."""
        mine = self.topology.world_rank(self.rank)
        return self._island_ranks_at(lambda size: mine, among)

    def _island_ranks_at(self, world_rank_of, among=None) -> list[int]:
        """Global ranks, one per island in plan order (`among`: only those islands): the rank at
        island world rank `world_rank_of(island size)`."""
        found = []
        for island, size in self._island_sizes(among).items():
            want = world_rank_of(size)
            found.append(next(r.rank for r in self.topology.plan.ranks
                              if r.island == island and self.topology.world_rank(r.rank) == want))
        return found

    @staticmethod
    def _island_group():
        return dist.group.WORLD if dist.is_initialized() else None

    def _to_device(self, host: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A copy of `host` in this rank's device memory (host -> device through the device's copy)."""
        return to_device(self.accelerator, host.to(dtype, copy=True), self.device)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_host(self.accelerator, tensor)

    def barrier(self, name: str) -> None:
        if self.client is not None:
            self.client.barrier(name, timeout=TIMEOUT_S)
        elif dist.is_initialized():
            dist.barrier()

    def record_bridge_stats(self, run_dir: str | None) -> None:
        """metrics/bridge-rankNNNNN.json: what this rank's bridge endpoint carried, and how."""
        if self.endpoint is None or not run_dir:
            return
        path = os.path.join(run_dir, "metrics", f"bridge-rank{self.rank:05d}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.endpoint.stats(), handle, indent=1)

    def finish(self) -> None:
        """Every rank is done: from here on a peer leaving is the end of the job, not a fault."""
        progress.stamp(progress.DONE)
        self.barrier("done")
        global _finishing
        _finishing = True

    def flush(self) -> None:
        for transport in (self.native, self.bridge):
            if transport is not None:
                transport.flush()

    def close(self) -> None:
        self.flush()
        if self.client is not None:
            self.client.close(leave=True, finished=_finishing)
        if self.endpoint is not None:
            self.endpoint.close()
        if dist.is_initialized():
            dist.destroy_process_group()   # gloo may abort at exit without it


_finishing = False


def _supports(accelerator, dtype: torch.dtype) -> bool:
    """Whether the device computes in `dtype` (no accelerator: the host, which does)."""
    check = getattr(accelerator, "supports_dtype", None)
    return True if check is None else bool(check(dtype))


def _init_island_group(backend: str, rank: int, world_size: int) -> None:
    """Join the island's native world through the coordinator's authenticated store.

    The store is this island's and attempt's (hetero.launch.store.worker_store): no
    TCPStore is opened, and only holders of the job token can read or write it."""
    from accelerators import register_dist_backends
    from hetero.launch.store import worker_store

    register_dist_backends()   # an island may ask for accelerators' own (backend: hetero-strict)
    dist.init_process_group(backend, store=worker_store(TIMEOUT_S), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _stop_on_peer_failure(rank: int, reason: str) -> None:
    if _finishing:
        return
    # A blocked native collective cannot be interrupted; leave now so the
    # launcher tears the job down and restarts it from the last checkpoint.
    print(f"hetero: peer rank {rank} failed ({reason}); stopping this worker", file=sys.stderr, flush=True)
    os._exit(PEER_STOPPED_EXIT_CODE)



class ReplicaSum:
    """Sums hetero-DP gradient buckets (1-D tensors on this rank's device) over every rank of
    every island, or (`islands_of`) over the islands holding the bucket's values: the others would
    add zeros and need none of the sum (a hybrid plan's pipeline cut over two islands sums its first
    layers from one and the rest from the other). Every rank of those islands starts the same
    buckets in the same order.

    Islands of equal size use comm_bridge's island-aware ring (reduce-scatter in the
    island, bridge ring between same-local-rank peers, all-gather: every rank's link
    carries a shard). Islands of different sizes reduce bucket `index` onto island rank
    `index mod size`, ring those ranks' sums over the bridge and broadcast: consecutive
    buckets use different ranks, so the traffic is shared among every island's ranks.

    `start(bucket, index)` issues the island phase and the device->host staging and
    returns at once (the bucket may then be refilled); `PendingSum.finish(out)` rings it
    over the bridge and lands the sum on the device, so bucket k+1 can be filled and staged
    while bucket k is on the bridge (hetero.engine.buckets).
    """

    def __init__(self, comms: Comms, islands_of=None):
        self.comms = comms
        self.islands_of = islands_of     # bucket index -> the islands in its sum; None: every island

    def __call__(self, bucket: torch.Tensor, index: int = 0) -> torch.Tensor:
        result = self.start(bucket, index).finish(bucket)
        if result is not bucket:
            with device_scope(self.comms.accelerator):
                bucket.copy_(result.view(bucket.shape))
        return bucket

    def start(self, bucket: torch.Tensor, index: int = 0):
        with progress.during("island collective"):
            return _StampedSum(self._start(bucket, index))

    def _start(self, bucket: torch.Tensor, index: int):
        from comm_bridge.allreduce import start_cross_island, start_lane

        comms = self.comms
        if comms.topology.plan.world_size == 1 or comms.endpoint is None:
            return _IslandSum(bucket, comms.topology.plan.world_size > 1, comms.accelerator)
        among = None if self.islands_of is None else self.islands_of(index)
        sizes = comms._island_sizes(among)
        group = comms._island_group()
        if len(set(sizes.values())) == 1:
            return start_cross_island(bucket, comms.endpoint, comms._same_rank_peers(among),
                                      island_group=group, wire_dtype=comms.grad_wire_dtype, timeout=TIMEOUT_S,
                                      accelerator=comms.accelerator)
        holder = index % sizes[comms.place.island]
        return start_lane(bucket, comms.endpoint, comms._island_ranks_at(lambda size: index % size, among), holder,
                          island_group=group, wire_dtype=comms.grad_wire_dtype, timeout=TIMEOUT_S,
                          accelerator=comms.accelerator)


class OwnedRing:
    """hetero.engine.owned_sum's bridge phase: this rank's island-summed shard of bucket `index`,
    ringed with the same-local-rank owners of the other islands holding the bucket (`islands_of`,
    as ReplicaSum's); `start` stages it, the pending sum's `finish` rings it (stamped)."""

    def __init__(self, comms: Comms, islands_of=None):
        self.comms = comms
        self.islands_of = islands_of

    def start(self, shard: torch.Tensor, index: int):
        from comm_bridge.allreduce import start_bridge_ring

        comms = self.comms
        among = None if self.islands_of is None else self.islands_of(index)
        peers = comms._same_rank_peers(among)  # pylint: disable=protected-access
        return _StampedSum(start_bridge_ring(shard, comms.endpoint, peers, wire_dtype=comms.grad_wire_dtype,
                                             timeout=TIMEOUT_S, accelerator=comms.accelerator))


class _Stamped(BridgeTransport):
    """The bridge transport, stamping its waits: a send hands off (its wait is in flush), a
    receive waits when the caller takes the tensor."""

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        with progress.during("bridge send"):
            super().isend(tensor, dst, tag)

    def irecv(self, shape, dtype, src: int, tag: int, timeout: float | None = None):
        return _StampedRecv(super().irecv(shape, dtype, src, tag, timeout))

    def flush(self) -> None:
        with progress.during("bridge send"):
            super().flush()


class _StampedRecv:
    def __init__(self, pending):
        self.pending = pending

    def wait(self) -> torch.Tensor:
        with progress.during("bridge receive"):
            return self.pending.wait()


class _StampedSum:
    """A started bucket sum whose finish (the bridge ring) is stamped."""

    def __init__(self, pending):
        self.pending = pending

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        with progress.during("bridge all-reduce"):
            return self.pending.finish(out)


class _IslandSum:
    """One island is the whole job: its native all-reduce is the sum (no bridge to overlap)."""

    def __init__(self, bucket: torch.Tensor, reduce: bool, accelerator):
        with device_scope(accelerator):
            self.total = bucket.clone()
            if reduce:
                dist.all_reduce(self.total)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return self.total
