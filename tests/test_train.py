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
from paragonsr.train.data import DataError
from paragonsr.train.loop import TrainingError, validate


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
    held_out = make_images(tmp_path / "val", count=1, seed=5)
    result = train(quick_config(tmp_path, iters=30, val=str(held_out)))
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
        train(quick_config(tmp_path / "again", iters=2, data=str(folder), holdout=0.0))


def test_paired_data_must_match_the_scale(tmp_path) -> None:
    hr = make_images(tmp_path / "paired_hr", count=1, size=48)
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.open(hr / "img0.png").resize((25, 24)).save(lr / "img0.png")
    with pytest.raises(DataError, match="img0.png: 25x24 times the scale 2"):
        train(quick_config(tmp_path, data=str(hr), lr_data=str(lr), holdout=0.0))


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


SHIPPED = {2: "paragonsr_nano_x2", 4: "paragonsr_nano_x4"}


def gain_over_bicubic(model_path: Path, scale: int) -> float:
    """PSNR gain over bicubic of a model on the held-out astronaut crop (never trained on),
    measured as the trainer validates."""
    hr = read_image(REPO / "paragonsr" / "data" / "astronaut_192.png").pixels
    scores = validate(load_model(model_path), [("astronaut_192", hr)], scale, torch.device("cpu"))
    return scores["psnr"] - scores["bicubic"]


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_the_shipped_models_beat_bicubic_as_recorded(scale: int) -> None:
    """Each bundled model against bicubic on a held-out crop, and against its model card's
    record (models/*.json, written when it was trained)."""
    name = SHIPPED[scale]
    record = json.loads((REPO / "models" / f"{name}.json").read_text())
    assert record["scale"] == scale and record["model"] == f"{name}.safetensors"
    gain = gain_over_bicubic(REPO / "models" / f"{name}.safetensors", scale)
    assert gain > 0.5
    assert gain >= record["astronaut_192_gain_db"] - 0.05
    assert (
        record["validation_psnr_db"] - record["validation_bicubic_psnr_db"]
        >= {2: 1.18, 4: 0.8}[scale]
    )


@pytest.mark.parametrize("scale", sorted(SHIPPED))
def test_untrained_weights_do_not_pass_the_shipped_model_check(tmp_path, scale: int) -> None:
    """The check above can fail: a fresh network is far below bicubic on the same crop."""
    fresh = fuse_for_release(build_model("nano", scale).eval())
    save_checkpoint(fresh, tmp_path / "fresh.safetensors")
    assert gain_over_bicubic(tmp_path / "fresh.safetensors", scale) < 0


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
    held_out = make_images(tmp_path / "val", count=1, seed=5)
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--val",
            str(held_out),
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
    assert f"validation: the held-out folder {held_out} (1 image)" in out
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
    held_out = make_images(tmp_path / "val", count=1, seed=5)
    declared_giant_png(held_out / "val_bomb.png")
    result = train(quick_config(tmp_path, iters=2, data=str(folder), val=str(held_out)))
    assert result.iteration == 2
    assert "bomb.png" in caplog.text and "val_bomb.png" in caplog.text
    assert "20000x20000" in caplog.text


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


def test_without_a_validation_folder_a_seeded_share_is_held_out(tmp_path) -> None:
    """Issue 16: the report never measures on training images. Ten images, --holdout 0.2: two
    held out, chosen by the seed alone, never drawn for training, and named in the report."""
    from paragonsr.train.data import PatchSampler, list_images, split_holdout

    folder = make_images(tmp_path / "hr", count=10)
    files = list_images(folder)
    training, held = split_holdout(files, 0.2, seed=3, folder=folder)
    assert len(held) == 2 and sorted(training + held) == files and not set(training) & set(held)
    assert split_holdout(files, 0.2, seed=3, folder=folder) == (training, held)
    assert split_holdout(files, 0.2, seed=4, folder=folder)[1] != held
    assert len(split_holdout(files, 0.01, seed=3, folder=folder)[1]) == 1  # never fewer than one
    sampler = PatchSampler(folder, 2, 12, 3, hr_files=training)
    assert len(sampler.images) == 8

    result = train(quick_config(tmp_path, data=str(folder), holdout=0.2, seed=3, iters=8))
    assert result.validation_source == (
        f"2 of the 10 images of {folder} held out (seed 3): {held[0].name}, {held[1].name}"
    )
    assert [row["iteration"] for row in result.validation] == [8]


def test_one_image_and_no_validation_folder_is_refused_with_the_ways_out(tmp_path) -> None:
    folder = make_images(tmp_path / "one", count=1)
    with pytest.raises(DataError, match="holds 1 image, and holding one out") as caught:
        train(quick_config(tmp_path, data=str(folder)))
    assert "name a separate validation folder" in str(caught.value)
    assert "--holdout 0" in str(caught.value)
    assert not (tmp_path / "run").exists()
    result = train(quick_config(tmp_path, data=str(folder), holdout=0.0, iters=2))
    assert result.validation == [] and result.validation_source.startswith("none (--holdout 0")


