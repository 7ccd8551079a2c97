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
copy API when one is given (`accelerator.to_host`, and inside its device scope
for the copy back). `lane_all_reduce` is the same sum for islands of different
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
    `accelerator`: stages the bridge hop (to_host, device scope); None: plain torch copies.
    """
    if endpoint.rank not in peers:
        raise ValueError(f"rank {endpoint.rank} is not among its ring peers {peers}")
    if len(set(peers)) != len(peers):
        raise ValueError(f"ring peers repeat a rank: {peers}")
    local_size = _island_size(island_group)
    flat = tensor.detach().reshape(-1)
    shard_len = -(-flat.numel() // local_size)

    # 1. Island sum of this rank's shard (padding makes the shards equal, as the collectives need).
    with _device_scope(accelerator):
        padded = flat
        if shard_len * local_size != flat.numel():
            padded = torch.zeros(shard_len * local_size, dtype=flat.dtype, device=flat.device)
            padded[:flat.numel()].copy_(flat)
        if local_size > 1:
            import torch.distributed as dist
            shard = torch.empty(shard_len, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(shard, padded, group=island_group)
        else:
            shard = padded  # may be a view of `tensor`: fine, the result lands there anyway

    # 2. Ring over the bridge (on host memory: the bridge moves host bytes anyway).
    _ring_on_host(shard, endpoint, peers, accelerator, wire_dtype=wire_dtype, tag=tag, timeout=timeout,
                  divide_by=local_size * len(peers) if average else None)

    # 3. Every rank of the island gets every reduced shard.
    with _device_scope(accelerator):
        if local_size > 1:
            import torch.distributed as dist
            gathered = torch.empty(shard_len * local_size, dtype=flat.dtype, device=flat.device)
            dist.all_gather_into_tensor(gathered, shard, group=island_group)
        else:
            gathered = shard
        tensor.copy_(gathered[:flat.numel()].view(tensor.shape))
    return tensor


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
    local_size = _island_size(island_group)
    if local_size > 1:
        import torch.distributed as dist
        root = dist.get_global_rank(island_group, holder_local) if island_group is not None else holder_local
        me = dist.get_rank(island_group)
        with _device_scope(accelerator):
            dist.reduce(tensor, root, group=island_group)
    else:
        me = 0
    if me == holder_local:
        flat = tensor.detach().reshape(-1)
        if endpoint.rank not in holders:
            raise ValueError(f"rank {endpoint.rank} holds the island sum but is not among {holders}")
        _ring_on_host(flat, endpoint, holders, accelerator, tag=tag, timeout=timeout)
    if local_size > 1:
        with _device_scope(accelerator):
            dist.broadcast(tensor, root, group=island_group)
    return tensor


def _ring_on_host(shard: torch.Tensor, endpoint, peers: list[int], accelerator, *, wire_dtype=None,
                  tag: int, timeout: float | None, divide_by: int | None = None) -> None:
    """Ring-sum the 1-D device tensor `shard` over the bridge through a host copy, in place."""
    if len(peers) == 1 and divide_by is None:
        return
    if accelerator is not None:
        host = accelerator.to_host(shard)
    else:
        host = shard if shard.device.type == "cpu" else shard.to("cpu")
    ring_all_reduce(host, endpoint, peers, wire_dtype=wire_dtype, tag=tag, timeout=timeout)
    if divide_by:
        host.div_(divide_by) if host.is_floating_point() or host.is_complex() else host.floor_divide_(divide_by)
    if host is not shard:
        with _device_scope(accelerator):
            shard.copy_(host)


def _device_scope(accelerator):
    scope = getattr(accelerator, "device_scope", None)
    return scope() if scope else contextlib.nullcontext()


def ring_all_reduce(buf: torch.Tensor, endpoint, peers: list[int], *, wire_dtype: torch.dtype | None = None,
                    tag: int = ALLREDUCE_TAG, timeout: float | None = None) -> torch.Tensor:
    """Ring all-reduce (sum) of the 1-D host tensor `buf` over the bridge, in place.

    n ranks cut `buf` into n pieces; n-1 reduce-scatter steps leave rank p with the
    full sum of piece p+1, n-1 all-gather steps pass the sums round. Each rank
    sends 2(n-1)/n of `buf` in all, whatever n is.
    """
    n = len(peers)
    if n == 1:
        return buf
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
