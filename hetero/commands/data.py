"""`hetero data prepare` (text -> token file + sidecar) and `hetero data bench`
(its speed beside the tokenizers library's own encode_batch)."""

from __future__ import annotations

import json
import os
import sys

from hetero.commands.flags import whole


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data: text through a Hugging Face tokenizer",
                                   description="Turn text into the token files 'data: {kind: tokens}' trains on.")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    prepare = commands.add_parser(
        "prepare", help="encode text/JSONL documents into a token file + JSON sidecar",
        description=(
            "Encode documents with a Hugging Face tokenizer (DIR/tokenizer.json) into one flat token file "
            "(uint16 when the vocabulary fits, else uint32) and OUT.json beside it (vocab size, token dtype, "
            "token and document counts, the tokenizer file's sha256). Plain-text inputs: documents are blocks "
            "separated by blank lines; *.jsonl/*.json inputs: one {\"text\": ...} object per line. Each "
            "document ends with the end-of-document token: --eos, else tokenizer_config.json's eos_token, "
            "else a well-known one (</s>, <|endoftext|>, ...). Train on it with data: {kind: tokens, path: OUT}."))
    _common(prepare)
    prepare.add_argument("--out", required=True, metavar="DATA", help="token file to write (its sidecar: DATA.json)")
    prepare.add_argument("--json", action="store_true", help="print the summary as JSON")
    prepare.set_defaults(func=run_prepare)
    bench = commands.add_parser(
        "bench", help="time 'data prepare' beside the tokenizers library's own encode_batch on the same input",
        description="Prepare INPUT into a scratch directory, then encode the same documents with "
                    "tokenizers' encode_batch alone; print both rates and their ratio (goal >= 0.8).")
    _common(bench)
    bench.add_argument("--json", action="store_true", help="print the numbers as JSON")
    bench.set_defaults(func=run_bench)
    parser.set_defaults(func=lambda args: _usage(parser))


def _common(parser) -> None:
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE", help="plain-text or JSONL files")
    parser.add_argument("--eos", metavar="TOKEN", help="end-of-document token (default: the tokenizer's eos)")
    parser.add_argument("--workers", type=whole(1, 256), default=1,
                        help="encoding processes (default 1: encode_batch already uses every core)")


def _usage(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_prepare(args) -> int:
    from hetero.data.prepare import Progress, prepare

    total = sum(os.path.getsize(path) for path in args.input if os.path.isfile(path))
    summary = prepare(args.tokenizer, args.input, args.out, eos=args.eos, workers=args.workers,
                      progress=Progress(total))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"wrote {summary['out']}: {summary['tokens']:,} {summary['token_dtype']} tokens, "
          f"{summary['documents']:,} documents, {summary['tokens_per_s']:,.0f} tokens/s")
    print(f"      {summary['sidecar']}: vocab {summary['vocab_size']:,}, end of document "
          f"{summary['eos_token']!r} (id {summary['eos_id']}, from {summary['eos_source']})")
    return 0


def run_bench(args) -> int:
    from hetero.data.bench import bench

    numbers = bench(args.tokenizer, args.input, workers=args.workers, eos=args.eos)
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0
    print(f"{numbers['bytes'] / 1e6:.1f} MB, {numbers['documents']:,} documents, {numbers['tokens']:,} tokens")
    print(f"hetero data prepare (workers {numbers['workers']}): {numbers['prepare_tokens_per_s']:,.0f} tokens/s")
    print(f"tokenizers encode_batch alone:  {numbers['encode_batch_tokens_per_s']:,.0f} tokens/s")
    if numbers["encode_batch_fast_tokens_per_s"]:
        print(f"tokenizers encode_batch_fast alone: {numbers['encode_batch_fast_tokens_per_s']:,.0f} tokens/s")
    print(f"ratio to encode_batch {numbers['ratio']:.2f} (goal >= 0.8)")
    return 0
