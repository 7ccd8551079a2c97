"""`hetero env`: which accelerator this machine would use, the versions, and why."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import accelerators
from accelerators import ops, registry


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="show the detected accelerator, versions and probe results",
        description=(
            "Probe every accelerator vendor in selection order (without initialising a device), "
            f"say which one this process would use and why ({registry.SELECT_ENV} overrides the "
            "probe), and print the package versions and the implementation each fused op uses. "
            "Exits 2 if the selected accelerator cannot run."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def collect() -> dict:
    """Everything `hetero env` reports, as plain data."""
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {**registry.package_versions(), **registry.runtime_versions()},
        "probe_order": registry.probe_order(),
        "probes": [result.to_dict() for result in registry.probe_all()],
        "environment": {var: os.environ.get(var) for var in
                        (registry.SELECT_ENV, ops.REFERENCE_ENV, "HETERO_EMULATED_CHIP",
                         "HETERO_EMULATED_TIME_DILATION")},
    }
    try:
        name, why = registry.select_name()
        report["selected"] = {"name": name, "why": why}
        accelerator = accelerators.get_accelerator()
        report["accelerator"] = accelerator.describe()
        report["ops"] = ops.kernel_sources()
        report["ok"] = True
    except (accelerators.AcceleratorUnavailable, ValueError) as exc:
        report.setdefault("selected", {"name": None, "why": None})
        report["error"] = str(exc)
        report["ok"] = False
    return report


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report)
    return 0 if report["ok"] else 2


def print_text(report: dict) -> None:
    selected = report["selected"]
    if report["ok"]:
        info = report["accelerator"]
        label = " (EMULATED test/benchmark device)" if info.get("emulated") else ""
        print(f"accelerator  {selected['name']}{label}: {selected['why']}")
        print(f"  device type {info['device_type']}, dist backend {info['dist_backend']}, "
              f"visible-devices env {info['visible_devices_env'] or '-'}")
        devices = info.get("devices")
        if devices is not None:
            print(f"  {info.get('device_count', len(devices))} device(s): {', '.join(devices)}")
        if "device_error" in info:
            print(f"  devices: {info['device_error']}")
    else:
        print(f"accelerator  {selected['name'] or '-'}: error: {report['error']}", file=sys.stderr)
    print(f"probe order  {', '.join(report['probe_order'])}")
    for probe in report["probes"]:
        mark = "yes" if probe["available"] else "no "
        print(f"  {mark} {probe['name']:<9} {probe['reason']}")
    print("versions")
    print(f"  python {report['python']} on {report['platform']}")
    for package, version in report["versions"].items():
        print(f"  {package:<18} {version or '-'}")
    if report["ok"]:
        print("fused ops    " + ", ".join(f"{op}={source}" for op, source in report["ops"].items()))
    set_vars = {k: v for k, v in report["environment"].items() if v}
    if set_vars:
        print("environment  " + ", ".join(f"{k}={v}" for k, v in set_vars.items()))
