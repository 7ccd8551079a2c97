"""One worker's training loop: its stage of the model, 1F1B, reductions, AdamW,
metrics and checkpoints. Every rank of the job runs this with its own Place.

An interleaved pipeline (virtual_stages v > 1) gives the stage v model chunks: one
LlamaStage holds them all (HF names, so gradients, checkpoints and tied embeddings
work over all chunks as over one), each action of the schedule runs one chunk, and
each chunk has its own neighbours (the last stage's chunk c feeds the first stage's
chunk c+1) and its own message tags.

A step: 1F1B (`_step_compute`; fp16 scales the loss before backward; a chunk's DP
reduction starts as soon as its last backward has run), the gradients made the fleet's
(GradientSync: tied copies, DP group — reduce-scattered under ZeRO-1 — hetero-DP pipelines), one fleet-wide sum of the loss and squared norm, then clip and
update (AdamW over fp32 master weights in bf16/fp16: hetero.engine.precision), or a
skipped update (fp16 overflow anywhere, or train.on_nan: skip).

Every decision that could split the fleet (which checkpoint to resume from, a
non-finite loss, a failed checkpoint write) is taken from fleet-wide sums, so
all ranks take it alike.
"""

from __future__ import annotations

import math

import torch

from hetero.engine import progress, tags
from hetero.engine.checkpointing import Checkpoints
from hetero.engine.data import SampleSource
from hetero.engine.gradients import GradientSync
from hetero.engine.lr_schedule import learning_rate
from hetero.engine.metrics import ChipClock, MetricsRecorder, PeakMemory
from hetero.engine.optimizer import AdamW
from hetero.engine.precision import DTYPES, LossScaler, needs_master
from hetero.engine.schedule import stage_schedule
from hetero.engine.transport import StageLink, device_scope, to_device
from hetero.engine.zero import FlatShard
from hetero.errors import JobFatalError
from hetero.model import LlamaStage, TensorParallel, layout
from hetero.model.hf import pretrained_tensors
from hetero.model.init import init_full_tensor


