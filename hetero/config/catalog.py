"""The chip catalog: peak speed, memory and links of every chip hetero knows.

The figures live in chips.yaml (data, with a public source for each); a cluster
file may add its own chips in the same format under `chips:`.

`host_link_gbps` (host <-> device GB/s per direction, what the emulated chips
charge a copy between host and device memory) is required of catalog chips and
optional in a cluster file's chips: by default PCIe 4.0 x16's 32 GB/s, or the
chip's memory_bandwidth_gbps where that is lower.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Mapping

from hetero.config.fields import REQUIRED, Invalid, Section, boolean, name, number, text
from hetero.config.yaml_io import read_yaml

CATALOG_PATH = os.path.join(os.path.dirname(__file__), "chips.yaml")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
DEFAULT_HOST_LINK_GBPS = 32.0   # PCIe 4.0 x16, per direction: a custom chip's default host link


@dataclass(frozen=True)
class ChipSpec:
    name: str
    accelerator: str
    vendor: str
    tflops: Mapping[str, float]           # peak dense TFLOP/s per dtype
    memory_gb: float
    memory_bandwidth_gbps: float          # GB/s
    intra_node_gbps: float                # GB/s between chips of one node
    memory_reserve_gb: float = 0.0
    host_link_gbps: float = DEFAULT_HOST_LINK_GBPS   # GB/s per direction, host <-> device
    emulated: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for a dtype; a dtype the chip does not list runs at its fp32 rate."""
        return 1e12 * self.tflops.get(dtype, self.tflops.get("fp32", min(self.tflops.values())))

    def to_dict(self) -> dict:
        """Plain data for another process (the emulated accelerator reads this)."""
        return {
            "name": self.name, "accelerator": self.accelerator, "vendor": self.vendor,
            "tflops": dict(self.tflops), "memory_gb": self.memory_gb,
            "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
            "intra_node_gbps": self.intra_node_gbps, "memory_reserve_gb": self.memory_reserve_gb,
            "host_link_gbps": self.host_link_gbps, "emulated": self.emulated,
        }


def read_chip(section: Section, chip_name: str, require_sources: bool) -> ChipSpec:
    """One chip entry, from the catalog (require_sources: every figure cited, host_link_gbps
    required) or from a cluster file's `chips:`."""
    tflops_section = section.section("tflops")
    tflops = {}
    for dtype in DTYPES:
        value = tflops_section.get(dtype, number(0.0, 1e5), None)
        if value is not None:
            tflops[dtype] = value
    tflops_section.finish()
    if not tflops:
        tflops_section.fail("", f"expected at least one of {', '.join(DTYPES)}")
    memory_bandwidth_gbps = section.get("memory_bandwidth_gbps", number(0.0, 1e6))
    spec = ChipSpec(
        name=chip_name,
        accelerator=section.get("accelerator", name),
        vendor=section.get("vendor", text(80), "custom"),
        tflops=tflops,
        memory_gb=section.get("memory_gb", number(0.0, 1e5)),
        memory_bandwidth_gbps=memory_bandwidth_gbps,
        host_link_gbps=section.get("host_link_gbps", number(0.0, 1e5), REQUIRED if require_sources
                                   else min(DEFAULT_HOST_LINK_GBPS, memory_bandwidth_gbps)),
        intra_node_gbps=section.get("intra_node_gbps", number(0.0, 1e6)),
        memory_reserve_gb=section.get("memory_reserve_gb", number(0.0, 1e5, low_inclusive=True), 0.0),
        emulated=section.get("emulated", boolean, False),
        sources=_read_sources(section, require_sources),
    )
    section.finish()
    if spec.memory_reserve_gb >= spec.memory_gb:
        section.fail("memory_reserve_gb", f"must be less than memory_gb ({spec.memory_gb:g})")
    return spec


def _read_sources(section: Section, required: bool) -> dict:
    """Catalog chips must cite where each figure comes from; custom chips may."""
    return section.get("sources", _source_map, REQUIRED if required else {})


def _source_map(value) -> dict:
    if not isinstance(value, dict) or not value:
        raise Invalid("expected a mapping from figure to its public source")
    return {str(k): str(v) for k, v in value.items()}


@functools.lru_cache(maxsize=1)
def load_catalog() -> Mapping[str, ChipSpec]:
    doc = read_yaml(CATALOG_PATH)
    root = Section(doc, "", doc.data)
    chips_section = root.section("chips")
    root.finish()
    return {
        chip: read_chip(Section(doc, f"chips.{chip}", entry), chip, require_sources=True)
        for chip, entry in chips_section.data.items()
    }
