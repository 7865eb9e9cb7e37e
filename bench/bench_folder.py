"""Folder upscaling: the serial loop against the pipeline (decode and encode beside the model).

    .venv/bin/python bench/bench_folder.py [--frames 32] [--size 640x360] [--rounds 2]

A folder of seeded natural-looking frames (smooth gradients, shapes, fine texture and noise;
PNG) is upscaled with the bundled nano x2 model on the CPU, in exact mode as `paragonsr
upscale` runs it, by `paragonsr.folder.upscale_files` serially and pipelined, interleaved
(serial, pipeline, serial, pipeline...) so that load from other processes falls on both alike;
the table says how many cores other processes used during each run. Every run writes its own
folder, and all of them must hold the same bytes (torch's thread count is held fixed for that,
unless --share-cores). A second table splits the serial loop's time into its stages: overlapped
on 2 cores, a frame cannot take less than its encoding (one thread) nor less than half the CPU
time of all its stages.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paragonsr import load_descriptor  # noqa: E402
from paragonsr.folder import upscale_files  # noqa: E402
from paragonsr.images import read_image, write_image  # noqa: E402
from paragonsr.inference import OptimizedParagonSR  # noqa: E402
from paragonsr.runtime import keep_freed_cpu_memory  # noqa: E402
from paragonsr.upscale import UpscaleSettings, upscale  # noqa: E402

MODEL = ROOT / "models" / "paragonsr_nano_x2.safetensors"


def frame(index: int, height: int, width: int) -> np.ndarray:
    """A seeded frame that compresses like a photo rather than like noise or a flat card: a
    smooth gradient that drifts with the index, a few soft-edged discs and bars, a fine
    texture and a little sensor noise."""
    rng = np.random.default_rng(index)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = rows / height, columns / width
    shift = index / 32
    image = np.stack(
        [0.2 + 0.6 * x * (1 - shift / 2), 0.3 + 0.4 * y, 0.5 + 0.3 * np.sin(3 * (x + y + shift))],
        axis=-1,
    )
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.2) * height
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        distance = np.sqrt((rows - cy) ** 2 + (columns - cx) ** 2)
        weight = np.clip(radius - distance, 0, 2)[..., None] / 2  # anti-aliased edge
        image = image * (1 - weight) + colour * weight
    top = int(rng.uniform(0, height * 0.8))
    image[top : top + height // 10, :, :] *= 0.6
    image += 0.04 * np.sin(columns / 3.0)[..., None] * np.cos(rows / 5.0)[..., None]
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def make_folder(folder: Path, frames: int, height: int, width: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for index in range(frames):
        path = folder / f"frame{index:04d}.png"
        Image.fromarray(np.rint(frame(index, height, width) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux), to tell how much of a run's
    machine went to other work."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def stage_times(paths: list[Path], out: Path, descriptor, settings) -> dict[str, float]:
    """Seconds per frame of each stage of the serial loop, timed one by one."""
    totals = {"decode": 0.0, "model": 0.0, "encode + write": 0.0}
    for path in paths:
        start = time.perf_counter()
        image = read_image(path)
        decoded = time.perf_counter()
        result = upscale(descriptor, image.pixels, settings)
        upscaled = time.perf_counter()
        write_image(out / path.name, result, image.bits, overwrite=True)
        written = time.perf_counter()
        totals["decode"] += decoded - start
        totals["model"] += upscaled - decoded
        totals["encode + write"] += written - upscaled
    return {stage: seconds / len(paths) for stage, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", default="640x360", help="frame size, WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rounds", type=int, default=2, help="serial/pipeline pairs")
    parser.add_argument("--depth", type=int, default=1, help="the pipeline's queue depth")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage table")
    parser.add_argument(
        "--share-cores",
        action="store_true",
        help="let inference run on fewer threads while other processes run (the library's "
        "default); without it torch keeps --threads throughout, since the thread count changes "
        "a few output values and the bytes of the runs could not be compared",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    OptimizedParagonSR.share_cores = args.share_cores
    keep_freed_cpu_memory()  # as `paragonsr upscale` does
    descriptor = load_descriptor(str(MODEL))
    settings = UpscaleSettings(device="cpu")

    def upscale_one(job, image) -> torch.Tensor:
        return upscale(descriptor, image.pixels, settings)

    print(
        f"# CPU, {args.threads} torch threads, torch {torch.__version__}; {args.frames} frames "
        f"{width}x{height} PNG, nano x2 (bundled), exact mode, pipeline depth {args.depth}, "
        f"threads {'shared with other work' if args.share_cores else 'fixed'}"
    )
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        paths = make_folder(root / "in", args.frames, height, width)

        def pairs_for(out: Path) -> list[tuple[Path, Path]]:
            return [(path, out / path.name) for path in paths]

        warm = root / "warm"
        warm.mkdir()
        upscale_files(pairs_for(warm)[:2], upscale_one, pipeline=False)  # oneDNN kernels, pages
        rows, reference = [], None
        for round_ in range(args.rounds):
            for pipeline in (False, True):
                out = root / f"out{round_}{'p' if pipeline else 's'}"
                out.mkdir()
                busy, own, start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
                outcomes = upscale_files(
                    pairs_for(out), upscale_one, pipeline=pipeline, depth=args.depth
                )
                seconds = time.perf_counter() - start
                own = own_cpu_seconds() - own
                others = None if busy is None else (machine_busy_seconds() - busy - own) / seconds
                assert all(o.ok for o in outcomes), [str(o.error) for o in outcomes if not o.ok]
                megapixels = sum(o.pixels for o in outcomes) / 1e6
                reference = reference or out
                name = "pipeline" if pipeline else "serial"
                rows.append((name, seconds, megapixels, own / seconds, others, out))
        serial = min(row[1] for row in rows if row[0] == "serial")
        print(
            "| run | loop | s | output MP/s | x best serial | cores used | cores used by other "
            "processes | bytes as the first run |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for number, (name, seconds, megapixels, cores, others, out) in enumerate(rows, 1):
            print(
                f"| {number} | {name} | {seconds:.2f} | {megapixels / seconds:.2f} | "
                f"{serial / seconds:.2f} | {cores:.2f} | "
                f"{'?' if others is None else f'{others:.2f}'} | "
                f"{'yes' if same_bytes(reference, out) else 'NO'} |"
            )
        best = {n: min(row[1] for row in rows if row[0] == n) for n in ("serial", "pipeline")}
        print(
            f"\nbest pipeline vs best serial: {best['serial'] / best['pipeline']:.2f}x output "
            "megapixels per second\n"
        )
        if args.no_stages:
            return
        times = stage_times(paths, root / "warm", descriptor, settings)
        total = sum(times.values())
        print("| serial stage | ms per frame | share |")
        print("|---|---|---|")
        for stage, seconds in times.items():
            print(f"| {stage} | {1000 * seconds:.1f} | {seconds / total:.0%} |")
        print(f"| all | {1000 * total:.1f} | 100% |")


if __name__ == "__main__":
    main()
