"""Write a bundled model's record (models/NAME.json), which its model card quotes and the tests
hold it to: the last validation of its training log, and its gain over bicubic on the held-out
astronaut crop that ships in paragonsr/data.

    .venv/bin/python scripts/record_model.py models/paragonsr_nano_x4.safetensors \
        models/logs/paragonsr_nano_x4.csv --recipe "scripts/train_default_model.sh x4"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from paragonsr import inspect_checkpoint, load_model  # noqa: E402
from paragonsr.images import read_image  # noqa: E402
from paragonsr.train.loop import validate  # noqa: E402

CROP = ROOT / "paragonsr" / "data" / "astronaut_192.png"


def crop_gain(model_path: Path, scale: int) -> float:
    """As the trainer validates: the same downscale, PSNR and bicubic baseline."""
    scores = validate(
        load_model(model_path), [(CROP.name, read_image(CROP).pixels)], scale, torch.device("cpu")
    )
    return scores["psnr"] - scores["bicubic"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("log", type=Path, help="the run's training_log.csv")
    parser.add_argument("--recipe", required=True, help="the command that trained it")
    args = parser.parse_args()
    with open(args.log, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    validated = [row for row in rows if row["val_psnr"]]
    if not validated:
        print(f"record_model: {args.log}: no validation row in the log", file=sys.stderr)
        return 1
    last = validated[-1]
    inspection = inspect_checkpoint(args.model)
    config = inspection.config
    record = {
        "model": args.model.name,
        "variant": inspection.variant,
        "scale": config.scale,
        "form": inspection.form,
        "trained_with": f"{args.recipe} (paragonsr train, seed 0, CPU, 2 threads)",
        "iterations": int(last["iteration"]),
        "train_seconds": round(float(rows[-1]["seconds"])),
        "validation_psnr_db": round(float(last["val_psnr"]), 3),
        "validation_bicubic_psnr_db": round(float(last["bicubic_psnr"]), 3),
        "astronaut_192_gain_db": round(crop_gain(args.model, config.scale), 3),
    }
    if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
        print(f"record_model: {args.model}: a non-finite figure: {record}", file=sys.stderr)
        return 1
    target = args.model.with_suffix(".json")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    temporary.replace(target)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
