"""CPU inference speed of every way to run ParagonSR, as a table.

    .venv/bin/python bench/bench_inference.py [--threads 2] [--size 256] [--repeats 5]
        [--models tiny:4,nano:2,s:4] [--busy N] [--keep-freed-memory] [--compile]
        [--baseline GIT_REV] [--original PATH/TO/paragonsr_arch.py]

Rows per model: the original's deployed forms (training form in eval, re-fusing every forward;
release form), this package's plain release-form forward, the inference-optimized network in
NCHW and channels_last, the same on the host's thread count throughout ("host's threads": it
otherwise runs on the cores other work leaves free, paragonsr.cpu_threads), and two small
architectures at the same scale through spandrel's descriptors, as ComfyUI calls them: Real-ESRGAN
Compact 64nf 16nc and SPAN 48nf (seeded random weights; speed does not depend on them). With
--compile the optimized network torch.compiled (its first call, the compilation, shows in the
"1st call s" column), with --baseline the optimized network of this package at another git
revision, and with --original the original implementation's own code (a scratch copy of
Phhofm/ParagonSR's traiNNer/archs/paragonsr_arch.py, never committed here) on the same weights:
its training form in eval and its fuse_for_release() form. --busy N starts N busy-looping
processes, each pinned to one of this process's cores, for the whole run: every row then shares
the machine the way it would with another job. Timings are medians of interleaved repeats, so
the ratios in one table come from the same stretch of machine time. ParagonSR weights are seeded
random with LayerScale 0.05-0.4, as trained models have.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from reference_style import reference_style  # noqa: E402

from paragonsr import config_for_variant, fuse_for_release, optimize_for_inference  # noqa: E402
from paragonsr.config import macs_per_pixel  # noqa: E402
from paragonsr.runtime import keep_freed_cpu_memory  # noqa: E402


def original_code(path: str):
    """The original implementation's module, loaded from a scratch copy. It imports traiNNer's
    registry only to register factories; a stand-in decorator takes its place."""
    import importlib.util
    import types

    registry = types.ModuleType("traiNNer.utils.registry")
    registry.ARCH_REGISTRY = types.SimpleNamespace(register=lambda *a, **k: lambda f: f)
    for name in ("traiNNer", "traiNNer.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["traiNNer.utils.registry"] = registry
    spec = importlib.util.spec_from_file_location("paragonsr_original_code", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original_rows(path: str, training) -> list[tuple[str, str, object, bool]]:
    """The original code's two deployed forms, holding ``training``'s weights (same key names)."""
    import contextlib
    import io

    module = original_code(path)
    config = training.config
    forms = []
    for fuse in (False, True):
        model = module.ParagonSR(
            scale=config.scale,
            in_chans=config.in_chans,
            num_feat=config.num_feat,
            num_groups=config.num_groups,
            num_blocks=config.num_blocks,
            ffn_expansion=config.ffn_expansion,
        )
        model.load_state_dict(training.state_dict())
        model.eval()
        if fuse:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints every fused layer
                model.fuse_for_release()
        forms.append(model)
    return [
        ("original code: training, eval", "training", forms[0], False),
        ("original code: fuse_for_release", "fused", forms[1], False),
    ]


def conv_macs_per_pixel(model: torch.nn.Module, size: int = 32) -> int:
    """Multiply-accumulates per input pixel of every convolution in ``model``, counted on one
    size x size image (for architectures that macs_per_pixel does not describe)."""
    total = [0]

    def count(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        total[0] += module.weight.numel() * output.shape[-2] * output.shape[-1]

    hooks = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            model(torch.rand(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] // (size * size)


def other_architectures(scale: int) -> list[tuple[str, int, object, bool]]:
    """Real-ESRGAN Compact (64nf, 16 convolutions) and SPAN (48nf) at ``scale``, loaded the way
    ComfyUI's stock loader does (spandrel's descriptor from a state dict) and called as its
    stock upscale node calls them (NCHW, the descriptor itself)."""
    from spandrel import ModelLoader
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.SPAN import SPAN

    torch.manual_seed(0)
    rows = []
    for label, network in (
        ("Compact 64nf 16nc (spandrel)", Compact(num_feat=64, num_conv=16, upscale=scale)),
        ("SPAN 48nf (spandrel)", SPAN(num_in_ch=3, num_out_ch=3, upscale=scale)),
    ):
        descriptor = ModelLoader().load_from_state_dict(network.state_dict()).eval()
        rows.append((label, conv_macs_per_pixel(descriptor.model), descriptor, False))
    return rows


def candidates(
    variant: str, scale: int, compile_: bool, baseline: str | None, original: str | None = None
) -> list[tuple[str, str | int, object, bool]]:
    """(label, MACs form or MACs per pixel, callable, run in reference style)."""
    training = common.seeded_model(variant, scale)
    fused = common.seeded_model(variant, scale)
    fuse_for_release(fused)
    host_threads = optimize_for_inference(training)
    host_threads.share_cores = False
    rows = [
        ("original: training form, eval", "training", training, True),
        ("original: release-fused", "fused", fused, True),
        ("plain release-fused (ours)", "fused", fused, False),
        (
            "optimized, NCHW",
            "optimized",
            optimize_for_inference(training, channels_last=False),
            False,
        ),
        ("optimized, channels_last", "optimized", optimize_for_inference(training), False),
        ("optimized, host's threads", "optimized", host_threads, False),
        *other_architectures(scale),
    ]
    if baseline:
        label, before = common.baseline_optimized(baseline, training)
        rows.append((label, "optimized", before, False))
    if original:
        rows.extend(original_rows(original, training))
    if compile_:
        compiled = torch.compile(optimize_for_inference(training), dynamic=False)
        rows.append(("optimized + torch.compile", "optimized", compiled, False))
    return rows


def measure(
    model: str,
    size: int,
    repeats: int,
    compile_: bool,
    baseline: str | None,
    original: str | None = None,
) -> list[dict]:
    variant, scale = model.split(":")
    scale = int(scale)
    config = config_for_variant(variant, scale)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = candidates(variant, scale, compile_, baseline, original)
    times: dict[str, list[float]] = {label: [] for label, *_ in rows}
    with torch.inference_mode():
        first_call: dict[str, float] = {}
        for label, _, run, reference in rows:  # warm-up (and compilation)
            with reference_style() if reference else _nothing():
                start = time.perf_counter()
                run(image)
                first_call[label] = time.perf_counter() - start
        for _ in range(repeats):
            for label, _, run, reference in rows:
                with reference_style() if reference else _nothing():
                    start = time.perf_counter()
                    run(image)
                    times[label].append(time.perf_counter() - start)
    best = statistics.median(times["optimized, channels_last"])
    results = []
    for label, form, _, _ in rows:
        seconds = statistics.median(times[label])
        macs = form if isinstance(form, int) else macs_per_pixel(config, form)
        results.append(
            {
                "model": f"{variant} x{scale}",
                "path": label,
                "ms": seconds * 1000,
                "vs_optimized": seconds / best,
                "macs_per_px": macs,
                "gflops": 2 * macs * size * size / seconds / 1e9,
                "first_call_s": first_call[label],
            }
        )
    return results


def start_busy(count: int) -> list[subprocess.Popen]:
    """``count`` busy-looping processes, each pinned to one of this process's cores (the last
    core first). Each one ends by itself when this process has gone, however it ended."""
    cores = sorted(os.sched_getaffinity(0))
    processes = []
    for index in range(count):
        core = cores[-1 - index % len(cores)]
        loop = (
            f"import os\nos.sched_setaffinity(0, {{{core}}})\nparent = os.getppid()\n"
            "while os.getppid() == parent:\n    for _ in range(100000):\n        pass\n"
        )
        processes.append(subprocess.Popen([sys.executable, "-c", loop]))
    return processes


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny:4,nano:2,s:4")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="raise glibc's mmap/trim thresholds first, as the CLI does",
    )
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N busy-looping processes, pinned to this process's cores, for the whole run",
    )
    parser.add_argument(
        "--baseline",
        metavar="GIT_REV",
        help="add a row for the optimized network of this package at a git revision, timed "
        "in the same run",
    )
    parser.add_argument(
        "--original",
        metavar="PATH",
        help="the original implementation's paragonsr_arch.py (a scratch copy; add rows for its "
        "own training and fuse_for_release forms on the same weights)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    allocator = (
        "kept freed memory"
        if args.keep_freed_memory and keep_freed_cpu_memory()
        else ("glibc defaults")
    )
    busy = f", {args.busy} busy process(es) on the same cores" if args.busy else ""
    print(
        f"# CPU, {args.threads} threads, 1x3x{args.size}x{args.size} float32, "
        f"allocator: {allocator}, torch {torch.__version__}, median of {args.repeats}{busy}"
    )
    print(
        f"| {'model':<8} | {'path':<32} | {'ms':>8} | {'x optimized':>11} | "
        f"{'MACs/px':>9} | {'GFLOP/s':>7} | {'1st call s':>10} |"
    )
    print(f"|{'-' * 10}|{'-' * 34}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 9}|{'-' * 12}|")
    competitors = start_busy(args.busy)
    try:
        for model in args.models.split(","):
            rows = measure(
                model, args.size, args.repeats, args.compile, args.baseline, args.original
            )
            for row in rows:
                print(
                    f"| {row['model']:<8} | {row['path']:<32} | {row['ms']:>8.1f} | "
                    f"{row['vs_optimized']:>11.2f} | {row['macs_per_px']:>9,} | "
                    f"{row['gflops']:>7.1f} | {row['first_call_s']:>10.2f} |",
                    flush=True,
                )
    finally:
        for process in competitors:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
