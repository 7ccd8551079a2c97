"""`hetero export CHECKPOINT --hf OUT_DIR`: a checkpoint as a Hugging Face Llama directory (hetero.export)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face Llama directory (config.json + safetensors)",
        description=(
            "Write the weights of CHECKPOINT -- a checkpoint folder (step-NNNNNNNN), a checkpoint directory or "
            "a run directory (their latest checkpoint), of any plan and sharding -- as a Hugging Face Llama "
            "directory that transformers' LlamaForCausalLM.from_pretrained loads: config.json, "
            "generation_config.json, model-NNNNN-of-NNNNN.safetensors shards with model.safetensors.index.json, "
            "and the tokenizer files when the run trained on data prepared with a tokenizer. No optimizer state. "
            "Every checkpoint file is checked against its sha256 as it is read; tensors are streamed one output "
            "shard at a time."))
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder, checkpoint directory or run "
                                                                 "directory")
    parser.add_argument("--hf", required=True, metavar="OUT_DIR", help="directory to write (new or empty)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the exported weights (default: the checkpoint's)")
    parser.add_argument("--shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB; a larger tensor gets "
                             "a file of its own)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="leave out the run's tokenizer files")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero.export.export import export_hf

    summary = export_hf(args.checkpoint, args.hf, dtype=args.dtype, shard_size=args.shard_size,
                        with_tokenizer=not args.no_tokenizer, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    tokenizer = f", tokenizer from {summary['tokenizer']}" if summary["tokenizer"] else ", no tokenizer"
    print(f"wrote {summary['out']}: step {summary['step']}, {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters as {summary['dtype']}, {summary['shards']} shard"
          f"{'s' if summary['shards'] > 1 else ''}, {summary['bytes'] / 1e6:,.1f} MB{tokenizer}")
    return 0