def test_a_validation_folder_inside_the_data_never_trains(tmp_path, caplog) -> None:
    data = make_images(tmp_path / "hr", count=3)
    inside = make_images(data / "val", count=2, seed=7)
    result = train(quick_config(tmp_path, val=str(inside), iters=2))
    assert result.validation_source == f"the held-out folder {inside} (2 images)"
    assert f"2 images of {data} lie in the validation folder" in caplog.text
    with pytest.raises(DataError, match="every image in it is also in the validation folder"):
        train(quick_config(tmp_path / "same", data=str(data), val=str(data)))


def test_an_unreadable_image_is_never_the_one_held_out(tmp_path, caplog) -> None:
    """The seeded draw passes over a file that does not decode (it stays with the training
    files, whose loader skips and counts it), so a broken file cannot empty the validation."""
    from paragonsr.train.data import list_images, readable, split_holdout

    folder = make_images(tmp_path / "hr", count=3)
    files = list_images(folder)
    [first] = split_holdout(files, 0.1, 0, folder)[1]
    first.write_bytes(b"not a png")  # the image the seed draws first is now broken
    training, held = split_holdout(files, 0.1, 0, folder, readable)
    assert first not in held and first in training and len(held) == 1
    assert f"not held out for validation: {first}" in caplog.text


def test_bad_holdout_shares_are_refused() -> None:
    for share in (-0.1, 1.0, float("nan")):
        with pytest.raises(TrainingError, match="--holdout .*: the share of images held out"):
            TrainConfig(data="d", out="o", holdout=share).validate()


def read_log(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_csv_log_holds_the_run(tmp_path) -> None:
    """Rows every --log-every iterations and at every validation: the window's mean loss, the
    learning rate, held-out and bicubic PSNR where validated, and throughput."""
    from paragonsr.train.loop import LOG_COLUMNS, lr_factor

    config = quick_config(tmp_path, iters=20, log_every=6, val_every=8)
    result = train(config)
    assert result.log_path == tmp_path / "run" / "training_log.csv"
    with open(result.log_path, encoding="utf-8") as handle:
        assert handle.readline().strip() == ",".join(LOG_COLUMNS)
    rows = read_log(result.log_path)
    assert [int(row["iteration"]) for row in rows] == [6, 8, 12, 16, 18, 20]
    previous = 0
    for row in rows:
        iteration = int(row["iteration"])
        window = result.losses[previous:iteration]
        assert float(row["loss"]) == pytest.approx(sum(window) / len(window), rel=1e-5)
        assert float(row["lr"]) == pytest.approx(config.lr * lr_factor(iteration, config), rel=1e-5)
        assert float(row["images_per_second"]) > 0 and float(row["seconds"]) > 0
        previous = iteration
    validated = {int(row["iteration"]): row for row in rows if row["val_psnr"]}
    assert sorted(validated) == [r["iteration"] for r in result.validation] == [8, 16, 20]
    for scores in result.validation:
        row = validated[scores["iteration"]]
        assert float(row["val_psnr"]) == pytest.approx(scores["psnr"], abs=1e-4)
        assert float(row["bicubic_psnr"]) == pytest.approx(scores["bicubic"], abs=1e-4)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path) -> None:
    """Rows written after the last save are replaced by the resumed run's own: the log of a run
    stopped at 11 (saved at 8) and resumed matches the whole run's but for time and speed."""
    whole = train(quick_config(tmp_path / "a", log_every=3))
    seen: list[int] = []
    train(
        quick_config(tmp_path / "b", log_every=3),
        progress=lambda r: seen.append(r["iteration"]),
        cancelled=lambda: len(seen) >= 11,
    )
    resumed = train(quick_config(tmp_path / "b", log_every=3, resume=True))

    def comparable(path: Path) -> list[tuple]:
        return [
            (row["iteration"], row["loss"], row["lr"], row["val_psnr"], row["bicubic_psnr"])
            for row in read_log(path)
        ]

    assert comparable(resumed.log_path) == comparable(whole.log_path)
    assert [row["iteration"] for row in read_log(whole.log_path)] == [
        "3", "6", "8", "9", "12", "15", "16",
    ]  # fmt: skip


def test_the_plot_script_draws_a_log(tmp_path) -> None:
    """scripts/plot_training.py turns a run's CSV log into the README's kind of PNG: two panels,
    a curve in the first series' color in each; a file that is not a log gets one line."""
    import subprocess
    import sys

    result = train(quick_config(tmp_path, iters=16, log_every=4, val_every=4))
    out = tmp_path / "curves.png"
    script = str(REPO / "scripts" / "plot_training.py")
    done = subprocess.run(
        [sys.executable, script, f"tiny run={result.log_path}", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (600, 900, 3)
    blue = np.all(pixels == (31, 119, 180), axis=-1)
    assert blue[:300].sum() > 100 and blue[300:].sum() > 100  # a curve in both panels
    not_a_log = tmp_path / "notes.csv"
    not_a_log.write_text("a,b\n1,2\n")
    done = subprocess.run(
        [sys.executable, script, f"x={not_a_log}", "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and f"{not_a_log}: not a training log" in done.stderr
    assert not (tmp_path / "x.png").exists()