class Trainer:
    def __init__(self, comms, accelerator, model_config, train_config, run_dir: str | None,
                 steps: int | None = None, log=print, pretrained=None):
        self.comms, self.accel = comms, accelerator
        self.pretrained = pretrained        # hetero.config.Pretrained, or None: loaded when no checkpoint is
        self.place = place = comms.place
        self.model_config, self.train = model_config, train_config
        self.steps = steps or train_config.steps
        self.run_dir = run_dir
        self.log = log
        self.dtype = DTYPES[train_config.dtype]
        # Metrics are in the chip's time: an emulated chip may run dilated (k wall
        # seconds per chip second), and every stamp and duration is divided alike.
        self.clock = ChipClock(float(getattr(accelerator, "time_dilation", 1.0)))
        stage = place.stage
        tp = TensorParallel(stage.tp, place.tp_rank, comms.tp_group)
        with self._scope():
            self.model = LlamaStage(model_config, first=place.is_first, last=place.is_last,
                                    tp=tp, dtype=self.dtype, device=comms.device,
                                    seed=None if pretrained else train_config.seed,
                                    recompute=stage.recompute,
                                    **({"blocks": stage.blocks} if stage.blocks else {"chunks": stage.layer_ranges}))
        self.params = dict(self.model.named_parameters())
        self.zero1 = bool(comms.topology.plan.zero1) and stage.dp > 1
        shard = self._flat_layout()
        with self._scope():
            self.optimizer = AdamW(self.model, self.params, train_config.lr, train_config.weight_decay,
                                   shard=shard, master=needs_master(self.dtype))
        if self.optimizer.master is not None and not pretrained:   # from the fp32 init, not its rounding
            for name in self.params:            # one host tensor at a time
                full = init_full_tensor(model_config, self.model.hf_name(name), train_config.seed)
                self.optimizer.load_master({name: full}, self._onto_device, self._scope)
        self.scaler = LossScaler(enabled=self.dtype == torch.float16)
        if shard is not None and self.zero1 and place.dp_rank == 0 and place.tp_rank == 0:
            log(f"stage {stage.index}: ZeRO-1 over DP {stage.dp}: each rank keeps {shard.shard_numel:,} of "
                f"{shard.numel:,} parameters' optimizer state per TP rank")
        self._track_memory()
        topology = comms.topology
        # chunk 0's neighbours; the other chunks' (interleaved) in _chunk_links
        self.prev, self.next = self._neighbour_link(-1, 0), self._neighbour_link(1, 0)
        self._chunk_links = {(step, c): self._neighbour_link(step, c)
                             for c in range(1, place.virtual_stages) for step in (-1, 1)}
        self.schedule = stage_schedule(place.position, len(place.pipeline_stages), place.num_micro_batches,
                                       place.virtual_stages)
        partners = topology.tied_partners(place) if model_config.tie_embeddings else None
        self.grads = GradientSync(comms, self.model, self.params, accelerator, self._scope, self._link(partners),
                                  shard=shard, zero=self.zero1, schedule=self.schedule)
        self.data = SampleSource(train_config.data, model_config.vocab, model_config.seq_len,
                                 train_config.seed, train_config.global_batch)
        self.checkpoints = Checkpoints(comms, accelerator, model_config, train_config, self.model, self.optimizer,
                                       self.scaler, pretrained=pretrained, log_once=self._log_once,
                                       fleet_count=self._fleet_count, scope=self._scope, onto_device=self._onto_device)
        self.start_step = self.checkpoints.resume()
        if self.start_step == 0 and pretrained:   # a run's own checkpoint wins over its starting model
            self._load_pretrained()
        self.peaks = PeakMemory(accelerator, comms.topology.plan, place.rank)
        self.metrics = MetricsRecorder(run_dir, place.rank, self.clock, self.peaks)

    # -- set-up helpers ---------------------------------------------------------
    def _scope(self):
        return device_scope(self.accel)

    def _flat_layout(self) -> FlatShard | None:
        """The stage's flat layout (ZeRO-1 over the DP group, or mixed precision), or None (fp32
        without ZeRO-1: per-parameter state, updated in place)."""
        if self.zero1:
            return FlatShard(self.params, self.place.stage.dp, self.place.dp_rank, self.comms.dp_group)
        return FlatShard(self.params) if needs_master(self.dtype) else None

    def _track_memory(self) -> None:
        track = getattr(self.accel, "track", None)
        if track:
            for param in self.params.values():
                track(param)
            for store in self.optimizer.local_state().values():
                for tensor in store.values():
                    track(tensor)

    def _onto_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor copied into this rank's device memory (charged on the host link)."""
        return to_device(self.accel, host, self.comms.device)

    def _link_of(self, step: int, chunk: int):
        """The link to the stage before (-1) or after (+1) `chunk`, or None."""
        if chunk == 0:
            return self.prev if step < 0 else self.next
        return self._chunk_links[(step, chunk)]

    def _tag(self, mb: int, kind: str, chunk: int, chunks: int, receive: bool) -> int:
        """The tag of the message `chunk` receives or sends for action (kind, mb), named by the chunk
        that takes the activation in forward: this one, or the next (the first stage's chunk + 1 when
        this is the last stage)."""
        into = chunk if (kind == "F") == receive else chunk + int(self.place.is_last)
        return tags.micro_batch(mb, kind, into, chunks)

    def _neighbour_link(self, step: int, chunk: int):
        """The link to the stage before (-1: activations in, gradients out) or after (+1) `chunk`;
        on the island's native p2p, each way in its kind's group (Comms.p2p_group, interleaved)."""
        place = self.place
        wrap = place.is_first if step < 0 else place.is_last     # the interleaved wrap-around
        incoming, outgoing = ("F", "B") if step < 0 else ("B", "F")
        return self._link(self.comms.topology.neighbour(place, step, chunk),
                          send_group=self.comms.p2p_group(outgoing, wrap),
                          recv_group=self.comms.p2p_group(incoming, wrap))

    def _link(self, peers, send_group=None, recv_group=None):
        if peers is None:
            return None
        transport = self.comms.transport_to(peers[0])
        return StageLink(transport, self.place.tp_rank, self.place.stage.tp, self.comms.tp_group, peers,
                         send_group, recv_group)

    @torch.no_grad()
    def _load_pretrained(self) -> None:
        """A fresh run from a Hugging Face model: read on the host like a resume, one of this stage's
        own tensors at a time; only this rank's TP slice crosses the host link; the fp32 master weights
        (bf16/fp16) come from the same full tensor, not from its rounding."""
        for name, full in pretrained_tensors(self.model, self.pretrained.hf, self.pretrained.fingerprint):
            param = self.params[name]
            local = self.model.tp.shard(full, layout.split_dim(self.model.hf_name(name)))
            piece = self._onto_device(local.to(param.dtype).contiguous())
            with self._scope():
                param.copy_(piece)
            if self.optimizer.master is not None:
                self.optimizer.load_master({name: full}, self._onto_device, self._scope)
        self._log_once(f"started from the Hugging Face model {self.pretrained.hf}")

    def _log_once(self, message: str) -> None:
        """A line for the whole job: rank 0 says it."""
        if self.place.rank == 0:
            self.log(message)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank of the job (a fleet-wide sum; every rank must call it)."""
        return self._fleet_count([flag])[0] > 0

    def _fleet_count(self, flags) -> list[int]:
        """How many ranks raise each flag (a fleet-wide sum; every rank must call it)."""
        totals = self.comms.fleet_sum(torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64))
        return [int(round(float(t))) for t in totals]

    # -- the loop -----------------------------------------------------------------
    def run(self) -> None:
        for step in range(self.start_step, self.steps):
            self._train_step(step)
            if self.checkpoints.due(step + 1, self.steps):
                self.checkpoints.save(step + 1)
        self.checkpoints.finish()
        self.comms.flush()
        self.metrics.close()

    def _train_step(self, step: int) -> None:
        tokens_per_step = self.train.global_batch * self.model_config.seq_len
        progress.step(step)                 # the head's hang watchdog (hetero.engine.progress)
        started = self.clock.now()
        self.peaks.step_started()
        self.grads.prepare()
        loss_sum = self._step_compute(step, self.grads.after_backward)
        progress.stamp("island collective")
        dp_started = self.clock.now()
        self.grads.collect(self.scaler.scale)
        self.grads.within_stage()
        reduce_started = self.clock.now()
        self.grads.across_pipelines()
        cross_island_s = self.clock.now() - reduce_started
        sums = torch.tensor([loss_sum, self.grads.local_sq_norm()], dtype=torch.float64)
        totals = self.comms.fleet_sum(torch.cat([sums, self.peaks.slots()]))   # peaks ride along
        loss, grad_norm = float(totals[0]) / tokens_per_step, math.sqrt(float(totals[1]))
        scale, lr = self.scaler.scale, learning_rate(self.train, step, self.steps)
        finite = self._check_finite(step, loss)
        progress.stamp("optimizer")
        self.checkpoints.before_update()
        if finite and self._gradients_usable(step, grad_norm):
            self.grads.clip(grad_norm, self.train.grad_clip)
            with self._scope():
                self.optimizer.step(self.grads.for_optimizer(), lr)
        self.optimizer.zero_grad()
        self.grads.release()
        self.accel.synchronize()
        self.peaks.update_done()
        step_s = self.clock.now() - started
        self.checkpoints.seal_ready()       # before the step's record: a recorded step N+1 means N is sealed
        if finite and (math.isfinite(grad_norm) or self.scaler.enabled):   # an fp16 overflow is recorded too
            self.metrics.step({"step": step + 1, "loss": loss, "tokens_per_s": tokens_per_step / step_s,
                               "step_s": step_s, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                               "time": self.clock.stamp(), "cross_island_reduce_s": cross_island_s, "lr": lr,
                               "dp_reduce_exposed_s": reduce_started - dp_started, **self._overlap_fields(),
                               **self._scaler_fields(scale)}, peak_slots=totals[2:])

    def _check_finite(self, step: int, loss: float) -> bool:
        """False when this step's loss is not finite and its update must be skipped (train.on_nan:
        skip); raises JobFatalError (train.on_nan: stop) before anything is checkpointed. The loss is a
        fleet-wide sum, the same on every rank, so every rank decides alike."""
        return math.isfinite(loss) or self._non_finite(step, f"loss is {loss}")

    def _gradients_usable(self, step: int, grad_norm: float) -> bool:
        """Whether the step's gradients may update the weights. A non-finite norm (a fleet-wide sum:
        an inf or nan on any rank makes it so) is an overflow under fp16 loss scaling: the step is
        skipped and the scale backs off; otherwise it is train.on_nan's to handle."""
        overflow = not math.isfinite(grad_norm)
        if self.scaler.enabled:
            if overflow:
                self._log_once(f"step {step + 1}: gradients overflowed at loss scale {self.scaler.scale:g}; "
                               f"skipping this step's update (loss scale now {self.scaler.scale * self.scaler.backoff:g})")
            self.scaler.update(overflow)
            return not overflow
        return not overflow or self._non_finite(step, f"gradient norm is {grad_norm}")

    def _non_finite(self, step: int, what: str) -> bool:
        if self.train.on_nan == "stop":
            self.checkpoints.finish()     # the previous checkpoint is good: seal it (every rank stops alike)
            raise JobFatalError(f"step {step + 1}: {what}; stopping before checkpointing (train.on_nan: stop)")
        self._log_once(f"step {step + 1}: {what}; skipping this step's update (train.on_nan: skip)")
        return False

    def _scaler_fields(self, scale: float) -> dict:
        """fp16's step-record fields: the loss scale the step ran at, and the skipped steps so far."""
        return {"loss_scale": scale, "skipped_steps": self.scaler.skipped_steps} if self.scaler.enabled else {}

    def _overlap_fields(self) -> dict:
        """Where this rank started each chunk's DP reduction: the schedule action it followed (null:
        after the stage's compute); only when the reduction overlaps the backward."""
        overlap = self.grads.overlap
        if overlap is None:
            return {}
        return {"dp_reduce_issued_after": [overlap.issued.get(c) for c in range(len(overlap.names))]}

    def _step_compute(self, step: int, after_backward=None) -> float:
        """Run this stage's 1F1B schedule (interleaved: over its chunks) for one step; return the
        summed loss (the stage holding the model's last piece). `after_backward(index)`
        runs after each backward's sends are issued (GradientSync starts final chunks' DP reductions).

        Each action's receive is posted ahead: together with the previous action's send,
        in one batch (NCCL/HCCL: two stages that send to each other at once must not
        block on a receive while their own send is unmatched), or at the step's start.
        Interleaved, receives are posted a pipeline's length of actions ahead: there every
        pair of native ranks carries one kind one way per group (Comms.p2p_group), so an
        early receive holds up nothing, and a neighbour's send that runs ahead (the schedule
        sends long before the data is needed) is matched at once instead of waiting for it.
        """
        place = self.place

        def hidden_shape(mb: int) -> tuple[int, int, int]:    # what crosses a stage boundary for micro-batch mb
            return place.micro_batch_size(mb), self.model_config.seq_len, self.model_config.hidden
        total_tokens = self.train.global_batch * self.model_config.seq_len
        inputs, outputs, loss_sum = {}, {}, 0.0
        posted: dict = {}
        chunks = 1 + max(action.chunk for action in self.schedule)    # v: the chunks the schedule runs
        ahead = 1 if chunks == 1 else len(place.pipeline_stages)      # receives posted ahead

        def embeds(chunk: int) -> bool:       # the model's first piece: token input
            return place.is_first and chunk == 0

        def ends(chunk: int) -> bool:         # the model's last piece: LM head and loss
            return place.is_last and chunk == chunks - 1

        def post(index: int) -> None:
            """Post the receive that action `index` will need, if it needs one."""
            if index >= len(self.schedule) or index in posted:
                return
            action = self.schedule[index]
            link = self._link_of(-1 if action.kind == "F" else 1, action.chunk)
            if link is not None:
                posted[index] = link.post(hidden_shape(action.micro_batch), self.dtype,
                                          self._tag(action.micro_batch, action.kind, action.chunk, chunks, True))

        for index, action in enumerate(self.schedule):
            kind, mb, chunk = action.kind, action.micro_batch, action.chunk
            t0, posted_at = self.clock.now(), self.clock.stamp()
            sent_at = None
            post(index)
            if kind == "F":
                first_sample, mb_size = place.first_sample + mb * place.micro_batch, place.micro_batch_size(mb)
                if embeds(chunk):
                    tokens, labels = self.data.batch(step, first_sample, mb_size)
                    x = to_device(self.accel, tokens, self.comms.device)
                else:
                    x = posted.pop(index).wait().requires_grad_()
                waited, received = self.clock.now() - t0, self.clock.stamp()
                if ends(chunk) and not embeds(chunk):
                    _, labels = self.data.batch(step, first_sample, mb_size)
                with self._scope():
                    out = self.model(x, chunk=chunk) if chunks > 1 else self.model(x)
                    if ends(chunk):
                        labels = to_device(self.accel, labels, self.comms.device)
                        out = self.model.loss(out, labels, reduction="sum") / total_tokens
                        if place.tp_rank == 0:   # every TP rank holds the same loss
                            loss_sum += float(out.detach()) * total_tokens
                        if self.scaler.enabled:  # fp16: backward runs on the scaled loss
                            out = out * self.scaler.scale
                self.accel.synchronize()
                inputs[chunk, mb], outputs[chunk, mb] = x, out
                send_link, link = self._link_of(1, chunk), self._link_of(-1, chunk)
                payload: torch.Tensor | None = out
            else:
                grad = None if ends(chunk) else posted.pop(index).wait()
                waited, received = self.clock.now() - t0, self.clock.stamp()
                x, out = inputs.pop((chunk, mb)), outputs.pop((chunk, mb))
                with self._scope():
                    out.backward(grad)
                self.accel.synchronize()
                send_link, link = self._link_of(-1, chunk), self._link_of(1, chunk)
                payload = x.grad if send_link else None
            with self.comms.batch():
                if send_link is not None:
                    sent_at = self.clock.stamp()
                    send_link.send(payload, self._tag(mb, kind, chunk, chunks, False))
                for later in range(index + 1, index + 1 + ahead):
                    post(later)
            if kind == "B" and after_backward is not None:
                after_backward(index)
            compute = self.clock.now() - t0 - waited
            self.metrics.action(step, mb, kind, compute, waited, posted_at, received, sent_at, link,
                                chunk=chunk if chunks > 1 else None)
        return loss_sum
