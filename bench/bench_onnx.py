"""onnxruntime (CPU) against this pack's optimized torch model, and export time, as a table.

    .venv/bin/python bench/bench_onnx.py [--threads 2] [--size 256] [--repeats 5]

Both run the same seeded weights (LayerScale 0.05-0.4, scaled down for deep variants so outputs
stay near [0, 1] as a trained model's do) on one size x size RGB image, with the same number of
threads; medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import seeded_model  # noqa: E402

from paragonsr import ExportOptions, export_onnx, optimize_for_inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny:4,s:2")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# CPU, {args.threads} threads, 1x3x{args.size}x{args.size}, torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, median of {args.repeats}"
    )
    print("| model | export s | torch optimized ms | onnxruntime ms | ort / torch |")
    print("|---|---|---|---|---|")
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            variant, scale = name.split(":")
            model = seeded_model(variant, int(scale), depth_scaled=True)
            path = Path(folder) / f"{variant}.onnx"
            start = time.perf_counter()
            export_onnx(model, path, ExportOptions(opset=args.opset))
            export_seconds = time.perf_counter() - start
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
            feed = {"input": image.numpy()}
            optimized = optimize_for_inference(model)
            runs = {
                "torch": lambda m=optimized: m(image),
                "ort": lambda s=session, f=feed: s.run(None, f),
            }
            times: dict[str, list[float]] = {key: [] for key in runs}
            with torch.inference_mode():
                for run in runs.values():
                    run()
                for _ in range(args.repeats):
                    for key, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[key].append(time.perf_counter() - start)
            torch_ms = statistics.median(times["torch"]) * 1000
            ort_ms = statistics.median(times["ort"]) * 1000
            print(
                f"| {variant} x{scale} | {export_seconds:.1f} | {torch_ms:.1f} | {ort_ms:.1f} | "
                f"{ort_ms / torch_ms:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
