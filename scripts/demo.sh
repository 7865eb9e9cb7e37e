#!/usr/bin/env bash
# Set up .venv if needed, then upscale the bundled sample photo x4 with the bundled default x4
# model (models/paragonsr_nano_x2.safetensors is the x2 default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=models/paragonsr_nano_x4.safetensors
mkdir -p out
.venv/bin/paragonsr info "$model"
.venv/bin/paragonsr upscale paragonsr/data/chelsea_160x120.png out/chelsea_x4.png \
    --model "$model" --overwrite
echo "wrote out/chelsea_x4.png (640x480)"
