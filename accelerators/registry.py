"""Which accelerator this process drives: names, probing, selection.

Selection (`get_accelerator(name=None)`):

1. an explicit `name` wins;
2. else the environment variable HETERO_ACCELERATOR;
3. else the first available vendor in PROBE_ORDER:
       ascend, kunlun, <out-of-tree plugins, by name>, cuda, cpu
   Ascend and Kunlun come before CUDA because both can masquerade as CUDA
   (Kunlun's torch_xmlir takes over torch.cuda outright), so they are detected
   by import spec, never by torch.cuda.is_available(). `emulated` needs a
   chip spec and is never picked automatically.

No probe initialises a device. A vendor asked for by name that cannot run
raises AcceleratorUnavailable saying what is missing; there is no silent
fallback to the CPU.

Out-of-tree vendors register an `Accelerator` subclass under the entry-point
group `hetero.accelerators` (name = vendor name).

This module imports neither torch nor any vendor package at import time, so
`names()` is cheap (the config layer validates YAML against it).
"""

from __future__ import annotations

import importlib
import os
import threading
from importlib import metadata
from typing import TYPE_CHECKING, Any

from accelerators.errors import AcceleratorUnavailable, UnknownAccelerator

if TYPE_CHECKING:
    from accelerators.base import Accelerator

SELECT_ENV = "HETERO_ACCELERATOR"
ENTRY_POINT_GROUP = "hetero.accelerators"

# Built-in vendors, loaded lazily: name -> "module:class".
BUILTIN = {
    "cuda": "accelerators.cuda:CudaAccelerator",
    "ascend": "accelerators.ascend:AscendAccelerator",
    "kunlun": "accelerators.kunlun:KunlunAccelerator",
    "cpu": "accelerators.cpu:CpuAccelerator",
    "emulated": "accelerators.emulated:EmulatedAccelerator",
}
# torch.distributed backends each built-in vendor can run inside an island, its
# native one first. Kept here, as data, so config validation needs no torch.
BUILTIN_BACKENDS = {
    "cuda": ("nccl", "gloo"),
    "ascend": ("hccl", "gloo"),
    "kunlun": ("nccl", "gloo"),  # BKCL, registered under the nccl name
    "cpu": ("gloo",),
    "emulated": ("hetero-strict", "gloo"),   # hetero-strict: NCCL/HCCL's rules on gloo (accelerators/strict_backend.py)
}
PROBE_FIRST = ("ascend", "kunlun")   # may masquerade as CUDA: must be probed before it
PROBE_LAST = ("cuda", "cpu")

_lock = threading.Lock()
_current: Any = None  # the process's Accelerator, once selected


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in found if ep.name not in BUILTIN}


def names() -> list[str]:
    """Known vendor names: the built-ins, then entry-point plugins. Imports nothing heavy."""
    return list(BUILTIN) + sorted(_entry_points())


def backends(name: str) -> list[str]:
    """Dist backends vendor `name` supports inside an island, its native one first."""
    if name in BUILTIN_BACKENDS:
        return list(BUILTIN_BACKENDS[name])
    native = accelerator_class(name).dist_backend  # plugins declare theirs on the class
    return [native] if native == "gloo" else [native, "gloo"]


def probe_order() -> list[str]:
    """The order automatic selection tries vendors in."""
    return list(PROBE_FIRST) + sorted(_entry_points()) + list(PROBE_LAST)


def accelerator_class(name: str) -> type[Accelerator]:
    """The Accelerator subclass for `name` (imports its module, not its vendor package)."""
    if name in BUILTIN:
        module_name, class_name = BUILTIN[name].split(":")
        return getattr(importlib.import_module(module_name), class_name)
    plugins = _entry_points()
    if name in plugins:
        return plugins[name].load()
    raise UnknownAccelerator(f"unknown accelerator {name!r}; known: {', '.join(names())}")


def probe(name: str):
    """ProbeResult for one vendor; a plugin that fails to load is reported, not raised."""
    from accelerators.base import ProbeResult

    try:
        return accelerator_class(name).probe()
    except UnknownAccelerator:
        raise
    except Exception as exc:
        return ProbeResult(name, False, f"probe failed: {type(exc).__name__}: {exc}")


def probe_all() -> list:
    """ProbeResults in PROBE_ORDER, then `emulated` (reported, never auto-picked)."""
    return [probe(name) for name in probe_order()] + [probe("emulated")]


def select_name(name: str | None = None) -> tuple[str, str]:
    """(vendor name, why it was chosen)."""
    if name:
        return name, "asked for by name"
    from_env = os.environ.get(SELECT_ENV, "").strip()
    if from_env:
        return from_env, f"{SELECT_ENV}={from_env}"
    for candidate in probe_order():
        found = probe(candidate)
        if found.available:
            return candidate, f"first available in probe order ({found.reason})"
    raise AcceleratorUnavailable("no accelerator available, not even cpu")  # cpu always probes true


def get_accelerator(name: str | None = None, **options: Any):
    """The process's Accelerator; built on first call, returned again after.

    `options` go to the vendor's constructor (e.g. chip=... for `emulated`).
    Asking for a different vendor, or passing options, builds a new one, which
    becomes the process's accelerator.
    """
    global _current
    with _lock:
        if _current is not None and not options and not name and not os.environ.get(SELECT_ENV):
            return _current  # already selected: do not probe again
        chosen, _why = select_name(name)
        if _current is not None and not options and _current.vendor == chosen:
            return _current
        _current = accelerator_class(chosen)(**options)
        return _current


def current_accelerator():
    """The selected accelerator, selecting one (as get_accelerator()) if none is yet."""
    return _current if _current is not None else get_accelerator()


def set_accelerator(accelerator) -> None:
    """Make `accelerator` the process's accelerator (tests, embedding)."""
    global _current
    with _lock:
        _current = accelerator


def reset_accelerator() -> None:
    """Forget the selection; the next get_accelerator() selects again."""
    set_accelerator(None)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages vendors depend on, read from metadata only."""
    versions: dict[str, str | None] = {}
    for package in ("torch", "torch_npu", "torch_xmlir", "kunlun_ops"):
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
    return versions


def runtime_versions() -> dict[str, str | None]:
    """Versions torch itself reports (imports torch)."""
    import torch

    return {"torch": torch.__version__, "torch.version.cuda": torch.version.cuda,
            "torch.version.hip": getattr(torch.version, "hip", None)}
