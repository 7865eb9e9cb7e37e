"""Checkpoint load time for every family member, as a table.

    .venv/bin/python bench/bench_load.py [--scale 4] [--repeats 3]

Each variant is saved once (training and fused form) to a temporary folder, then loaded with
``paragonsr.load_model`` and with ``spandrel.ModelLoader().load_from_file``. The files were just
written, so they come from the page cache: this measures parsing, detection and model
construction, not the disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import spandrel
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds  # noqa: E402

from paragonsr import (  # noqa: E402
    VARIANTS,
    build_model,
    fuse_for_release,
    load_model,
    save_checkpoint,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# load time, x{args.scale}, {args.threads} threads, median of {args.repeats}, "
        f"torch {torch.__version__}"
    )
    print("| variant | form     |    params |   MB | load_model s | spandrel s |")
    print("|---------|----------|-----------|------|--------------|------------|")
    with tempfile.TemporaryDirectory() as folder:
        for name in VARIANTS:
            model = build_model(name, args.scale)
            for form in ("training", "fused"):
                if form == "fused":
                    fuse_for_release(model)
                path = save_checkpoint(model, Path(folder) / f"{name}.{form}.safetensors")
                params = sum(p.numel() for p in model.parameters())
                ours = median_seconds(lambda p=path: load_model(p), args.repeats, warm_up=False)
                theirs = median_seconds(
                    lambda p=path: spandrel.ModelLoader().load_from_file(p),
                    args.repeats,
                    warm_up=False,
                )
                size = path.stat().st_size / 1e6
                print(
                    f"| {name:<7} | {form:<8} | {params:>9,} | {size:>4.0f} | "
                    f"{ours:>12.3f} | {theirs:>10.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
