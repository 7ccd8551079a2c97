"""`hetero bench bridge`: the JSON contract and the goal verdicts (never timings)."""

import json
import subprocess
import sys

import pytest

from hetero.bench import bridge

pytestmark = pytest.mark.timeout(300)


def test_quick_run_reports_every_transport_and_size_in_the_documented_json():
    transports = "memcpy,raw_tcp,bridge_tcp,bridge_shm"
    proc = subprocess.run([sys.executable, "-m", "hetero.cli", "bench", "bridge", "--quick", "--json",
                           "--transports", transports], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {(r["transport"], r["bytes"]) for r in report["results"]}
    assert rows == {(t, n) for t in transports.split(",") for n in bridge.SIZES}
    for row in report["results"]:
        assert set(row) == {"transport", "bytes", "gbps", "p50_us"}
        assert row["gbps"] > 0 and row["p50_us"] > 0
    verdicts = {g["goal"]: g["verdict"] for g in report["goals"]}
    assert verdicts["bridge_tcp >= 1.0x gloo at 64 MiB"] == "N/A"  # gloo was not measured
    assert verdicts["bridge_tcp 4 KiB round-trip p50 <= 100 us"] in ("PASS", "MISS")


def test_goals_compare_against_anchors_from_the_same_results():
    def row(transport, nbytes, gbps, p50):
        return {"transport": transport, "bytes": nbytes, "gbps": gbps, "p50_us": p50}
    big, small = 64 << 20, 4 << 10
    results = [row("gloo", big, 3.0, 1), row("raw_tcp", big, 4.0, 1), row("memcpy", big, 8.0, 1),
               row("bridge_tcp", big, 3.5, 1), row("bridge_shm", big, 3.9, 1),
               row("bridge_tcp", small, 0.1, 80.0), row("bridge_shm", small, 0.1, 120.0)]
    verdicts = {g["goal"]: g["verdict"] for g in bridge.goals(results)}
    assert verdicts == {
        "bridge_tcp >= 1.0x gloo at 64 MiB": "PASS",
        "bridge_tcp >= 0.9x raw_tcp at 64 MiB": "MISS",   # 3.5 < 3.6
        "bridge_shm >= 0.5x memcpy at 64 MiB": "MISS",     # 3.9 < 4.0
        "bridge_tcp 4 KiB round-trip p50 <= 100 us": "PASS",
        "bridge_shm 4 KiB round-trip p50 <= 100 us": "MISS",
    }


def test_unknown_transport_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "hetero.cli", "bench", "bridge", "--transports", "carrier_pigeon"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "carrier_pigeon" in proc.stderr and "raw_tcp" in proc.stderr
