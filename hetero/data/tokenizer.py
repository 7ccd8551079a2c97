"""A Hugging Face tokenizer directory (tokenizer.json, as HF models ship it) and the
token that ends each document.

The end-of-document token, in this order: the one named with --eos; the
eos_token of tokenizer_config.json beside tokenizer.json (what the model was
trained with); else the first of WELL_KNOWN_EOS the vocabulary holds. None of
these: refused, asking for --eos.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from hetero.digest import file_sha256
from hetero.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
WELL_KNOWN_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclass(frozen=True)
class TokenizerInfo:
    directory: str
    path: str            # .../tokenizer.json
    sha256: str
    vocab_size: int      # with added tokens
    eos_token: str
    eos_id: int
    eos_source: str      # --eos | tokenizer_config.json | well-known name


def tokenizer_file(directory: str) -> str:
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such directory (expected a tokenizer directory with {TOKENIZER_FILE})")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (a Hugging Face tokenizer directory holds {TOKENIZER_FILE})")
    return path


def load_tokenizer(path: str):
    """tokenizers.Tokenizer from a tokenizer.json; one line when it is not one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("the 'tokenizers' package is missing; install it: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception for a bad file
        raise UserError(f"{path}: not a readable tokenizer.json ({str(exc).splitlines()[0]})") from None


def describe(directory: str, eos: str | None = None):
    """(tokenizers.Tokenizer, TokenizerInfo) of a tokenizer directory."""
    path = tokenizer_file(directory)
    tokenizer = load_tokenizer(path)
    token, source = _eos_token(directory, tokenizer, eos)
    info = TokenizerInfo(directory=os.path.abspath(directory), path=os.path.abspath(path), sha256=file_sha256(path),
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_token=token,
                         eos_id=tokenizer.token_to_id(token), eos_source=source)
    return tokenizer, info


def _eos_token(directory: str, tokenizer, requested: str | None) -> tuple[str, str]:
    if requested is not None:
        if tokenizer.token_to_id(requested) is None:
            raise UserError(f"--eos {requested!r}: not a token of {os.path.join(directory, TOKENIZER_FILE)}")
        return requested, "--eos"
    configured = _configured_eos(directory)
    if configured is not None and tokenizer.token_to_id(configured) is not None:
        return configured, CONFIG_FILE
    for token in WELL_KNOWN_EOS:
        if tokenizer.token_to_id(token) is not None:
            return token, "well-known name"
    raise UserError(f"{os.path.join(directory, TOKENIZER_FILE)}: no end-of-document token found (no eos_token in "
                    f"{CONFIG_FILE}, none of {', '.join(WELL_KNOWN_EOS)}); name one with --eos TOKEN")


def _configured_eos(directory: str) -> str | None:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = json.load(handle).get("eos_token")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(token, dict):          # {"content": "</s>", ...} in older files
        token = token.get("content")
    return token if isinstance(token, str) else None
