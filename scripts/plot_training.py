"""Training curves from `paragonsr train` logs (training_log.csv), as one PNG: held-out PSNR gain
over bicubic, and the training loss, against the iteration. Pillow only, so it runs wherever the
pack does.

    .venv/bin/python scripts/plot_training.py LABEL=RUN/training_log.csv [...] --out curves.png

The README's plot of the bundled models:

    .venv/bin/python scripts/plot_training.py "nano x2=models/logs/paragonsr_nano_x2.csv" \
        "nano x4=models/logs/paragonsr_nano_x4.csv" --out models/training_curves.png
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
WIDTH, PANEL_HEIGHT, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 900, 300, 70, 20, 34, 40


class LogError(ValueError):
    pass


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) series of one log: ``gain`` (validation PSNR minus bicubic) and
    ``loss``."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise LogError(f"{path}: cannot read the log ({error.strerror})") from None
    needed = {"iteration", "loss", "val_psnr", "bicubic_psnr"}
    if not rows or not needed <= set(rows[0]):
        raise LogError(
            f"{path}: not a training log (needs the columns {', '.join(sorted(needed))}); "
            "point at the training_log.csv that `paragonsr train` writes"
        )
    gain, loss = [], []
    for row in rows:
        iteration = int(row["iteration"])
        if row["loss"] and math.isfinite(float(row["loss"])):
            loss.append((iteration, float(row["loss"])))
        if row["val_psnr"] and row["bicubic_psnr"]:
            gain.append((iteration, float(row["val_psnr"]) - float(row["bicubic_psnr"])))
    return {"gain": gain, "loss": loss}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def _panel(
    draw: ImageDraw.ImageDraw,
    top: int,
    title: str,
    series: list[tuple[str, list[tuple[int, float]]]],
    last_iteration: int,
    zero_line: bool,
    legend_low: bool,
    log_scale: bool = False,
) -> None:
    font = _font(14)
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    upper, lower = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
    if log_scale:  # losses fall over decades: plot log10, label in the values themselves
        series = [
            (label, [(i, math.log10(v)) for i, v in points if v > 0]) for label, points in series
        ]
    values = [v for _, points in series for _, v in points] + ([0.0] if zero_line else [])
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    low, high = low - pad, high + pad

    def x_of(iteration: float) -> float:
        return left + (right - left) * iteration / max(1, last_iteration)

    def y_of(value: float) -> float:
        return lower - (lower - upper) * (value - low) / (high - low)

    draw.text((left, top + 8), title, fill=(0, 0, 0), font=font)
    draw.rectangle((left, upper, right, lower), outline=(0, 0, 0))
    if log_scale:
        ticks = [
            math.log10(m * 10.0**e)
            for e in range(math.floor(low), math.ceil(high) + 1)
            for m in (1, 2, 5)
            if low <= math.log10(m * 10.0**e) <= high
        ]
    else:
        ticks = _ticks(low, high)
    for tick in ticks:
        y = y_of(tick)
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.line((left + 1, y, right - 1, y), fill=(228, 228, 228))
        label = f"{10**tick:.2g}" if log_scale else f"{tick:g}"
        draw.text((4, y - 8), label, fill=(0, 0, 0), font=font)
    for tick in _ticks(0, last_iteration):
        x = x_of(tick)
        draw.line((x, lower, x, lower + 4), fill=(0, 0, 0))
        draw.text((x - 14, lower + 6), f"{tick:g}", fill=(0, 0, 0), font=font)
    if zero_line:
        draw.line((left + 1, y_of(0), right - 1, y_of(0)), fill=(120, 120, 120))
    for index, (label, points) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        coordinates = [(x_of(i), y_of(v)) for i, v in points]
        if len(coordinates) > 1:
            draw.line(coordinates, fill=color, width=2)
        for x, y in coordinates if len(coordinates) < 60 else []:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=color)
        legend_y = (
            (lower - 8 - 18 * (len(series) - index)) if legend_low else upper + 8 + 18 * index
        )
        draw.line((right - 150, legend_y + 8, right - 125, legend_y + 8), fill=color, width=3)
        draw.text((right - 118, legend_y), label, fill=(0, 0, 0), font=font)


def plot(logs: list[tuple[str, Path]], out: Path) -> None:
    series = [(label, read_log(path)) for label, path in logs]
    last = max((i for _, s in series for i, _ in s["loss"] + s["gain"]), default=1)
    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    _panel(
        draw,
        0,
        "held-out PSNR gain over bicubic (dB) by iteration",
        [(label, s["gain"]) for label, s in series],
        last,
        zero_line=True,
        legend_low=True,
    )
    _panel(
        draw,
        PANEL_HEIGHT,
        "training loss (L1, mean of each logged window, log scale) by iteration",
        [(label, s["loss"]) for label, s in series],
        last,
        zero_line=False,
        legend_low=False,
        log_scale=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    image.save(temporary, format="PNG")
    temporary.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", metavar="LABEL=CSV", help="a label and a log file")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    logs = []
    for item in args.logs:
        label, separator, path = item.partition("=")
        if not separator or not label or not path:
            parser.error(f"{item!r}: give LABEL=PATH, e.g. 'nano x4=run/training_log.csv'")
        logs.append((label, Path(path)))
    try:
        plot(logs, Path(args.out))
    except LogError as error:
        print(f"plot_training: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
