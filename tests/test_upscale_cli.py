"""``paragonsr upscale`` end to end: real image files in and out."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import PYPNG_INSTALL, REFERENCE, randomized_model, require
from paragonsr import config_for_variant, load_descriptor, save_checkpoint
from paragonsr.cli import main
from paragonsr.images import read_image
from paragonsr.upscale import UpscaleSettings, upscale

NANO = str(REFERENCE / "nano_x2.fused.safetensors")


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(5)
    base = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    noise = rng.uniform(0, 0.2, (height, width, channels))
    return np.clip(base + noise, 0, 1)


def save8(path, array: np.ndarray) -> None:
    values = np.rint(array * 255).astype(np.uint8)
    Image.fromarray(values[..., 0] if values.shape[-1] == 1 else values).save(path)


def expected_output(array: np.ndarray, model_path: str = NANO) -> torch.Tensor:
    pixels = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None]
    return upscale(load_descriptor(model_path), pixels, UpscaleSettings())


def test_rgb_png_file_to_file(tmp_path) -> None:
    array = np.rint(gradient(30, 41) * 255) / 255
    save8(tmp_path / "in.png", array)
    code, out, err = run(
        "upscale",
        str(tmp_path / "in.png"),
        str(tmp_path / "out.png"),
        "--model",
        NANO,
        "--tile",
        "32",
    )
    assert code == 0, err
    assert "upscaled 1 image(s) x2 with ParagonSR (exact mode)" in out
    written = np.asarray(Image.open(tmp_path / "out.png")).astype(np.float32) / 255
    expected = expected_output(array)[0].permute(1, 2, 0).numpy()
    assert written.shape == (60, 82, 3)
    assert np.abs(written - expected).max() <= 0.5 / 255 + 1e-6


def test_rgba_and_gray_keep_their_layout(tmp_path) -> None:
    save8(tmp_path / "rgba.png", gradient(12, 10, 4))
    save8(tmp_path / "gray.png", gradient(12, 10, 1))
    code, _, err = run("upscale", str(tmp_path), str(tmp_path / "out"), "--model", NANO)
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "rgba.png").mode == "RGBA"
    assert Image.open(tmp_path / "out" / "gray.png").mode == "L"
    assert Image.open(tmp_path / "out" / "gray.png").size == (20, 24)


def test_sixteen_bit_png_stays_sixteen_bit(tmp_path) -> None:
    png = require("png", PYPNG_INSTALL)
    array = gradient(14, 18)
    values = np.rint(array * 65535).astype(np.uint16)
    with open(tmp_path / "deep.png", "wb") as handle:
        png.Writer(18, 14, bitdepth=16, greyscale=False).write(handle, values.reshape(14, -1))
    loaded = read_image(tmp_path / "deep.png")
    assert loaded.bits == 16
    assert np.abs(loaded.pixels[0].permute(1, 2, 0).numpy() - values / 65535).max() < 1e-6
    code, _, err = run(
        "upscale", str(tmp_path / "deep.png"), str(tmp_path / "out.png"), "--model", NANO
    )
    assert code == 0, err
    width, height, rows, info = png.Reader(filename=str(tmp_path / "out.png")).asDirect()
    assert (width, height, info["bitdepth"], info["planes"]) == (36, 28, 16, 3)
    written = np.vstack([np.asarray(r, dtype=np.float64) for r in rows]).reshape(28, 36, 3)
    expected = expected_output(values / 65535)[0].permute(1, 2, 0).numpy()
    assert np.abs(written / 65535 - expected).max() <= 0.5 / 65535 + 1e-6


def test_sixteen_bit_grayscale_through_pillow(tmp_path) -> None:
    values = np.rint(gradient(9, 11, 1)[..., 0] * 65535).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert read_image(tmp_path / "gray16.png").bits == 16
    code, _, err = run(
        "upscale", str(tmp_path / "gray16.png"), str(tmp_path / "o.png"), "--model", NANO
    )
    assert code == 0, err
    written = Image.open(tmp_path / "o.png")
    assert written.mode.startswith("I") and written.size == (22, 18)


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tif"])
def test_other_formats(tmp_path, suffix: str) -> None:
    save8(tmp_path / f"in{suffix}", gradient(10, 12))
    code, _, err = run(
        "upscale", str(tmp_path / f"in{suffix}"), str(tmp_path / f"out{suffix}"), "--model", NANO
    )
    assert code == 0, err
    assert Image.open(tmp_path / f"out{suffix}").size == (24, 20)


def test_one_pixel_image(tmp_path) -> None:
    save8(tmp_path / "dot.png", gradient(1, 1))
    code, _, err = run(
        "upscale", str(tmp_path / "dot.png"), str(tmp_path / "o.png"), "--model", NANO
    )
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (2, 2)


def test_any_spandrel_model_runs_in_overlap_mode(tmp_path) -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    torch.save(model.state_dict(), tmp_path / "compact.pth")
    save8(tmp_path / "in.png", gradient(20, 20))
    code, out, err = run(
        "upscale",
        str(tmp_path / "in.png"),
        str(tmp_path / "o.png"),
        "--model",
        str(tmp_path / "compact.pth"),
    )
    assert code == 0, err
    assert "RealESRGAN Compact (overlap mode)" in out


def assert_fails_cleanly(tmp_path, args: list[str], *fragments: str) -> None:
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(*args)
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("paragonsr: error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


def test_corrupt_image(tmp_path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert_fails_cleanly(
        tmp_path,
        ["upscale", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", NANO],
        "bad.png",
        "not a readable image",
    )


def test_unsupported_format(tmp_path) -> None:
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    assert_fails_cleanly(
        tmp_path,
        ["upscale", str(tmp_path / "anim.gif"), str(tmp_path / "o.png"), "--model", NANO],
        "unsupported image type '.gif'",
    )


def test_pixel_limit(tmp_path) -> None:
    save8(tmp_path / "big.png", gradient(20, 20))
    assert_fails_cleanly(
        tmp_path,
        [
            "upscale",
            str(tmp_path / "big.png"),
            str(tmp_path / "o.png"),
            "--model",
            NANO,
            "--max-pixels",
            "399",
        ],
        "20x20 = 400 pixels, above the limit of 399",
        "--max-pixels",
    )


def test_existing_output_needs_overwrite(tmp_path) -> None:
    save8(tmp_path / "in.png", gradient(8, 8))
    (tmp_path / "o.png").write_bytes(b"keep")
    assert_fails_cleanly(
        tmp_path,
        ["upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--model", NANO],
        "already exists",
        "--overwrite",
    )
    assert (tmp_path / "o.png").read_bytes() == b"keep"


def test_missing_output_folder(tmp_path) -> None:
    save8(tmp_path / "in.png", gradient(8, 8))
    assert_fails_cleanly(
        tmp_path,
        ["upscale", str(tmp_path / "in.png"), str(tmp_path / "nowhere" / "o.png"), "--model", NANO],
        "the output folder does not exist",
    )


def test_model_that_cannot_serve_the_image(tmp_path) -> None:
    model = randomized_model(config_for_variant("nano", 2, in_chans=1))
    save_checkpoint(model, tmp_path / "gray_model.safetensors")
    save8(tmp_path / "in.png", gradient(8, 8))
    assert_fails_cleanly(
        tmp_path,
        [
            "upscale",
            str(tmp_path / "in.png"),
            str(tmp_path / "o.png"),
            "--model",
            str(tmp_path / "gray_model.safetensors"),
        ],
        "in.png",
        "cannot serve a 3-channel image",
    )


def test_not_a_model(tmp_path) -> None:
    save8(tmp_path / "in.png", gradient(8, 8))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "junk.pth")
    assert_fails_cleanly(
        tmp_path,
        [
            "upscale",
            str(tmp_path / "in.png"),
            str(tmp_path / "o.png"),
            "--model",
            str(tmp_path / "junk.pth"),
        ],
        "junk.pth",
        "not a model that spandrel or this pack recognizes",
    )


def test_a_folder_continues_past_bad_files(tmp_path) -> None:
    """A folder of good, text, truncated and good files: every good one is written, each bad
    one is reported with its reason, the summary counts both, the exit status says something
    failed (issue 13: the first bad file stopped the job, at the same file on every rerun)."""
    folder = tmp_path / "in"
    folder.mkdir()
    save8(folder / "a_good.png", gradient(12, 10))
    (folder / "b_text.png").write_text("not an image")
    good = folder / "d_good.png"
    save8(good, gradient(10, 14))
    (folder / "c_truncated.png").write_bytes(good.read_bytes()[:60])
    out = tmp_path / "out"
    code, stdout, stderr = run("upscale", str(folder), str(out), "--model", NANO)
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_good.png", "d_good.png"]
    assert "b_text.png" in stderr and "c_truncated.png" in stderr
    assert stderr.count("paragonsr: skipped ") == 2 and "Traceback" not in stderr
    assert "upscaled 2 image(s), 2 failed" in stdout


def test_an_unknown_device_is_a_one_line_error(tmp_path) -> None:
    save8(tmp_path / "in.png", gradient(8, 8))
    assert_fails_cleanly(
        tmp_path,
        ["upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--model", NANO]
        + ["--device", "banana"],
        "unknown device 'banana'; use auto, cpu or cuda:N",
    )
