"""The choices the command line and the nodes offer, importable without torch (argument parsing
and ``--help`` answer before any heavy import)."""

from __future__ import annotations

MODES = ("exact", "overlap")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ALPHA_MODES = ("bilinear", "model")
# The one pixel limit for every image read (upscale inputs, training and validation data);
# --max-pixels raises it. 8000x8000: about 0.8 GB as float32 RGB.
DEFAULT_MAX_PIXELS = 64_000_000
