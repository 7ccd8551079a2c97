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


@pytest.mark.parametrize("chip", REQUIRED + ["emu-tiny"])
def test_every_catalog_chip_names_and_cites_its_host_link(chip):
    spec = load_catalog()[chip]
    assert spec.host_link_gbps > 0 and spec.sources.get("host_link_gbps", "").strip()
    assert spec.to_dict()["host_link_gbps"] == spec.host_link_gbps


def test_host_link_figures():
    catalog = load_catalog()
    # PCIe 4.0 x16 (A100/A800) and 5.0 x16 (H100/H200), per direction.
    assert catalog["A100-80G"].host_link_gbps == catalog["A800-80G"].host_link_gbps == 32
    assert catalog["H100-SXM"].host_link_gbps == catalog["H200"].host_link_gbps == 64
    for chip in ("Ascend-910B", "Kunlun-P800"):
        source = catalog[chip].sources["host_link_gbps"]
        assert "reported" in source or "estimate" in source
    # Emulated chips copy slowly enough that host<->device copies show on their clock.
    for chip in ("emu-fast", "emu-slow", "emu-tiny"):
        assert catalog[chip].host_link_gbps <= 1.0


def _cluster_with_chip(tmp_path, chip_fields: str):
    from hetero.config import load_sections

    path = tmp_path / "c.yaml"
    path.write_text("name: x\ncoordinator: {host: 127.0.0.1, port: 1}\n"
                    "islands: [{name: a, accelerator: emulated, chip: my-chip, nodes: [{host: h, chips: 1}]}]\n"
                    "chips:\n  my-chip: {accelerator: emulated, tflops: {fp32: 1}, memory_gb: 1, "
                    f"intra_node_gbps: 1{chip_fields}}}\n")
    return load_sections(str(path))["cluster"].chip("my-chip")


def test_custom_chip_host_link_is_optional_with_a_pcie4_default(tmp_path):
    assert _cluster_with_chip(tmp_path, ", memory_bandwidth_gbps: 900").host_link_gbps == 32.0
    # never faster than the chip's own memory
    assert _cluster_with_chip(tmp_path, ", memory_bandwidth_gbps: 0.3").host_link_gbps == 0.3
    spec = _cluster_with_chip(tmp_path, ", memory_bandwidth_gbps: 900, host_link_gbps: 0.7")
    assert spec.host_link_gbps == 0.7 and spec.to_dict()["host_link_gbps"] == 0.7


def test_bad_custom_host_link_is_one_line_naming_the_field(tmp_path):
    from hetero.errors import ConfigError

    with pytest.raises(ConfigError, match=r"chips\.my-chip\.host_link_gbps.*expected a number") as refused:
        _cluster_with_chip(tmp_path, ", memory_bandwidth_gbps: 9, host_link_gbps: fast")
    assert "\n" not in str(refused.value)
