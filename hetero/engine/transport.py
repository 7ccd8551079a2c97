"""Point-to-point between stages: the island's native backend when both ends share
an island, comm_bridge across islands. Both speak the same small interface, so the
resharding logic above them does not care which one carries a piece.

The native side keeps NCCL's and HCCL's rules, which gloo forgives:

- a send completes only once the peer has posted the matching receive, and the
  operations between two ranks run in the order they were issued, so a rank
  never blocks on a receive while a send of its own to that peer is still
  unmatched: a step's sends and the receives posted ahead for the next action
  go out together in one `dist.batch_isend_irecv` (`NativeTransport.batch`);
- tags carry no meaning: messages between two ranks match in issue order, and
  the native transport sends every message with tag 0 so that gloo matches the
  same way (a schedule that relied on tags would fail on CPU too);
- receive buffers are device memory (allocated inside the accelerator's device
  scope where it has one).

The bridge side stages device->host copies through the accelerator
(comm_bridge.staging: a side stream and an event where the vendor has streams)
instead of a synchronous `.cpu()`, and its receives can be posted ahead.

Which pieces of a boundary tensor go where at a TP mismatch is comm_bridge.reshard's
(the one implementation); `StageLink` only says what carries them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist

from comm_bridge.reshard import Piece, Reshard, all_gather_shares, assemble, post_pieces, send_pieces

NATIVE_TAG = 0   # NCCL/HCCL ignore tags: match in issue order, on gloo too
# A stage boundary tensor up to this size goes whole to every receiving TP rank: one island
# collective (the receivers' all-gather, a round of latency on the critical path of every
# micro-batch) costs more than (b-1)/b of a megabyte more on the link.
WHOLE_MAX_BYTES = 1 << 20

_Slot = list["dist.Work | None"]   # where a native op's work lands once its batch is issued


def device_scope(accelerator) -> ContextManager:
    """The accelerator's device scope (emulated chips: what is allocated inside is device memory)."""
    scope = getattr(accelerator, "device_scope", None)
    return scope() if scope else contextlib.nullcontext()


