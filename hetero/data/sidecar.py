"""The JSON sidecar `hetero data prepare` writes beside a token file (DATA.json): what
training needs without reading the tokens (count, dtype, vocabulary size), and where
they came from (tokenizer and its sha256, end-of-document token, inputs)."""

from __future__ import annotations

import json
import os

from hetero.atomic import write_atomic
from hetero.errors import UserError

SIDECAR_SUFFIX = ".json"
FORMAT = "hetero-tokens/1"
TOKEN_DTYPES = ("uint16", "uint32")


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def write_sidecar(path: str, fields: dict) -> dict:
    """Write token file `path`'s sidecar atomically; return what it holds."""
    sidecar = {"format": FORMAT, **fields}
    write_atomic(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def read_sidecar(path: str) -> dict | None:
    """Token file `path`'s sidecar, or None when there is none (an older or hand-made file)."""
    sidecar = sidecar_path(path)
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as handle:
            meta = json.load(handle)
        tokens, vocab, dtype = int(meta["tokens"]), int(meta["vocab_size"]), meta["token_dtype"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{sidecar}: not a token-file sidecar ({exc}); delete it or prepare the data again") from None
    if dtype not in TOKEN_DTYPES:
        raise UserError(f"{sidecar}: token_dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    return {**meta, "tokens": tokens, "vocab_size": vocab}
