"""The folder pipeline (paragonsr.folder): the same bytes as the serial loop, in order, with
each bad file reported and the rest written, memory bounded by its depth, and nothing left
running or half-written when the run is stopped."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import paragonsr.files
import paragonsr.images
from helpers import REPO
from paragonsr import load_descriptor
from paragonsr.cli import main
from paragonsr.errors import ParagonSRError, UpscaleError
from paragonsr.folder import upscale_files, write_like_source
from paragonsr.images import read_image
from paragonsr.upscale import UpscaleSettings, upscale

MODEL = REPO / "models" / "paragonsr_nano_x2.safetensors"


@pytest.fixture(scope="module")
def descriptor():
    return load_descriptor(str(MODEL))


def run_upscale(descriptor):
    def upscale_one(job, image) -> torch.Tensor:
        return upscale(descriptor, image.pixels, UpscaleSettings(device="cpu"))

    return upscale_one


def make_folder(folder: Path, count: int = 6) -> list[Path]:
    """Small seeded images of several layouts (RGB, RGBA, gray)."""
    folder.mkdir()
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        channels = (3, 4, 1)[index % 3]
        array = rng.integers(0, 256, (16, 24, channels), dtype=np.uint8)
        path = folder / f"f{index}.png"
        Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
        paths.append(path)
    return paths


def pairs(paths: list[Path], out: Path) -> list[tuple[Path, Path]]:
    out.mkdir(exist_ok=True)
    return [(p, out / p.name) for p in paths]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_pipeline_writes_the_bytes_of_the_serial_loop(tmp_path, descriptor) -> None:
    paths = make_folder(tmp_path / "in")
    upscale_one = run_upscale(descriptor)
    serial = upscale_files(pairs(paths, tmp_path / "serial"), upscale_one, pipeline=False)
    seen: list[int] = []
    piped = upscale_files(
        pairs(paths, tmp_path / "piped"),
        upscale_one,
        on_done=lambda outcome: seen.append(outcome.job.index),
    )
    assert [o.job.index for o in piped] == seen == list(range(len(paths)))
    assert all(o.ok for o in serial + piped)
    assert [o.pixels for o in piped] == [o.pixels for o in serial] == [48 * 32] * len(paths)
    assert files(tmp_path / "piped") == files(tmp_path / "serial")
    # The command line (a folder goes through the pipeline) writes those bytes too.
    code, stdout, stderr = run_cli(
        "upscale", str(tmp_path / "in"), str(tmp_path / "cli"), "--model", str(MODEL)
    )
    assert code == 0, stderr
    assert f"upscaled {len(paths)} image(s)" in stdout
    assert files(tmp_path / "cli") == files(tmp_path / "serial")


def test_outcomes_are_reported_in_order_in_the_calling_thread(tmp_path) -> None:
    paths = make_folder(tmp_path / "in", 5)
    caller = threading.current_thread()
    seen: list[tuple[int, bool]] = []

    def write(target: Path, result: torch.Tensor, image) -> None:
        time.sleep(0.02 * (len(paths) - int(target.stem[1:])))  # early files write slowest
        write_like_source(target, result, image)

    def report(outcome) -> None:
        assert threading.current_thread() is caller
        seen.append((outcome.job.index, outcome.ok))

    outcomes = upscale_files(
        pairs(paths, tmp_path / "out"),
        lambda job, image: image.pixels.repeat_interleave(2, -1).repeat_interleave(2, -2),
        write=write,
        on_done=report,
        depth=2,
    )
    assert seen == [(i, True) for i in range(len(paths))]
    assert [o.job.target.name for o in outcomes] == [p.name for p in paths]
    assert sorted(os.listdir(tmp_path / "out")) == [p.name for p in paths]


@pytest.mark.parametrize("pipeline", [False, True])
def test_read_upscale_and_write_errors_are_per_file(tmp_path, pipeline: bool) -> None:
    paths = make_folder(tmp_path / "in", 6)
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated
    out = tmp_path / "out"
    plan = pairs(paths, out)
    (out / paths[4].name).mkdir()  # the output's path is taken by a folder

    def upscale_one(job, image) -> torch.Tensor:
        if job.index == 2:
            raise UpscaleError("the model refused")
        return image.pixels.repeat_interleave(2, -1).repeat_interleave(2, -2)

    outcomes = upscale_files(plan, upscale_one, pipeline=pipeline)
    failed = {o.job.index: str(o.error) for o in outcomes if not o.ok}
    assert sorted(failed) == [1, 2, 4]
    assert str(paths[1]) in failed[1] and "not a readable image" in failed[1]
    assert failed[2] == f"{paths[2]}: the model refused"  # named by its source
    assert str(out / paths[4].name) in failed[4] and "could not be written" in failed[4]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["f0.png", "f3.png", "f5.png"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_command_line_reports_each_bad_file_and_counts_them(tmp_path) -> None:
    paths = make_folder(tmp_path / "in", 5)
    paths[2].write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / paths[3].name).mkdir()
    code, stdout, stderr = run_cli(
        "upscale", str(tmp_path / "in"), str(out), "--model", str(MODEL), "--overwrite"
    )
    assert code == 2
    marker = "paragonsr: skipped "  # after the progress bar's carriage return
    skipped = [line.split(marker)[1] for line in stderr.splitlines() if marker in line]
    assert len(skipped) == 2 and "Traceback" not in stderr
    assert str(paths[2]) in skipped[0] and str(out / paths[3].name) in skipped[1]  # in order
    assert "upscaled 3 image(s), 2 failed" in stdout
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["f0.png", "f1.png", "f4.png"]


class Counting:
    """A reader and writer that count, and a model that checks what is outstanding against the
    depth each time it starts an image."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.read = self.written = self.handed = 0
        self.decoded_ahead: list[int] = []
        self.waiting_writes: list[int] = []

    def read_one(self, path: Path):
        image = read_image(path)
        self.read += 1
        return image

    def upscale_one(self, job, image) -> torch.Tensor:
        # Images decoded but not yet taken by the model (this one is taken).
        self.decoded_ahead.append(self.read - (job.index + 1))
        self.waiting_writes.append(self.handed - self.written)
        time.sleep(0.005)  # a slow model: an unbounded reader would race ahead
        self.handed += 1
        return image.pixels.repeat_interleave(2, -1).repeat_interleave(2, -2)

    def write_one(self, target: Path, result: torch.Tensor, image) -> None:
        time.sleep(0.05)  # a slower writer: unbounded results would pile up
        write_like_source(target, result, image)
        self.written += 1


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_is_bounded_by_the_depth(tmp_path, depth: int) -> None:
    paths = make_folder(tmp_path / "in", 10)
    counting = Counting(depth)
    outcomes = upscale_files(
        pairs(paths, tmp_path / "out"),
        counting.upscale_one,
        read=counting.read_one,
        write=counting.write_one,
        depth=depth,
    )
    assert all(o.ok for o in outcomes)
    assert max(counting.decoded_ahead) <= depth
    assert max(counting.waiting_writes) <= depth
    assert max(counting.waiting_writes) == depth  # the writer is the bottleneck: queue full


