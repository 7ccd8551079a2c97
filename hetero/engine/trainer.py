"""One worker's training loop: its stage of the model, 1F1B, reductions, AdamW,
metrics and checkpoints. Every rank of the job runs this with its own Place.

Every decision that could split the fleet (which checkpoint to resume from, a
non-finite loss, a failed checkpoint write) is taken from fleet-wide sums, so
all ranks take it alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from hetero.engine import checkpoint as ckpt
from hetero.engine.data import SampleSource
from hetero.engine.optimizer import AdamW
from hetero.engine.schedule import one_f_one_b
from hetero.engine.transport import StageLink, device_scope, to_device, to_host
from hetero.errors import JobFatalError, UserError
from hetero.model import LlamaStage, TensorParallel
from hetero.model import layout
from hetero.model.state import full_state_dict, load_full_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_BUCKET_ENV = "HETERO_GRAD_BUCKET_MB"
DEFAULT_GRAD_BUCKET_MB = 25.0        # fp32 elements of one hetero-DP bucket: MB = 1e6 bytes
FORWARD, BACKWARD = 0, 1
TIED_TAG = 1 << 20          # above every micro-batch tag


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
        self.dilation = float(getattr(accelerator, "time_dilation", 1.0))
        stage = place.stage
        tp = TensorParallel(stage.tp, place.tp_rank, comms.tp_group)
        with self._scope():
            self.model = LlamaStage(model_config, tuple(stage.layers), first=place.is_first, last=place.is_last,
                                    tp=tp, dtype=self.dtype, device=comms.device, seed=train_config.seed)
        self.params = dict(self.model.named_parameters())
        self.optimizer = AdamW(self.params, train_config.lr, train_config.weight_decay)
        self._buckets = None      # hetero-DP gradient buckets, made on first use
        self._track_memory()
        topology = comms.topology
        self.prev = self._link(topology.neighbour(place, -1))
        self.next = self._link(topology.neighbour(place, +1))
        partners = topology.tied_partners(place) if model_config.tie_embeddings else None
        self.tied_link = self._link(partners)
        self.data = SampleSource(train_config.data, model_config.vocab, model_config.seq_len,
                                 train_config.seed, train_config.global_batch)
        self.schedule = one_f_one_b(place.position, len(place.pipeline_stages), place.num_micro_batches)
        self.start_step = self._resume()
        self.timing = _open_jsonl(run_dir, f"metrics/rank{place.rank:05d}.jsonl")
        self.steps_log = _open_jsonl(run_dir, "metrics/steps.jsonl") if place.rank == 0 else None

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
            started = self._clock()
            loss_sum = self._step_compute(step)
            self._reduce_gradients()
            reduce_started = self._clock()
            self._reduce_across_pipelines()
            cross_island_s = self._clock() - reduce_started
            sq_norm = self._local_grad_sq_norm()
            totals = self.comms.fleet_sum(torch.tensor([loss_sum, sq_norm], dtype=torch.float64))
            loss, grad_norm = float(totals[0]) / tokens_per_step, math.sqrt(float(totals[1]))
            finite = self._check_finite(step, loss, grad_norm)
            if finite:
                with self._scope():
                    self._clip(grad_norm)
                    self.optimizer.step(self._lr(step))
            self.optimizer.zero_grad()
            self.accel.synchronize()
            step_s = self._clock() - started
            if self.steps_log and finite:
                record = {"step": step + 1, "loss": loss, "tokens_per_s": tokens_per_step / step_s,
                          "step_s": step_s, "grad_norm": grad_norm, "time": self._stamp(),
                          "cross_island_reduce_s": cross_island_s}
                if self.dilation != 1.0:
                    record["time_dilation"] = self.dilation
                self.steps_log.write(json.dumps(record) + "\n")
                self.steps_log.flush()
            every = self.train.checkpoint.every if self.train.checkpoint else 0
            if every and ((step + 1) % every == 0 or step + 1 == self.steps):
                self._save(step + 1)
        self.comms.flush()

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
                posted[index] = link.post(hidden_shape, self.dtype, 2 * mb + (FORWARD if kind == "F" else BACKWARD))

        for index, (kind, mb) in enumerate(self.schedule):
            tag = 2 * mb + (FORWARD if kind == "F" else BACKWARD)
            t0, posted_at = self._clock(), self._stamp()
            sent_at = None
            post(index)
            if kind == "F":
                first_sample = place.first_sample + mb * mb_size
                if place.is_first:
                    tokens, labels = self.data.batch(step, first_sample, mb_size)
                    x = to_device(self.accel, tokens, self.comms.device)
                else:
                    x = posted.pop(index).wait().requires_grad_()
                waited, received = self._clock() - t0, self._stamp()
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
                waited, received = self._clock() - t0, self._stamp()
                x, out = inputs.pop(mb), outputs.pop(mb)
                with self._scope():
                    out.backward(grad)
                self.accel.synchronize()
                send_link, payload, link = self.prev, (x.grad if self.prev else None), self.next
            with self.comms.batch():
                if send_link is not None:
                    sent_at = self._stamp()
                    send_link.send(payload, tag)
                post(index + 1)
            compute = self._clock() - t0 - waited
            self._time(step, mb, kind, compute, waited, posted_at, received, sent_at, link)
        return loss_sum

    def _clock(self) -> float:
        """Monotonic seconds of chip time, for durations."""
        return time.perf_counter() / self.dilation

    def _stamp(self) -> float:
        """Epoch seconds of chip time, for stamps that ranks compare with each other."""
        return time.time() / self.dilation

    def _time(self, step, mb, kind, compute, waited, posted, received, sent_at, link) -> None:
        """One line per micro-batch action; the stamps (chip time, alike on every rank) let a reader
        pair a send with its receive."""
        if self.timing:
            self.timing.write(json.dumps({
                "step": step + 1, "mb": mb, "phase": "forward" if kind == "F" else "backward",
                "compute_s": compute, "p2p_wait_s": waited, "posted_at": posted, "received_at": received,
                "sent_at": sent_at, "recv_link": link.kind if link else None}) + "\n")

    # -- gradients ------------------------------------------------------------------
    def _reduce_gradients(self) -> None:
        """Sum gradients over the stage's DP group and between tied embedding copies
        (island collectives on device memory)."""
        self.comms.flush()
        if self.place.stage.dp > 1:
            with self._scope():
                for param in self.params.values():
                    dist.all_reduce(param.grad, group=self.comms.dp_group)
        if self.tied_link is not None:
            # The two copies may differ in TP: swap full gradients (resharded like
            # activations), then add the other copy's share of ours.
            name = "model.embed_tokens.weight" if self.place.is_first else "lm_head.weight"
            grad = self.params[name].grad
            with self._scope():
                full = self.model.tp.all_gather(grad, 0)
            other = self.tied_link.exchange(full, TIED_TAG)
            self.comms.flush()
            with self._scope():
                grad.add_(self.model.tp.shard(other, 0))

    def _fitting_bucket_elements(self) -> int:
        return fitting_bucket_elements(grad_bucket_elements(), self.accel.free_memory(), self.comms.fleet_sum)

    def _reduce_across_pipelines(self) -> None:
        """hetero-DP: sum gradients over the pipelines (one whole replica per island).

        Replicas may split layers and TP differently, so the sum runs over the
        full-model layout, streamed in fixed-size buckets (GradBuckets): each rank
        writes its own TP shard of the gradients of pipeline-unique values at their
        full-model positions (zeros elsewhere) into a device bucket, and the
        island-aware all-reduce (Comms.replica_sum) adds the bucket up fleet-wide.
        No full-model vector is ever built.
        """
        if len(self.comms.topology.plan.pipelines) == 1:
            return
        if self._buckets is None:
            self._buckets = GradBuckets(self.model_config, self._fitting_bucket_elements())
        shards = {}
        for name, param in self.params.items():
            hf = self.model.hf_name(name)
            dim = layout.split_dim(hf)
            part = None
            if dim is not None and self.model.tp.size > 1:
                part = (dim, *self.model.tp.part(layout.full_shape(self.model_config, hf)[dim], hf))
            shards.setdefault(hf, []).append(GradShard(param.grad, part, self._counts_once(name)))
        self._buckets.all_reduce(shards, self.comms.replica_sum, self.comms.device, self._scope)

    def _counts_once(self, name: str) -> bool:
        """Whether this rank's copy of `name` is the one that counts in a fleet-wide sum:
        one DP replica, one TP rank for replicated values, the first stage for tied embeddings."""
        if self.place.dp_rank != 0:
            return False
        if name == "lm_head.weight" and self.model.tied_lm_head:
            return False
        return layout.split_dim(self.model.hf_name(name)) is not None or self.place.tp_rank == 0

    def _local_grad_sq_norm(self) -> float:
        """This rank's share of the global squared gradient norm, counting each value once."""
        if self.place.dp_rank != 0 or self.place.stage.pipeline != 0:
            return 0.0
        return sum(float(p.grad.double().pow(2).sum()) for n, p in self.params.items() if self._counts_once(n))

    def _clip(self, grad_norm: float) -> None:
        limit = self.train.grad_clip
        if limit and grad_norm > limit:
            scale = limit / (grad_norm + 1e-6)
            for param in self.params.values():
                param.grad.mul_(scale)

    # -- checkpoints ------------------------------------------------------------------
    def _save(self, step: int) -> None:
        """Write checkpoint `step`; each phase ends in a fleet-wide count of ranks whose part failed
        for want of space (it doubles as the barrier), so every rank stops alike and `latest` keeps
        naming the previous checkpoint."""
        root = self.train.checkpoint.dir
        self._refuse_non_finite_state(step)
        self._agree_written(root, step, self._only_rank0(ckpt.prepare, root, step))
        with self._scope():       # TP gathers run on device memory
            model = full_state_dict(self.model)
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


