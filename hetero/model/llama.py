"""A Llama-style decoder, one pipeline stage at a time, on accelerators.ops.

A stage holds the decoder blocks of a half-open GLOBAL layer range
[start, end), plus the embedding when it is the first stage and the final norm
and LM head when it is the last, split over one tensor-parallel group.
Parameter names follow Hugging Face (model.layers.{global i}.self_attn.q_proj.weight,
...), so a stage's named_parameters() are a slice of a HF checkpoint's keys
(with TP-split shapes; see hetero.model.state for full <-> shard).

Activation recompute (hetero.model.recompute) is per stage: `full` recomputes every
decoder layer in backward, `selective` the attention core of each.

A stage may also begin or end inside a layer, at the seam between its attention half and its
MLP half (`blocks`: half-layer block 2k is layer k's input norm and attention, 2k+1 its
post-attention norm and MLP); only the residual stream crosses that seam, as between layers.

GQA under TP: rank r holds q heads [r*heads/tp, ...) and kv heads
[r*kv_heads/tp, ...); since each kv head serves heads/kv_heads consecutive q
heads, every q head's kv head is on the same rank.
"""

from __future__ import annotations

import torch
from torch import nn

from accelerators import ops
from hetero.config.model import ModelConfig
from hetero.errors import UserError
from hetero.model import layout
from hetero.model.init import init_stage
from hetero.model.parallel import (
    NO_TP,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    vocab_parallel_cross_entropy,
)
from hetero.model.recompute import checked_mode, recomputed
from hetero.model.rope import rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, *, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, *, dtype: torch.dtype, device,
                 recompute_core: bool = False):
        super().__init__()
        hidden, head_dim = config.hidden, config.head_dim
        column = dict(copy_input=False, dtype=dtype, device=device)  # one copy for q, k and v
        self.tp, self.head_dim = tp, head_dim
        self.recompute_core = recompute_core    # selective recompute: softmax(QK^T)V again in backward
        self.q_proj = ColumnParallelLinear(hidden, config.heads * head_dim, tp, **column)
        self.k_proj = ColumnParallelLinear(hidden, config.kv_heads * head_dim, tp, **column)
        self.v_proj = ColumnParallelLinear(hidden, config.kv_heads * head_dim, tp, **column)
        self.o_proj = RowParallelLinear(config.heads * head_dim, hidden, tp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        x = copy_to_tensor_parallel(x, self.tp)

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b, s, h*d) -> (b, h, s, d)
            return y.view(batch, seq, -1, self.head_dim).transpose(1, 2)

        q = ops.rotary(heads(self.q_proj(x)), cos, sin)
        k = ops.rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if self.recompute_core:
            out = recomputed(ops.attention, q, k, v, causal=True)
        else:
            out = ops.attention(q, k, v, causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, *, dtype: torch.dtype, device):
        super().__init__()
        column = dict(copy_input=False, dtype=dtype, device=device)  # one copy for gate and up
        self.tp = tp
        self.gate_proj = ColumnParallelLinear(config.hidden, config.ffn_hidden, tp, **column)
        self.up_proj = ColumnParallelLinear(config.hidden, config.ffn_hidden, tp, **column)
        self.down_proj = RowParallelLinear(config.ffn_hidden, config.hidden, tp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel(x, self.tp)
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One decoder layer, or one half of it on a stage that begins or ends inside it: `halves`
    (attention, mlp) says which it holds; an absent half is no attribute, as in a checkpoint
    slice."""

    self_attn: Attention
    mlp: MLP

    def __init__(self, config: ModelConfig, tp: TensorParallel, *, dtype: torch.dtype, device,
                 recompute: str = "none", halves: tuple[bool, bool] = (True, True)):
        super().__init__()
        self.recompute = recompute
        self.halves = halves
        if halves[0]:
            self.input_layernorm = RMSNorm(config.hidden, config.norm_eps, dtype=dtype, device=device)
            self.self_attn = Attention(config, tp, dtype=dtype, device=device,
                                       recompute_core=recompute == "selective")
        if halves[1]:
            self.post_attention_layernorm = RMSNorm(config.hidden, config.norm_eps, dtype=dtype, device=device)
            self.mlp = MLP(config, tp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full":
            return recomputed(self._layer, x, cos, sin)
        return self._layer(x, cos, sin)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.halves[0]:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if self.halves[1]:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class _Body(nn.Module):
    """The `model.` prefix of the HF names: the modules a stage holds (embed_tokens only on the
    first stage, norm only on the last; an absent one is no attribute, as in the HF checkpoint)."""

    embed_tokens: VocabParallelEmbedding
    layers: nn.ModuleDict
    norm: RMSNorm


class LlamaStage(nn.Module):
    """One pipeline stage of a Llama decoder on one TP rank.

    first (default: start == 0) adds the embedding; last (default:
    end == config.layers) adds the final norm and LM head. `seed` initialises
    the parameters plan-independently (hetero.model.init); None leaves them
    uninitialised for a checkpoint to fill.

    With tie_embeddings and first == last the LM head IS the embedding. With
    tie_embeddings on a last stage that is not first (`tied_lm_head`), the LM
    head is a separate copy of model.embed_tokens.weight: whoever trains it
    must sum its gradient with the first stage's embedding gradient.

    `recompute` (none | selective | full, hetero.model.recompute) is the plan's
    activation recompute mode for this stage, applied to every decoder layer.

    `chunks` (interleaved 1F1B, instead of `layer_range`): the stage's layer ranges in
    model order, non-contiguous; forward(x, chunk=c) runs chunk c alone. The embedding
    belongs to chunk 0 (first) and the norm and LM head to the last chunk (last). The
    parameter names are the same HF names whatever the chunking, so checkpoints stay
    layout-free and load into any other cut.

    `blocks` (instead of `layer_range` and `chunks`): the half-open range [a, b) of
    half-layer blocks the stage holds (2k: layer k's attention half, 2k+1: its MLP half),
    so it may begin at a layer's MLP half or end after a layer's attention half;
    `layer_range` is then the layers it touches.
    """

    lm_head: ColumnParallelLinear   # the last stage only

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int] | range | None = None,
                 first: bool | None = None, last: bool | None = None,
                 tp: TensorParallel | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", *, seed: int | None = 0, recompute: str = "none",
                 chunks: tuple[tuple[int, int], ...] | None = None,
                 blocks: tuple[int, int] | None = None):
        super().__init__()
        if blocks is not None:
            if layer_range is not None or chunks is not None:
                raise ValueError("give blocks alone, without layer_range or chunks")
            self.blocks = _check_blocks(config, blocks)
            ranges: tuple[tuple[int, int], ...] = ((self.blocks[0] // 2, (self.blocks[1] + 1) // 2),)
        else:
            ranges = _check_chunks(config, layer_range, chunks)
            self.blocks = (2 * ranges[0][0], 2 * ranges[-1][1])   # the span, for a plain stage its blocks
        start, end = ranges[0][0], ranges[-1][1]
        first = self.blocks[0] == 0 if first is None else first
        last = self.blocks[1] == 2 * config.layers if last is None else last
        tp = tp or NO_TP
        _check_stage(config, self.blocks, first, last, tp)
        self.config, self.tp = config, tp
        self.recompute = checked_mode(recompute)
        self.chunks = ranges
        self.layer_range = (start, end)     # the span; the layers held are `chunks`
        self.first, self.last = first, last
        self.tied_lm_head = config.tie_embeddings and last and not first

        self.model = _Body()
        if first:
            self.model.embed_tokens = VocabParallelEmbedding(config.vocab, config.hidden, tp, dtype=dtype,
                                                             device=device)
        # String keys give HF names with global indices: model.layers.7.mlp...
        self.model.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, tp, recompute=recompute, dtype=dtype, device=device,
                                  halves=self._halves(i, blocks is not None))
             for a, b in ranges for i in range(a, b)})
        if last:
            self.model.norm = RMSNorm(config.hidden, config.norm_eps, dtype=dtype, device=device)
            self.lm_head = ColumnParallelLinear(config.hidden, config.vocab, tp, dtype=dtype, device=device)
            if config.tie_embeddings and first:
                self.lm_head.weight = self.model.embed_tokens.weight
        if seed is not None:
            init_stage(self, seed)

    def _halves(self, layer: int, partial: bool) -> tuple[bool, bool]:
        """Which halves of `layer` this stage holds: both, unless its `blocks` cut the layer."""
        if not partial:
            return True, True
        a, b = self.blocks
        return a <= 2 * layer < b, a <= 2 * layer + 1 < b

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of the FULL tensor a parameter is a shard of."""
        if name == layout.LM_HEAD and self.config.tie_embeddings:
            return layout.EMBED
        return name

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None, *,
                gather_logits: bool = False, chunk: int | None = None) -> torch.Tensor:
        """inputs: token ids (batch, seq) on the first stage, hidden states
        (batch, seq, hidden) on the others. Returns hidden states, or on the last
        stage logits: this rank's vocab slice (batch, seq, vocab/tp), or all of
        them with gather_logits (costly; for inspection, not for the loss).
        positions: (seq,) or (batch, seq); default 0..seq-1.
        chunk: which of `chunks` to run (required when there are several); only
        chunk 0 embeds and only the last chunk ends in the LM head."""
        if chunk is None:
            if len(self.chunks) > 1:
                raise ValueError(f"this stage holds {len(self.chunks)} chunks: say which one to run")
            chunk = 0
        if not 0 <= chunk < len(self.chunks):
            raise ValueError(f"chunk {chunk} is outside 0..{len(self.chunks) - 1}")
        embeds, heads = self.first and chunk == 0, self.last and chunk == len(self.chunks) - 1
        if embeds:
            if inputs.is_floating_point():
                raise TypeError("the first stage takes token ids, got a floating-point tensor")
            x = self.model.embed_tokens(inputs)
        else:
            x = inputs
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for index in range(*self.chunks[chunk]):
            x = self.model.layers[str(index)](x, cos, sin)
        if not heads:
            return x
        logits = self.lm_head(self.model.norm(x))
        return gather_from_tensor_parallel(logits, self.tp) if gather_logits else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of this (last) stage's vocab-split logits, as forward
        returns them (not gathered). labels[b, t] is the target at position t:
        shift them before (HF's model shifts inside; this does not)."""
        if not self.last:
            raise RuntimeError("loss() is for the last stage")
        if logits.shape[-1] != self.lm_head.weight.shape[0]:
            raise ValueError(f"loss() takes this rank's logits ({self.lm_head.weight.shape[0]} "
                             f"vocab entries), got last dim {logits.shape[-1]}")
        return vocab_parallel_cross_entropy(logits, labels, self.tp, ignore_index=ignore_index,
                                            reduction=reduction)


def _check_range(config: ModelConfig, layer_range) -> tuple[int, int]:
    if layer_range is None:
        return 0, config.layers
    if isinstance(layer_range, range):
        if layer_range.step != 1:
            raise ValueError(f"layer range must be contiguous, got {layer_range}")
        layer_range = (layer_range.start, layer_range.stop)
    start, end = (int(v) for v in layer_range)
    if not 0 <= start <= end <= config.layers:
        raise UserError(f"layer range [{start}, {end}) does not fit a model of {config.layers} layers")
    return start, end


def _check_blocks(config: ModelConfig, blocks) -> tuple[int, int]:
    """A stage's half-layer block range [a, b), within the model's 2 * layers blocks."""
    start, end = (int(v) for v in blocks)
    if not 0 <= start <= end <= 2 * config.layers:
        raise UserError(f"block range [{start}, {end}) does not fit a model of {config.layers} layers "
                        f"({2 * config.layers} half-layer blocks)")
    return start, end


def _check_chunks(config: ModelConfig, layer_range, chunks) -> tuple[tuple[int, int], ...]:
    """The stage's layer ranges: `chunks` (in model order, disjoint, each non-empty when there are
    several), or the one `layer_range`."""
    if chunks is None:
        return (_check_range(config, layer_range),)
    if layer_range is not None or not chunks:
        raise ValueError("give either layer_range or a non-empty chunks, not both")
    ranges = tuple(_check_range(config, c) for c in chunks)
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        if not (a < b <= c < d):
            raise UserError(f"chunks {[list(r) for r in ranges]} must be non-empty and in model order")
    return ranges


def _check_stage(config: ModelConfig, blocks: tuple[int, int], first: bool, last: bool,
                 tp: TensorParallel) -> None:
    """The stage's span (in half-layer blocks; layers in the messages, x.5 inside a layer) and the
    model's shape against TP."""
    start, end = (v / 2 for v in blocks)
    if first and start != 0:
        raise UserError(f"a first stage must start at layer 0, not {start:g}")
    if last and end != config.layers:
        raise UserError(f"a last stage must end at layer {config.layers}, not {end:g}")
    if start == end and not (first or last):
        raise UserError(f"stage [{start:g}, {end:g}) holds nothing: no layers, no embedding, no head")
    if config.hidden % config.heads or config.head_dim % 2:
        raise UserError(f"hidden ({config.hidden}) / heads ({config.heads}) must be an even integer")
    if config.heads % config.kv_heads:
        raise UserError(f"kv_heads ({config.kv_heads}) must divide heads ({config.heads})")
    for what, count in (("kv_heads", config.kv_heads), ("ffn_hidden", config.ffn_hidden),
                        ("vocab", config.vocab)):
        if count % tp.size:
            raise UserError(f"tensor-parallel size {tp.size} must divide the model's {what} ({count})")
