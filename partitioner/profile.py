"""Profile DB: measured layer times per chip, TP degree and micro-batch, and the bridge.

File format (JSON, written by `hetero profile`, read by `hetero plan --profile`):

    {"format": "hetero-profile", "version": 1,
     "model": {"hidden": .., "heads": .., "kv_heads": .., "ffn_hidden": .., "seq_len": ..},
     "dtype": "fp32",
     "layers": [{"chip": "emu-fast", "accelerator": "emulated", "tp": 1, "micro_batch": 2,
                 "forward_s": .., "backward_s": .., "memory_bytes": ..}, ...],
     "bridge": {"gbps": .., "latency_us": ..}          # optional, GB/s and microseconds
     "host_costs": [{"chip": "emu-fast", "accelerator": "emulated", "micro_batch": 2,
                     "launch_s": .., "sync_s": .., "handoff_s": .., "optimizer_step_s": ..}, ...],
     "host": "..", "created": ".."}

`host_costs` (optional; a profile without it, or a chip without an entry, has
host costs of 0 s -- the cost model as it was before they were measured): the
fixed host work a stage pays whatever its layer count, measured per chip.
Per micro-batch: `launch_s` issuing its forward and its backward on an idle
queue (the engine synchronizes after each action, so every action starts on
one), `sync_s` its two synchronizes; `handoff_s` handing one micro-batch's
activation (or its gradient) across the bridge, once out and once in, less the
bytes the link model already charges; per step: `optimizer_step_s`, the
optimizer step's fixed part. The planner adds them (partitioner/costs.py).

A `tp` entry is the time of one TP shard's compute (weights split t ways); the
TP all-reduces are added from the link model. Lookups for a (chip, tp,
micro_batch) that was not measured use the analytic estimate, scaled by the
chip's median measured/analytic ratio when the chip has any measurement
("calibrated"); otherwise the estimate stands ("estimated").
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from partitioner.costs import LayerCost, analytic_layer
from partitioner.inputs import ChipModel, ModelSpec

FORMAT = "hetero-profile"
VERSION = 1
SHAPE_FIELDS = ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")


HOST_FIELDS = ("launch_s", "sync_s", "handoff_s", "optimizer_step_s")


class ProfileError(ValueError):
    """A profile file that cannot be read; the message names the file and field."""


@dataclass(frozen=True)
class HostCost:
    """Fixed host seconds of one stage on one chip (module docstring); all 0 when not measured."""

    launch_s: float = 0.0
    sync_s: float = 0.0
    handoff_s: float = 0.0
    optimizer_step_s: float = 0.0

    @property
    def micro_batch_s(self) -> float:
        """What every stage pays per micro-batch, whatever its layers: launch and synchronize."""
        return self.launch_s + self.sync_s

    def scaled(self, k: float) -> "HostCost":
        """These costs in a clock running k times slower than the host (a time-dilated run)."""
        return HostCost(*(getattr(self, name) / k for name in HOST_FIELDS))


NO_HOST_COST = HostCost()


@dataclass
class ProfileDB:
    model: dict = field(default_factory=dict)      # the layer shape the times were measured for
    dtype: str = "fp32"
    layers: list = field(default_factory=list)     # dicts as in the file format
    bridge: tuple[float, float] | None = None      # (bytes/s, seconds)
    meta: dict = field(default_factory=dict)
    host_costs: dict = field(default_factory=dict)  # chip name -> HostCost (absent: NO_HOST_COST)
    host_sources: dict = field(default_factory=dict)  # chip name -> {accelerator, micro_batch} it was measured on
    chips: dict = field(default_factory=dict)      # chip name -> ChipModel (for calibration), filled by users
    used: dict = field(default_factory=dict)       # (chip, tp, b) -> source, filled by lookups

    # -- building ---------------------------------------------------------------

    def add_layer(self, chip: str, tp: int, micro_batch: int, forward_s: float, backward_s: float,
                  memory_bytes: float | None = None, accelerator: str = "") -> None:
        self.layers = [e for e in self.layers
                       if (e["chip"], e["tp"], e["micro_batch"]) != (chip, tp, micro_batch)]
        self.layers.append({"chip": chip, "accelerator": accelerator, "tp": int(tp),
                            "micro_batch": int(micro_batch), "forward_s": float(forward_s),
                            "backward_s": float(backward_s),
                            "memory_bytes": None if memory_bytes is None else float(memory_bytes)})

    def add_host_cost(self, chip: str, cost: HostCost, accelerator: str = "", micro_batch: int | None = None) -> None:
        self.host_costs[chip] = cost
        self.host_sources[chip] = {"accelerator": accelerator, "micro_batch": micro_batch}

    # -- lookups -------------------------------------------------------------------

    def host_cost(self, chip: str) -> HostCost:
        """The chip's measured host costs; 0 s each when the profile has none (older files)."""
        return self.host_costs.get(chip, NO_HOST_COST)

    def matches(self, model: ModelSpec, dtype: str) -> bool:
        if dtype != self.dtype:
            return False
        return all(self.model.get(k) == getattr(model, k) for k in SHAPE_FIELDS)

    def find(self, chip: str, tp: int, b: int) -> dict | None:
        for entry in self.layers:
            if entry["chip"] == chip and entry["tp"] == tp and entry["micro_batch"] == b:
                return entry
        return None

    def layer_cost(self, chip: str, model: ModelSpec, tp: int, b: int, dtype: str,
                   analytic: LayerCost, chip_model: ChipModel | None = None) -> LayerCost:
        """The measured cost when there is one; else the analytic one, calibrated if possible."""
        if not self.matches(model, dtype):
            self.used[(chip, tp, b)] = "estimated"
            return analytic
        entry = self.find(chip, tp, b)
        core_share = analytic.attention_core_s / analytic.forward_s if analytic.forward_s else 0.0
        if entry is not None:
            self.used[(chip, tp, b)] = "measured"
            fwd = entry["forward_s"]
            return LayerCost(fwd, entry["backward_s"], fwd * core_share, "measured")
        ratio = self._ratio(chip, model, dtype, chip_model, tp)
        if ratio is not None:
            self.used[(chip, tp, b)] = "calibrated"
            return LayerCost(analytic.forward_s * ratio, analytic.backward_s * ratio,
                             analytic.attention_core_s * ratio, "calibrated")
        self.used[(chip, tp, b)] = "estimated"
        return analytic

    def _ratio(self, chip: str, model: ModelSpec, dtype: str, chip_model: ChipModel | None,
               tp: int | None = None) -> float | None:
        """Measured over analytic for the chip: the median over its entries at TP degree `tp` where
        there are any (a TP degree changes what a layer's shard runs besides its FLOPs: smaller
        kernels, the collectives around them), else over all of them."""
        spec = chip_model or self.chips.get(chip)
        if spec is None:
            return None
        entries = [e for e in self.layers if e["chip"] == chip]
        ratios = []
        for entry in [e for e in entries if e["tp"] == tp] or entries:
            est = analytic_layer(spec, model, entry["tp"], entry["micro_batch"], dtype)
            total = est.forward_s + est.backward_s
            if total > 0:
                ratios.append((entry["forward_s"] + entry["backward_s"]) / total)
        return statistics.median(ratios) if ratios else None

    # -- files -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "version": VERSION, "model": dict(self.model), "dtype": self.dtype,
               "layers": list(self.layers)}
        if self.bridge is not None:
            out["bridge"] = {"gbps": self.bridge[0] / 1e9, "latency_us": self.bridge[1] * 1e6}
        if self.host_costs:
            out["host_costs"] = [{"chip": chip, **{k: v for k, v in self.host_sources.get(chip, {}).items()
                                                   if v is not None},
                                  **asdict(cost)} for chip, cost in self.host_costs.items()]
        out.update({k: v for k, v in self.meta.items() if k not in out})
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def from_dict(cls, data, source: str = "profile") -> "ProfileDB":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{source}: not a hetero profile (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ProfileError(f"{source}: version: expected {VERSION}, got {data.get('version')!r}")
        model = data.get("model")
        if not isinstance(model, dict) or any(not isinstance(model.get(k), int) for k in SHAPE_FIELDS):
            raise ProfileError(f"{source}: model: expected integers {', '.join(SHAPE_FIELDS)}")
        clean = []
        for where, entry in _chip_entries(data.get("layers"), "layers", source):
            for key in ("tp", "micro_batch"):
                if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool) or entry[key] < 1:
                    raise ProfileError(f"{where}.{key}: expected a positive integer")
            for key in ("forward_s", "backward_s"):
                value = entry.get(key)
                if not _is_number(value) or not value > 0:
                    raise ProfileError(f"{where}.{key}: expected a positive number of seconds")
            clean.append({"chip": entry["chip"], "accelerator": str(entry.get("accelerator", "")),
                          "tp": entry["tp"], "micro_batch": entry["micro_batch"],
                          "forward_s": float(entry["forward_s"]), "backward_s": float(entry["backward_s"]),
                          "memory_bytes": entry.get("memory_bytes")})
        bridge = None
        if data.get("bridge") is not None:
            br = data["bridge"]
            if (not isinstance(br, dict) or not isinstance(br.get("gbps"), (int, float))
                    or not br["gbps"] > 0 or not isinstance(br.get("latency_us"), (int, float))
                    or br["latency_us"] < 0):
                raise ProfileError(f"{source}: bridge: expected {{\"gbps\": >0, \"latency_us\": >=0}}")
            bridge = (br["gbps"] * 1e9, br["latency_us"] * 1e-6)
        meta = {k: v for k, v in data.items() if k in ("host", "created", "accelerators", "notes")}
        db = cls(model={k: model[k] for k in SHAPE_FIELDS}, dtype=str(data.get("dtype", "fp32")),
                 layers=clean, bridge=bridge, meta=meta)
        for chip, cost, accelerator, micro_batch in _host_costs(data.get("host_costs"), source):
            db.add_host_cost(chip, cost, accelerator, micro_batch)
        return db

    @classmethod
    def load(cls, path: str) -> "ProfileDB":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=path)


def _chip_entries(entries, field: str, source: str):
    """(where, entry) for each entry of the file's list `field`, each an object naming its chip."""
    if not isinstance(entries, list):
        raise ProfileError(f"{source}: {field}: expected a list")
    for index, entry in enumerate(entries):
        where = f"{source}: {field}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("chip"), str):
            raise ProfileError(f"{where}: expected an object with a 'chip' name")
        yield where, entry


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _host_costs(entries, source: str) -> list:
    """The file's `host_costs` list, checked: (chip, HostCost, accelerator, micro_batch) each.
    Absent: none (every chip's host costs are 0 s); a missing field of an entry is 0 s too."""
    if entries is None:
        return []
    out = []
    for where, entry in _chip_entries(entries, "host_costs", source):
        values = {}
        for key in HOST_FIELDS:
            value = entry.get(key, 0.0)
            if not _is_number(value) or not 0 <= value < float("inf"):
                raise ProfileError(f"{where}.{key}: expected a number of seconds >= 0")
            values[key] = float(value)
        micro_batch = entry.get("micro_batch")
        out.append((entry["chip"], HostCost(**values), str(entry.get("accelerator", "")),
                    micro_batch if isinstance(micro_batch, int) and not isinstance(micro_batch, bool) else None))
    return out
