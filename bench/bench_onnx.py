"""onnxruntime (CPU) against this pack's optimized torch model, and export time, as a table.

    .venv/bin/python bench/bench_onnx.py [--threads 2] [--size 256] [--repeats 5]

Both run the same seeded weights (LayerScale 0.05-0.4, scaled down for deep variants so outputs
stay near [0, 1] as a trained model's do) on one size x size RGB image, with the same number of
threads; medians of interleaved repeats. onnxruntime gets the session options a host such as
chaiNNer creates (none: every graph optimization, NCHWc layout included) but for the thread
count. ``--ffn-group 0`` exports the FFN's gated product in one slice (ExportOptions.ffn_group).
``--chainner-python .venv-chainner/bin/python`` also times the same file in that interpreter's
onnxruntime (chaiNNer's pinned 1.17.1, which scripts/setup.sh installs there), in a subprocess
right after the in-process repeats, against the same torch median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import seeded_model  # noqa: E402

from paragonsr import ExportOptions, export_onnx, optimize_for_inference  # noqa: E402

# Run in another interpreter: median milliseconds of one onnxruntime session on a seeded image.
FOREIGN_TIMING = """
import json, statistics, sys, time
import numpy, onnxruntime
path, threads, size, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feed = {"input": numpy.random.default_rng(0).random((1, 3, size, size), dtype=numpy.float32)}
session.run(None, feed)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - start)
print(json.dumps({"version": onnxruntime.__version__, "ms": statistics.median(times) * 1000}))
"""


def foreign_ort_ms(python: str, path: Path, threads: int, size: int, repeats: int) -> dict:
    done = subprocess.run(
        [python, "-c", FOREIGN_TIMING, str(path), str(threads), str(size), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny:4,s:2")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--ffn-group", type=int, default=ExportOptions().ffn_group)
    parser.add_argument(
        "--chainner-python",
        metavar="PYTHON",
        help="also time the file in this interpreter's onnxruntime (.venv-chainner/bin/python)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# CPU, {args.threads} threads, 1x3x{args.size}x{args.size}, torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, median of {args.repeats}, "
        f"opset {args.opset}, ffn_group {args.ffn_group}"
    )
    header = "| model | export s | torch optimized ms | onnxruntime ms | ort / torch |"
    if args.chainner_python:
        header += " other onnxruntime ms | other / torch |"
    print(header)
    print("|---" * header.count(" |") + "|")
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            variant, scale = name.split(":")
            model = seeded_model(variant, int(scale), depth_scaled=True)
            path = Path(folder) / f"{variant}.onnx"
            start = time.perf_counter()
            export_onnx(model, path, ExportOptions(opset=args.opset, ffn_group=args.ffn_group))
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
            row = (
                f"| {variant} x{scale} | {export_seconds:.1f} | {torch_ms:.1f} | {ort_ms:.1f} | "
                f"{ort_ms / torch_ms:.2f} |"
            )
            if args.chainner_python:
                other = foreign_ort_ms(
                    args.chainner_python, path, args.threads, args.size, args.repeats
                )
                row += f" {other['ms']:.1f} ({other['version']}) | {other['ms'] / torch_ms:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
