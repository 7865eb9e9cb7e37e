"""torchrun on the CPU with gloo: DDP training matches one process, resume state fits another
number of ranks, and a folder upscale is sharded without gaps or repeats and restarts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import torch

from helpers import REPO

MODEL = REPO / "models" / "paragonsr_nano_x2.safetensors"
SAMPLE = REPO / "paragonsr" / "data" / "chelsea_160x120.png"


def paragonsr(*args: str, ranks: int = 1, cwd=None) -> subprocess.CompletedProcess:
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--standalone",  # a free local rendezvous port for each launch
            "-m",
            "paragonsr",
        ]
        if ranks > 1
        else [sys.executable, "-m", "paragonsr"]
    )
    result = subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(run) -> list[float]:
    return torch.load(run / "resume_state.pt", weights_only=True)["history"]["losses"]


def train_args(data, out, iters: int, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        str(iters),
        "--batch",
        "4",
        "--lq-size",
        "16",
        "--schedule",
        "constant",
        "--warmup",
        "1",
        "--save-every",
        "100",
        "--threads",
        "1",
        "--holdout",
        "0",  # one training image: the ranks' steps are compared, not validated
        *extra,
    ]


def make_data(tmp_path):
    data = tmp_path / "hr"
    data.mkdir()
    shutil.copy(SAMPLE, data / "a.png")
    return data


def test_two_gloo_ranks_take_the_steps_of_one_process(tmp_path) -> None:
    data = make_data(tmp_path)
    paragonsr(*train_args(data, tmp_path / "one", 6))
    paragonsr(*train_args(data, tmp_path / "two", 6), ranks=2)
    single, ddp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(ddp) == 6
    # Same global batch, gradients averaged by DDP: equal up to float summation order.
    assert max(abs(a - b) / a for a, b in zip(single, ddp, strict=True)) < 1e-5


def test_resume_with_another_number_of_ranks(tmp_path) -> None:
    data = make_data(tmp_path)
    paragonsr(*train_args(data, tmp_path / "whole", 6))
    paragonsr(*train_args(data, tmp_path / "split", 3), ranks=2)
    paragonsr(*train_args(data, tmp_path / "split", 6, "--resume"))
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(split) == 6
    assert max(abs(a - b) / a for a, b in zip(whole, split, strict=True)) < 1e-5


def test_folder_upscale_is_sharded_and_restartable(tmp_path) -> None:
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for index in range(5):
        shutil.copy(SAMPLE, source / f"frame{index}.png")
    result = paragonsr("upscale", str(source), str(target), "--model", str(MODEL), ranks=2)
    counts = [int(n) for n in re.findall(r"rank \d/2: upscaled (\d) image", result.stdout)]
    assert sorted(counts) == [2, 3]  # every file once, split between the ranks
    assert sorted(p.name for p in target.iterdir()) == [f"frame{i}.png" for i in range(5)]
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    (target / "frame3.png").unlink()
    result = paragonsr("upscale", str(source), str(target), "--model", str(MODEL), ranks=2)
    assert re.findall(r"upscaled (\d) image", result.stdout) == ["1"]
    assert result.stdout.count("nothing to do") == 1
    for name, stamp in stamps.items():
        if name != "frame3.png":
            assert (target / name).stat().st_mtime_ns == stamp  # finished files untouched
