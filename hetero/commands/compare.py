"""`hetero compare --model HF_DIR`: one batch through hetero and through transformers,
per layer, to find where the numbers part (hetero.compare)."""

from __future__ import annotations

import json
import math

from hetero.commands.flags import add_job_files, number, whole
from hetero.runner import KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare hetero's numbers with transformers' on one batch, layer by layer",
        description=(
            "Run one batch (step 1's batch of the synthetic stream for --seed) through hetero's model loaded "
            "from a Hugging Face Llama directory -- on a fleet as a run would (the plan's stages, TP, micro-batches, "
            "bridge and gradient reductions; default: the embedded emulated fleet), or in one process with --local "
            "-- and through transformers' LlamaForCausalLM on the CPU; print "
            "per layer the largest absolute and relative difference of the hidden states, then the logits, the "
            "loss and each layer's gradient norm, and flag the first row beyond --rtol. Relative differences "
            "are max|ours - theirs| / max|theirs|. Exits 1 when a row is flagged. Needs transformers."))
    add_job_files(parser, ("model", "cluster"), defaults={"cluster": "emulated-mixed.yaml"},
                  described={"model": ("HF_DIR", "Hugging Face Llama directory (config.json + *.safetensors)")})
    parser.add_argument("--plan", metavar="FILE", help="plan JSON to run (default: the planner's best)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="auto",   # the plan kinds `hetero run` trains
                        help="without --plan: plan hetero-PP (pipeline), hetero-DP (replicas), hetero-DP of "
                             "hetero-PP pipelines (hybrid: three islands or more) or let the planner pick "
                             "(auto, the default); with --plan: the kind the plan must be")
    parser.add_argument("--local", action="store_true",
                        help="one process: the whole model as one stage on this host's CPU, no fleet")
    parser.add_argument("--out", metavar="DIR", help="keep the fleet run's files here (plan, logs, what each "
                                                     "rank saw); default: a scratch folder, kept only on failure")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="compute dtype of both sides (default fp32)")
    parser.add_argument("--rtol", type=number(0.0, 1.0, low_open=True),
                        help="relative tolerance (default: 1e-5 for fp32, 5e-2 for bf16, 1e-2 for fp16)")
    parser.add_argument("--batch", type=whole(1, 1024), default=2, help="samples in the batch (default 2)")
    parser.add_argument("--seq-len", type=whole(1, 1 << 16), default=64,
                        help="tokens per sample (default 64, at most the model's max_position_embeddings)")
    parser.add_argument("--seed", type=whole(0, (1 << 63) - 1), default=0, help="seed of the batch (default 0)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero.errors import UserError

    common = dict(dtype=args.dtype, batch=args.batch, seq_len=args.seq_len, seed=args.seed, rtol=args.rtol)
    if args.local:
        if args.cluster or args.plan or args.out or args.kind != "auto":
            raise UserError("--local runs in one process: --cluster, --plan, --kind and --out are for a fleet")
        from hetero.compare.local import compare_local

        result = compare_local(args.model, **common)
    else:
        from hetero.compare.fleet import compare_fleet

        result = compare_fleet(args.model, cluster=args.cluster, plan_file=args.plan, out=args.out,
                               kind=args.kind, **common)
    if args.json:
        print(json.dumps(result, indent=2, default=_json_number))
    else:
        print("\n".join(summary_lines(result)))
    return 1 if result["first_flagged"] else 0


def summary_lines(result: dict) -> list[str]:
    default = " (the default for " + result["dtype"] + ")" if result["rtol_default"] else ""
    lines = [f"hetero compare: {result['model']}, {result['layers']} layers, {result['dtype']}, "
             f"batch {result['batch']} x {result['seq_len']} tokens (seed {result['seed']}), {result['where']}; "
             f"rtol {result['rtol']:g}{default}",
             f"{'':<18}{'max abs':>12}{'max rel':>12}"]
    for row in result["rows"]:
        if row["kind"] == "grad_norm" and row is _first(result["rows"], "grad_norm"):
            lines.append(f"gradient norms{'':<4}{'hetero':>12}{'transformers':>14}{'rel':>10}")
        label = row["name"] if row["kind"] != "loss" else "loss"
        mark = "" if row["ok"] else "  <-- beyond rtol"
        if row["kind"] == "forward":
            lines.append(f"  {label:<16}{row['max_abs']:>12.3e}{row['max_rel']:>12.3e}{mark}")
        else:
            lines.append(f"  {label:<16}{row['ours']:>12.6g}{row['transformers']:>14.6g}{row['max_rel']:>10.2e}{mark}")
    if result["first_flagged"]:
        lines.append(f"first beyond rtol: {result['first_flagged']} ({result['first_flagged_kind']}); "
                     f"worst relative difference {result['worst_rel_diff']:.3e}")
    else:
        lines.append(f"every row within rtol; worst relative difference {result['worst_rel_diff']:.3e}")
    return lines


def _first(rows: list[dict], kind: str):
    return next((row for row in rows if row["kind"] == kind), None)


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
