"""One worker's training loop: its stage of the model, 1F1B, reductions, AdamW,
metrics and checkpoints. Every rank of the job runs this with its own Place.

Every decision that could split the fleet (which checkpoint to resume from, a
non-finite loss, a failed checkpoint write) is taken from fleet-wide sums, so
all ranks take it alike.
"""

from __future__ import annotations

import errno
import math
import os

import torch

from hetero.engine import checkpoint as ckpt
from hetero.engine import tags
from hetero.engine.data import SampleSource
from hetero.engine.gradients import GradientSync
from hetero.engine.metrics import ChipClock, MetricsRecorder, PeakMemory
from hetero.engine.optimizer import AdamW
from hetero.engine.schedule import one_f_one_b
from hetero.engine.transport import StageLink, device_scope, to_device, to_host
from hetero.errors import JobFatalError
from hetero.model import LlamaStage, TensorParallel
from hetero.model import layout
from hetero.model.state import full_state_dict, load_full_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, comms, accelerator, model_config, train_config, run_dir: str | None,
                 steps: int | None = None, log=print):
        self.comms, self.accel = comms, accelerator
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
            self.model = LlamaStage(model_config, tuple(stage.layers), first=place.is_first, last=place.is_last,
                                    tp=tp, dtype=self.dtype, device=comms.device, seed=train_config.seed,
                                    recompute=stage.recompute)
        self.params = dict(self.model.named_parameters())
        self.optimizer = AdamW(self.params, train_config.lr, train_config.weight_decay)
        self._track_memory()
        topology = comms.topology
        self.prev = self._link(topology.neighbour(place, -1))
        self.next = self._link(topology.neighbour(place, +1))
        partners = topology.tied_partners(place) if model_config.tie_embeddings else None
        self.grads = GradientSync(comms, self.model, self.params, accelerator, self._scope, self._link(partners))
        self.data = SampleSource(train_config.data, model_config.vocab, model_config.seq_len,
                                 train_config.seed, train_config.global_batch)
        self.schedule = one_f_one_b(place.position, len(place.pipeline_stages), place.num_micro_batches)
        self.start_step = self._resume()
        self.metrics = MetricsRecorder(run_dir, place.rank, self.clock,
                                       PeakMemory(accelerator, comms.topology.plan, place.rank))

    # -- set-up helpers ---------------------------------------------------------
    def _scope(self):
        return device_scope(self.accel)

    def _track_memory(self) -> None:
        track = getattr(self.accel, "track", None)
        if track:
            for name, param in self.params.items():
                track(param)
                track(self.optimizer.exp_avg[name])
                track(self.optimizer.exp_avg_sq[name])

    def _link(self, peers):
        if peers is None:
            return None
        transport = self.comms.transport_to(peers[0])
        return StageLink(transport, self.place.tp_rank, self.place.stage.tp, self.comms.tp_group, peers)

    def _resume(self) -> int:
        """Load the newest good checkpoint (falling back past bad ones); return its step."""
        root = self.train.checkpoint.dir if self.train.checkpoint else None
        saved = ckpt.load(root, self.model_config, log=self._log_once, agree=self._any_rank)
        if saved is None:
            return 0
        found = saved.directory
        names = {self.model.hf_name(n): n for n in self.params}
        load_full_state_dict(self.model, saved.tensors(names), source=found)
        for kind, store in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
            full = saved.tensors([f"{kind}.{hf}" for hf in names])
            for hf, module_name in names.items():
                store[module_name].copy_(self.model.tp.shard(full[f"{kind}.{hf}"], layout.split_dim(hf)))
        self.optimizer.steps = saved.optimizer_steps
        self._log_once(f"resumed from {found} (step {saved.step})")
        return saved.step

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
        tokens_per_step = self.train.global_batch * self.model_config.seq_len
        for step in range(self.start_step, self.steps):
            started = self.clock.now()
            self.metrics.peaks.step_started()
            loss_sum = self._step_compute(step)
            self.grads.within_stage()
            reduce_started = self.clock.now()
            self.grads.across_pipelines()
            cross_island_s = self.clock.now() - reduce_started
            sums = torch.tensor([loss_sum, self.grads.local_sq_norm()], dtype=torch.float64)
            totals = self.comms.fleet_sum(torch.cat([sums, self.metrics.peaks.slots()]))   # peaks ride along
            loss, grad_norm = float(totals[0]) / tokens_per_step, math.sqrt(float(totals[1]))
            finite = self._check_finite(step, loss, grad_norm)
            if finite:
                self.grads.clip(grad_norm, self.train.grad_clip)
                with self._scope():
                    self.optimizer.step(self._lr(step))
            self.optimizer.zero_grad()
            self.accel.synchronize()
            self.metrics.peaks.update_done()
            step_s = self.clock.now() - started
            if finite:
                self.metrics.step({"step": step + 1, "loss": loss, "tokens_per_s": tokens_per_step / step_s,
                                   "step_s": step_s, "grad_norm": grad_norm, "time": self.clock.stamp(),
                                   "cross_island_reduce_s": cross_island_s}, peak_slots=totals[2:])
            every = self.train.checkpoint.every if self.train.checkpoint else 0
            if every and ((step + 1) % every == 0 or step + 1 == self.steps):
                self._save(step + 1)
        self.comms.flush()
        self.metrics.close()

    def _check_finite(self, step: int, loss: float, grad_norm: float) -> bool:
        """False when this step's update must be skipped (train.on_nan: skip); raises JobFatalError
        (train.on_nan: stop) before anything is checkpointed. Loss and norm are fleet-wide sums, the
        same on every rank, so every rank decides alike."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        if self.train.on_nan == "stop":
            raise JobFatalError(f"step {step + 1}: {what}; stopping before checkpointing (train.on_nan: stop)")
        self._log_once(f"step {step + 1}: {what}; skipping this step's update (train.on_nan: skip)")
        return False

    def _lr(self, step: int) -> float:
        warmup = self.train.warmup_steps
        return self.train.lr * min(1.0, (step + 1) / warmup) if warmup else self.train.lr

    def _step_compute(self, step: int) -> float:
        """Run this stage's 1F1B schedule for one step; return the summed loss (last stage).

        Each action's receive is posted ahead: together with the previous action's send,
        in one batch (NCCL/HCCL: two stages that send to each other at once must not
        block on a receive while their own send is unmatched), or at the step's start.
        """
        place, mb_size = self.place, self.place.micro_batch
        hidden_shape = (mb_size, self.model_config.seq_len, self.model_config.hidden)
        total_tokens = self.train.global_batch * self.model_config.seq_len
        inputs, outputs, loss_sum = {}, {}, 0.0
        posted: dict = {}

        def post(index: int) -> None:
            """Post the receive that action `index` will need, if it needs one."""
            if index >= len(self.schedule) or index in posted:
                return
            kind, mb = self.schedule[index]
            link = self.prev if kind == "F" else self.next
            if link is not None:
                posted[index] = link.post(hidden_shape, self.dtype, tags.micro_batch(mb, kind))

        for index, (kind, mb) in enumerate(self.schedule):
            tag = tags.micro_batch(mb, kind)
            t0, posted_at = self.clock.now(), self.clock.stamp()
            sent_at = None
            post(index)
            if kind == "F":
                first_sample = place.first_sample + mb * mb_size
                if place.is_first:
                    tokens, labels = self.data.batch(step, first_sample, mb_size)
                    x = to_device(self.accel, tokens, self.comms.device)
                else:
                    x = posted.pop(index).wait().requires_grad_()
                waited, received = self.clock.now() - t0, self.clock.stamp()
                if place.is_last and not place.is_first:
                    _, labels = self.data.batch(step, first_sample, mb_size)
                with self._scope():
                    out = self.model(x)
                    if place.is_last:
                        labels = to_device(self.accel, labels, self.comms.device)
                        out = self.model.loss(out, labels, reduction="sum") / total_tokens
                        if place.tp_rank == 0:   # every TP rank holds the same loss
                            loss_sum += float(out.detach()) * total_tokens
                self.accel.synchronize()
                inputs[mb], outputs[mb] = x, out
                send_link, payload, link = self.next, out, self.prev
            else:
                grad = None if place.is_last else posted.pop(index).wait()
                waited, received = self.clock.now() - t0, self.clock.stamp()
                x, out = inputs.pop(mb), outputs.pop(mb)
                with self._scope():
                    out.backward(grad)
                self.accel.synchronize()
                send_link, payload, link = self.prev, (x.grad if self.prev else None), self.next
            with self.comms.batch():
                if send_link is not None:
                    sent_at = self.clock.stamp()
                    send_link.send(payload, tag)
                post(index + 1)
            compute = self.clock.now() - t0 - waited
            self.metrics.action(step, mb, kind, compute, waited, posted_at, received, sent_at, link)
        return loss_sum

    # -- checkpoints ------------------------------------------------------------------
    def _save(self, step: int) -> None:
        """Write checkpoint `step`; each phase ends in a fleet-wide count of ranks whose part failed
        for want of space (it doubles as the barrier), so every rank stops alike and `latest` keeps
        naming the previous checkpoint."""
        root = self.train.checkpoint.dir
        self._refuse_non_finite_state(step)
        self._agree_written(root, step, self._only_rank0(ckpt.prepare, root, step))
        with self._scope():       # TP gathers run on device memory
            model = full_state_dict(self.model, accelerator=self.accel)
        moments = {}
        for kind, store in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
            for name, tensor in store.items():
                hf = self.model.hf_name(name)
                dim = layout.split_dim(hf)
                with self._scope():
                    whole = tensor if dim is None else self.model.tp.all_gather(tensor, dim)
                moments[f"{kind}.{hf}"] = self._host_copy(whole)
        writer = self.place.tp_rank == 0 and self.place.dp_rank == 0 and self.place.stage.pipeline == 0
        failed = None
        if writer:
            failed = _out_of_space(ckpt.write_stage_files, root, step, self.place.stage.index, model, moments)
        self._agree_written(root, step, failed)
        extra = {"data_position": {"next_step": step}, "optimizer_steps": self.optimizer.steps}
        failed = self._only_rank0(ckpt.commit, root, step, self.model_config, extra)
        self._agree_written(root, step, failed)
        self._log_once(f"checkpoint {ckpt.step_dir(root, step)}")

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of a device tensor, through the accelerator's copy API (never the live tensor)."""
        host = to_host(self.accel, tensor)
        return host.clone() if host.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() else host

    def _only_rank0(self, write, *args) -> int | None:
        """Rank 0 runs `write`; the errno of a full disk or quota it hit, else None."""
        return _out_of_space(write, *args) if self.place.rank == 0 else None

    def _agree_written(self, root: str, step: int, failed: int | None) -> None:
        """Every rank: raise JobFatalError if any rank ran out of space writing checkpoint `step`."""
        no_space, quota = self._fleet_count([failed == errno.ENOSPC, failed == errno.EDQUOT])
        if not (no_space or quota):
            return
        if self.place.rank == 0:
            ckpt.discard(root, step)
        what = "no space left on device" if no_space else "disk quota exceeded"
        kept = ckpt.pointed_step(root)
        previous = f"latest is still step {kept}" if kept else "no earlier checkpoint"
        raise JobFatalError(f"{root}: {what} while writing checkpoint {os.path.basename(ckpt.step_dir(root, step))}"
                            f" ({previous}); free space there and restart")

    def _refuse_non_finite_state(self, step: int) -> None:
        """Raise JobFatalError on every rank if any rank's weights or moments hold nan or inf."""
        stores = (("", self.params), ("exp_avg.", self.optimizer.exp_avg),
                  ("exp_avg_sq.", self.optimizer.exp_avg_sq))
        bad = next((prefix + self.model.hf_name(name) for prefix, store in stores for name, t in store.items()
                    if not bool(torch.isfinite(t.detach()).all())), None)
        if self._any_rank(bad is not None):
            where = f" ({bad} on rank {self.place.rank})" if bad else ""
            raise JobFatalError(f"step {step}: weights are not finite{where}; stopping before checkpointing")


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
