"""Documents from input files, in order, in batches sized for one encode call.

Plain text: a file's documents are its blocks of lines separated by one or more
blank lines (a file without blank lines is one document). JSONL (*.jsonl, *.json):
one JSON object per line with a string "text"; blank lines are skipped.
A bad JSONL line is named by file and line number.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from hetero.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")
BATCH_CHARS = 1 << 20        # about 1 MB of text per encode call: big enough for the threads
BATCH_DOCUMENTS = 4096


def check_inputs(paths: list[str]) -> None:
    """Refuse a missing or unreadable input before any work starts."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: not readable")


def documents(path: str) -> Iterator[tuple[str, int]]:
    """The documents of one input file, each with the bytes of the file it used up (for progress)."""
    reader = _jsonl if path.lower().endswith(JSONL_SUFFIXES) else _plain_text
    try:
        with open(path, encoding="utf-8") as handle:
            yield from reader(path, handle)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def batches(paths: list[str]) -> Iterator[tuple[list[str], int]]:
    """(documents, the input bytes they used up) of all inputs in order, about BATCH_CHARS at a time."""
    batch: list[str] = []
    size = 0
    for path in paths:
        for text, used in documents(path):
            batch.append(text)
            size += used
            if size >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


def _plain_text(path: str, handle) -> Iterator[tuple[str, int]]:
    del path
    lines: list[str] = []
    used = 0
    for line in handle:
        used += len(line.encode("utf-8"))
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\n"), used
            lines, used = [], 0
    if lines:
        yield "".join(lines).rstrip("\n"), used


def _jsonl(path: str, handle) -> Iterator[tuple[str, int]]:
    used = 0
    for number, line in enumerate(handle, 1):
        used += len(line.encode("utf-8"))
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not a JSON line ({exc})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: expected a JSON object with a string \"text\"")
        yield text, used
        used = 0
