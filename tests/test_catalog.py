"""The chip catalog: required chips, cited sources, sane units."""

import pytest

import accelerators
from hetero.config.catalog import load_catalog

REQUIRED = ["A800-80G", "A100-80G", "H100-SXM", "H200", "Ascend-910B", "Kunlun-P800", "cpu", "emu-fast", "emu-slow"]


def test_required_chips_present():
    catalog = load_catalog()
    for chip in REQUIRED:
        assert chip in catalog


@pytest.mark.parametrize("chip", REQUIRED)
def test_every_chip_is_sourced_and_driven_by_a_known_accelerator(chip):
    spec = load_catalog()[chip]
    assert spec.sources and all(s.strip() for s in spec.sources.values())
    assert spec.accelerator in accelerators.names()
    assert 0 <= spec.memory_reserve_gb < spec.memory_gb


def test_public_figures():
    catalog = load_catalog()
    # NVIDIA datasheets: dense BF16 and memory.
    assert catalog["A100-80G"].tflops["bf16"] == 312 and catalog["A100-80G"].memory_gb == 80
    assert catalog["H100-SXM"].tflops["bf16"] == pytest.approx(989.5)
    assert catalog["H200"].memory_gb == 141 and catalog["H200"].memory_bandwidth_gbps == 4800
    assert catalog["A800-80G"].intra_node_gbps < catalog["A100-80G"].intra_node_gbps  # export NVLink cap


def test_emulated_chips_are_labelled_and_ordered():
    catalog = load_catalog()
    fast, slow = catalog["emu-fast"], catalog["emu-slow"]
    assert fast.emulated and slow.emulated and not catalog["H100-SXM"].emulated
    assert fast.peak_flops("fp32") > slow.peak_flops("fp32")
    # Slow enough that the virtual clock, not a 2-core host, decides the pace.
    assert fast.peak_flops("fp32") <= 5e10
    assert set(fast.to_dict()) >= {"name", "tflops", "memory_gb", "memory_bandwidth_gbps"}
