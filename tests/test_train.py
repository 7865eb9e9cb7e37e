"""The trainer: it learns, resumes bit-identically, writes loadable checkpoints, and refuses
bad input before training starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import REFERENCE, REPO
from paragonsr import build_model, fuse_for_release, load_model, save_checkpoint
from paragonsr.images import read_image
from paragonsr.train import TrainConfig, train
from paragonsr.train.data import DataError, bicubic_upscale, downscale
from paragonsr.train.loop import TrainingError, psnr


def make_images(folder: Path, count: int = 3, size: int = 48, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(6 * x + index), np.cos(5 * y - index), x * y], axis=-1)
        noise = rng.uniform(-0.1, 0.1, (size, size, 3))
        array = np.clip(0.5 + 0.4 * base + noise, 0, 1)
        Image.fromarray((array * 255).astype(np.uint8)).save(folder / f"img{index}.png")
    return folder


def quick_config(tmp_path: Path, **changes) -> TrainConfig:
    settings = dict(
        data=str(make_images(tmp_path / "hr")),
        out=str(tmp_path / "run"),
        variant="nano",
        scale=2,
        iters=16,
        batch=4,
        lq_size=12,
        lr=2e-3,
        val_every=8,
        save_every=8,
        threads=1,
        seed=1,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def test_a_short_run_learns(tmp_path) -> None:
    result = train(quick_config(tmp_path, iters=30, val=str(tmp_path / "hr")))
    losses = result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert [row["iteration"] for row in result.validation] == [8, 16, 24, 30]
    assert all(math.isfinite(row["psnr"]) and row["bicubic"] > 0 for row in result.validation)


def test_resume_continues_bit_identically(tmp_path) -> None:
    whole = train(quick_config(tmp_path / "a"))
    stop_after = 7
    seen: list[int] = []
    first = train(
        quick_config(tmp_path / "b"),
        progress=lambda r: seen.append(r["iteration"]),
        cancelled=lambda: len(seen) >= stop_after,
    )
    assert first.cancelled and first.iteration == stop_after
    second = train(quick_config(tmp_path / "b", resume=True))
    assert second.iteration == 16
    assert second.losses == whole.losses  # every loss, bit for bit
    ours = load_file(tmp_path / "b" / "run" / "model_ema.safetensors")
    theirs = load_file(tmp_path / "a" / "run" / "model_ema.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_checkpoint_has_the_reference_layout_and_loads_everywhere(tmp_path) -> None:
    train(quick_config(tmp_path, iters=4))
    path = tmp_path / "run" / "model_ema.safetensors"
    reference = load_file(REFERENCE / "nano_x2.train.safetensors")
    ours = load_file(path)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert descriptor.architecture.id == "ParagonSR" and "training" in descriptor.tags
    assert load_model(path).form == "training"


def test_fine_tuning_starts_from_the_checkpoint_with_a_low_lr(tmp_path) -> None:
    init = REFERENCE / "nano_x2.train.safetensors"
    config = quick_config(tmp_path, iters=2, lr=None, init=str(init))
    assert config.resolved_lr() == 2e-5
    result = train(config)
    assert result.iteration == 2
    with pytest.raises(TrainingError, match="a fused checkpoint cannot be trained"):
        train(
            quick_config(tmp_path / "f", iters=2, init=str(REFERENCE / "nano_x2.fused.safetensors"))
        )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda t: {"data": str(t / "nowhere")}, DataError, "data folder not found"),
        (
            lambda t: {"data": str((t / "empty").mkdir() or t / "empty")},
            DataError,
            "contains no images",
        ),
        (lambda t: {"lq_size": 40}, DataError, "smaller than the 80 px HR crop"),
        (lambda t: {"schedule": "sawtooth"}, TrainingError, "unknown schedule"),
    ],
    ids=["missing", "empty", "crop-too-large", "schedule"],
)
def test_refused_before_training(tmp_path, change, error, message) -> None:
    with pytest.raises(error, match=message):
        train(quick_config(tmp_path, **change(tmp_path)))


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog) -> None:
    folder = make_images(tmp_path / "hr", count=2)
    (folder / "broken.png").write_bytes(b"not a png")
    result = train(quick_config(tmp_path, iters=2, data=str(folder)))
    assert result.iteration == 2
    assert "broken.png" in caplog.text
    for image in folder.glob("img*.png"):
        image.unlink()
    with pytest.raises(DataError, match="no usable training image \\(1 unreadable\\)"):
        train(quick_config(tmp_path / "again", iters=2, data=str(folder)))


def test_paired_data_must_match_the_scale(tmp_path) -> None:
    hr = make_images(tmp_path / "paired_hr", count=1, size=48)
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.open(hr / "img0.png").resize((25, 24)).save(lr / "img0.png")
    with pytest.raises(DataError, match="img0.png: 25x24 times the scale 2"):
        train(quick_config(tmp_path, data=str(hr), lr_data=str(lr)))


def test_unwritable_run_folder(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="not writable"):
        train(quick_config(tmp_path, out=str(tmp_path / "file" / "run")))


def test_a_previous_run_needs_resume_and_the_same_network(tmp_path) -> None:
    train(quick_config(tmp_path, iters=2))
    with pytest.raises(TrainingError, match="pass --resume"):
        train(quick_config(tmp_path, iters=2))
    with pytest.raises(TrainingError, match="another network \\(scale"):
        train(quick_config(tmp_path, iters=4, scale=3, resume=True))


def shipped_model_gain() -> tuple[float, float]:
    """PSNR gain over bicubic of the bundled default model on a held-out crop, and the
    recorded value."""
    record = json.loads((REPO / "models" / "paragonsr_nano_x2.json").read_text())
    hr = read_image(REPO / "paragonsr" / "data" / "astronaut_192.png").pixels
    lr = downscale(hr, 2)
    model = load_model(REPO / "models" / "paragonsr_nano_x2.safetensors")
    with torch.inference_mode():
        ours = psnr(model(lr).clamp(0, 1), hr, 2)
    return ours - psnr(bicubic_upscale(lr, 2), hr, 2), record["astronaut_192_gain_db"]


def test_the_shipped_model_beats_bicubic_as_recorded() -> None:
    gain, recorded = shipped_model_gain()
    assert gain > 0.5
    assert gain >= recorded - 0.05


def test_untrained_weights_do_not_pass_the_shipped_model_check(tmp_path) -> None:
    """The check above can fail: a fresh network is far below bicubic on the same crop."""
    hr = read_image(REPO / "paragonsr" / "data" / "astronaut_192.png").pixels
    lr = downscale(hr, 2)
    fresh = fuse_for_release(build_model("nano", 2).eval())
    save_checkpoint(fresh, tmp_path / "fresh.safetensors")
    with torch.inference_mode():
        gain = psnr(load_model(tmp_path / "fresh.safetensors")(lr).clamp(0, 1), hr, 2) - psnr(
            bicubic_upscale(lr, 2), hr, 2
        )
    assert gain < 0


def test_degradations_and_charbonnier_with_ms_ssim(tmp_path) -> None:
    result = train(
        quick_config(tmp_path, iters=3, degrade=True, loss="charbonnier", ms_ssim_weight=0.2)
    )
    assert result.iteration == 3 and all(math.isfinite(x) for x in result.losses)


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    from paragonsr.train.losses import ms_ssim

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 96, 96, generator=generator)
    assert ms_ssim(image, image).item() == pytest.approx(1.0, abs=1e-5)
    light = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    heavy = (image + 0.3 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    assert 1.0 > ms_ssim(light, image).item() > ms_ssim(heavy, image).item()


def test_cli_train_reports_psnr_beside_bicubic(tmp_path, capsys) -> None:
    from paragonsr.cli import main

    data = make_images(tmp_path / "hr")
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--val",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--iters",
            "4",
            "--batch",
            "2",
            "--lq-size",
            "12",
            "--val-every",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "iteration      2: PSNR" in out and "bicubic" in out
    assert (tmp_path / "r" / "model_ema.safetensors").exists()


def test_non_finite_losses_skip_steps_then_abort(tmp_path, monkeypatch) -> None:
    import paragonsr.train.loop as loop

    monkeypatch.setattr(loop.F, "l1_loss", lambda a, b: (a - b).abs().mean() * float("nan"))
    with pytest.raises(TrainingError, match="5 non-finite losses in a row at iteration 0"):
        train(quick_config(tmp_path, iters=10))
    assert (tmp_path / "run" / "resume_state.pt").exists()  # saved before stopping


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_state_that_resume_continues(tmp_path, signal_name: str) -> None:
    """Ctrl-C (or a SIGTERM from a scheduler) in the middle of `paragonsr train`, long before the
    first periodic save: the step in flight finishes, a resumable state is written, the exit is
    130, and --resume continues from that iteration (issue 13: it used to save nothing)."""
    import signal
    import subprocess
    import sys
    import time

    data = make_images(tmp_path / "data", count=2, size=48)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "paragonsr", "train", "--data", str(data), "--out", str(out),
        "--variant", "nano", "--scale", "2", "--batch", "2", "--lq-size", "16",
        "--save-every", "100000", "--val-every", "100000", "--threads", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        [*command, "--iters", "100000"], stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    time.sleep(8)  # import, data, a few steps
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    state = torch.load(out / "resume_state.pt", weights_only=True)
    stopped = state["iteration"]
    assert f"stopped by {signal_name} at iteration {stopped}" in stderr and "--resume" in stderr
    finished = subprocess.run(
        [*command, "--iters", str(stopped + 3), "--resume"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert f"trained {stopped + 3} iterations" in finished.stdout


def declared_giant_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG header declaring width x height RGB over a few bytes of data: what a decompression
    bomb looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_in_the_data_is_refused_from_its_header(tmp_path, caplog) -> None:
    """Training and validation images go through the same pixel limit as upscaling: an image
    declaring 400 megapixels is skipped as too large (not decoded: that took 7.9 GB)."""
    folder = make_images(tmp_path / "hr", count=2)
    declared_giant_png(folder / "bomb.png")
    result = train(quick_config(tmp_path, iters=2, data=str(folder), val=str(folder)))
    assert result.iteration == 2
    assert "bomb.png" in caplog.text and "20000x20000" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch", "0"], "--batch 0: must be at least 1"),
        (["--lq-size", "0"], "--lq-size 0: must be at least 1"),
        (["--scale", "0"], "--scale 0: must be at least 1"),
        (["--scale", "17"], "--scale 17: ParagonSR supports scales 1-16"),
        (["--threads", "-1"], "--threads -1: must be 0 (all cores) or more"),
        (["--milestones", "a"], "--milestones 'a': give iterations separated by commas"),
        (["--val-every", "0"], "--val-every 0: must be at least 1"),
        (["--save-every", "0"], "--save-every 0: must be at least 1"),
        (["--iters", "0"], "--iters 0: must be at least 1"),
        (["--iters", "-5"], "--iters -5: must be at least 1"),
        (["--lr", "0"], "--lr 0.0: must be positive"),
    ],
)
def test_bad_training_arguments_are_one_line_errors(tmp_path, capsys, arguments, message) -> None:
    """Refused before anything is read or written: no traceback (a ZeroDivisionError after the
    first iteration, for --save-every 0), no untrained model written with exit 0 (--iters 0),
    no empty run folder left behind."""
    from paragonsr.cli import main

    data = make_images(tmp_path / "hr", count=1)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("paragonsr: error: ") and message in last
    assert "Traceback" not in err
    assert not out.exists()
