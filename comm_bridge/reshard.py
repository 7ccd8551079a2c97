"""Resharding at a TP mismatch: sender stage TP a, receiver stage TP b.

Both sides hold (or need) the same activation, cut along one dim. Sender i owns
the slice [i*L/a, (i+1)*L/a) and receiver j is responsible for
[j*L/b, (j+1)*L/b). Each sender ships only the intersections of its slice with
the receivers' slices, so every sender sends L/a and every receiver gets L/b:
the bridge load spreads over all ranks and links (no leader). Receivers then
rebuild the full tensor with an intra-island all-gather on their native backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def send_share(endpoint, full: torch.Tensor, dim: int, tp_rank: int, tp_size: int,
               receiver_ranks: list[int], tag: int) -> list:
    """Sender TP rank `tp_rank`: ship its pieces to the receivers' global ranks."""
    handles = []
    for piece in overlap_plan(full.shape[dim], tp_size, len(receiver_ranks)):
        if piece.sender == tp_rank:
            chunk = full.narrow(dim, piece.start, piece.stop - piece.start)
            handles.append(endpoint.isend(chunk, receiver_ranks[piece.receiver], tag))
    return handles


def receive_share(endpoint, shape, dtype, dim: int, tp_rank: int, tp_size: int,
                  sender_ranks: list[int], tag: int, timeout: float | None = None) -> torch.Tensor:
    """Receiver TP rank `tp_rank`: assemble its own share from the senders' pieces."""
    start, stop = share(shape[dim], tp_size, tp_rank)
    out_shape = list(shape)
    out_shape[dim] = stop - start
    out = torch.empty(out_shape, dtype=dtype)
    pending = []
    for piece in overlap_plan(shape[dim], len(sender_ranks), tp_size):
        if piece.receiver == tp_rank:
            view = out.narrow(dim, piece.start - start, piece.stop - piece.start)
            pending.append((endpoint.irecv(sender_ranks[piece.sender], tag), view))
    for handle, view in pending:
        view.copy_(handle.wait(timeout))
    return out


def all_gather_shares(share_tensor: torch.Tensor, length: int, dim: int, tp_size: int, group=None) -> torch.Tensor:
    """Rebuild the full tensor from every receiver's share (torch.distributed all-gather).

    Shares can differ by one row, and all_gather wants equal sizes: pad to the
    largest share, gather, and trim.
    """
    import torch.distributed as dist
    widest = max(share(length, tp_size, k)[1] - share(length, tp_size, k)[0] for k in range(tp_size))
    padded_shape = list(share_tensor.shape)
    padded_shape[dim] = widest
    padded = torch.zeros(padded_shape, dtype=share_tensor.dtype)
    padded.narrow(dim, 0, share_tensor.shape[dim]).copy_(share_tensor)
    gathered = [torch.empty_like(padded) for _ in range(tp_size)]
    dist.all_gather(gathered, padded, group=group)
    parts = []
    for k, part in enumerate(gathered):
        lo, hi = share(length, tp_size, k)
        parts.append(part.narrow(dim, 0, hi - lo))
    return torch.cat(parts, dim=dim)