def to_device(accelerator, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device memory through the accelerator's copy API (plain `.to` without one)."""
    if accelerator is not None and hasattr(accelerator, "to_device"):
        return accelerator.to_device(tensor)
    return tensor.to(device)


def to_host(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Device -> host memory through the accelerator's copy API (plain `.to("cpu")` without one)."""
    if accelerator is not None and hasattr(accelerator, "to_host"):
        return accelerator.to_host(tensor)
    return tensor.to("cpu")


class PendingRecv:
    """A receive that has been posted; `wait()` returns the tensor."""

    def __init__(self, finish: Callable[[], torch.Tensor]):
        self._finish = finish
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish()
        return self._result


class NativeTransport:
    """torch.distributed point-to-point inside the island world (gloo, nccl, hccl...).

    Every operation goes out through `dist.batch_isend_irecv`; inside `batch()` the
    operations collect and go out as one batch at the end of the block (NCCL runs
    them as one group, so sends and receives between two ranks progress together).
    """

    def __init__(self, topology, device: torch.device, accelerator=None):
        self.topology = topology
        self.device = device
        self.accelerator = accelerator
        self._pending: list[tuple[_Slot, torch.Tensor]] = []   # sends not yet known complete
        self._batch: list[tuple[dist.P2POp, _Slot]] | None = None   # ops of the open batch

    def _local(self, rank: int) -> int:
        return self.topology.world_rank(rank)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Issue the sends and receives of the block together, at its end (re-entrant)."""
        if self._batch is not None:
            yield
            return
        ops: list[tuple[dist.P2POp, _Slot]] = []
        self._batch = ops
        try:
            yield
        finally:
            self._batch = None
        self._issue(ops)

    def _issue(self, ops: list[tuple[dist.P2POp, _Slot]]) -> None:
        """One dist.batch_isend_irecv per process group among `ops` (torch wants one group per batch)."""
        by_group: dict[int, list[tuple[dist.P2POp, _Slot]]] = {}
        for op, slot in ops:
            by_group.setdefault(id(getattr(op, "group", None)), []).append((op, slot))
        for group_ops in by_group.values():
            issued = dist.batch_isend_irecv([op for op, _ in group_ops])
            works: list[dist.Work | None] = list(issued)
            if len(works) != len(group_ops):      # a coalescing backend returns one work for the group
                works = [works[-1] if works else None] * len(group_ops)
            for (_op, slot), work in zip(group_ops, works):
                slot.append(work)

    def _submit(self, op: dist.P2POp) -> _Slot:
        """Queue `op` in the open batch, or issue it alone; returns the slot its work lands in."""
        slot: _Slot = []
        if self._batch is not None:
            self._batch.append((op, slot))
        else:
            self._issue([(op, slot)])
        return slot

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, group: dist.ProcessGroup | None = None) -> None:
        tensor = tensor.detach().contiguous()
        slot = self._submit(dist.P2POp(dist.isend, tensor, self._local(dst), group=group, tag=NATIVE_TAG))
        self._pending.append((slot, tensor))   # the tensor lives until the send is done

    def irecv(self, shape, dtype, src: int, tag: int, group=None) -> PendingRecv:
        """`group`: a process group over the whole island world (Comms.p2p_group), or None for it."""
        with device_scope(self.accelerator):
            out = torch.empty(shape, dtype=dtype, device=self.device)
        slot = self._submit(dist.P2POp(dist.irecv, out, self._local(src), group=group, tag=NATIVE_TAG))

        def finish() -> torch.Tensor:
            if not slot:
                raise RuntimeError(f"receive from rank {src} waited on inside the batch that posts it")
            if slot[0] is not None:
                slot[0].wait()
            return out
        return PendingRecv(finish)

    def recv(self, shape, dtype, src: int, tag: int, timeout: float | None = None) -> torch.Tensor:
        return self.irecv(shape, dtype, src, tag).wait()

    def flush(self) -> None:
        for slot, _tensor in self._pending:
            if slot and slot[0] is not None:
                slot[0].wait()
        self._pending.clear()


class BridgeTransport:
    """comm_bridge between islands: activations and gradients go through host memory.

    A send hands the device tensor to the endpoint, whose stager copies it to host
    through the accelerator (non-blocking, on a side stream where the vendor has
    streams; the bytes leave once the copy's event completes). The tensor is kept
    alive until the send is done. Receives may be posted ahead (`irecv`).
    """

    def __init__(self, endpoint, device: torch.device, timeout: float, accelerator=None):
        self.endpoint = endpoint
        self.device = device
        self.timeout = timeout
        self.accelerator = accelerator
        self._pending: list = []

    @contextlib.contextmanager
    def batch(self):
        """The bridge has no rendezvous: operations go out as they are issued."""
        yield

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.detach()
        self._pending.append((self.endpoint.isend(tensor, dst, tag), tensor))

    def irecv(self, shape, dtype, src: int, tag: int, timeout: float | None = None) -> PendingRecv:
        handle = self.endpoint.irecv(src, tag)

        def finish() -> torch.Tensor:
            out = handle.wait(timeout or self.timeout)
            if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
                raise RuntimeError(f"bridge: rank {src} sent {tuple(out.shape)} {out.dtype}, "
                                   f"expected {tuple(shape)} {dtype}")
            return to_device(self.accelerator, out, self.device)
        return PendingRecv(finish)

    def recv(self, shape, dtype, src: int, tag: int, timeout: float | None = None) -> torch.Tensor:
        return self.irecv(shape, dtype, src, tag, timeout).wait()

    def flush(self) -> None:
        for handle, _tensor in self._pending:
            handle.wait(self.timeout)
        self._pending.clear()


class StageLink:
    """Moves one tensor between two adjacent stages whose TP degrees may differ.

    Every rank of the sending TP group holds the same full tensor (activations
    and their gradients are replicated across TP ranks at stage boundaries).
    Instead of every receiver fetching it whole, sender TP rank i ships only the
    pieces of its 1/a share that overlap each receiver's 1/b share; the
    receivers then all-gather inside their TP group. Bridge load spreads over
    all a x b links (FlagScale's overlap mapping). A tensor of at most
    WHOLE_MAX_BYTES goes whole to each receiver instead (sender j mod a serves
    receiver j), so that no all-gather waits on the critical path. The mapping
    is comm_bridge.reshard's; the tensor travels flat (its dim 0).
    """

    def __init__(self, transport, my_tp_rank: int, my_tp_size: int, tp_group: dist.ProcessGroup | None,
                 peers: list[int], send_group: dist.ProcessGroup | None = None,
                 recv_group: dist.ProcessGroup | None = None):
        self.transport = transport
        self.kind = "bridge" if isinstance(transport, BridgeTransport) else "native"
        self.tp_rank, self.tp_size, self.tp_group = my_tp_rank, my_tp_size, tp_group
        self.peers = peers        # the other stage's ranks, by their tp_rank
        # native only: the process groups sends and receives go in (Comms.p2p_group); default: the world
        native = self.kind == "native"
        self._send: dict[str, Any] = {"group": send_group} if native and send_group is not None else {}
        self._recv: dict[str, Any] = {"group": recv_group} if native and recv_group is not None else {}

    def batch(self) -> ContextManager:
        """Operations on this link inside the block go out together (see NativeTransport.batch)."""
        return self.transport.batch()

    def send(self, full: torch.Tensor, tag: int) -> None:
        flat = full.detach().contiguous().view(-1)
        plan = _reshard(flat.numel(), flat.dtype, self.tp_size, len(self.peers))

        def isend(piece_tensor: torch.Tensor, piece: Piece) -> None:
            self.transport.isend(piece_tensor, self.peers[piece.receiver], tag, **self._send)
        send_pieces(plan, self.tp_rank, flat, 0, isend)

    def post(self, shape: Sequence[int], dtype: torch.dtype, tag: int) -> PendingRecv:
        """Post the receives of one tensor now; `wait()` on the result assembles it."""
        numel = 1
        for size in shape:
            numel *= size
        plan = _reshard(numel, dtype, len(self.peers), self.tp_size)
        parts = post_pieces(plan, self.tp_rank, lambda piece: self.transport.irecv(
            (piece.stop - piece.start,), dtype, self.peers[piece.sender], tag, **self._recv))
        accelerator = getattr(self.transport, "accelerator", None)
        device = self.transport.device

        def finish() -> torch.Tensor:
            arrived = [(piece, pending.wait()) for piece, pending in parts]   # host work (the bridge's)
            with device_scope(accelerator):
                mine = assemble(plan, self.tp_rank, arrived, (numel,), 0,
                                lambda span: torch.empty(span, dtype=dtype, device=device))
                if not plan.gathers:
                    return mine.view(shape)
                return all_gather_shares(mine, numel, 0, self.tp_size, self.tp_group).view(shape)
        return PendingRecv(finish)

    def recv(self, shape: Sequence[int], dtype: torch.dtype, tag: int) -> torch.Tensor:
        return self.post(shape, dtype, tag).wait()

    def exchange(self, full: torch.Tensor, tag: int) -> torch.Tensor:
        """Send `full` to the other side and receive its tensor of the same shape, both at once
        (two ranks that send to each other must not block on a receive first)."""
        with self.batch():
            pending = self.post(tuple(full.shape), full.dtype, tag)
            self.send(full, tag)
        return pending.wait()


def _reshard(numel: int, dtype: torch.dtype, senders: int, receivers: int) -> Reshard:
    """The mapping of one flat boundary tensor: whole to each of `receivers` TP ranks (instead of
    in shares that they all-gather) when it is at most WHOLE_MAX_BYTES, where the all-gather's
    latency costs more than the extra bytes on the link. Sender and receiver decide alike from
    numel and dtype."""
    small = numel * torch.empty((), dtype=dtype).element_size() <= WHOLE_MAX_BYTES
    return Reshard(numel, senders, receivers, whole=receivers > 1 and small)
