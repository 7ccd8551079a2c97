"""Cost model: FLOPs, bytes, memory and communication time of a Llama-style decoder.

Everything is per chip and per micro-batch unless a name says otherwise. The prices of
operations live here, in one module of ~700 lines on purpose: every formula below shares this
docstring's notation and derivations (counts, memory phases, op times and links all use b, s, h,
t, e and N as defined here, and the memory phases follow the engine's allocations step by step),
and the CostModel that memoises them is what the search modules ask (partitioner/evaluate.py).
Composing stage times along a schedule (1F1B, interleaved, and the DP reduction's overlap with
the backward) is partitioner/schedule_time.py, re-exported here.
Notation: b micro-batch, s sequence, h hidden, a heads, f ffn_hidden, V vocab,
t TP degree, e bytes per element of the training dtype, N = b*s tokens.

Compute (forward, one layer, whole layer before TP sharding), Megatron's count
(Narayanan et al. 2021) generalised to GQA and SwiGLU:
    QKV 2*N*h*(h + 2*h_kv)  +  scores and A*V 4*N*s*h  +  out 2*N*h^2  +  MLP 6*N*h*f
Backward is twice the forward. Embedding on the first stage; final norm, LM head
(2*N*h*V) and loss on the last.

Analytic time of each op is a roofline, max(FLOPs / (peak * eff), bytes /
(bandwidth * bw_eff)), summed over the ops of a layer (the emulated accelerator
charges exactly this, with eff = bw_eff = 1). TP adds two all-reduces of N*h*e
bytes per forward and two per backward (ring over intra-node links).

Activation memory per layer and micro-batch kept for backward. Vendor chips (fused
kernels): Korthikanti et al. 2022, re-derived for RMSNorm, RoPE, GQA, SwiGLU and no
dropout; no sequence parallelism, so norm inputs/outputs are replicated across TP ranks:
    none      e*N*(4h + (2h + 2h_kv)/t + 4f/t) + (e+4)*b*(a/t)*s^2   (softmax output)
    selective the same without the s^2 term (attention core recomputed)
    full      e*N*h (the layer input)
The reference ops the cpu and emulated chips run (accelerators/ops/reference.py) keep,
tensor by tensor (autograd's saved tensors, measured):
    norms     2 * (4*N*h fp32 input + 4*N rsqrt + 2*e*N*h normed and scaled)
    attention e*N*4*hq/t (q, k and v expanded to the q heads, out_proj's input) + s^2 mask
              + 4*b*(a/t)*s^2 softmax + e*b*(a/t)*s^2 probabilities when e < 4
    selective e*N*(2*hq + 2*h_kv)/t (q, k, v, out_proj's input) in place of the attention's
    MLP       4*e*N*f/t (gate, silu, up, their product)
Backward of a layer adds a transient 2*e*N*f/t (the MLP's input gradients); under full
recompute, one layer's activations are rebuilt on top of that.
Under 1F1B stage i of p holds min(p - i, m) micro-batches in flight (interleaved, v chunks per
stage: partitioner.interleave.peak_in_flight chunks, each 1/v of the stage); parameter gradients
accumulate from the first backward on, so a stage whose in-flight count is all m
micro-batches (m <= p - i) never holds its gradients and all m at once.

Weights, gradients and optimizer (AdamW) bytes per parameter at their peak, as the
engine lays them out (hetero/engine/optimizer.py, gradients.py, zero.py); D is the
DP degree under ZeRO-1, else 1:
    fp32      4 weight + 4 grad + 8 moments (per parameter, updated in place)
    fp32 ZeRO 4 weight + 4 flat grad (made before forward) + 8/D moments; the update
              reads a 4/D shard of the weights and all-gathers the full 4 into a new vector
    bf16/fp16 e weight + e grad in backward, then a 4-byte flat fp32 copy (both at
              collection) + 4/D master + 8/D moments; the update casts a shard to e and,
              under ZeRO-1, all-gathers the full e
The reference AdamW (chips without a fused AdamW: ChipModel.fused_adamw) makes two 4-byte
temporaries per element it updates (the per-parameter layout: one tensor at a time; the flat layout: the shard).
The stage's peak is the largest of these phases: compute (1F1B), gradient collection
and reduction, update.

Host costs (`hetero profile` measures them per chip; partitioner/profile.py HostCost;
0 s without a profile that has them): every stage pays its chip's launch and
synchronize per micro-batch whatever its layers, a stage next to a bridge pays its
chip's hand-off per micro-batch and bridge boundary, and every stage's tail pays the
optimizer step's fixed part once per step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partitioner.inputs import DTYPE_BYTES, RECOMPUTE_MODES, ChipModel, FleetSpec, IslandSpec, ModelSpec, TrainSpec
from partitioner.schedule_time import (  # noqa: F401  # pylint: disable=unused-import  # re-exported
    BACKWARD_SHARE, exposed_reduce_s, interleaved_cycle_fill, pipeline_step_s)

GRAD_REDUCE_BYTES = 4          # gradients are reduced in fp32 (main grads)
SOFTMAX_PASSES = 8             # elementwise passes over the b*a*s^2 scores (scale, mask, softmax, cast)


# ----------------------------------------------------------------------------- counts

def layer_params(m: ModelSpec) -> int:
    h = m.hidden
    return h * (h + 2 * m.kv_hidden) + h * h + 3 * h * m.ffn_hidden + 2 * h


def embedding_params(m: ModelSpec) -> int:
    return m.vocab * m.hidden


def head_params(m: ModelSpec) -> int:
    return m.vocab * m.hidden + m.hidden


def total_params(m: ModelSpec) -> int:
    return m.layers * layer_params(m) + embedding_params(m) + (m.hidden if m.tie_embeddings else head_params(m))


def layer_forward_flops(m: ModelSpec, b: int) -> float:
    """Forward FLOPs of one layer for b samples (all TP shards together)."""
    n = b * m.seq_len
    h = m.hidden
    return (2 * n * h * (h + 2 * m.kv_hidden) + 4 * n * m.seq_len * h
            + 2 * n * h * h + 6 * n * h * m.ffn_hidden)


def attention_forward_flops(m: ModelSpec, b: int) -> float:
    """Forward FLOPs of one layer's attention half (q/k/v/o projections and the attention core) for
    b samples: the part of `layer_forward_flops` a stage holding only that half runs."""
    n = b * m.seq_len
    h = m.hidden
    return 2 * n * h * (h + 2 * m.kv_hidden) + 4 * n * m.seq_len * h + 2 * n * h * h


def attention_share(m: ModelSpec) -> float:
    """The attention half's share of a layer's forward FLOPs (the MLP half holds the rest)."""
    return attention_forward_flops(m, 1) / layer_forward_flops(m, 1)


def blocks_layers(m: ModelSpec, start: int, end: int) -> float:
    """Half-layer blocks [start, end) (block 2k: layer k's attention half, 2k+1: its MLP half) in
    layers of compute: whole layers count 1, a lone attention half `attention_share`, a lone MLP
    half the rest."""
    share = attention_share(m)
    whole, rest = divmod(end - start, 2)
    if not rest:
        return float(whole)
    return whole + (share if start % 2 == 0 else 1.0 - share)


def head_forward_flops(m: ModelSpec, b: int) -> float:
    return 2.0 * b * m.seq_len * m.hidden * m.vocab


def model_flops_per_sample(m: ModelSpec) -> float:
    """Model FLOPs of one sample, forward and backward, no recompute (for MFU)."""
    return 3.0 * (m.layers * layer_forward_flops(m, 1) + head_forward_flops(m, 1))


def optimizer_bytes_per_param(dtype: str, fused: bool = True) -> float:
    """Bytes the AdamW update moves per parameter: fused, one pass (read p, g, m, v; write p, m,
    v); else the reference's eight elementwise passes (accelerators/ops/reference.py: 92 bytes).
    bf16/fp16 add the cast of the updated fp32 master to the compute dtype."""
    return (28.0 if fused else 92.0) + (0.0 if DTYPE_BYTES.get(dtype, 4) >= 4 else 10.0)


REFERENCE_ADAMW_TEMPS = 8      # bytes per updated element: the reference AdamW's two fp32 temporaries


def optimizer_phases(params, e: int, shard: int, per_mb, work, inflight: float, steady: bool, largest: float,
                     adamw_temps: float, staged_gather: bool = False):
    """Peak bytes of one chip over a step's phases, as the engine allocates (module docstring).

    params: parameters on the chip; e: bytes of the compute dtype; shard: the ZeRO-1 DP degree
    (1: none); per_mb: activations one in-flight micro-batch keeps; work: backward's transient;
    steady: gradients coexist with every in-flight micro-batch (1F1B has m > in-flight);
    largest: the largest parameter tensor (elements); adamw_temps: bytes per updated element
    the optimizer's kernel allocates for a moment; staged_gather: ZeRO-1's collectives stage a
    full vector once more inside the backend (gloo, under the cpu and emulated chips' backends:
    the reduce-scatter a copy of its fp32 input, the all-gather one of its output; NCCL and
    HCCL work in place). Works on numpy arrays of params."""
    gather = 2 if staged_gather else 1
    staged_reduce = 4 * params if staged_gather else 0.0
    acts = inflight * per_mb

    def compute(resident, grads):
        if steady:
            return resident + grads + acts + work
        return resident + np.maximum(acts, grads + (inflight - 1) * per_mb) + work

    sh = params / shard
    if e >= 4 and shard == 1:                  # per parameter: the weights are the master copy
        resident = 12 * params
        return np.maximum(compute(resident, 4 * params), 16 * params + adamw_temps * largest)
    if e >= 4:                                 # fp32 ZeRO-1: the flat gradient vector exists from the start
        resident = 8 * params + 8 * sh
        return _peak([resident + acts + work, resident + 4 * sh + staged_reduce,
                      resident + 4 * sh + np.maximum(adamw_temps * sh, gather * 4 * params)])
    resident = e * params + 12 * sh            # low precision: fp32 master and moments, flat
    gathered = e * sh + (gather * e * params if shard > 1 else 0.0)
    return _peak([compute(resident, e * params), resident + e * params + 4 * params,
                  resident + 4 * params + (4 * sh + staged_reduce if shard > 1 else 0.0),
                  resident + 4 * params + np.maximum(adamw_temps * sh, gathered)])


def _peak(phases: list):
    """The largest phase, element-wise; phases may broadcast (a column of in-flight counts
    against a row of layer counts)."""
    return functools.reduce(np.maximum, phases)


def activation_bytes(m: ModelSpec, t: int, b: int, dtype: str, mode: str, fused: bool = True) -> float:
    """Bytes one layer keeps for backward, one micro-batch, one TP rank (`fused`: vendor kernels;
    else the reference ops of the cpu and emulated chips)."""
    if not fused:
        return reference_activation_bytes(m, t, b, dtype, mode)
    e = DTYPE_BYTES.get(dtype, 4)
    n = b * m.seq_len
    h = m.hidden
    if mode == "full":
        return float(e * n * h)
    keep = e * n * (4 * h + (2 * h + 2 * m.kv_hidden) / t + 4 * m.ffn_hidden / t)
    if mode == "selective":
        return float(keep)
    return float(keep + (e + 4) * b * (m.heads / t) * m.seq_len * m.seq_len)


def reference_activation_bytes(m: ModelSpec, t: int, b: int, dtype: str, mode: str) -> float:
    """What autograd keeps of one layer run on the reference ops (see the module docstring)."""
    e = DTYPE_BYTES.get(dtype, 4)
    n = b * m.seq_len
    h, s = m.hidden, m.seq_len
    if mode == "full":
        return float(e * n * h)
    norms = 2 * (4 * n * h + 4 * n + 2 * e * n * h)
    mlp = 4 * e * n * m.ffn_hidden / t
    if mode == "selective":
        return float(norms + mlp + e * n * (2 * h + 2 * m.kv_hidden) / t)
    scores = b * (m.heads / t) * s * s
    core = 4 * e * n * h / t + s * s + 4 * scores + (e * scores if e < 4 else 0)
    return float(norms + mlp + core)


def backward_work_bytes(m: ModelSpec, t: int, b: int, dtype: str, mode: str, fused: bool = True) -> float:
    """Transient bytes while one layer runs backward, one micro-batch: the MLP's input gradients
    and, under full recompute, the layer's activations rebuilt (less its input, already kept)."""
    e = DTYPE_BYTES.get(dtype, 4)
    work = 2.0 * e * b * m.seq_len * m.ffn_hidden / t
    if mode == "full":
        work += activation_bytes(m, t, b, dtype, "none", fused) - activation_bytes(m, t, b, dtype, "full", fused)
    return work


def loss_bytes(m: ModelSpec, t: int, b: int, dtype: str) -> float:
    """The last stage's final norm, logits and cross-entropy, one micro-batch: the logits in the
    compute dtype and their fp32 softmax kept for backward, and the fp32 transients of the loss
    (one vector of logits' size in fp32, two when the logits are cast up from a lower precision)."""
    e = DTYPE_BYTES.get(dtype, 4)
    n = b * m.seq_len
    logits = n * m.vocab / t
    norm = 4 * n * m.hidden + 4 * n + 2 * e * n * m.hidden
    return float(norm + e * logits + 4 * logits + (4 if e >= 4 else 8) * logits)


def ring_allreduce_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


# ----------------------------------------------------------------------------- analytic times

def _roofline(chip: ChipModel, dtype: str, flops: float, nbytes: float) -> float:
    return max(flops / (chip.flops(dtype) * chip.mm_eff), nbytes / (chip.memory_bandwidth * chip.bw_eff))


def layer_ops(m: ModelSpec, t: int, b: int, dtype: str, fused: bool = False) -> list[tuple[str, float, float, bool]]:
    """(name, FLOPs, bytes, attention_core) of each forward op of one layer on one TP shard.

    `fused`: vendor chips run fused RMSNorm, rotary, scale-mask-softmax and SwiGLU
    kernels (one read and one write per tensor); the reference ops that the cpu and
    emulated accelerators run make several elementwise passes instead."""
    e = DTYPE_BYTES.get(dtype, 4)
    s = m.seq_len
    n = b * s
    h = m.hidden
    hq = h / t
    hkv = m.kv_hidden / t
    f = m.ffn_hidden / t
    sq = b * (m.heads / t) * s * s
    norm_passes, rope_passes, softmax_passes, swiglu_passes = (2, 2, 2, 3) if fused else (8, 6, SOFTMAX_PASSES, 5)
    return [
        ("rms_norm", 0.0, norm_passes * n * h * e, False),
        ("qkv", 2 * n * h * (hq + 2 * hkv), e * (n * h + h * (hq + 2 * hkv) + n * (hq + 2 * hkv)), False),
        ("rotary", 0.0, rope_passes * n * (hq + hkv) * e, False),
        ("scores", 2 * n * s * hq, e * (2 * n * hq + sq), True),
        ("softmax", 0.0, softmax_passes * sq * e, True),
        ("attn_v", 2 * n * s * hq, e * (sq + 2 * n * hq), True),
        ("out_proj", 2 * n * hq * h, e * (n * hq + hq * h + n * h), False),
        ("residual", 0.0, 3 * n * h * e, False),
        ("rms_norm", 0.0, norm_passes * n * h * e, False),
        ("gate_up", 4 * n * h * f, e * (n * h + 2 * h * f + 2 * n * f), False),
        ("swiglu", 0.0, swiglu_passes * n * f * e, False),
        ("down", 2 * n * f * h, e * (n * f + f * h + n * h), False),
        ("residual", 0.0, 3 * n * h * e, False),
    ]


@dataclass(frozen=True)
class LayerCost:
    """One layer on one chip (one TP shard), one micro-batch; TP communication excluded."""

    forward_s: float
    backward_s: float
    attention_core_s: float      # forward time of the attention core (recomputed under selective)
    source: str = "estimated"    # measured | calibrated | estimated


def analytic_layer(chip: ChipModel, m: ModelSpec, t: int, b: int, dtype: str) -> LayerCost:
    fwd = 0.0
    core = 0.0
    for _name, flops, nbytes, is_core in layer_ops(m, t, b, dtype, chip.fused):
        cost = _roofline(chip, dtype, flops, nbytes)
        fwd += cost
        if is_core:
            core += cost
    return LayerCost(forward_s=fwd, backward_s=2.0 * fwd, attention_core_s=core)


def analytic_first_extra(chip: ChipModel, m: ModelSpec, t: int, b: int, dtype: str) -> float:
    """Embedding forward + backward on the first stage."""
    e = DTYPE_BYTES.get(dtype, 4)
    n = b * m.seq_len
    fwd = _roofline(chip, dtype, 0.0, 2 * n * m.hidden * e)
    bwd = _roofline(chip, dtype, 0.0, 2 * m.vocab * m.hidden / t * e + n * m.hidden * e)
    return fwd + bwd


def analytic_last_extra(chip: ChipModel, m: ModelSpec, t: int, b: int, dtype: str) -> float:
    """Final norm, LM head and cross-entropy forward + backward on the last stage."""
    e = DTYPE_BYTES.get(dtype, 4)
    n = b * m.seq_len
    h = m.hidden
    v = m.vocab / t
    norm = _roofline(chip, dtype, 0.0, (2 if chip.fused else 8) * n * h * e)
    head = _roofline(chip, dtype, 2 * n * h * v, e * (n * h + h * v + n * v))
    loss = _roofline(chip, dtype, 0.0, (2 if chip.fused else 6) * n * v * 4)
    return 3.0 * (norm + head + loss)


# ----------------------------------------------------------------------------- the model

class CostModel:
    """Costs for one (fleet, model, train, profile); memoised, so the search can ask freely."""

    def __init__(self, fleet: FleetSpec, model: ModelSpec, train: TrainSpec, profile=None):
        self.fleet = fleet
        self.model = model
        self.train = train
        self.profile = profile
        self.dtype = train.dtype
        self.e = DTYPE_BYTES.get(train.dtype, 4)
        self.layer_params = layer_params(model)
        if profile is not None and profile.bridge is not None:
            self.bridge_bandwidth, self.bridge_latency = profile.bridge
            self.bridge_source = "measured"
        else:
            self.bridge_bandwidth, self.bridge_latency = fleet.bridge_bandwidth, fleet.bridge_latency
            self.bridge_source = "config"
        self._islands = {i.name: i for i in fleet.islands}
        self._cache: dict = {}

    # -- layer times ---------------------------------------------------------

    def layer_cost(self, island: str, t: int, b: int) -> LayerCost:
        key = ("layer", island, t, b)
        hit = self._cache.get(key)
        if hit is None:
            chip = self._islands[island].chip
            hit = analytic_layer(chip, self.model, t, b, self.dtype)
            if self.profile is not None:
                hit = self.profile.layer_cost(chip.name, self.model, t, b, self.dtype, hit, chip)
            self._cache[key] = hit
        return hit

    def tp_allreduce_s(self, island: str, t: int, b: int) -> float:
        if t <= 1:
            return 0.0
        chip = self._islands[island].chip
        nbytes = b * self.model.seq_len * self.model.hidden * self.e
        return ring_allreduce_s(nbytes, t, chip.intra_node_bandwidth, self.fleet.intra_node_latency)

    def per_layer_s(self, island: str, t: int, b: int, mode: str) -> float:
        """Forward + backward (+ recompute) of one layer, one micro-batch, TP comm included."""
        lc = self.layer_cost(island, t, b)
        ar = self.tp_allreduce_s(island, t, b)
        if mode == "none":
            return lc.forward_s + lc.backward_s + 4 * ar
        if mode == "selective":
            return lc.forward_s + lc.backward_s + lc.attention_core_s + 4 * ar
        return 2 * lc.forward_s + lc.backward_s + 6 * ar

    def host_cost(self, island: str):
        """The island's chip's measured fixed host costs (all 0 without a profile that has them)."""
        if self.profile is None:
            hit = self._cache.get("no host cost")
            if hit is None:       # imported here: partitioner.profile imports this module
                from partitioner.profile import NO_HOST_COST

                hit = self._cache["no host cost"] = NO_HOST_COST
            return hit
        return self.profile.host_cost(self._islands[island].chip.name)

    def stage_host_s(self, island: str) -> float:
        """Host seconds every stage on this island pays per micro-batch, whatever its layers."""
        return self.host_cost(island).micro_batch_s

    def handoff_s(self, island: str) -> float:
        """Host seconds a stage on this island pays per micro-batch for each bridge boundary it has."""
        return self.host_cost(island).handoff_s

    def first_extra_s(self, island: str, t: int, b: int) -> float:
        return analytic_first_extra(self._islands[island].chip, self.model, t, b, self.dtype)

    def last_extra_s(self, island: str, t: int, b: int) -> float:
        return analytic_last_extra(self._islands[island].chip, self.model, t, b, self.dtype)

    # -- memory --------------------------------------------------------------

    def capacity(self, island: str) -> float:
        """Bytes a plan may use on one chip: memory less the vendor reserve, less the headroom."""
        return self._islands[island].chip.usable_bytes * (1.0 - self.train.memory_headroom)

    def zero1(self, dp: int) -> bool:
        return dp > 1 if self.train.zero1 is None else (self.train.zero1 and dp > 1)

    def first_static_params(self, t: int) -> float:
        return embedding_params(self.model) / t

    def last_static_params(self, t: int) -> float:
        if self.model.tie_embeddings:
            return (embedding_params(self.model)) / t + self.model.hidden
        return head_params(self.model) / t

    def stage_params(self, t: int, n_layers, *, first: bool, last: bool):
        """Parameters on one chip of a stage: its layers' share under TP t, plus the embedding on
        the first stage and the LM head (or the tied embedding's norm) on the last. The one place
        stage parameter counts come from; `n_layers` may be a numpy array."""
        params = n_layers * self.layer_params / t
        if first:
            params = params + self.first_static_params(t)
        if last:
            params = params + self.last_static_params(t)
        return params

    def last_transient_bytes(self, t: int, b: int) -> float:
        """The last stage's norm, logits and loss, one micro-batch (`loss_bytes`)."""
        return loss_bytes(self.model, t, b, self.dtype)

    def _fused(self, island: str | None) -> bool:
        return True if island is None else self._islands[island].chip.fused

    def _fused_adamw(self, island: str | None) -> bool:
        return True if island is None else self._islands[island].chip.fused_adamw

    def stage_memory(self, t: int, b: int, dp: int, n_layers, first: bool, last: bool,
                     inflight, mode: str, island: str | None = None, micro_batches: int | None = None):
        """Bytes one chip of a stage needs at peak: the largest of its phases (see the module
        docstring). `island`: whose chip (vendor kernels or the reference ops; None: vendor);
        `micro_batches`: the pipeline's m (None: gradients and every in-flight micro-batch are
        counted together, the bound for any m). `n_layers` may be a numpy array."""
        fused = self._fused(island)
        steady = micro_batches is None or micro_batches > inflight
        peak = self._peak_bytes(t, b, dp, island, n_layers, np.asarray(first, dtype=bool),
                                np.asarray(last, dtype=bool), inflight,
                                activation_bytes(self.model, t, b, self.dtype, mode, fused),
                                backward_work_bytes(self.model, t, b, self.dtype, mode, fused), steady)
        return float(peak) if np.ndim(peak) == 0 else peak

    def stage_memory_many(self, t: int, b: int, dp: int, island: str, n_layers: Sequence, first: Sequence,
                          last: Sequence, inflight: Sequence, modes: Sequence) -> list[float]:
        """stage_memory (micro_batches None) of several stages of one island and TP in one
        vectorised pass: per stage its layers, place, in-flight count and mode."""
        m, fused = self.model, self._fused(island)
        one = len(set(modes)) == 1
        kinds = list(modes)[:1] if one else list(modes)
        act = [activation_bytes(m, t, b, self.dtype, mode, fused) for mode in kinds]
        bwd = [backward_work_bytes(m, t, b, self.dtype, mode, fused) for mode in kinds]
        n = np.array(n_layers, dtype=np.float64)
        peak = self._peak_bytes(t, b, dp, island, n, np.array(first, dtype=bool), np.array(last, dtype=bool),
                                np.array(inflight, dtype=np.float64), act[0] if one else np.array(act),
                                bwd[0] if one else np.array(bwd))
        return np.broadcast_to(peak, n.shape).tolist()

    def _peak_bytes(self, t: int, b: int, dp: int, island: str | None, n, firsts, lasts, inflight, act, work_bytes,
                    steady=True):
        """stage_memory's arithmetic, over arrays that broadcast: layers n, places (boolean firsts,
        lasts: a place's terms selected, not added as zeros), in-flight counts, a layer's activation
        and backward bytes in its mode, and whether the step reaches 1F1B's steady state."""
        m, e = self.model, self.e
        fused = self._fused(island)
        params = n * self.layer_params / t
        if firsts.any():
            params = np.where(firsts, params + self.first_static_params(t), params)
        if lasts.any():
            params = np.where(lasts, params + self.last_static_params(t), params)
        per_mb = n * act
        if firsts.any():
            per_mb = np.where(firsts, per_mb + e * b * m.seq_len * m.hidden, per_mb)
        work = np.where(n > 0, work_bytes, 0.0)
        if lasts.any():
            work = np.where(lasts, np.maximum(work, self.last_transient_bytes(t, b)), work)
        largest = max(m.hidden * m.ffn_hidden, m.hidden * m.hidden, 0) / t
        ends = firsts | lasts
        if ends.any():
            largest = np.where(ends, max(m.hidden * m.ffn_hidden, m.hidden * m.hidden, m.vocab * m.hidden) / t,
                               largest)  # type: ignore[assignment]
        return optimizer_phases(params, e, dp if self.zero1(dp) else 1, per_mb, work, inflight, steady, largest,
                                0 if self._fused_adamw(island) else REFERENCE_ADAMW_TEMPS, staged_gather=not fused)

    # -- one stage row for the layer split -------------------------------------

    def stage_row(self, island: str, t: int, b: int, dp: int, *, first: bool, last: bool,
                  inflight: float) -> tuple[np.ndarray, np.ndarray]:
        """Time of this stage holding n = 1..L layers (inf where nothing fits) and the
        recompute mode chosen for each n (index into RECOMPUTE_MODES): the fastest that fits."""
        return self._stage_entry(island, t, b, dp, first, last, inflight)[:2]

    def steady_memories(self, b: int, dp: int, stages: list) -> list[float]:
        """stage_memory of stages [(island, t, first, last, inflight, mode, n)] with gradients and
        every in-flight micro-batch together (micro_batches None): looked up in the memory rows
        stage_rows kept beside a stage's time row or among those costed here before, the others in
        one pass per island and TP (stage_memory_many). Each is its own element of the same
        arithmetic, so a stage's bytes do not depend on which stages it is costed with."""
        cache = self._cache
        out: list[float] = []
        todo: dict = {}
        for j, (name, t, first, last, k, mode, n) in enumerate(stages):
            row = cache.get(("row", name, t, b, dp, first, last, k))
            mem = row[2].get(mode) if row is not None else None
            if mem is not None and row is not None:
                out.append(float(mem[row[3], n - 1]))
                continue
            key = ("memory", name, t, b, dp, first, last, k, mode, n)
            hit = cache.get(key)
            out.append(0.0 if hit is None else hit)
            if hit is None:
                todo.setdefault((name, t), []).append((j, n, first, last, k, mode, key))
        for (name, t), rows in todo.items():
            idx, ns, firsts, lasts, ks, modes, keys = zip(*rows)
            for j, key, value in zip(idx, keys, self.stage_memory_many(t, b, dp, name, ns, firsts, lasts, ks, modes)):
                out[j] = cache[key] = value
        return out

    def stage_entries(self, b: int, dp: int, stages: list) -> list:
        """[(row, pick, memory rows by mode, the stage's index in them)] of stages [(island, t, first,
        last, inflight)] (a pipeline's, in order): stage_row's and steady_memories' numbers, those not
        cached yet costed in one pass per island and TP."""
        cache = self._cache
        out = [cache.get(("row", name, t, b, dp, first, last, k)) for name, t, first, last, k in stages]
        missing: dict = {}
        for (name, t, first, last, k), hit in zip(stages, out):
            if hit is None:
                missing.setdefault((name, t), []).append((first, last, k))
        if missing:
            for (name, t), specs in missing.items():
                self._fill_rows(name, t, b, dp, specs)
            out = [cache[("row", name, t, b, dp, first, last, k)] for name, t, first, last, k in stages]
        return out

    def _stage_entry(self, island: str, t: int, b: int, dp: int, first: bool, last: bool, inflight: float):
        key = ("row", island, t, b, dp, first, last, inflight)
        hit = self._cache.get(key)
        if hit is None:
            self.stage_rows(island, t, b, dp, first=first, last=last, inflights=[inflight])
            hit = self._cache[key]
        return hit

    def stage_rows(self, island: str, t: int, b: int, dp: int, *, first: bool, last: bool, inflights) -> None:
        """Fill the cache with `stage_row` for several in-flight counts in one pass (a column of
        counts against the row of layer counts): a pipeline's stages differ only in that. Each
        mode's memory row is kept beside it (`steady_memories`)."""
        self._fill_rows(island, t, b, dp, [(first, last, k) for k in inflights])

    def _fill_rows(self, island: str, t: int, b: int, dp: int, specs) -> None:
        """stage_rows for stages [(first, last, inflight)] of one island and TP, whatever their
        places: a row each, the places' terms selected per row (CostModel._peak_bytes)."""
        todo = sorted({tuple(spec) for spec in specs if ("row", island, t, b, dp) + tuple(spec) not in self._cache})
        if not todo:
            return
        L, m, fused = self.model.layers, self.model, self._fused(island)
        n = np.arange(1, L + 1, dtype=np.float64)
        firsts = np.array([spec[0] for spec in todo], dtype=bool)[:, None]
        lasts = np.array([spec[1] for spec in todo], dtype=bool)[:, None]
        ks = np.array([spec[2] for spec in todo], dtype=np.float64)[:, None]
        cap = self.capacity(island)
        extra = self.stage_extra_s(island, t, b, firsts, lasts)
        best = np.full((len(todo), L), np.inf)
        choice = np.full((len(todo), L), -1, dtype=np.int64)
        mems: dict = {}           # mode -> memory at every (stage of todo, n)
        for index, mode in enumerate(RECOMPUTE_MODES):
            if mode not in self.train.recompute_modes:
                continue
            mem = self._peak_bytes(t, b, dp, island, n, firsts, lasts, ks,
                                   activation_bytes(m, t, b, self.dtype, mode, fused),
                                   backward_work_bytes(m, t, b, self.dtype, mode, fused))
            mem = np.broadcast_to(mem, best.shape)
            time = extra + n * self.per_layer_s(island, t, b, mode)
            ok = (mem <= cap) & (time < best)
            best = np.where(ok, time, best)
            choice = np.where(ok, index, choice)
            mems[mode] = mem
        for j, spec in enumerate(todo):
            self._cache[("row", island, t, b, dp) + spec] = (best[j], choice[j], mems, j)

    def stage_s(self, island: str, t: int, b: int, n_layers: int, mode: str, *, first: bool, last: bool) -> float:
        """One stage's time for one micro-batch of b samples in `mode` (a value of `stage_row`'s row,
        whatever the memory): the embedding or head where it holds them, its host cost, its layers."""
        return float(self.stage_extra_s(island, t, b, first, last)) + n_layers * self.per_layer_s(island, t, b, mode)

    def stage_extra_s(self, island: str, t: int, b: int, first, last):
        """What a stage pays per micro-batch besides its layers: the embedding where it is `first`,
        the head where it is `last` (bools, or boolean arrays: one value per stage), its host cost."""
        return (np.where(first, self.first_extra_s(island, t, b), 0.0)
                + np.where(last, self.last_extra_s(island, t, b), 0.0)) + self.stage_host_s(island)

    def best_layer_s(self, island: str, t: int, b: int) -> float:
        """Fastest per-layer time of any allowed mode (for lower bounds)."""
        return min(self.per_layer_s(island, t, b, mode) for mode in self.train.recompute_modes)

    # -- communication ---------------------------------------------------------

    def p2p_s(self, src: IslandSpec, src_offset: int, dst: IslandSpec, dst_offset: int,
              t_src: int, dp: int, b: int) -> float:
        """One activation (or its gradient) across a stage boundary, per micro-batch.

        All DP replicas whose senders share a node share that node's link. Memoised: every
        pipeline the search costs asks for the same boundaries (the entry keeps the islands, so
        their ids stay theirs)."""
        key = ("p2p", id(src), src_offset, id(dst), dst_offset, t_src, dp, b)
        hit = self._cache.get(key)
        if hit is None:
            hit = (self._p2p_s(src, src_offset, dst, dst_offset, t_src, dp, b), src, dst)
            self._cache[key] = hit
        return hit[0]

    def _p2p_s(self, src: IslandSpec, src_offset: int, dst: IslandSpec, dst_offset: int,
               t_src: int, dp: int, b: int) -> float:
        nbytes = b * self.model.seq_len * self.model.hidden * self.e
        per_node = max(1, min(dp, max(1, src.smallest_node // max(1, t_src))))
        if src.name != dst.name:
            return self.bridge_latency + per_node * nbytes / self.bridge_bandwidth + self.staging_s(src, dst, nbytes)
        if self._node(src, src_offset) == self._node(dst, dst_offset):
            return self.fleet.intra_node_latency + per_node * nbytes / src.chip.intra_node_bandwidth
        return self.fleet.inter_node_latency + per_node * nbytes / self.fleet.inter_node_bandwidth

    def _node(self, island: IslandSpec, rank: int) -> int:
        """island.node_of(rank), memoised (it sums the island's nodes at every call)."""
        key = ("node", id(island), rank)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (island.node_of(rank), island)
        return hit[0]

    def dp_allreduce_s(self, island: IslandSpec, offset: int, t: int, dp: int, params_per_chip: float) -> float:
        """Gradient all-reduce (or reduce-scatter + all-gather under ZeRO-1) of one stage.

        Hierarchical: inside each node over intra-node links, then across the
        nodes the stage spans, with the t TP ranks of a node sharing its NIC."""
        if dp <= 1:
            return 0.0
        nbytes = params_per_chip * GRAD_REDUCE_BYTES
        nodes = self._node(island, offset + t * dp - 1) - self._node(island, offset) + 1   # nodes_spanned
        if nodes <= 1:
            return ring_allreduce_s(nbytes, dp, island.chip.intra_node_bandwidth, self.fleet.intra_node_latency)
        local = max(1, dp // nodes)
        intra = ring_allreduce_s(nbytes, local, island.chip.intra_node_bandwidth, self.fleet.intra_node_latency)
        inter = ring_allreduce_s(t * nbytes, nodes, self.fleet.inter_node_bandwidth, self.fleet.inter_node_latency)
        return intra + inter

    def optimizer_s(self, island: IslandSpec, dp: int, params_per_chip: float) -> float:
        shard = dp if self.zero1(dp) else 1
        return (params_per_chip / shard * optimizer_bytes_per_param(self.dtype, island.chip.fused_adamw)
                / (island.chip.memory_bandwidth * island.chip.bw_eff)) + self.host_cost(island.name).optimizer_step_s

    def reduce_parts(self, island: IslandSpec, offset: int, t: int, dp: int, params_per_chip: float):
        """(overlappable, after the update) seconds of a stage's DP reduction: the engine starts the
        gradient all-reduce (ZeRO-1: the reduce-scatter, half of it) during the backward; ZeRO-1's
        all-gather of the updated parameters follows the update (partitioner/schedule_time.py)."""
        total = self.dp_allreduce_s(island, offset, t, dp, params_per_chip)
        return (total / 2, total / 2) if self.zero1(dp) else (total, 0.0)

    def stage_tail(self, island: IslandSpec, offset: int, t: int, dp: int, n: int, *, first: bool,
                   last: bool) -> tuple[float, float, float]:
        """(overlappable DP reduction, ZeRO-1's all-gather, update) seconds of one stage of n layers
        at `offset` (reduce_parts and optimizer_s of its parameters); memoised like p2p_s."""
        key = ("tail", id(island), offset, t, dp, n, first, last)
        hit = self._cache.get(key)
        if hit is None:
            params = self.stage_params(t, n, first=first, last=last)
            overlapped, gather = self.reduce_parts(island, offset, t, dp, params)
            hit = (overlapped, gather, self.optimizer_s(island, dp, params), island)
            self._cache[key] = hit
        return hit[0], hit[1], hit[2]

    @staticmethod
    def staging_s(src: IslandSpec, dst: IslandSpec, nbytes: float) -> float:
        """The bridge is CPU-mediated: `nbytes` leave the sending chip over its host link and
        enter the receiving chip over its own. The engine stages asynchronously, but the bytes
        cannot leave before they are in host memory nor be used before they are back on the
        device, so a hop pays both copies in series with its transfer."""
        return nbytes / src.chip.host_link_bandwidth + nbytes / dst.chip.host_link_bandwidth

    def cross_island_reduce_s(self, islands: list[IslandSpec], links: int,
                              ranks: list[tuple[IslandSpec, int]] | None = None) -> float:
        """Whole-model gradient reduction between replicas on different islands (hetero-DP).

        After each island reduces inside itself, its `links` nodes each hold a
        shard; a ring over the islands moves 2(K-1)/K of the model's gradients
        through each bridge link pair in parallel. Each shard is staged through host
        memory (device -> host before the ring, host -> device after it) at the slowest
        island's host link. The sum's device work (`bucket_device_s` on each island of `ranks`:
        (island, ranks the plan uses there); None: not counted) runs on every chip at once. The
        engine streams buckets: bucket k+1 is filled and staged while bucket k is on the bridge,
        so the three overlap and the slowest counts."""
        k = len(islands)
        if k <= 1:
            return 0.0
        nbytes = total_params(self.model) * GRAD_REDUCE_BYTES
        ring = 2.0 * (k - 1) / k * nbytes / (self.bridge_bandwidth * max(1, links))
        host_link = min(island.chip.host_link_bandwidth for island in islands)
        staging = 2.0 * nbytes / max(1, links) / host_link
        owned = len({n for _, n in ranks or ()}) == 1     # the engine sums by ownership where islands are of one size
        device = max((self.bucket_device_s(island, n, owned) for island, n in ranks or ()), default=0.0)
        return max(ring, staging, device) + 2 * (k - 1) * self.bridge_latency

    def bucket_device_s(self, island: IslandSpec, chips: int, owned: bool = True) -> float:
        """The hetero-DP sum's device memory traffic on one of the `chips` ranks of `island`.

        `owned` (hetero.engine.owned_sum: islands of one size): a rank packs the gradients it holds
        (read and write 1/chips of the model), zeroes its owned shard and adds what it receives into
        it (1 + 3 x 1/chips), packs the summed shard back (2 x) and lands its values (2 x): 10/chips
        of the model in all. Otherwise (hetero.engine.buckets' lane path) every rank zeroes each
        full-model fp32 bucket, copies its share in and out (4/chips) and receives the island's total
        (the whole model again)."""
        nbytes = total_params(self.model) * GRAD_REDUCE_BYTES
        n = max(1, chips)
        touched = 10.0 * nbytes / n if owned else nbytes * (1 if n == 1 else 2) + 4.0 * nbytes / n
        return touched / (island.chip.memory_bandwidth * island.chip.bw_eff)


def tp_choices(model: ModelSpec, island: IslandSpec) -> list[int]:
    """TP degrees an island may use: powers of two dividing heads and kv_heads, within one node."""
    out = []
    t = 1
    while t <= island.tp_limit:
        if island.tp_limit % t == 0 and model.heads % t == 0 and model.kv_heads % t == 0:
            out.append(t)
        t *= 2
    return out


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
