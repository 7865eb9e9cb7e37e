"""`paragonsr info` on large and hostile checkpoints: wall time and peak resident memory.

    .venv/bin/python bench/bench_info.py

Each file is inspected by a fresh `paragonsr info` process (what a user runs), timed from start
to exit; the peak is the child's maximum resident set size. The files are made here: xl x4 in
both formats (the largest variant), a nano checkpoint padded with a 900 MB tensor, and a nano
checkpoint with a key that claims 200,000 groups; and s x4, the flagship. The bars: under 5 s
and 1 GB for any file under 1 GB; a well-formed .safetensors file answered from its header,
without importing torch, in under 0.5 s and 100 MB; `paragonsr --help` under 0.3 s (its row).
Pickles (.pth) and files the header does not settle (the padded and depth-bomb files, refused
or diagnosed by the tensor path) pay torch's import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from paragonsr import build_model

PARAGONSR = [sys.executable, "-m", "paragonsr"]


def make_files(folder: Path) -> list[Path]:
    save_file(build_model("s", 4).state_dict(), folder / "s_x4.safetensors")
    xl = build_model("xl", 4).state_dict()
    save_file(xl, folder / "xl_x4.safetensors")
    torch.save({"params_ema": xl}, folder / "xl_x4.pth")
    padded = dict(build_model("nano", 2).state_dict())
    padded["padding"] = torch.zeros(225_000_000)  # 900 MB of float32
    save_file(padded, folder / "nano_padded_900MB.safetensors")
    torch.save(padded, folder / "nano_padded_900MB.pth")
    bomb = dict(build_model("nano", 2).state_dict())
    bomb["body.200000.x"] = torch.zeros(1)
    save_file(bomb, folder / "nano_depth_bomb.safetensors")
    return sorted(folder.iterdir())


# A fresh parent per measurement: RUSAGE_CHILDREN's peak is then this one child's.
_PEAK_OF_CHILD = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def measure(*arguments: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CHILD, *PARAGONSR, *arguments],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    peak_kb, code = done.stdout.split()
    return seconds, int(peak_kb) / 1024, int(code)


def main() -> None:
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs; one fresh process per file")
    print("| file | size MB | s | peak MB | exit |")
    print("|---|---|---|---|---|")
    seconds, peak, code = measure("--help")
    print(f"| (paragonsr --help) | - | {seconds:.2f} | {peak:.0f} | {code} |", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        files = make_files(Path(folder))
        for path in sorted(files, key=lambda p: p.stat().st_size):
            seconds, peak, code = measure("info", str(path))
            print(
                f"| {path.name} | {path.stat().st_size / 1e6:.0f} | {seconds:.2f} | "
                f"{peak:.0f} | {code} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
