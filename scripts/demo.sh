#!/usr/bin/env bash
# Set up .venv if needed, then inspect the bundled checkpoint and fuse it for release.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=models/demo_nano_x2_untrained.safetensors
mkdir -p out
.venv/bin/paragonsr info "$model"
.venv/bin/paragonsr fuse "$model" out/demo_nano_x2_untrained.fused.safetensors --overwrite
.venv/bin/paragonsr info out/demo_nano_x2_untrained.fused.safetensors
