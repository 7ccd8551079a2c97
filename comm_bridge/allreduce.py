"""Cross-island all-reduce for hetero-DP (every island holds a replica of the same stage).

Three phases, so that the bridge carries only 1/local_size of the tensor per rank
and every rank's link works (no island leader funnels the traffic):

1. intra-island reduce-scatter on the native backend: local rank l ends with the
   island's sum of shard l;
2. cross-island ring all-reduce of shard l over the bridge, among the ranks that
   hold shard l in every island (the same-local-rank peers);
3. intra-island all-gather of the reduced shards on the native backend.

Phases 1 and 3 run on the island's device memory (NCCL and HCCL refuse host
tensors); only phase 2 stages through host memory, through the accelerator's
copy API when one is given (`accelerator.to_host` non-blocking, with an event the
ring waits on; `accelerator.to_device` for the copy back, both charged at the
chip's host link). Each sum comes in two halves (`start_cross_island` /
`start_lane`, then `PendingSum.finish`) so that a caller can issue the island
phase and staging of the next bucket while this one is on the bridge. `lane_all_reduce` is the same sum for islands of different
sizes: the island reduces onto one chosen rank, the chosen ranks of all islands
ring over the bridge, and the island broadcasts; callers rotate the chosen rank
(per bucket) so that every rank's link carries a share.

With `wire_dtype=torch.bfloat16` the ring moves bf16 but accumulates in the
tensor's own dtype; the owner of each reduced piece rounds it to the wire dtype
before sharing it, so every replica ends bit-identical (DP replicas must not
drift apart).
"""

from __future__ import annotations

import contextlib

import torch

from comm_bridge.direct_sum import DIRECT_MAX_BYTES, direct_all_reduce
from comm_bridge.reshard import share

ALLREDUCE_TAG = 0x4152_0000  # "AR": keeps ring traffic apart from pipeline tags by default


def cross_island_all_reduce(tensor: torch.Tensor, endpoint, peers: list[int], *, island_group=None,
                            wire_dtype: torch.dtype | None = None, average: bool = False,
                            tag: int = ALLREDUCE_TAG, timeout: float | None = None,
                            accelerator=None) -> torch.Tensor:
    """Sum `tensor` over every rank of every island, in place; returns `tensor`.

    `peers`: global bridge ranks of this rank's same-local-rank peers, one per
    island, in the same order on every rank (this rank included).
    `island_group`: this island's torch.distributed group; None means the default
    group when torch.distributed is initialized, else an island of one rank.
    `average`: divide by the total number of ranks (islands x island size).
    `accelerator`: stages the bridge hop (to_host, to_device, device scope); None: plain torch copies.
    """
    pending = start_cross_island(tensor, endpoint, peers, island_group=island_group, wire_dtype=wire_dtype,
                                 average=average, tag=tag, timeout=timeout, accelerator=accelerator)
    result = pending.finish(tensor)
    if result is not tensor:
        with _device_scope(accelerator):
            tensor.copy_(result.view(tensor.shape))
    return tensor


