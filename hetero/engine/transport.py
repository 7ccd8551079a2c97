"""Point-to-point between stages: the island's native backend when both ends share
an island, comm_bridge across islands. Both speak the same small interface, so the
resharding logic above them does not care which one carries a piece.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from comm_bridge.reshard import overlap_plan, share


class NativeTransport:
    """torch.distributed send/recv inside the island world (gloo, nccl, hccl...)."""

    def __init__(self, topology, device: torch.device):
        self.topology = topology
        self.device = device
        self._pending: list = []

    def _local(self, rank: int) -> int:
        return self.topology.world_rank(rank)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._pending.append(dist.isend(tensor.contiguous(), self._local(dst), tag=tag))

    def recv(self, shape, dtype, src: int, tag: int, timeout: float | None = None) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(out, self._local(src), tag=tag)
        return out

    def flush(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending.clear()


class BridgeTransport:
    """comm_bridge between islands: activations and gradients go through host memory."""

    def __init__(self, endpoint, device: torch.device, timeout: float):
        self.endpoint = endpoint
        self.device = device
        self.timeout = timeout
        self._pending: list = []

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._pending.append(self.endpoint.isend(tensor.detach().cpu(), dst, tag))

    def recv(self, shape, dtype, src: int, tag: int, timeout: float | None = None) -> torch.Tensor:
        out = self.endpoint.irecv(src, tag).wait(timeout or self.timeout)
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            raise RuntimeError(f"bridge: rank {src} sent {tuple(out.shape)} {out.dtype}, "
                               f"expected {tuple(shape)} {dtype}")
        return out.to(self.device)

    def flush(self) -> None:
        for handle in self._pending:
            handle.wait(self.timeout)
        self._pending.clear()


class StageLink:
    """Moves one tensor between two adjacent stages whose TP degrees may differ.

    Every rank of the sending TP group holds the same full tensor (activations
    and their gradients are replicated across TP ranks at stage boundaries).
    Instead of every receiver fetching it whole, sender TP rank i ships only the
    pieces of its 1/a share that overlap each receiver's 1/b share; the
    receivers then all-gather inside their TP group. Bridge load spreads over
    all a x b links (FlagScale's overlap mapping).
    """

    def __init__(self, transport, my_tp_rank: int, my_tp_size: int, tp_group, peers: list[int]):
        self.transport = transport
        self.kind = "bridge" if isinstance(transport, BridgeTransport) else "native"
        self.tp_rank, self.tp_size, self.tp_group = my_tp_rank, my_tp_size, tp_group
        self.peers = peers        # the other stage's ranks, by their tp_rank

    def send(self, full: torch.Tensor, tag: int) -> None:
        flat = full.detach().contiguous().view(-1)
        for piece in overlap_plan(flat.numel(), self.tp_size, len(self.peers)):
            if piece.sender == self.tp_rank and piece.stop > piece.start:
                self.transport.isend(flat[piece.start:piece.stop], self.peers[piece.receiver], tag)

    def recv(self, shape, dtype, tag: int) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        start, stop = share(numel, self.tp_size, self.tp_rank)
        mine = torch.empty(stop - start, dtype=dtype, device=self.transport.device)
        for piece in overlap_plan(numel, len(self.peers), self.tp_size):
            if piece.receiver == self.tp_rank and piece.stop > piece.start:
                part = self.transport.recv((piece.stop - piece.start,), dtype, self.peers[piece.sender], tag)
                mine[piece.start - start:piece.stop - start].copy_(part)
        if self.tp_size == 1:
            return mine.view(shape)
        return _all_gather_flat(mine, numel, self.tp_size, self.tp_group).view(shape)


def _all_gather_flat(mine: torch.Tensor, numel: int, parts: int, group) -> torch.Tensor:
    """Rebuild a flat tensor from every TP rank's share (shares differ by at most one)."""
    widest = -(-numel // parts)
    padded = torch.zeros(widest, dtype=mine.dtype, device=mine.device)
    padded[:mine.numel()].copy_(mine)
    gathered = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(gathered, padded, group=group)
    pieces = []
    for k, part in enumerate(gathered):
        lo, hi = share(numel, parts, k)
        pieces.append(part[:hi - lo])
    return torch.cat(pieces)
