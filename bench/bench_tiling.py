"""Exact tiling against whole-image inference, overlap mode and ComfyUI's stock tiling.

    .venv/bin/python bench/bench_tiling.py [--threads 2] [--size 512]
    .venv/bin/python bench/bench_tiling.py --photo    # 4000x3000, nano x2: the memory rows

Every configuration runs in a fresh child process so that its peak resident memory (VmHWM,
reset just before the call) belongs to that call alone. Outputs are compared with the
whole-image result of the same model: max abs difference and PSNR (on [0, 1]). Models are
seeded random networks with LayerScale 0.05-0.4; the input is a seeded smooth image with noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import seeded_model  # noqa: E402


def test_image(height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.linspace(0, 1, height), torch.linspace(0, 1, width)
    base = torch.stack(
        [
            columns[None, :] * rows[:, None],
            columns[None, :].expand(height, width),
            rows[:, None].expand(height, width),
        ]
    )
    noise = torch.rand(3, height, width, generator=generator) * 0.3
    return (base * 0.7 + noise)[None].clamp(0, 1)


def comfyui_stock_tiles(
    run, image: torch.Tensor, scale: int, tile: int = 512, overlap: int = 32
) -> torch.Tensor:
    """ComfyUI's stock algorithm as its upscale node runs it (our own code): tiles every
    tile - overlap pixels, each output multiplied by a mask that ramps linearly over
    overlap * scale pixels at all four edges, summed and divided by the summed masks."""
    _, channels, height, width = image.shape
    out = torch.zeros((1, channels, height * scale, width * scale))
    weight = torch.zeros_like(out)
    step = tile - overlap

    def positions(length: int) -> list[int]:
        return sorted({max(0, min(length - tile, p)) for p in range(0, length, step)})

    feather = overlap * scale
    for top in positions(height):
        for left in positions(width):
            piece = run(image[..., top : top + tile, left : left + tile]).float()
            mask = torch.ones_like(piece)
            for t in range(feather):
                factor = (t + 1) / feather
                for dim in (2, 3):
                    mask.narrow(dim, t, 1).mul_(factor)
                    mask.narrow(dim, mask.shape[dim] - 1 - t, 1).mul_(factor)
            region = (
                ...,
                slice(top * scale, top * scale + piece.shape[2]),
                slice(left * scale, left * scale + piece.shape[3]),
            )
            out[region] += piece * mask
            weight[region] += mask
    return out / weight


def child(args: argparse.Namespace) -> None:
    """Run one configuration and report time and peak memory as JSON."""
    from paragonsr import ParagonSRArch, optimize_for_inference
    from paragonsr.upscale import UpscaleSettings, upscale

    torch.set_num_threads(args.threads)
    variant, scale = args.model.split(":")
    model = seeded_model(variant, int(scale))
    height, width = _size(args.size)
    image = test_image(height, width)
    optimized = optimize_for_inference(model)
    # What ComfyUI's stock node calls per tile: the descriptor, which runs the optimized network.
    descriptor = ParagonSRArch().load(model.state_dict())

    def call() -> torch.Tensor:
        if args.config == "whole":
            with torch.inference_mode():
                return optimized(image).clamp(0, 1)
        if args.config == "whole-plain":
            with torch.no_grad():
                return model(image).clamp(0, 1)
        if args.config == "comfyui":
            with torch.inference_mode():
                return comfyui_stock_tiles(descriptor, image, model.scale).clamp(0, 1)
        mode, tile = args.config.split("@")
        overlap = 32
        return upscale(
            model, image, UpscaleSettings(tile=int(tile), mode=mode, overlap=overlap, device="cpu")
        )

    if not args.no_warmup:
        call()  # warm-up: allocator, oneDNN kernels
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident set size
    baseline = _status("VmRSS")
    start = time.perf_counter()
    output = call()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    torch.save(output, args.save)
    report = {"seconds": seconds, "peak_mb": (peak - baseline) / 1024, "hwm_mb": peak / 1024}
    print(json.dumps(report))


def _size(text: str) -> tuple[int, int]:
    """A size such as 512 (square) or 4000x3000 (width x height), as (height, width)."""
    width, _, height = str(text).partition("x")
    return int(height or width), int(width)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_child(
    model: str, config: str, size, threads: int, folder: str, warmup: bool = True
) -> dict:
    save = os.path.join(folder, f"{model.replace(':', '_')}_{config}.pt")
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            config,
            "--model",
            model,
            "--size",
            str(size),
            "--threads",
            str(threads),
            "--save",
            save,
            *([] if warmup else ["--no-warmup"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["output"] = torch.load(save)
    return report


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="512")
    parser.add_argument("--models", default="tiny:4,s:2")
    parser.add_argument(
        "--comfy-size",
        type=int,
        default=1024,
        help="input size for the ComfyUI comparison (512 tiles need a larger image to tile at all)",
    )
    parser.add_argument(
        "--photo",
        action="store_true",
        help="only the memory rows: nano x2 on a 4000x3000 input, whole image against exact "
        "tiling (one run each, no warm-up: the first call is what a user gets)",
    )
    parser.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.config = args.child
        child(args)
        return
    print(
        f"# CPU, {args.threads} threads, torch {torch.__version__}; peak = resident memory "
        "above the process's level before the call"
    )
    if args.photo:
        photo_rows(args)
        return
    print(
        "| model | input | configuration | s | x whole | peak MB | x whole mem | max abs diff "
        "| PSNR dB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            jobs = [
                (args.size, c)
                for c in ("whole", "whole-plain", "exact@128", "exact@256", "overlap@256")
            ]
            if model == args.models.split(",")[0]:
                # 512 px tiles only tile a larger image: the ComfyUI comparison and overlap at
                # 512/32 run on comfy-size inputs.
                jobs += [
                    (args.comfy_size, c)
                    for c in ("whole", "comfyui", "overlap@512", "exact@256", "exact@512")
                ]
            reference: dict[int, dict] = {}
            for size, config in jobs:
                report = run_child(model, config, size, args.threads, folder)
                if config == "whole":
                    reference[size] = report
                base = reference[size]
                diff = (report["output"] - base["output"]).abs().max().item()
                print(
                    f"| {model.replace(':', ' x')} | {size}x{size} | {config} | "
                    f"{report['seconds']:.2f} | {report['seconds'] / base['seconds']:.2f} | "
                    f"{report['peak_mb']:.0f} | {report['peak_mb'] / base['peak_mb']:.2f} | "
                    f"{diff:.2e} | {psnr(report['output'], base['output']):.1f} |",
                    flush=True,
                )


def photo_rows(args: argparse.Namespace) -> None:
    """Resident memory of exact tiling on a camera-sized photo: the whole-image run against
    exact mode at two tile sizes, and the output in 8-bit levels."""
    print(
        "| model | input | configuration | s | peak MB above start | x whole | peak MB (VmHWM) "
        "| x whole | max diff (8-bit levels) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        base = None
        for config in ("whole", "exact@512", "exact@256"):
            report = run_child("nano:2", config, "4000x3000", args.threads, folder, warmup=False)
            levels = (report.pop("output") * 255).round_()
            if base is None:
                base, base_levels = report, levels
            difference = int((levels - base_levels).abs().max().item())
            print(
                f"| nano x2 | 4000x3000 | {config} | {report['seconds']:.1f} | "
                f"{report['peak_mb']:.0f} | {report['peak_mb'] / base['peak_mb']:.2f} | "
                f"{report['hwm_mb']:.0f} | {report['hwm_mb'] / base['hwm_mb']:.2f} | "
                f"{difference} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