def start_cross_island(tensor: torch.Tensor, endpoint, peers: list[int], *, island_group=None,
                       wire_dtype: torch.dtype | None = None, average: bool = False,
                       tag: int = ALLREDUCE_TAG, timeout: float | None = None,
                       accelerator=None) -> "PendingSum":
    """Phase 1 of cross_island_all_reduce, issued now: the island's reduce-scatter and the
    device->host copy of this rank's shard (queued, not waited for). `tensor` may be
    overwritten as soon as this returns (the device runs its work in issue order), so a
    caller can fill the next bucket while this one is on the bridge; `finish(out)` does
    phases 2 and 3."""
    if endpoint.rank not in peers:
        raise ValueError(f"rank {endpoint.rank} is not among its ring peers {peers}")
    if len(set(peers)) != len(peers):
        raise ValueError(f"ring peers repeat a rank: {peers}")
    local_size = _island_size(island_group)
    flat = tensor.detach().reshape(-1)
    shard_len = -(-flat.numel() // local_size)
    with _device_scope(accelerator):
        padded = flat
        if shard_len * local_size != flat.numel():
            padded = torch.zeros(shard_len * local_size, dtype=flat.dtype, device=flat.device)
            padded[:flat.numel()].copy_(flat)
        shard = padded   # one rank: a view of `tensor`, so staging copies it out (never aliases it)
        if local_size > 1:
            import torch.distributed as dist
            shard = torch.empty(shard_len, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(shard, padded, group=island_group)
    divide_by = local_size * len(peers) if average else None
    ring, device_result = None, None   # the result comes back from the ring, or is on the device already
    if len(peers) > 1 or divide_by:
        # the shard's bytes are on their way to host memory; the device may reuse it (not kept)
        ring = _Ring(stage_to_host(shard, accelerator), endpoint, peers, wire_dtype, tag, timeout, divide_by)
    elif _aliases(shard, flat):
        device_result = _device_copy(shard, accelerator)   # nothing to ring: keep the result apart from `tensor`
    else:
        device_result = shard
    return PendingSum(ring, device_result, flat.numel(), tuple(tensor.shape), local_size, island_group, accelerator)


def start_bridge_ring(shard: torch.Tensor, endpoint, peers: list[int], *, wire_dtype: torch.dtype | None = None,
                      tag: int = ALLREDUCE_TAG, timeout: float | None = None, accelerator=None) -> "PendingSum":
    """Phase 2 alone, for a shard its owner has already summed over its island (hetero.engine.owned_sum):
    staged to host memory now, ringed with `peers` (one owner per island) at `finish(shard)`, which
    returns the total on the device. `shard` may be dropped once this returns."""
    if endpoint.rank not in peers:
        raise ValueError(f"rank {endpoint.rank} is not among its ring peers {peers}")
    flat = shard.detach().reshape(-1)
    if len(peers) == 1:
        return PendingSum(None, flat, flat.numel(), tuple(shard.shape), 1, None, accelerator)
    ring = _Ring(stage_to_host(flat, accelerator), endpoint, peers, wire_dtype, tag, timeout, None)
    return PendingSum(ring, None, flat.numel(), tuple(shard.shape), 1, None, accelerator)


def lane_all_reduce(tensor: torch.Tensor, endpoint, holders: list[int], holder_local: int, *,
                    island_group=None, tag: int = ALLREDUCE_TAG, timeout: float | None = None,
                    accelerator=None) -> torch.Tensor:
    """Sum `tensor` (on the island's device) over every rank of every island, in place.

    Islands may differ in size. The island reduces onto its rank `holder_local`
    (native backend, device memory); `holders` (global bridge ranks of every
    island's holder, the same list on every rank) ring the island sums over the
    bridge; the holder broadcasts the total back to its island. `endpoint` is
    needed only on a holder.
    """
    pending = start_lane(tensor, endpoint, holders, holder_local, island_group=island_group, tag=tag,
                         timeout=timeout, accelerator=accelerator)
    result = pending.finish(tensor)
    if result is not tensor:
        with _device_scope(accelerator):
            tensor.copy_(result.view(tensor.shape))
    return tensor


def start_lane(tensor: torch.Tensor, endpoint, holders: list[int], holder_local: int, *,
               island_group=None, wire_dtype: torch.dtype | None = None, tag: int = ALLREDUCE_TAG,
               timeout: float | None = None, accelerator=None) -> "PendingSum":
    """Phase 1 of lane_all_reduce, issued now: the island's reduce onto its holder and the
    holder's device->host copy (queued). `tensor` may be overwritten once this returns."""
    local_size = _island_size(island_group)
    flat = tensor.detach().reshape(-1)
    root = me = 0
    if local_size > 1:
        import torch.distributed as dist
        root = dist.get_global_rank(island_group, holder_local) if island_group is not None else holder_local
        me = dist.get_rank(island_group)
        with _device_scope(accelerator):
            dist.reduce(flat, root, group=island_group)
    ring = None
    if me == holder_local:
        if endpoint.rank not in holders:
            raise ValueError(f"rank {endpoint.rank} holds the island sum but is not among {holders}")
        if len(holders) > 1:
            ring = _Ring(stage_to_host(flat, accelerator), endpoint, holders, wire_dtype, tag, timeout, None)
    holds = _device_copy(flat, accelerator) if ring is None and me == holder_local else None
    return PendingSum(ring, holds, flat.numel(), tuple(tensor.shape), local_size, island_group, accelerator,
                      broadcast_root=root if local_size > 1 else None, is_root=me == holder_local)


class _Ring:
    """The bridge phase of one pending sum: a staged host copy and how to ring it."""

    def __init__(self, staged, endpoint, peers, wire_dtype, tag, timeout, divide_by):
        self.staged, self.endpoint, self.peers = staged, endpoint, peers
        self.wire_dtype, self.tag, self.timeout, self.divide_by = wire_dtype, tag, timeout, divide_by

    def run(self) -> torch.Tensor:
        """Wait for the staging copy, ring-sum the host bytes; returns the host tensor."""
        host, event = self.staged
        if event is not None:
            event.synchronize()
        ring_all_reduce(host, self.endpoint, self.peers, wire_dtype=self.wire_dtype, tag=self.tag,
                        timeout=self.timeout)
        if self.divide_by:
            host.div_(self.divide_by) if host.is_floating_point() or host.is_complex() \
                else host.floor_divide_(self.divide_by)
        return host


class PendingSum:
    """A cross-island sum whose island phase and staging are issued; `finish(out)` rings it
    over the bridge, copies it back to the device and completes the island phase. Returns
    the device tensor holding the sum: `out` where it can land there, else another tensor
    of the same number of elements. Every rank of the island must finish its pending sums
    in the order it started them (the island collectives must match)."""

    def __init__(self, ring, device_result, numel, shape, local_size, island_group, accelerator,
                 broadcast_root=None, is_root=True):
        self.ring, self.device_result, self.numel, self.shape = ring, device_result, numel, shape
        self.local_size, self.island_group, self.accelerator = local_size, island_group, accelerator
        self.broadcast_root, self.is_root = broadcast_root, is_root

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        mine = self.device_result
        if self.ring is not None:
            mine = copy_to_device(self.ring.run(), out.device, self.accelerator)
        flat_out = out.detach().reshape(-1)
        if self.broadcast_root is not None:      # lane: the holder's total goes to the island
            import torch.distributed as dist
            source = mine if self.is_root else flat_out
            with _device_scope(self.accelerator):
                dist.broadcast(source, self.broadcast_root, group=self.island_group)
            return source
        if self.local_size == 1:
            return mine[:self.numel]
        import torch.distributed as dist
        width = mine.numel() * self.local_size
        with _device_scope(self.accelerator):
            gathered = flat_out if width == flat_out.numel() else \
                torch.empty(width, dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(gathered, mine, group=self.island_group)
        return gathered[:self.numel]


def stage_to_host(tensor: torch.Tensor, accelerator):
    """(host copy of `tensor`, event that says when its bytes are there, or None), queued
    without waiting: the accelerator's non-blocking copy where it has one. The copy never
    aliases `tensor`, which the caller may overwrite at once."""
    if accelerator is None:
        host = tensor.to("cpu")
        return (host.clone() if _aliases(host, tensor) else host), None
    new_event = getattr(accelerator, "new_event", None)
    host = accelerator.to_host(tensor, non_blocking=new_event is not None)   # no events: a blocking copy
    if _aliases(host, tensor):
        return host.clone(), None   # a host-memory device: the "copy" was the tensor itself
    if new_event is None:
        return host, None
    event = new_event(enable_timing=False)
    event.record()
    return host, event


def copy_to_device(host: torch.Tensor, device: torch.device, accelerator) -> torch.Tensor:
    """Host -> device through the accelerator's copy API (charged at its host link)."""
    if accelerator is not None and hasattr(accelerator, "to_device"):
        return accelerator.to_device(host)
    return host if device.type == "cpu" else host.to(device)


def _device_copy(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    with _device_scope(accelerator):
        return tensor.clone()


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _device_scope(accelerator):
    scope = getattr(accelerator, "device_scope", None)
    return scope() if scope else contextlib.nullcontext()


def ring_all_reduce(buf: torch.Tensor, endpoint, peers: list[int], *, wire_dtype: torch.dtype | None = None,
                    tag: int = ALLREDUCE_TAG, timeout: float | None = None) -> torch.Tensor:
    """Ring all-reduce (sum) of the 1-D host tensor `buf` over the bridge, in place.

    n ranks cut `buf` into n pieces; n-1 reduce-scatter steps leave rank p with the
    full sum of piece p+1, n-1 all-gather steps pass the sums round. Each rank
    sends 2(n-1)/n of `buf` in all, whatever n is. A vector of at most DIRECT_MAX_BYTES on
    the wire skips the ring: one round of direct exchange (comm_bridge.direct_sum).
    """
    n = len(peers)
    if n == 1:
        return buf
    wire_bytes = buf.numel() * (buf if wire_dtype is None else torch.empty(0, dtype=wire_dtype)).element_size()
    if wire_bytes <= DIRECT_MAX_BYTES:
        return direct_all_reduce(buf, endpoint, peers, wire_dtype=wire_dtype, tag=tag, timeout=timeout)
    me = peers.index(endpoint.rank)
    right, left = peers[(me + 1) % n], peers[(me - 1) % n]
    pieces = [buf.narrow(0, *_start_len(share(buf.numel(), n, k))) for k in range(n)]
    wire = buf.dtype if wire_dtype is None else wire_dtype

    def exchange(send_index: int, recv_index: int) -> torch.Tensor:
        incoming = torch.empty(pieces[recv_index].numel(), dtype=wire)
        pending = endpoint.irecv(left, tag, out=incoming)  # posted first: no unexpected-message copy
        sent = endpoint.isend(pieces[send_index].to(wire), right, tag)
        pending.wait(timeout)
        sent.wait(timeout)
        return incoming

    for step in range(n - 1):  # reduce-scatter
        recv_index = (me - step - 1) % n
        pieces[recv_index].add_(exchange((me - step) % n, recv_index).to(buf.dtype))
    owned = pieces[(me + 1) % n]
    if wire != buf.dtype:
        owned.copy_(owned.to(wire))  # round as the others will see it: replicas stay identical
    for step in range(n - 1):  # all-gather
        recv_index = (me - step) % n
        pieces[recv_index].copy_(exchange((me + 1 - step) % n, recv_index))
    return buf


def _island_size(group) -> int:
    """Ranks in this island's process group; 1 without torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("island_group given but torch.distributed is not initialized")
        return 1
    return dist.get_world_size(group)


def _start_len(bounds: tuple[int, int]) -> tuple[int, int]:
    return bounds[0], bounds[1] - bounds[0]
