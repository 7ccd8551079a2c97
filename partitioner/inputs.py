"""What the partitioner takes: plain frozen descriptions of chips, fleet, model and training.

Units are SI throughout: FLOP/s, bytes, bytes/s, seconds. (The hetero config
speaks GB and GB/s; hetero.planning converts.) Nothing here imports hetero.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
RECOMPUTE_MODES = ("none", "selective", "full")

# Fraction of peak FLOP/s that a transformer layer's matmuls reach on a real chip
# when nothing has been measured. Large bf16 GEMMs of transformer shapes reach
# 70-80% of peak on A100-class parts (cuBLAS); we take the low end, 0.7, for every
# vendor. It is an assumption, not a measurement: `hetero profile` replaces it.
DEFAULT_MATMUL_EFFICIENCY = 0.7
# Accelerators whose ops table runs AdamW as the reference's elementwise ops (Kunlun, the plain CPU);
# the others run one fused kernel (accelerators/ops/vendor.py: torch's fused AdamW on NVIDIA and the
# emulated chips, npu_apply_adam_w on Ascend). tests/accelerators/test_ops_vendor.py checks the two agree.
REFERENCE_ADAMW = ("kunlun", "cpu")
# Fraction of memory bandwidth that elementwise kernels reach on a real chip.
DEFAULT_BANDWIDTH_EFFICIENCY = 0.8


class InfeasibleError(ValueError):
    """No plan exists for these inputs; the message says what to change."""


@dataclass(frozen=True)
class ChipModel:
    """One chip type as the cost model sees it."""

    name: str
    peak_flops: Mapping[str, float]        # FLOP/s per dtype
    memory_bytes: float
    reserve_bytes: float = 0.0             # kept by the vendor runtime; never planned into
    memory_bandwidth: float = 1e12         # bytes/s
    intra_node_bandwidth: float = 1e11     # bytes/s between chips of one node
    emulated: bool = False
    accelerator: str = ""
    # Fused kernels (fused softmax, RMSNorm, SwiGLU, rotary) on vendor chips; the
    # emulated and cpu accelerators run the plain-torch reference ops instead.
    fused_kernels: bool | None = None
    # Emulated chips charge matmul FLOPs at exactly peak and bytes at exactly the
    # declared bandwidth, so both efficiencies are 1.0 for them.
    matmul_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    host_link_bandwidth: float = 32e9      # bytes/s host <-> device, per direction (bridge staging)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for a dtype; an unlisted dtype runs at the fp32 rate."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops.get("fp32", min(self.peak_flops.values()))

    @property
    def fused(self) -> bool:
        if self.fused_kernels is not None:
            return self.fused_kernels
        return not self.emulated and self.accelerator not in ("cpu", "emulated")

    @property
    def fused_adamw(self) -> bool:
        """Whether AdamW runs as one kernel with no temporaries rather than the reference's
        elementwise ops (REFERENCE_ADAMW); an unnamed accelerator is a vendor chip, as in `fused`."""
        return self.accelerator not in REFERENCE_ADAMW

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes - self.reserve_bytes

    @property
    def mm_eff(self) -> float:
        if self.matmul_efficiency is not None:
            return self.matmul_efficiency
        return 1.0 if self.emulated else DEFAULT_MATMUL_EFFICIENCY

    @property
    def bw_eff(self) -> float:
        if self.bandwidth_efficiency is not None:
            return self.bandwidth_efficiency
        return 1.0 if self.emulated else DEFAULT_BANDWIDTH_EFFICIENCY


@dataclass(frozen=True)
class IslandSpec:
    """A group of identical chips sharing one native collective world."""

    name: str
    chip: ChipModel
    nodes: tuple[int, ...]                 # chips per node, in rank order

    @property
    def size(self) -> int:
        return sum(self.nodes)

    @property
    def tp_limit(self) -> int:
        """Largest TP degree whose groups never straddle a node: gcd of the node sizes."""
        g = 0
        for n in self.nodes:
            g = math.gcd(g, n)
        return g

    @cached_property
    def smallest_node(self) -> int:
        """Chips on the island's smallest node (p2p costs ask for it per boundary)."""
        return min(self.nodes)

    @cached_property
    def _node_ends(self) -> list[int]:
        return list(itertools.accumulate(self.nodes))

    def node_of(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.size:
            raise IndexError(f"island {self.name}: local rank {local_rank} beyond its {self.size} chips")
        return bisect.bisect_right(self._node_ends, local_rank)

    def nodes_spanned(self, first: int, count: int) -> int:
        """How many nodes the chips first .. first+count-1 sit on."""
        if count <= 0:
            return 0
        return self.node_of(first + count - 1) - self.node_of(first) + 1


@dataclass(frozen=True)
class FleetSpec:
    name: str
    islands: tuple[IslandSpec, ...]
    inter_node_bandwidth: float = 12.5e9   # bytes/s per node NIC, inside an island
    bridge_bandwidth: float = 1e9          # bytes/s per link between islands
    bridge_latency: float = 50e-6          # seconds per message over the bridge
    inter_node_latency: float = 10e-6
    intra_node_latency: float = 5e-6

    @property
    def total_chips(self) -> int:
        return sum(i.size for i in self.islands)

    def island(self, name: str) -> IslandSpec:
        for island in self.islands:
            if island.name == name:
                return island
        raise KeyError(name)


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU MLP."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tie_embeddings: bool = False
    name: str = "model"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_hidden(self) -> int:
        return self.head_dim * self.kv_heads


@dataclass(frozen=True)
class TrainSpec:
    global_batch: int
    micro_batch: int = 1                   # the user's choice; searched around when search_micro_batch
    dtype: str = "fp32"
    search_micro_batch: bool = True
    max_micro_batch: int = 16
    recompute_modes: tuple[str, ...] = RECOMPUTE_MODES
    zero1: bool | None = None              # None: ZeRO-1 wherever DP > 1
    modes: tuple[str, ...] = ("pipeline", "replicas", "hybrid")   # hetero-PP, hetero-DP, and DP of PP pipelines
    # Share of each chip's usable memory (after the vendor reserve) the planner keeps
    # free for what the model does not count: allocator fragmentation, collective
    # and kernel workspaces, framework buffers.
    memory_headroom: float = 0.05
    # Interleaved 1F1B: model chunks per stage the planner may give a pipeline, 1..this (1: plain
    # 1F1B only, the default; the engine runs interleaved plans too, hetero.engine.support.INTERLEAVED);
    # `hetero plan --virtual-stages N` asks for more.
    max_virtual_stages: int = 1
    # Stage boundaries may sit inside a layer, between its attention and MLP halves (partitioner/halves.py;
    # the engine runs them, hetero.engine.support.SUBLAYER); `hetero plan --whole-layers` keeps whole layers.
    half_layers: bool = True

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    def micro_batch_choices(self) -> list[int]:
        if not self.search_micro_batch:
            return [self.micro_batch]
        choices = {b for b in range(1, min(self.max_micro_batch, self.global_batch) + 1)
                   if self.global_batch % b == 0 and (b & (b - 1) == 0 or b == self.micro_batch)}
        choices.add(self.micro_batch)
        return sorted(choices)


@dataclass(frozen=True)
class LayerMeasurement:
    """Measured time of one transformer layer on one chip (from a profile)."""

    forward_s: float
    backward_s: float
    memory_bytes: float | None = None
    source: str = "measured"               # measured | calibrated | estimated


@dataclass(frozen=True)
class SearchLimits:
    """Knobs that bound the search (defaults suit up to a few thousand chips)."""

    max_orders: int = 24                   # island orders tried for hetero-PP
    max_stage_choices: int = 6             # stage counts tried per island beyond the full one
    exhaustive_stages: bool = False        # brute force: every stage count per island
    small_fleet_chips: int = 64            # up to this many chips, every stage count up to 8 per island
    # hetero-PP configurations costed at most (best bound first); reached only on fleets of
    # thousands of chips, where each costs about a millisecond (issue #20: <= 10 s at 8,192)
    max_pp_evaluations: int = 1000
    # hybrid plans (hetero-DP of hetero-PP pipelines) are searched up to this many islands: the
    # groupings of n islands grow like the Bell numbers (3 at 3 islands, 25 at 4, 145 at 5, 756 at 6)
    max_hybrid_islands: int = 5
    extra: Mapping[str, object] = field(default_factory=dict)
