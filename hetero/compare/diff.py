"""Two traces side by side: per row the largest absolute difference and the relative one,
and the first row beyond the tolerance.

The relative difference of a tensor is max|ours - theirs| / max|theirs|: relative to
the tensor's scale, not element by element (an element near zero would make any
rounding look huge). Of a scalar (the loss, a gradient norm) it is |ours - theirs| / |theirs|.
"""

from __future__ import annotations

import torch

from hetero.compare.trace import Trace

# Defaults of --rtol by compute dtype: fp32 must agree to rounding; bf16 and fp16 keep
# 8 and 11 significand bits, and two correct implementations differ by a few of their steps.
DEFAULT_RTOL = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}
_TINY = 1e-30


def compare_traces(ours: Trace, theirs: Trace, rtol: float) -> dict:
    """Rows in forward order (hidden states, logits, loss), then the gradient norms;
    `first_flagged` is the first row whose relative difference exceeds rtol."""
    rows = [_tensor_row(name, ours.hidden[name], theirs.hidden[name], "forward")
            for name in theirs.hidden if name in ours.hidden]
    missing = sorted(set(theirs.hidden) ^ set(ours.hidden))
    rows.append(_scalar_row("loss", ours.loss, theirs.loss, "loss"))
    rows += [_scalar_row(name, ours.grad_norms.get(name, float("nan")), value, "grad_norm")
             for name, value in theirs.grad_norms.items()]
    for row in rows:
        row["ok"] = bool(row["max_rel"] <= rtol)        # nan is not ok
    flagged = next((row for row in rows if not row["ok"]), None)
    finite = [row["max_rel"] for row in rows if row["max_rel"] == row["max_rel"]]
    return {"rtol": rtol, "rows": rows, "missing": missing,
            "first_flagged": flagged["name"] if flagged else None,
            "first_flagged_kind": flagged["kind"] if flagged else None,
            "worst_rel_diff": max(finite) if len(finite) == len(rows) else float("nan")}


def _tensor_row(name: str, ours: torch.Tensor, theirs: torch.Tensor, kind: str) -> dict:
    if ours.shape != theirs.shape:
        return {"name": name, "kind": kind, "max_abs": float("nan"), "max_rel": float("nan"),
                "note": f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"}
    diff = float((ours.double() - theirs.double()).abs().max())
    scale = float(theirs.double().abs().max())
    return {"name": name, "kind": kind, "max_abs": diff, "max_rel": diff / max(scale, _TINY)}


def _scalar_row(name: str, ours: float, theirs: float, kind: str) -> dict:
    diff = abs(ours - theirs)
    return {"name": name, "kind": kind, "ours": ours, "transformers": theirs,
            "max_abs": diff, "max_rel": diff / max(abs(theirs), _TINY)}
