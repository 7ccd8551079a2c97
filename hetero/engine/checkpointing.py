"""The trainer's checkpoints, as one component (torchtitan's CheckpointManager is the pattern): the
trainer holds `self.checkpoints` and calls `resume()` once, `save(step)` when a checkpoint is due,
`before_update()` right before the optimizer modifies parameters or optimizer state, `seal_ready()`
at the end of each step and `finish()` at the end of training (or before a fleet-wide stop).

A save copies this rank's own shard into host staging buffers kept from save to save
(hetero.checkpoint.staging, through the accelerator's copy_to_host) and a background writer
(hetero.checkpoint.writer) streams them to a file; the checkpoint is sealed once every rank's writer is
done. The copy itself runs in the background too (`Checkpoints.background`): parameters and optimizer
state change only at the next optimizer update, so the snapshot of step N is exact as long as it ends
before step N+1's update, which `before_update()` ensures. What is copied: the weights (the fp32
master copy in bf16/fp16), the moments, each rank's own TP slice or ZeRO-1 shard; the loss scaler's
and the optimizer's counters are read in save() itself.

Background or synchronous is the accelerator's declared capability (`copy_engine`, a class attribute,
vLLM-platforms style): a chip with DMA copy engines (GPUs, NPUs, the emulated chip, which models one)
copies on a side stream while the next step computes; on plain `cpu` the "copy" is a host memcpy that
takes cores from the step, so a background snapshot only slows the step (measured: `hetero bench
checkpoint`) and the copy is made synchronously; HETERO_CHECKPOINT_SNAPSHOT=background|sync overrides
the choice. The side stream waits for an event recorded in save()
after the step's update, as CUDA needs (a non-blocking side stream is not ordered after the compute
stream by itself); the emulated chip refuses a copy whose source's last write it was not told is done.

Every decision (which checkpoint to resume from, a failed write, sealing) is taken from
fleet-wide counts, so all ranks take it alike and `latest` keeps naming the previous checkpoint
when any rank's part fails.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable

import torch

from hetero.engine import checkpoint as ckpt
from hetero.engine import progress, retention
from hetero.errors import JobFatalError, UserError

SNAPSHOT_ENV = "HETERO_CHECKPOINT_SNAPSHOT"   # background | sync | auto (the accelerator's copy_engine)


class Checkpoints:
    # Snapshots in the background (CheckFreq, Mohan et al., FAST'21): save() hands the device->host copy
    # to the writer's thread and returns; the copy runs while the next step's forward and backward do
    # (they only read what is copied), and before_update() waits for it. False: save() copies first.
    # None: HETERO_CHECKPOINT_SNAPSHOT (background, sync) or else the accelerator's `copy_engine` decides.
    background: bool | None = None

    def __init__(self, comms, accelerator, model_config, train_config, model, optimizer, scaler, *,
                 pretrained, log_once: Callable[[str], None], fleet_count: Callable[[list], list[int]],
                 scope, onto_device):
        self.comms, self.accel = comms, accelerator
        self.place = comms.place
        self.model_config, self.train = model_config, train_config
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.params = dict(model.named_parameters())
        self.pretrained = pretrained
        self._log_once, self._fleet_count = log_once, fleet_count
        self._scope, self._onto_device = scope, onto_device
        self.background = background_snapshots(accelerator, type(self).background)
        self.root: str = train_config.checkpoint.dir if train_config.checkpoint else ""   # "": none kept
        self.every = train_config.checkpoint.every if train_config.checkpoint else 0
        self._pending: tuple | None = None   # (step, extra, write): the save whose writer may still run
        self._in_flight = None               # that writer while its snapshot may still be copying
        self._stream = None                  # the side stream snapshots copy on
        # The last save (seconds): training blocked (issue_s in save(), waited_s in before_update),
        # the snapshot's copy and the write.
        self.blocked_s = self.issue_s = self.waited_s = self.write_s = 0.0
        self.bytes = 0
        # The host buffers every save copies this rank's shard into, through the accelerator's
        # copy_to_host (an emulated chip charges its host link, as a real chip's copy costs).
        self.staging = ckpt.Staging(accelerator)

    # -- resume -------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest good checkpoint (falling back past bad ones); return its step, 0 for none.
        Each rank reads on the host, outside the device scope, only the chunks that overlap its own TP
        slices and ZeRO-1 shard (the plan may differ from the saver's); only they cross the host link."""
        saved = ckpt.load(self.root or None, self.model_config, log=self._log_once, agree=self._any_rank,
                          read=self.optimizer.read_part)
        if self.place.rank == 0:
            ckpt.discard_partials(self.root or None)   # saves a crash cut short; no rank writes yet
        if saved is None:
            return 0
        self.optimizer.load_part(saved.part, saved.optimizer_steps, self._onto_device, self._scope)
        self.scaler.load(saved.state)
        self._log_once(f"resumed from {saved.directory} (step {saved.step})")
        return saved.step

    # -- save ---------------------------------------------------------------------------
    def due(self, step: int, last: int) -> bool:
        """Whether checkpoint `step` is to be saved (every `checkpoint.every` steps, and the last)."""
        return bool(self.every) and (step % self.every == 0 or step == last)

    def save(self, step: int) -> None:
        """Start checkpoint `step`: seal the previous one, then copy this rank's own shard to the host
        (training blocks only for that copy) and hand it to a background writer. Each phase ends in a
        fleet-wide count of ranks whose part failed for want of space (it doubles as the barrier)."""
        progress.stamp("checkpoint")
        self.finish()
        self._refuse_non_finite_state(step)
        self._agree_written(step, self._only_rank0(ckpt.prepare, self.root, step))
        started = time.perf_counter()
        write = self._start_write(step) if self._writes_checkpoint(self.place.rank) else None
        self.blocked_s = self.issue_s = time.perf_counter() - started
        self.waited_s = 0.0
        extra = {"data_position": {"next_step": step}, "optimizer_steps": self.optimizer.steps,
                 **self.scaler.state(), **({"pretrained": self.pretrained.to_dict()} if self.pretrained else {})}
        self._pending = (step, extra, write)
        self._in_flight = write if self.background else None

    def _start_write(self, step: int):
        """This rank's writer of checkpoint `step`; in the background mode its thread also makes the
        snapshot (the copy into staging), else the copy is made here first, training waiting for it."""
        directory, copy, names = ckpt.partial_dir(self.root, step), self.staging.begin().copy, self._own_names()
        produced = self.accel.new_event()     # after the update that wrote what is copied
        produced.record()
        if self.background:
            return ckpt.AsyncWrite(directory, self.place.rank, step, staging=self.staging,
                                   snapshot=lambda: self._snapshot(copy, names, produced)).start()
        chunks = self._snapshot(copy, names, produced)
        return ckpt.AsyncWrite(directory, self.place.rank, step, chunks, staging=self.staging).start()

    def _snapshot(self, copy, names, produced) -> list:
        """This rank's own shard copied into the staging buffers (on a side stream where the chip has
        streams, so the copy can overlap the compute queued on the main one; the stream first waits for
        the event `produced`, recorded after the compute that wrote the shard), waited for."""
        stream = self._copy_stream()
        with self.accel.stream(stream):
            produced.wait(stream)
            chunks = self.optimizer.own_chunks(copy, names)
            self.staging.finish()
        return chunks

    def _copy_stream(self):
        if self._stream is None:
            self._stream = self.accel.new_stream()
        return self._stream

    def before_update(self) -> None:
        """Called right before the optimizer modifies parameters or optimizer state: a snapshot still
        copying them (the background mode) must be done first. Training is blocked only for the part
        of the copy the step's forward and backward did not hide (`waited_s`)."""
        write, self._in_flight = self._in_flight, None
        if write is not None:
            self.waited_s = write.wait_snapshot()
            self.blocked_s = self.issue_s + self.waited_s

    def seal_ready(self) -> None:
        """Seal the pending checkpoint as soon as every rank's writer is done: checked at the end of each
        step while one is pending (a fleet-wide count, so every rank decides alike); training never waits
        for a writer here."""
        if self._pending is None:
            return
        write = self._pending[2]
        done = self._fleet_count([write is None or not write.running()])[0]
        if done == self.comms.topology.plan.world_size:
            self.finish()

    def finish(self) -> None:
        """Wait for this rank's writer of the pending checkpoint, agree fleet-wide that every part is
        written, and seal it (rank 0): before the next save starts, at the end of training, and before a
        fleet-wide stop."""
        if self._pending is None:
            return
        (step, extra, write), self._pending = self._pending, None
        self._in_flight = None
        progress.stamp("checkpoint")
        self._agree_written(step, write.wait() if write else None)
        self.write_s, self.bytes = (write.write_s, write.bytes) if write else (0.0, 0)
        self._agree_written(step, self._only_rank0(self._seal, step, extra))
        self._log_once(f"checkpoint {ckpt.step_dir(self.root, step)}")

    # -- helpers --------------------------------------------------------------------------
    def _seal(self, step: int, extra: dict) -> None:
        writers = [r.rank for r in self.comms.topology.plan.ranks if self._writes_checkpoint(r.rank)]
        ckpt.seal(self.root, step, self.model_config, extra, writers)
        retention.prune(self.root, self.train.checkpoint.keep)

    def _writes_checkpoint(self, rank: int) -> bool:
        """Whether `rank` writes its part: pipeline 0's ranks hold the whole model once (hetero-DP
        replicas are copies; a hybrid plan's pipeline 0 may span islands, its ranks on each write
        their layers); in a DP group without ZeRO-1 the replicas are copies too (dp rank 0
        writes), with ZeRO-1 every DP rank writes its own shard."""
        plan = self.comms.topology.plan
        where = next(r for r in plan.ranks if r.rank == rank)
        stage = next(s for s in plan.stages if s.index == where.stage)
        return stage.pipeline == 0 and ((plan.zero1 and stage.dp > 1) or where.dp_rank == 0)

    def _own_names(self) -> list[str]:
        """The parameters this rank saves: all but a tied LM head, the first stage's embedding's copy."""
        return [n for n in self.params if self.model.hf_name(n) == n]

    def _any_rank(self, flag: bool) -> bool:
        return self._fleet_count([flag])[0] > 0

    def _only_rank0(self, write, *args) -> int | None:
        """Rank 0 runs `write`; the errno of a full disk or quota it hit, else None."""
        return _out_of_space(write, *args) if self.place.rank == 0 else None

    def _agree_written(self, step: int, failed: int | None) -> None:
        """Every rank: raise JobFatalError if any rank ran out of space writing checkpoint `step`."""
        no_space, quota = self._fleet_count([failed == errno.ENOSPC, failed == errno.EDQUOT])
        if not (no_space or quota):
            return
        if self.place.rank == 0:
            ckpt.discard(self.root, step)
        what = "no space left on device" if no_space else "disk quota exceeded"
        kept = ckpt.pointed_step(self.root)
        previous = f"latest is still step {kept}" if kept else "no earlier checkpoint"
        raise JobFatalError(f"{self.root}: {what} while writing checkpoint "
                            f"{os.path.basename(ckpt.step_dir(self.root, step))} ({previous}); "
                            "free space there and restart")

    def _refuse_non_finite_state(self, step: int) -> None:
        """Raise JobFatalError on every rank if any rank's weights or moments hold nan or inf."""
        stores = (("", self.params), *self.optimizer.local_state().items())
        bad = next((prefix + self.model.hf_name(name) for prefix, store in stores for name, t in store.items()
                    if not bool(torch.isfinite(t.detach()).all())), None)
        if self._any_rank(bad is not None):
            where = f" ({bad} on rank {self.place.rank})" if bad else ""
            raise JobFatalError(f"step {step}: weights are not finite{where}; stopping before checkpointing")


def background_snapshots(accelerator, override: bool | None = None) -> bool:
    """Whether saves snapshot in the background: `override` when set, else HETERO_CHECKPOINT_SNAPSHOT
    (background or sync) when set, else whether the accelerator declares DMA copy engines
    (`copy_engine`; False on plain cpu, where the copy is a host memcpy that only slows the step it
    would run beside)."""
    if override is not None:
        return bool(override)
    chosen = os.environ.get(SNAPSHOT_ENV, "").strip().lower()
    if chosen in ("", "auto"):
        return bool(getattr(accelerator, "copy_engine", False))
    if chosen not in ("background", "sync"):
        raise UserError(f"{SNAPSHOT_ENV} must be background, sync or auto, got {chosen!r}")
    return chosen == "background"


def _out_of_space(write, *args) -> int | None:
    """Run a checkpoint write; the errno if it failed for want of space (ENOSPC, EDQUOT), else None.
    Other failures propagate."""
    try:
        write(*args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.errno
        raise
    return None
