#!/usr/bin/env bash
# Set up .venv if needed, then upscale the bundled sample photo with the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=models/paragonsr_nano_x2.safetensors
mkdir -p out
.venv/bin/paragonsr info "$model"
.venv/bin/paragonsr upscale paragonsr/data/chelsea_160x120.png out/chelsea_x2.png \
    --model "$model" --overwrite
echo "wrote out/chelsea_x2.png (320x240)"
