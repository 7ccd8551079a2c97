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
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from comm_bridge.reshard import overlap_plan, share

NATIVE_TAG = 0   # NCCL/HCCL ignore tags: match in issue order, on gloo too
# A stage boundary tensor up to this size goes whole to every receiving TP rank: one island
# collective (the receivers' all-gather, a round of latency on the critical path of every
# micro-batch) costs more than (b-1)/b of a megabyte more on the link.
WHOLE_MAX_BYTES = 1 << 20


def device_scope(accelerator):
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

    def __init__(self, finish):
        self._finish = finish
        self._result = None
        self._done = False

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._result = self._finish()
            self._done = True
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
        self._pending: list = []           # (work, tensor): sends not yet known complete
        self._batch: list | None = None    # ops of the open batch: (P2POp, PendingSlot)

    def _local(self, rank: int) -> int:
        return self.topology.world_rank(rank)

    @contextlib.contextmanager
    def batch(self):
        """Issue the sends and receives of the block together, at its end (re-entrant)."""
        if self._batch is not None:
            yield
            return
        self._batch = ops = []
        try:
            yield
        finally:
            self._batch = None
        self._issue(ops)

    def _issue(self, ops: list) -> None:
        """One dist.batch_isend_irecv per process group among `ops` (torch wants one group per batch)."""
        by_group: dict = {}
        for op, slot in ops:
            by_group.setdefault(id(getattr(op, "group", None)), []).append((op, slot))
        for group_ops in by_group.values():
            works = dist.batch_isend_irecv([op for op, _ in group_ops])
            if len(works) != len(group_ops):      # a coalescing backend returns one work for the group
                works = [works[-1]] * len(group_ops) if works else [None] * len(group_ops)
            for (_op, slot), work in zip(group_ops, works):
                slot.append(work)

    def _submit(self, op) -> list:
        """Queue `op` in the open batch, or issue it alone; returns the slot its work lands in."""
        slot: list = []
        if self._batch is not None:
            self._batch.append((op, slot))
        else:
            self._issue([(op, slot)])
        return slot

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, group=None) -> None:
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
    receiver j), so that no all-gather waits on the critical path.
    """

    def __init__(self, transport, my_tp_rank: int, my_tp_size: int, tp_group, peers: list[int],
                 send_group=None, recv_group=None):
        self.transport = transport
        self.kind = "bridge" if isinstance(transport, BridgeTransport) else "native"
        self.tp_rank, self.tp_size, self.tp_group = my_tp_rank, my_tp_size, tp_group
        self.peers = peers        # the other stage's ranks, by their tp_rank
        # native only: the process groups sends and receives go in (Comms.p2p_group); default: the world
        native = self.kind == "native"
        self._send = {"group": send_group} if native and send_group is not None else {}
        self._recv = {"group": recv_group} if native and recv_group is not None else {}

    def batch(self):
        """Operations on this link inside the block go out together (see NativeTransport.batch)."""
        return self.transport.batch()

    def send(self, full: torch.Tensor, tag: int) -> None:
        flat = full.detach().contiguous().view(-1)
        if _whole(flat.numel(), flat.dtype, len(self.peers)):
            for receiver, peer in enumerate(self.peers):   # sender i serves receivers i, i+a, ...
                if receiver % self.tp_size == self.tp_rank:
                    self.transport.isend(flat, peer, tag, **self._send)
            return
        for piece in overlap_plan(flat.numel(), self.tp_size, len(self.peers)):
            if piece.sender == self.tp_rank and piece.stop > piece.start:
                self.transport.isend(flat[piece.start:piece.stop], self.peers[piece.receiver], tag, **self._send)

    def post(self, shape, dtype, tag: int) -> PendingRecv:
        """Post the receives of one tensor now; `wait()` on the result assembles it."""
        numel = 1
        for size in shape:
            numel *= size
        if _whole(numel, dtype, self.tp_size):
            whole = self.transport.irecv((numel,), dtype, self.peers[self.tp_rank % len(self.peers)], tag, **self._recv)
            return PendingRecv(lambda: whole.wait().view(shape))
        start, stop = share(numel, self.tp_size, self.tp_rank)
        parts = [(piece, self.transport.irecv((piece.stop - piece.start,), dtype, self.peers[piece.sender], tag,
                                              **self._recv))
                 for piece in overlap_plan(numel, len(self.peers), self.tp_size)
                 if piece.receiver == self.tp_rank and piece.stop > piece.start]
        accelerator = getattr(self.transport, "accelerator", None)

        def finish() -> torch.Tensor:
            arrived = [(piece, pending.wait()) for piece, pending in parts]   # host work (the bridge's)
            with device_scope(accelerator):
                if len(arrived) == 1 and arrived[0][0].start == start and arrived[0][0].stop == stop:
                    mine = arrived[0][1]
                else:
                    mine = torch.empty(stop - start, dtype=dtype, device=self.transport.device)
                    for piece, part in arrived:
                        mine[piece.start - start:piece.stop - start].copy_(part)
                if self.tp_size == 1:
                    return mine.view(shape)
                return _all_gather_flat(mine, numel, self.tp_size, self.tp_group).view(shape)
        return PendingRecv(finish)

    def recv(self, shape, dtype, tag: int) -> torch.Tensor:
        return self.post(shape, dtype, tag).wait()

    def exchange(self, full: torch.Tensor, tag: int) -> torch.Tensor:
        """Send `full` to the other side and receive its tensor of the same shape, both at once
        (two ranks that send to each other must not block on a receive first)."""
        with self.batch():
            pending = self.post(tuple(full.shape), full.dtype, tag)
            self.send(full, tag)
        return pending.wait()


def _whole(numel: int, dtype: torch.dtype, receivers: int) -> bool:
    """Whether a tensor goes whole to each of `receivers` TP ranks (instead of in shares that they
    all-gather): when it is at most WHOLE_MAX_BYTES, where the all-gather's latency costs more
    than the extra bytes on the link. Sender and receiver decide alike from numel and dtype."""
    return receivers > 1 and numel * torch.empty((), dtype=dtype).element_size() <= WHOLE_MAX_BYTES


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
