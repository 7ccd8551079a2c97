#!/usr/bin/env bash
# Quickstart 1: set up .venv (idempotent) and run the main job on the embedded
# default, an emulated mixed fleet on this machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
hetero=(.venv/bin/hetero)
cluster=configs/emulated-mixed.yaml model=configs/llama-tiny.yaml train=configs/train-tiny.yaml

"${hetero[@]}" validate "$cluster" "$model" "$train"
"${hetero[@]}" run --cluster "$cluster" --model "$model" --train "$train" "$@"
