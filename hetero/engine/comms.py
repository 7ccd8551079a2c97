"""This worker's communication: island process groups, the bridge, fleet-wide sums.

`Comms.start()` reads the launcher's environment (torchrun's island-local
RANK/WORLD_SIZE, plus HETERO_*), joins the island's native world through the
coordinator's token-checked store (hetero.launch.store),
creates every TP and DP group of the island in plan order, opens a comm_bridge
endpoint and registers it with the coordinator. `Comms.solo()` is the
one-process stand-in that the reference run and single-chip plans use.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from hetero.engine.topology import Topology
from hetero.errors import PEER_STOPPED_EXIT_CODE
from hetero.engine.transport import BridgeTransport, NativeTransport

TAG_FLEET_REDUCE = 1 << 24       # bridge tags above every pipeline tag
TAG_FLEET_RESULT = TAG_FLEET_REDUCE + 1
TIMEOUT_S = float(os.environ.get("HETERO_COMM_TIMEOUT", "300"))


class Comms:
    def __init__(self, topology: Topology, rank: int, device: torch.device):
        self.topology = topology
        self.rank = rank
        self.place = topology.place(rank)
        self.device = device
        self.tp_group = self.dp_group = None
        self.native = None
        self.bridge = None
        self.endpoint = self.client = None

    # -- construction -------------------------------------------------------
    @classmethod
    def solo(cls, topology: Topology, device: torch.device) -> "Comms":
        if topology.plan.world_size != 1:
            raise ValueError("a solo run needs a one-rank plan")
        return cls(topology, 0, device)

    @classmethod
    def start(cls, topology: Topology, accelerator, device: torch.device, cluster) -> "Comms":
        rank = int(os.environ["HETERO_GLOBAL_RANK"])
        comms = cls(topology, rank, device)
        place = comms.place
        island_size = int(os.environ.get("WORLD_SIZE", "1"))
        backend = cluster.island(place.island).backend
        if island_size > 1:
            _init_island_group(backend, int(os.environ["RANK"]), island_size)
            if dist.get_rank() != topology.world_rank(rank):
                raise RuntimeError(f"launcher gave island rank {dist.get_rank()}, "
                                   f"the plan says {topology.world_rank(rank)}")
            comms._make_groups()
            comms.native = NativeTransport(topology, device)
        if topology.plan.world_size > 1 and len({r.island for r in topology.plan.ranks}) > 1:
            comms._open_bridge(accelerator, cluster)
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

    def _open_bridge(self, accelerator, cluster) -> None:
        from comm_bridge.channel import Endpoint, transport_options
        from comm_bridge.client import CoordinatorClient

        token = os.environ["HETERO_JOB_TOKEN"]
        entry = self.topology.by_rank[self.rank]
        host = cluster.island(entry.island).nodes[entry.node].host
        self.endpoint = Endpoint(self.rank, token, host=host, accelerator=accelerator, default_timeout=TIMEOUT_S,
                                 **transport_options(cluster.network.bridge.transport))
        self.client = CoordinatorClient(os.environ["HETERO_COORDINATOR"], token, self.rank, timeout=TIMEOUT_S)
        self.client.register_endpoint(self.endpoint, island=entry.island, local_rank=entry.local_rank)
        self.client.on_failure(_stop_on_peer_failure)
        self.client.start_heartbeats()
        self.endpoint.add_peers(self.client.address_book().values())
        self.bridge = BridgeTransport(self.endpoint, self.device, TIMEOUT_S)

    # -- use ------------------------------------------------------------------
    def transport_to(self, rank: int):
        """Native inside the island, bridge across islands."""
        return self.native if self.topology.island_of[rank] == self.place.island else self.bridge

    def fleet_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 vector over every rank of the job (star through rank 0)."""
        world = self.topology.plan.world_size
        if world == 1:
            return values
        if self.endpoint is None:  # one island: its native world is the whole job
            total = values.clone()
            dist.all_reduce(total)
            return total
        if self.rank == 0:
            total = values.clone()
            for peer in range(1, world):
                total += self.endpoint.recv(peer, TAG_FLEET_REDUCE, timeout=TIMEOUT_S)
            handles = [self.endpoint.isend(total, peer, TAG_FLEET_RESULT) for peer in range(1, world)]
            for handle in handles:
                handle.wait(TIMEOUT_S)
            return total
        self.endpoint.send(values.contiguous(), 0, TAG_FLEET_REDUCE, timeout=TIMEOUT_S)
        return self.endpoint.recv(0, TAG_FLEET_RESULT, timeout=TIMEOUT_S)

    def replica_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum a full-model vector over every rank of every island (hetero-DP gradients).

        Islands of equal size use comm_bridge's island-aware ring (every
        same-local-rank peer carries a shard: no leader); otherwise the small
        star through rank 0 does it.
        """
        islands = list(dict.fromkeys(r.island for r in self.topology.plan.ranks))
        sizes = {i: sum(1 for r in self.topology.plan.ranks if r.island == i) for i in islands}
        if self.endpoint is None or len(set(sizes.values())) != 1:
            return self.fleet_sum(flat)
        from comm_bridge.allreduce import cross_island_all_reduce

        mine = self.topology.world_rank(self.rank)
        peers = [next(r.rank for r in self.topology.plan.ranks if r.island == island and
                      self.topology.world_rank(r.rank) == mine) for island in islands]
        group = dist.group.WORLD if dist.is_initialized() else None
        return cross_island_all_reduce(flat, self.endpoint, peers, island_group=group, timeout=TIMEOUT_S)

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


def _init_island_group(backend: str, rank: int, world_size: int) -> None:
    """Join the island's native world through the coordinator's authenticated store.

    The store is this island's and attempt's (hetero.launch.store.worker_store): no
    TCPStore is opened, and only holders of the job token can read or write it."""
    from hetero.launch.store import worker_store

    dist.init_process_group(backend, store=worker_store(TIMEOUT_S), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _stop_on_peer_failure(rank: int, reason: str) -> None:
    if _finishing:
        return
    # A blocked native collective cannot be interrupted; leave now so the
    # launcher tears the job down and restarts it from the last checkpoint.
    print(f"hetero: peer rank {rank} failed ({reason}); stopping this worker", file=sys.stderr, flush=True)
    os._exit(PEER_STOPPED_EXIT_CODE)
