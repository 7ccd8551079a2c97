"""The tokenizer a run trained with, for the exported model.

A run on prepared text (train data {kind: tokens, path: DATA}) has DATA.json beside its token file
(hetero.data.sidecar): the tokenizer directory and the sha256 of its tokenizer.json. Those files are
exported when tokenizer.json still has that hash (a different tokenizer would silently re-map every
id); a run on synthetic data, or on a token file without a sidecar, had no tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil

import yaml

from hetero.data.sidecar import read_sidecar
from hetero.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, load_tokenizer
from hetero.digest import file_sha256
from hetero.errors import UserError

# The files of a Hugging Face tokenizer directory that travel with a model.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def run_tokenizer(run_dir: str | None) -> dict | None:
    """The run's data sidecar when it trained on prepared tokens with a tokenizer, else None."""
    if run_dir is None:
        return None
    path = os.path.join(run_dir, "train.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable YAML ({' '.join(str(exc).split())})") from None
    section = raw.get("train") if isinstance(raw, dict) and isinstance(raw.get("train"), dict) else raw
    data = section.get("data") if isinstance(section, dict) else None
    if not isinstance(data, dict) or data.get("kind") != "tokens" or not isinstance(data.get("path"), str):
        return None
    sidecar = read_sidecar(os.path.join(os.path.dirname(path), data["path"]))
    return sidecar if sidecar and isinstance(sidecar.get("tokenizer"), str) else None


def check_tokenizer(sidecar: dict) -> str:
    """The tokenizer directory the sidecar names, checked to still hold the same tokenizer.json."""
    directory = sidecar["tokenizer"]
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (the run's data was prepared with it); restore it or pass --no-tokenizer")
    if sidecar.get("tokenizer_sha256") and file_sha256(path) != sidecar["tokenizer_sha256"]:
        raise UserError(f"{path}: changed since the run's data was prepared with it (sha256 differs from the "
                        "data sidecar's); restore it or pass --no-tokenizer")
    return directory


def special_ids(directory: str, sidecar: dict) -> dict:
    """{bos_token_id, eos_token_id} as far as they are known: eos from the sidecar (what ended each
    document), bos from tokenizer_config.json's bos_token."""
    ids = {}
    bos = _config(directory).get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if isinstance(bos, str):
        bos_id = load_tokenizer(os.path.join(directory, TOKENIZER_FILE)).token_to_id(bos)
        if bos_id is not None:
            ids["bos_token_id"] = bos_id
    if isinstance(sidecar.get("eos_id"), int):
        ids["eos_token_id"] = sidecar["eos_id"]
    return ids


def copy_tokenizer(directory: str, out: str, sidecar: dict, max_length: int) -> list[str]:
    """Copy the tokenizer files into `out`; a tokenizer directory without tokenizer_config.json gets one
    (transformers' AutoTokenizer needs it to pick the fast tokenizer class). Returns the file names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            shutil.copyfile(os.path.join(directory, name), os.path.join(out, name))
            copied.append(name)
    if CONFIG_FILE not in copied:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
        if isinstance(sidecar.get("eos_token"), str):
            config["eos_token"] = sidecar["eos_token"]
        with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        copied.append(CONFIG_FILE)
    return copied


def _config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