@contextlib.contextmanager
def slow_atomic_write(seconds: float):
    """atomic_write that waits with the temporary written, before the rename, as a large
    output would; it records whether the wait was entered."""
    real = paragonsr.files.atomic_write
    entered = threading.Event()

    @contextlib.contextmanager
    def slow(path, **options):
        with real(path, **options) as temporary:
            yield temporary
            entered.set()
            time.sleep(seconds)

    paragonsr.images.atomic_write = slow
    try:
        yield entered
    finally:
        paragonsr.images.atomic_write = real


@pytest.mark.parametrize("stop", [RuntimeError("a bug in the model"), KeyboardInterrupt()])
def test_a_stop_mid_folder_joins_the_threads_and_leaves_nothing_half_written(
    tmp_path, stop: BaseException
) -> None:
    paths = make_folder(tmp_path / "in", 8)
    out = tmp_path / "out"
    threads = threading.active_count()
    calls: list[int] = []

    with slow_atomic_write(0.3) as writing:

        def upscale_one(job, image) -> torch.Tensor:
            calls.append(job.index)
            if job.index == 3:
                assert writing.wait(5)  # a write is in progress when the model fails
                raise stop
            return image.pixels.repeat_interleave(2, -1).repeat_interleave(2, -2)

        with pytest.raises(type(stop)):
            upscale_files(pairs(paths, out), upscale_one, depth=2)
    assert threading.active_count() == threads
    assert calls == [0, 1, 2, 3]
    left = sorted(os.listdir(out))
    assert not [name for name in left if name.endswith(".tmp")]
    # The write in progress finished; nothing after the stop was started.
    assert left and left == [p.name for p in paths[: len(left)]] and len(left) <= 3
    for name in left:
        with Image.open(out / name) as written:
            written.load()  # complete files only


