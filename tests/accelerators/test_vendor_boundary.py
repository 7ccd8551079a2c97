"""Vendor names stay inside accelerators/.

Outside it, Python code must not use `torch.cuda`, a "cuda" device string,
or torch_npu / torch_xmlir (docs/architecture.md, The four packages). Comments and prose
in docstrings are fine; code is parsed with `ast`, so only real uses count.
tests/ is exempt: the fakes must name the vendors.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap

import pytest
from tests.conftest import ROOT

SCANNED = ("hetero", "partitioner", "comm_bridge", "scripts")
VENDOR_MODULE = re.compile(r"torch_(npu|xmlir)(\..*)?")
CUDA_STRING = re.compile(r"cuda(:\d+)?")


def violations(source: str, filename: str = "<string>") -> list[str]:
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr == "cuda" \
                and isinstance(node.value, ast.Name) and node.value.id == "torch":
            report(node, "torch.cuda")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.cuda" or alias.name.startswith("torch.cuda."):
                    report(node, f"import {alias.name}")
                if VENDOR_MODULE.fullmatch(alias.name):
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if VENDOR_MODULE.fullmatch(node.module) or node.module.startswith("torch.cuda"):
                report(node, f"from {node.module} import ...")
            if node.module == "torch" and any(a.name == "cuda" for a in node.names):
                report(node, "from torch import cuda")
        elif isinstance(node, ast.Name) and VENDOR_MODULE.fullmatch(node.id):
            report(node, node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if CUDA_STRING.fullmatch(node.value):
                report(node, repr(node.value))
            elif VENDOR_MODULE.fullmatch(node.value):
                report(node, repr(node.value))
    return found


def python_files() -> list[str]:
    files = []
    for top in SCANNED:
        for directory, _dirs, names in os.walk(os.path.join(ROOT, top)):
            files.extend(os.path.join(directory, n) for n in names if n.endswith(".py"))
    return sorted(files)


def test_no_vendor_names_outside_accelerators():
    files = python_files()
    assert any(f.endswith(os.path.join("hetero", "cli.py")) for f in files)  # the scan sees the tree
    found = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            found += violations(handle.read(), os.path.relpath(path, ROOT))
    assert found == [], "vendor names outside accelerators/:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.cuda.synchronize()",
    "x = t.to('cuda')",
    "device = 'cuda:1'",
    "import torch_npu",
    "import torch_xmlir.xpu",
    "from torch_npu.contrib import transfer_to_npu",
    "from torch import cuda",
    "import importlib\nimportlib.import_module('torch_npu')",
    "def f(torch_npu): return torch_npu",
])
def test_checker_catches(snippet):
    assert violations(snippet)


def test_checker_allows_prose_and_device_agnostic_code():
    clean = textwrap.dedent('''
        """Runs on CUDA, torch_npu or torch_xmlir chips alike."""
        # torch.cuda is never touched here
        device = accelerator.device()
        message = "no cuda device visible"
    ''')
    assert violations(clean) == []