def fitting_bucket_elements(wanted: int, free_bytes: int, fleet_sum) -> int:
    """The bucket size every rank uses: `wanted` fp32 elements, halved until the bucket takes at
    most half of the device memory free on the tightest rank (a 25 MB bucket is nothing on an
    80 GB chip and too much on a small one). Every rank must cut the same buckets, so the ranks
    agree through `fleet_sum` (a sum of one-hot votes over the halvings: the smallest wins)."""
    ladder = [max(1, wanted >> k) for k in range(24)]
    fits = next((k for k, n in enumerate(ladder) if 4 * n <= free_bytes // 2), len(ladder) - 1)
    votes = fleet_sum(torch.tensor([float(k == fits) for k in range(len(ladder))], dtype=torch.float64))
    return ladder[max(k for k, count in enumerate(votes.tolist()) if count > 0)]


def grad_bucket_elements(environ=None) -> int:
    """fp32 elements per hetero-DP gradient bucket, from HETERO_GRAD_BUCKET_MB (default 25)."""
    raw = (os.environ if environ is None else environ).get(GRAD_BUCKET_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_GRAD_BUCKET_MB
    except ValueError:
        mb = float("nan")
    if not math.isfinite(mb) or mb <= 0:
        raise UserError(f"{GRAD_BUCKET_ENV}={raw!r}: the gradient bucket size must be a positive number of MB")
    return max(1, int(mb * 1e6) // 4)


class GradShard(NamedTuple):
    """One rank's gradient of a parameter: `part` = (split dim, start, stop) of its TP shard, or None
    for the whole tensor; `counts` = whether this copy counts in a fleet-wide sum."""
    grad: torch.Tensor
    part: tuple[int, int, int] | None
    counts: bool


class BucketPiece(NamedTuple):
    """Rows [start, stop) of parameter `hf` (seen as rows x cols), at `offset` in its bucket."""
    hf: str
    start: int
    stop: int
    cols: int
    offset: int


class GradBuckets:
    """The full model's gradient layout (HF names, in order), cut into buckets of whole rows.

    A bucket holds at most `capacity` elements (at least one row, so a row wider than the
    capacity makes a bucket of one row). Every rank of the job cuts the same buckets from
    the model config, so they sum bucket by bucket, in the same order, without a full-model
    vector anywhere.
    """

    def __init__(self, config, capacity: int):
        self.buckets: list[list[BucketPiece]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        current: list[BucketPiece] = []
        used = 0
        for hf in layout.model_names(config):
            shape = tuple(layout.full_shape(config, hf))
            self.shapes[hf] = shape
            rows, cols = _rows_cols(shape)
            row = 0
            while row < rows:
                if used and used + cols > capacity:
                    self.buckets.append(current)
                    current, used = [], 0
                take = min(rows - row, max(1, (capacity - used) // cols))
                current.append(BucketPiece(hf, row, row + take, cols, used))
                used += take * cols
                row += take
        if current:
            self.buckets.append(current)
        self.widest = max(sum((p.stop - p.start) * p.cols for p in b) for b in self.buckets)

    def all_reduce(self, shards: dict, sum_bucket, device, scope=contextlib.nullcontext) -> None:
        """Sum every rank's `shards` (HF name -> [GradShard]: a tied LM head is a second copy of the
        embedding) over the fleet, in place, bucket by bucket.

        `sum_bucket(buffer, index)` sums one 1-D fp32 device tensor fleet-wide, in place (outside
        `scope`, the device scope the buffer is made and filled in: its bridge hop is host work)."""
        with scope():
            buffer = torch.empty(self.widest, dtype=torch.float32, device=device)
        for index, pieces in enumerate(self.buckets):
            length = pieces[-1].offset + (pieces[-1].stop - pieces[-1].start) * pieces[-1].cols
            bucket = buffer[:length]
            with scope():
                bucket.zero_()
                for piece in pieces:
                    for shard in shards.get(piece.hf, ()):
                        pair = self._pair(bucket, piece, shard) if shard.counts else None
                        if pair:
                            pair[0].copy_(pair[1])
            sum_bucket(bucket, index)
            with scope():
                for piece in pieces:
                    for shard in shards.get(piece.hf, ()):
                        pair = self._pair(bucket, piece, shard)
                        if pair:
                            pair[1].copy_(pair[0])

    def _pair(self, bucket: torch.Tensor, piece: BucketPiece, shard: GradShard):
        """(bucket region, gradient region) of `piece` that this shard holds, or None."""
        rows, cols = piece.stop - piece.start, piece.cols
        region = bucket[piece.offset:piece.offset + rows * cols].view(rows, cols)
        shape = self.shapes[piece.hf]
        if shard.part is None:
            return region, shard.grad.view(_rows_cols(shape))[piece.start:piece.stop]
        dim, start, stop = shard.part
        if dim == 0:
            lo, hi = max(piece.start, start), min(piece.stop, stop)
            if lo >= hi:
                return None
            grad = shard.grad.view(stop - start, cols)
            return region[lo - piece.start:hi - piece.start], grad[lo - start:hi - start]
        if dim != 1 or len(shape) != 2:
            raise ValueError(f"{piece.hf}: cannot bucket a shard split along dim {dim} of {shape}")
        return region[:, start:stop], shard.grad[piece.start:piece.stop]


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter seen as rows x cols: its first dim by the rest (a vector is a column)."""
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


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


def _open_jsonl(run_dir: str | None, relative: str):
    if not run_dir:
        return None
    path = os.path.join(run_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "a", encoding="utf-8")
