"""GPU figures for ParagonSR, as one table: run by bench/gpu.sh on a machine with CUDA.

For tiny x4, s x4 and xl x2 on a 1920x1080 input (seeded weights, LayerScale 0.05-0.4 scaled for
depth): fp32, bf16 and fp16 time of the optimized network, max abs error against fp32 and the
inf/NaN count; exact tiling against whole-image time and peak memory; torch.compile; and
onnxruntime's CUDA provider where its wheel is installed. Everything is bounded so the whole
script stays within about five minutes on one GPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import seeded_model  # noqa: E402

from paragonsr import UpscaleSettings, optimize_for_inference, upscale  # noqa: E402


def timed(function, repeats: int = 5) -> float:
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, input 1x3x1080x1920")
    print("| model | path | ms | max abs err vs fp32 | inf/NaN | peak GiB |")
    print("|---|---|---|---|---|---|")
    image = torch.rand(1, 3, 1080, 1920, generator=torch.Generator().manual_seed(0)).to(device)
    for variant, scale in (("tiny", 4), ("s", 4), ("xl", 2)):
        model = seeded_model(variant, scale, depth_scaled=True).to(device)
        reference = None
        for name, dtype in (
            ("fp32", torch.float32),
            ("bf16", torch.bfloat16),
            ("fp16", torch.float16),
        ):
            net = optimize_for_inference(model).to(dtype)
            torch.cuda.reset_peak_memory_stats()
            try:
                with torch.inference_mode():
                    seconds = timed(lambda n=net, d=dtype: n(image.to(d)), repeats=3)
                    output = net(image.to(dtype)).float()
            except torch.OutOfMemoryError:
                print(f"| {variant} x{scale} | whole {name} | OOM | | | |", flush=True)
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            if reference is None:
                reference = output
            error = (output.clamp(0, 1) - reference.clamp(0, 1)).abs().max().item()
            bad = int((~torch.isfinite(output)).sum())
            print(
                f"| {variant} x{scale} | whole {name} | {seconds * 1000:.1f} | {error:.2e} | "
                f"{bad} | {peak:.2f} |",
                flush=True,
            )
            del output
        for tile in (512, 256):
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tiled = upscale(model, image, UpscaleSettings(tile=tile, device="cuda"))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            error = (tiled.to(device) - reference.clamp(0, 1)).abs().max().item()
            print(
                f"| {variant} x{scale} | exact tiles {tile} fp32 | {seconds * 1000:.1f} | "
                f"{error:.2e} | 0 | {torch.cuda.max_memory_allocated() / 2**30:.2f} |",
                flush=True,
            )
        if variant == "tiny":
            compiled = torch.compile(optimize_for_inference(model))
            with torch.inference_mode():
                seconds = timed(lambda c=compiled: c(image), repeats=3)
            print(
                f"| {variant} x{scale} | torch.compile fp32 | {seconds * 1000:.1f} | | | |",
                flush=True,
            )
        del model, reference
        torch.cuda.empty_cache()
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: no ONNX row")
        return
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        print("onnxruntime has no CUDA provider here: no ONNX row")
        return
    import tempfile

    from paragonsr import ExportOptions, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        model = seeded_model("tiny", 4, depth_scaled=True)
        path = Path(folder) / "tiny.onnx"
        export_onnx(model, path, ExportOptions())
        session = onnxruntime.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        feed = {"input": image.cpu().numpy()}
        session.run(None, feed)
        start = time.perf_counter()
        for _ in range(3):
            session.run(None, feed)
        print(
            f"| tiny x4 | onnxruntime CUDA fp32 | {(time.perf_counter() - start) / 3 * 1000:.1f}"
            " | | | |"
        )


if __name__ == "__main__":
    main()
