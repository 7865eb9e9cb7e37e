"""NCNN export: ncnn's CPU speed against torch, export time, and what host tiling does.

    .venv/bin/python bench/bench_ncnn.py [--threads 2] [--repeats 5]

1. Speed, one process, same weights and input: the exported pair in the ``ncnn`` package (CPU,
   fp32, load excluded), this pack's optimized torch network and the plain torch forward.
2. Export time of ``paragonsr export`` for the s variant (build, write, verify in ncnn).
3. Host tiling: Upscayl and realesrgan-ncnn-vulkan run each tile (plus 10 px of reflected or
   neighbouring context) as a separate image, so ParagonSR's whole-image GroupNorm sees one
   tile at a time. PSNR of that tiled result against the whole image, per tile size, for the
   bundled trained nano x2 model on the bundled photos (upscaled 3x first, so that the tiles
   see a photo rather than its padding) - the same arithmetic ncnn runs, computed in torch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import seeded_model  # noqa: E402

from paragonsr import load_model, optimize_for_inference  # noqa: E402
from paragonsr.images import SAMPLE_DATASET, read_image  # noqa: E402
from paragonsr.ncnn_export import export_ncnn, ncnn_graph  # noqa: E402

BUNDLED = HERE.parent / "models" / "paragonsr_nano_x2.safetensors"


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ncnn_runner(text: str, weights: bytes, threads: int):
    """A loaded ncnn net and a call that runs one image (load excluded from the timing)."""
    import ncnn
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="bench-ncnn-"))
    (folder / "m.param").write_text(text)
    (folder / "m.bin").write_bytes(weights)
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.load_param(str(folder / "m.param"))
    net.load_model(str(folder / "m.bin"))

    def run(image: torch.Tensor):
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(np.ascontiguousarray(image[0].numpy())))
        return extractor.extract("output")

    return run


def speed(args) -> None:
    print(f"## Speed, CPU, {args.threads} threads, median of {args.repeats}, one process")
    print("| model | input | ncnn s | optimized torch s | plain torch s | ncnn / optimized |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(args.threads)
    for variant, scale in (("tiny", 4), ("nano", 2)):
        model = seeded_model(variant, scale)
        optimized = optimize_for_inference(model)
        graph = ncnn_graph(optimized)
        image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        run = ncnn_runner(graph.param_text(), graph.bin_bytes(), args.threads)
        with torch.inference_mode():
            calls = {"ncnn": run, "optimized": optimized, "plain": model}
            times = {
                name: median_seconds(lambda call=call, x=image: call(x), args.repeats)
                for name, call in calls.items()
            }
        print(
            f"| {variant} x{scale} | 256x256 | {times['ncnn']:.3f} | {times['optimized']:.3f} | "
            f"{times['plain']:.3f} | {times['ncnn'] / times['optimized']:.2f} |",
            flush=True,
        )


def export_time() -> None:
    print("\n## Export time (build, write, verify in ncnn)")
    print("| variant | s |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "s_x4.safetensors"
        from paragonsr.checkpoint import save_checkpoint

        save_checkpoint(seeded_model("s", 4), checkpoint)
        start = time.perf_counter()
        export_ncnn(checkpoint, Path(folder) / "4x-ParagonSR-s.param")
        print(f"| s x4 | {time.perf_counter() - start:.2f} |", flush=True)


def reflect_tiles(net, image: torch.Tensor, tile: int, context: int) -> torch.Tensor:
    """Upscayl's way: each tile with ``context`` px around it (neighbouring pixels inside the
    image, reflected outside), run on its own, cropped back."""
    scale = net.scale
    _, _, height, width = image.shape
    padded = F.pad(image, (context,) * 4, mode="reflect")
    out = torch.empty(1, 3, height * scale, width * scale)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(height, top + tile), min(width, left + tile)
            piece = padded[..., top : bottom + 2 * context, left : right + 2 * context]
            result = net(piece)
            c = context * scale
            out[..., top * scale : bottom * scale, left * scale : right * scale] = result[
                ..., c : c + (bottom - top) * scale, c : c + (right - left) * scale
            ]
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).double().square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def tiling() -> None:
    print("\n## Host tiling (10 px context per tile, as Upscayl and realesrgan-ncnn-vulkan)")
    print("| model | photo | tile px | PSNR vs whole image dB | max abs diff |")
    print("|---|---|---|---|---|")
    net = optimize_for_inference(load_model(BUNDLED))
    for photo in sorted(SAMPLE_DATASET.glob("*.png")):
        small = read_image(photo).pixels[:, :3]
        image = F.interpolate(small, scale_factor=3, mode="bicubic", align_corners=False)
        image = image.clamp(0, 1)
        with torch.inference_mode():
            whole = net(image)
            for tile in (32, 64, 100, 200, 400):
                tiled = reflect_tiles(net, image, tile, 10)
                size = f"{image.shape[-1]}x{image.shape[-2]}"
                print(
                    f"| nano x2 (bundled) | {photo.name} ({size}) | {tile} | "
                    f"{psnr(tiled, whole):.1f} | "
                    f"{(tiled.clamp(0, 1) - whole.clamp(0, 1)).abs().max().item():.3f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import ncnn

    print(f"# torch {torch.__version__}, ncnn {ncnn.__version__}")
    speed(args)
    export_time()
    tiling()


if __name__ == "__main__":
    main()
