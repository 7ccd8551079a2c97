"""Resharding at a TP mismatch: sender stage TP a, receiver stage TP b.

Both sides hold (or need) the same activation, cut along one dim. Sender i owns
the slice [i*L/a, (i+1)*L/a) and receiver j is responsible for
[j*L/b, (j+1)*L/b). Each sender ships only the intersections of its slice with
the receivers' slices, so every sender sends L/a and every receiver gets L/b:
the bridge load spreads over all ranks and links (no leader). Receivers then
rebuild the full tensor with an intra-island all-gather on their native backend.

A small tensor can instead go whole to every receiver (`Reshard(whole=True)`:
sender j mod a serves receiver j), where the receivers' all-gather, a round of
latency, costs more than the extra bytes on the link.

This is the one implementation: the engine's stage links (hetero.engine.transport.StageLink)
move their boundary tensors with `Reshard`, `send_pieces`, `post_pieces`, `assemble` and
`all_gather_shares`; `send_share` / `receive_share` are the same over a bare endpoint.
Whatever carries a piece (an endpoint, a native transport) is the caller's callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

Sent = TypeVar("Sent")
Posted = TypeVar("Posted")


@dataclass(frozen=True)
class Piece:
    sender: int      # TP rank on the sending stage
    receiver: int    # TP rank on the receiving stage
    start: int       # [start, stop) along the split dim
    stop: int


def share(length: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `length` is cut into `parts` near-equal runs."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts}")
    return index * length // parts, (index + 1) * length // parts


def overlap_plan(length: int, senders: int, receivers: int) -> list[Piece]:
    """Every non-empty intersection of a sender share with a receiver share, in order."""
    if length < 0 or senders < 1 or receivers < 1:
        raise ValueError(f"length {length}, senders {senders}, receivers {receivers}")
    pieces = []
    i = j = 0
    while i < senders and j < receivers:
        s0, s1 = share(length, senders, i)
        r0, r1 = share(length, receivers, j)
        lo, hi = max(s0, r0), min(s1, r1)
        if lo < hi:
            pieces.append(Piece(i, j, lo, hi))
        if s1 <= r1:
            i += 1
        else:
            j += 1
    return pieces


def whole_plan(length: int, senders: int, receivers: int) -> list[Piece]:
    """Every receiver gets all of [0, length) from sender (receiver mod senders), in receiver order."""
    if length < 0 or senders < 1 or receivers < 1:
        raise ValueError(f"length {length}, senders {senders}, receivers {receivers}")
    return [Piece(j % senders, j, 0, length) for j in range(receivers)]


@dataclass(frozen=True)
class Reshard:
    """How one tensor, cut along a dim of `length`, moves from `senders` TP ranks to `receivers`:
    in overlapping shares that the receivers all-gather, or (`whole`) whole to each receiver."""

    length: int
    senders: int
    receivers: int
    whole: bool = False

    def pieces(self) -> list[Piece]:
        plan = whole_plan if self.whole else overlap_plan
        return plan(self.length, self.senders, self.receivers)

    def sent_by(self, sender: int) -> list[Piece]:
        return [piece for piece in self.pieces() if piece.sender == sender]

    def received_by(self, receiver: int) -> list[Piece]:
        return [piece for piece in self.pieces() if piece.receiver == receiver]

    def span(self, receiver: int) -> tuple[int, int]:
        """[start, stop) that `receiver` assembles from its pieces: its share, or everything."""
        return (0, self.length) if self.whole else share(self.length, self.receivers, receiver)

    @property
    def gathers(self) -> bool:
        """Whether the receivers all-gather their spans to hold the full tensor."""
        return not self.whole and self.receivers > 1


def send_pieces(plan: Reshard, sender: int, full: torch.Tensor, dim: int,
                isend: Callable[[torch.Tensor, Piece], Sent]) -> list[Sent]:
    """Sender TP rank `sender`: hand each of its pieces of `full` (cut along `dim`) to `isend`."""
    return [isend(full.narrow(dim, piece.start, piece.stop - piece.start), piece)
            for piece in plan.sent_by(sender)]


def post_pieces(plan: Reshard, receiver: int, irecv: Callable[[Piece], Posted]) -> list[tuple[Piece, Posted]]:
    """Receiver TP rank `receiver`: post a receive (`irecv`) for each of its pieces, in plan order."""
    return [(piece, irecv(piece)) for piece in plan.received_by(receiver)]


def assemble(plan: Reshard, receiver: int, arrived: Sequence[tuple[Piece, torch.Tensor]],
             full_shape: Sequence[int], dim: int, new: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """`receiver`'s span from its arrived pieces: the piece itself when one covers the span, else a
    tensor from `new(shape)` (the caller decides where it lives) with each piece copied to its place."""
    start, stop = plan.span(receiver)
    if len(arrived) == 1 and arrived[0][0].start == start and arrived[0][0].stop == stop:
        return arrived[0][1]
    shape = list(full_shape)
    shape[dim] = stop - start
    out = new(shape)
    for piece, part in arrived:
        out.narrow(dim, piece.start - start, piece.stop - piece.start).copy_(part)
    return out


def send_share(endpoint, full: torch.Tensor, dim: int, tp_rank: int, tp_size: int,
               receiver_ranks: list[int], tag: int) -> list:
    """Sender TP rank `tp_rank`: ship its pieces to the receivers' global ranks (bridge handles)."""
    plan = Reshard(full.shape[dim], tp_size, len(receiver_ranks))
    return send_pieces(plan, tp_rank, full, dim,
                       lambda chunk, piece: endpoint.isend(chunk, receiver_ranks[piece.receiver], tag))


def receive_share(endpoint, shape, dtype, dim: int, tp_rank: int, tp_size: int,
                  sender_ranks: list[int], tag: int, timeout: float | None = None) -> torch.Tensor:
    """Receiver TP rank `tp_rank`: assemble its own share from the senders' pieces (host memory)."""
    plan = Reshard(shape[dim], len(sender_ranks), tp_size)
    pending = post_pieces(plan, tp_rank, lambda piece: endpoint.irecv(sender_ranks[piece.sender], tag))
    arrived = [(piece, handle.wait(timeout)) for piece, handle in pending]
    return assemble(plan, tp_rank, arrived, shape, dim, lambda out_shape: torch.empty(out_shape, dtype=dtype))


def all_gather_shares(share_tensor: torch.Tensor, length: int, dim: int, tp_size: int, group=None) -> torch.Tensor:
    """Rebuild the full tensor from every receiver's share (torch.distributed all-gather), on the
    share's device (inside the caller's device scope on an emulated chip).

    Shares can differ by one row, and all_gather wants equal sizes: pad to the
    largest share, gather, and trim.
    """
    widest = max(share(length, tp_size, k)[1] - share(length, tp_size, k)[0] for k in range(tp_size))
    padded_shape = list(share_tensor.shape)
    padded_shape[dim] = widest
    padded = torch.zeros(padded_shape, dtype=share_tensor.dtype, device=share_tensor.device)
    padded.narrow(dim, 0, share_tensor.shape[dim]).copy_(share_tensor)
    gathered = [torch.empty_like(padded) for _ in range(tp_size)]
    dist.all_gather(gathered, padded, group=group)
    parts = []
    for k, part in enumerate(gathered):
        lo, hi = share(length, tp_size, k)
        parts.append(part.narrow(dim, 0, hi - lo))
    return torch.cat(parts, dim=dim)
