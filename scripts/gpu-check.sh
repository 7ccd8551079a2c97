#!/usr/bin/env bash
# The GPU check (issue 13): on a machine with one NVIDIA GPU, in a few minutes,
#   1. the accelerator tests on `cuda` (pytest: tests/accelerators/test_vendor_attention_cuda.py runs
#      the accelerator and ops on the device; the ops suites beside it run on the host),
#   2. op parity on the device against the plain-torch reference,
#   3. a mixed run: a 1-GPU `cuda` island + a 1-chip `cpu` island through the bridge,
#      losses against one process (configs/gpu-check.yaml),
#   4. single-chip MFU of a ~1B-parameter Llama in bf16 against the catalog peak.
# Usage: bash scripts/gpu-check.sh [--json] [more hetero.bench.gpu_check flags]
# With --json, stdout is one JSON object; everything else goes to stderr.
# CI never runs this (no GPU). Without a GPU it stops at once: one line, exit code 4.
# A failing pytest does not stop the measurements; the exit code is then 1.
#
# torch: scripts/setup.sh installs torch only where none is importable. A torch
# that already has CUDA is used as it is, never replaced. A CPU-only torch on a
# GPU machine is replaced by the same version from the default index (on Linux
# x86_64 that wheel is the CUDA build); set HETERO_TORCH_SPEC to pin another
# (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NO_GPU=4
say() { echo "gpu-check: $*" >&2; }

# 1. Fail fast, before any install, when the machine has no NVIDIA GPU.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA GPU: nvidia-smi not found (this check needs one CUDA GPU; CI does not run it)"
    exit "$NO_GPU"
fi
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    say "no NVIDIA GPU: nvidia-smi lists none (driver not loaded or CUDA_VISIBLE_DEVICES empty)"
    exit "$NO_GPU"
fi

# 2. The venv, as scripts/test.sh sets it up; its output goes to stderr.
bash scripts/setup.sh --dev >&2
py=.venv/bin/python
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
if [[ -z "$torch_cuda" ]]; then
    version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
    spec="${HETERO_TORCH_SPEC:-torch==$version}"
    say "torch $version in .venv is a CPU build: installing $spec (CUDA build) in its place"
    "$py" -m pip --disable-pip-version-check -q uninstall -y torch >&2
    # shellcheck disable=SC2086  # HETERO_TORCH_SPEC may carry pip options
    "$py" -m pip --disable-pip-version-check -q install $spec >&2
fi
"$py" -m hetero.bench.gpu_check --accelerator cuda --stages preflight >&2 || exit "$NO_GPU"

# 3. The accelerator tests on the device.
say "pytest: accelerator and ops tests on cuda"
tests=0
"$py" -m pytest -q -p no:cacheprovider tests/accelerators/test_vendor_attention_cuda.py tests/accelerators/test_ops.py \
    tests/accelerators/test_ops_vendor.py tests/accelerators/test_vendor_attention.py >&2 || tests=$?
[[ "$tests" == 0 ]] || say "pytest FAILED (exit $tests); the measurements still run"

# 4. Op parity, the mixed run and MFU (text, or one JSON object with --json).
measured=0
"$py" -m hetero.bench.gpu_check --accelerator cuda "$@" || measured=$?
if [[ "$measured" != 0 ]]; then exit "$measured"; fi
[[ "$tests" == 0 ]] || exit 1