@pytest.mark.parametrize("where", ["read", "write"])
def test_an_unexpected_error_in_a_thread_reaches_the_caller(tmp_path, where: str) -> None:
    paths = make_folder(tmp_path / "in", 6)
    threads = threading.active_count()

    def read(path: Path):
        if where == "read" and path == paths[2]:
            raise MemoryError("reader")
        return read_image(path)

    def write(target: Path, result: torch.Tensor, image) -> None:
        if where == "write" and target.name == paths[2].name:
            raise RuntimeError("writer")
        write_like_source(target, result, image)

    with pytest.raises((MemoryError, RuntimeError), match=where.rstrip("e") + "er"):
        upscale_files(
            pairs(paths, tmp_path / "out"),
            lambda job, image: image.pixels,
            read=read,
            write=write,
        )
    assert threading.active_count() == threads
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_folder_run_removes_the_folder_it_created(tmp_path, monkeypatch) -> None:
    make_folder(tmp_path / "in", 4)
    threads = threading.active_count()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # The package exports the function under the module's name: patch the module itself.
    monkeypatch.setattr(sys.modules["paragonsr.upscale"], "upscale", interrupted)
    code, _, stderr = run_cli(
        "upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(MODEL)
    )
    assert code == 130 and "interrupted" in stderr
    assert not (tmp_path / "out").exists()
    assert threading.active_count() == threads


def test_a_single_file_raises_its_error(tmp_path) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    code, _, stderr = run_cli(
        "upscale", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", str(MODEL)
    )
    assert code == 2 and "skipped" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"paragonsr: error: {tmp_path / 'bad.png'}: not a readable")
    assert "1/1" not in stderr  # the bar does not count a file that failed as done
    assert sorted(os.listdir(tmp_path)) == ["bad.png"]


SLOW_FOLDER = """
import contextlib, sys, time
import paragonsr.images as images
from paragonsr.cli import main

real = images.atomic_write

@contextlib.contextmanager
def slow(path, **options):
    with real(path, **options) as temporary:
        yield temporary
        print("WRITING", path.name, flush=True)
        time.sleep(1.5)  # SIGTERM arrives here, with the temporary written

images.atomic_write = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_folder_write_finishes_it_and_stops(tmp_path) -> None:
    paths = make_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_FOLDER, "upscale", str(tmp_path / "in"), str(out)]
        + ["--model", str(MODEL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        for line in process.stdout:
            if line.startswith("WRITING"):
                break
        assert any(p.name.endswith(".tmp") for p in out.iterdir())
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "paragonsr: stopped by SIGTERM"
    assert time.monotonic() - started < 10
    left = sorted(os.listdir(out))
    assert left == [paths[0].name]  # the write in progress finished, no other began
    with Image.open(out / left[0]) as written:
        written.load()


def test_depth_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError, match="depth"):
        upscale_files([], lambda job, image: image.pixels, depth=0)


def test_a_model_error_names_the_file_in_both_loops(tmp_path) -> None:
    paths = make_folder(tmp_path / "in", 2)

    def upscale_one(job, image) -> torch.Tensor:
        raise ParagonSRError("out of tiles")

    for pipeline in (False, True):
        outcomes = upscale_files(
            pairs(paths, tmp_path / f"out{pipeline}"), upscale_one, pipeline=pipeline
        )
        assert [str(o.error) for o in outcomes] == [f"{p}: out of tiles" for p in paths]
