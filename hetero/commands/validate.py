"""`hetero validate FILE...`: check descriptions, alone and together."""

from __future__ import annotations

import json
import sys
from typing import Any

from hetero.config import load_files, load_sections
from hetero.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check cluster, model and train YAML files",
        description=(
            "Check each YAML file (types, ranges, names, known chips and accelerators), then the "
            "rules across them. Each file holds one description (cluster, model or train) or several "
            "under top-level cluster:/model:/train: keys. Exits 0 when all are valid, 2 otherwise."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files to check")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    results = []
    for path in args.files:
        try:
            kinds = sorted(load_sections(path))
            results.append({"file": path, "ok": True, "describes": kinds})
        except UserError as exc:
            results.append({"file": path, "ok": False, "error": str(exc)})
    combined: dict[str, Any] | None = None
    if all(r["ok"] for r in results):
        try:
            job = load_files(args.files)
            combined = {"ok": True, "summary": summarize(job)}
        except UserError as exc:
            combined = {"ok": False, "error": str(exc)}
    ok = all(r["ok"] for r in results) and bool(combined and combined["ok"])

    if args.json:
        print(json.dumps({"ok": ok, "files": results, "combined": combined}, indent=2))
    else:
        for r in results:
            if r["ok"]:
                print(f"ok    {r['file']} ({', '.join(r['describes'])})")
            else:
                print(f"error {r['error']}", file=sys.stderr)
        if combined and combined["ok"]:
            for line in combined["summary"]:
                print(f"      {line}")
        elif combined:
            print(f"error {combined['error']}", file=sys.stderr)
    return 0 if ok else 2


def summarize(job) -> list[str]:
    lines = []
    if job.cluster:
        islands = ", ".join(f"{i.name}: {i.size} x {i.chip}" for i in job.cluster.islands)
        lines.append(f"cluster {job.cluster.name}: {job.cluster.total_chips} chips ({islands})")
    if job.model:
        m = job.model
        lines.append(f"model {m.name}: {m.layers} layers, hidden {m.hidden}, {m.heads}/{m.kv_heads} heads, "
                     f"vocab {m.vocab}, seq {m.seq_len}")
    if job.train:
        t = job.train
        lines.append(f"train: global batch {t.global_batch}, micro batch {t.micro_batch}, {t.dtype}, "
                     f"{t.steps} steps, data {t.data.kind}")
    return lines
