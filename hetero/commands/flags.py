"""argparse types for numeric flags, each with its range: a bad value is refused by
argparse (exit 2, the flag named) instead of being used or silently replaced."""

from __future__ import annotations

import argparse
import math


def whole(low: int, high: int):
    """A type for a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {value}")
        return value

    parse.__name__ = "whole number"     # argparse names the type by it in its messages
    return parse


def number(low: float, high: float, low_open: bool = False):
    """A type for a finite number in [low, high] ((low, high] with low_open)."""
    bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


MAX_TIMEOUT_S = 7 * 24 * 3600.0


def add_recovery_flags(parser) -> None:
    """--hang-timeout, --rejoin-timeout and --no-elastic, as `hetero run` and `hetero launch` both take them."""
    parser.add_argument("--hang-timeout", type=number(0, MAX_TIMEOUT_S, low_open=True), metavar="S",
                        help="declare the job hung when no rank's training loop has moved for S seconds: the stuck "
                             "rank's Python stacks go to <run dir>/stacks/, it is killed, and the job takes the "
                             "failure path (restart from the last checkpoint if --max-restarts allows); default: the "
                             "larger of 60 s and 5 x the plan's predicted step time (said at start); an attempt's "
                             "first step gets 3 x S")
    parser.add_argument("--rejoin-timeout", type=number(0, MAX_TIMEOUT_S, low_open=True), metavar="S",
                        help="before a restart, seconds the head waits for every node to be back; the nodes still "
                             "missing then are lost, and the job is re-planned on the chips that remain and resumes "
                             "from its last checkpoint (a lost node started again is taken back at the next "
                             "checkpoint); default 60")
    parser.add_argument("--no-elastic", dest="elastic", action="store_false",
                        help="never re-plan: every restart waits for the same fleet")


JOB_FILES = {
    "cluster": ("FILE", "cluster YAML"),
    "model": ("PATH", "model YAML, or a Hugging Face Llama directory (config.json + *.safetensors)"),
    "train": ("FILE", "train YAML"),
}


def add_job_files(parser, kinds=("cluster", "model", "train"), *, optional=(), defaults=None, notes=None,
                  described=None) -> None:
    """--cluster/--model/--train, declared alike by every command that reads a job: required unless in
    `optional` or given a default (`defaults`: {kind: file under configs/}); `notes`: {kind: text added
    to the help}; `described`: {kind: (metavar, help)} for a command that takes another form of the file
    (`hetero compare --model HF_DIR`)."""
    for kind in kinds:
        metavar, text = (described or {}).get(kind, JOB_FILES[kind])
        text += (notes or {}).get(kind, "")
        if defaults and kind in defaults:
            parser.add_argument(f"--{kind}", metavar=metavar, help=f"{text} (default configs/{defaults[kind]})")
        else:
            parser.add_argument(f"--{kind}", required=kind not in optional, metavar=metavar, help=text)
