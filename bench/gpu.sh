#!/usr/bin/env bash
# GPU figures (issue 7): one prepared run of at most about five minutes on one CUDA GPU.
# Sets up .venv if needed, prints a table; record it with the card's name in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi
timeout 330 .venv/bin/python bench/gpu.py
