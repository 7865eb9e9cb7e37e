"""Unusual and hostile image files: read right (orientation, colour profiles, float, CMYK,
CIELAB) or refused with one line that names the file, the problem and the fix."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from helpers import PYPNG_INSTALL, REFERENCE, require
from paragonsr.cli import main
from paragonsr.images import ImageError, read_image, write_image

NANO = str(REFERENCE / "nano_x2.fused.safetensors")
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def hwc(loaded) -> np.ndarray:
    return loaded.pixels[0].permute(1, 2, 0).numpy()


def random8(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def refusal(path, *fragments: str, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        read_image(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def png_chunks(path) -> list[tuple[bytes, bytes]]:
    png = require("png", PYPNG_INSTALL)
    return list(png.Reader(filename=str(path)).chunks())


def write_png16(path, values: np.ndarray, extra: list[tuple[bytes, bytes]] = ()) -> None:
    """A 16-bit colour PNG written by pypng, with ``extra`` chunks placed right before IDAT."""
    png = require("png", PYPNG_INSTALL)
    height, width, channels = values.shape
    buffer = io.BytesIO()
    png.Writer(width, height, bitdepth=16, greyscale=False, alpha=channels == 4).write(
        buffer, values.reshape(height, -1)
    )
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    first_idat = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    chunks[first_idat:first_idat] = list(extra)
    with open(path, "wb") as handle:
        png.write_chunks(handle, chunks)


def read_png16(path) -> np.ndarray:
    png = require("png", PYPNG_INSTALL)
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    assert info["bitdepth"] == 16
    return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, -1)


def iccp_chunk(profile: bytes) -> tuple[bytes, bytes]:
    return b"iCCP", b"test\0\0" + zlib.compress(profile)


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_every_exif_orientation_is_applied(tmp_path, suffix: str, orientation: int) -> None:
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(random8(5, 7, seed=orientation)).save(path, exif=exif_with(orientation))
    with Image.open(path) as stored:
        assert stored.getexif().get(0x0112) == orientation  # the file really carries it
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB")) / np.float32(255)
    loaded = read_image(path)
    assert loaded.pixels.shape == ((1, 3, 7, 5) if orientation >= 5 else (1, 3, 5, 7))
    np.testing.assert_array_equal(hwc(loaded), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_16_bit_colour_png(tmp_path, orientation: int) -> None:
    # Multiples of 257 are the same fractions in 8 and 16 bits, so the 8-bit file, oriented by
    # Pillow, is the answer for the 16-bit one (read by pypng).
    values8 = random8(4, 6, seed=orientation)
    eight, deep = tmp_path / "eight.png", tmp_path / "deep.png"
    Image.fromarray(values8).save(eight, exif=exif_with(orientation))
    exif = exif_with(orientation).tobytes()
    exif = exif[6:] if exif.startswith(b"Exif\0\0") else exif  # PNG's eXIf has no prefix
    write_png16(deep, values8.astype(np.uint16) * 257, [(b"eXIf", exif)])
    loaded = read_image(deep)
    assert loaded.bits == 16
    np.testing.assert_allclose(hwc(loaded), hwc(read_image(eight)), atol=1e-7)
    assert loaded.pixels.shape[2:] == ((6, 4) if orientation >= 5 else (4, 6))


def test_a_portrait_phone_jpeg_is_written_upright_without_an_orientation_tag(tmp_path) -> None:
    Image.fromarray(random8(6, 10)).save(tmp_path / "phone.jpg", exif=exif_with(6))
    loaded = read_image(tmp_path / "phone.jpg")
    assert loaded.pixels.shape == (1, 3, 10, 6)
    write_image(tmp_path / "out.jpg", loaded.pixels)
    with Image.open(tmp_path / "out.jpg") as written:
        assert written.size == (6, 10)
        assert 0x0112 not in written.getexif()


def test_the_cli_writes_an_oriented_image_upright(tmp_path) -> None:
    Image.fromarray(random8(6, 10)).save(tmp_path / "in.png", exif=exif_with(8))
    code, _, err = run(
        "upscale", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--model", NANO
    )
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (12, 20)
        assert 0x0112 not in written.getexif()


# ICC profiles


@pytest.mark.parametrize(
    "suffix, bits, channels",
    [(".png", 8, 3), (".png", 8, 4), (".png", 16, 3), (".jpg", 8, 3), (".webp", 8, 3)]
    + [(".tif", 8, 3), (".tif", 8, 4)],
)
def test_icc_profile_round_trips(tmp_path, suffix: str, bits: int, channels: int) -> None:
    source = tmp_path / f"in{suffix}"
    values8 = random8(5, 6, channels, seed=bits + channels)
    if bits == 16:
        write_png16(source, values8.astype(np.uint16) * 257 + 3, [iccp_chunk(SRGB_PROFILE)])
    else:
        Image.fromarray(values8).save(source, icc_profile=SRGB_PROFILE)
    loaded = read_image(source)
    assert loaded.bits == bits
    assert loaded.icc_profile == SRGB_PROFILE
    target = tmp_path / f"out{suffix}"
    write_image(target, loaded.pixels, loaded.bits, icc_profile=loaded.icc_profile)
    with Image.open(target) as written:
        assert written.info.get("icc_profile") == SRGB_PROFILE
    if bits == 16:  # the profile did not cost the 16 bits
        np.testing.assert_array_equal(read_png16(target), values8.astype(np.uint16) * 257 + 3)
    assert read_image(target).icc_profile == SRGB_PROFILE


def test_a_broken_png_iccp_chunk_is_ignored_like_pillow_does(tmp_path) -> None:
    write_png16(tmp_path / "in.png", random8(3, 3).astype(np.uint16), [(b"iCCP", b"x\0\0junk")])
    assert read_image(tmp_path / "in.png").icc_profile is None


def test_bmp_is_written_without_the_profile(tmp_path) -> None:
    pixels = torch.rand(1, 3, 4, 5)
    write_image(tmp_path / "out.bmp", pixels, icc_profile=SRGB_PROFILE)
    with Image.open(tmp_path / "out.bmp") as written:
        assert written.size == (5, 4) and "icc_profile" not in written.info


def test_an_rgb_profile_is_not_put_on_gray_pixels(tmp_path) -> None:
    write_image(tmp_path / "gray.png", torch.rand(1, 1, 4, 5), icc_profile=SRGB_PROFILE)
    with Image.open(tmp_path / "gray.png") as written:
        assert written.mode == "L" and "icc_profile" not in written.info


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_the_cli_carries_the_profile_to_the_output(tmp_path, suffix: str) -> None:
    Image.fromarray(random8(8, 9)).save(tmp_path / f"in{suffix}", icc_profile=SRGB_PROFILE)
    code, _, err = run(
        "upscale", str(tmp_path / f"in{suffix}"), str(tmp_path / f"out{suffix}"), "--model", NANO
    )
    assert code == 0, err
    with Image.open(tmp_path / f"out{suffix}") as written:
        assert written.size == (18, 16)
        assert written.info.get("icc_profile") == SRGB_PROFILE


def test_the_cli_carries_the_profile_of_a_16_bit_png(tmp_path) -> None:
    values = (random8(7, 8).astype(np.uint16) << 8) | 0x5A
    write_png16(tmp_path / "in.png", values, [iccp_chunk(SRGB_PROFILE)])
    code, _, err = run(
        "upscale", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--model", NANO
    )
    assert code == 0, err
    assert read_png16(tmp_path / "out.png").shape == (14, 16, 3)
    with Image.open(tmp_path / "out.png") as written:
        assert written.info.get("icc_profile") == SRGB_PROFILE


# 32-bit float and integer images


def test_a_float_tiff_in_0_1_is_read_exactly(tmp_path) -> None:
    values = np.random.default_rng(3).random((6, 7), dtype=np.float32)
    values[0, 0], values[0, 1] = 0.0, 1.0
    Image.fromarray(values).save(tmp_path / "f.tif")
    loaded = read_image(tmp_path / "f.tif")
    assert loaded.bits == 16
    np.testing.assert_array_equal(hwc(loaded)[..., 0], values)


def test_float_rounding_noise_at_the_ends_is_clamped(tmp_path) -> None:
    values = np.full((2, 3), 0.5, dtype=np.float32)
    values[0, 0], values[1, 2] = -2e-5, 1 + 5e-5
    Image.fromarray(values).save(tmp_path / "f.tif")
    got = hwc(read_image(tmp_path / "f.tif"))[..., 0]
    assert got[0, 0] == 0 and got[1, 2] == 1 and got[0, 1] == 0.5


def test_an_hdr_float_tiff_is_refused(tmp_path) -> None:
    values = np.random.default_rng(4).random((6, 7), dtype=np.float32) * 3.5
    Image.fromarray(values).save(tmp_path / "hdr.tif")
    refusal(
        tmp_path / "hdr.tif",
        "float image with values outside [0, 1] (HDR; min ",
        "Tone-map it to [0, 1] or save it as a 16-bit PNG",
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_nan_or_inf_is_refused(tmp_path, bad: float) -> None:
    values = np.full((3, 3), 0.25, dtype=np.float32)
    values[1, 1] = bad
    Image.fromarray(values).save(tmp_path / "nan.tif")
    refusal(
        tmp_path / "nan.tif",
        "float image with NaN or infinite values",
        "Tone-map it to [0, 1] or save it as a 16-bit PNG",
    )


def test_a_32_bit_integer_image_within_16_bits_reads_as_16_bit(tmp_path) -> None:
    values = np.random.default_rng(5).integers(0, 65536, (4, 5)).astype(np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
    loaded = read_image(tmp_path / "i.tif")
    assert loaded.bits == 16
    np.testing.assert_allclose(hwc(loaded)[..., 0], values / 65535, atol=1e-7)


@pytest.mark.parametrize("bad", [70000, -1])
def test_a_32_bit_integer_image_beyond_16_bits_is_refused(tmp_path, bad: int) -> None:
    values = np.full((3, 4), 1000, dtype=np.int32)
    values[2, 3] = bad
    Image.fromarray(values, mode="I").save(tmp_path / "wide.tif")
    refusal(
        tmp_path / "wide.tif",
        "32-bit integer image with values outside 0..65535",
        f"{bad}",
        "Scale it to 0..65535",
    )


# CIELAB and CMYK


def lab_d50(rgb8) -> np.ndarray:
    """CIE L*a*b* (D50, Bradford-adapted, as ICC profiles use) of an sRGB colour."""
    c = np.asarray(rgb8, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz_d65 = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750]]
        + [[0.0193339, 0.1191920, 0.9503041]]
    )
    bradford_d65_to_d50 = np.array(
        [[1.0478112, 0.0228866, -0.0501270], [0.0295424, 0.9904844, -0.0170491]]
        + [[-0.0092345, 0.0150436, 0.7521316]]
    )
    xyz = bradford_d65_to_d50 @ to_xyz_d65 @ linear / np.array([0.96422, 1.0, 0.82521])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_a_lab_tiff_is_converted_to_srgb(tmp_path) -> None:
    colours = [(200, 120, 60), (40, 160, 220), (128, 128, 128), (90, 30, 140), (240, 235, 200)]
    image = Image.new("LAB", (len(colours), 1))
    for index, colour in enumerate(colours):
        lightness, a, b = lab_d50(colour)
        # Pillow's LAB mode: L scaled to 0..255, a and b offset by 128 (frombytes' "LAB" raw
        # mode would read a and b as signed instead).
        image.putpixel((index, 0), (round(lightness * 2.55), round(a) + 128, round(b) + 128))
    image.save(tmp_path / "lab.tif")
    with Image.open(tmp_path / "lab.tif") as check:
        assert check.mode == "LAB"
    loaded = read_image(tmp_path / "lab.tif")
    assert loaded.pixels.shape == (1, 3, 1, len(colours))  # no made-up alpha channel
    assert loaded.bits == 8 and loaded.icc_profile is None
    got = hwc(loaded)[0] * 255
    assert np.abs(got - np.array(colours)).max() <= 3, got.round()


def cmyk_test_profile() -> bytes:
    """A tiny CMYK -> Lab ICC v2 printer profile: cyan ink prints red, black ink black, no ink
    white; so a pixel that the naive formula makes cyan comes out red through the profile."""
    ramp = bytes(range(256))
    clut = b"".join(
        bytes((0, 128, 128) if k else (140, 200, 190) if c else (255, 128, 128))
        for c, _, _, k in itertools.product((0, 1), repeat=4)
    )
    identity = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x10000)
    lut = b"mft1" + bytes(4) + bytes((4, 3, 2, 0)) + struct.pack(">9i", *identity)
    lut += ramp * 4 + clut + ramp * 3
    tag_at = 128 + 4 + 12
    header = struct.pack(">I4sI4s", tag_at + len(lut), bytes(4), 0x02100000, b"prtr")
    header += struct.pack(">4s4s12s4s", b"CMYK", b"Lab ", bytes(12), b"acsp")
    header += bytes(68 - len(header)) + struct.pack(">3i", 63190, 65536, 54061)  # D50
    header += bytes(128 - len(header))
    return header + struct.pack(">I4sII", 1, b"A2B0", tag_at, len(lut)) + lut


def test_cmyk_without_a_profile_is_read_as_rgb(tmp_path) -> None:
    image = Image.frombytes("CMYK", (6, 5), random8(5, 6, 4).tobytes())
    image.save(tmp_path / "cmyk.tif")
    loaded = read_image(tmp_path / "cmyk.tif")
    assert loaded.pixels.shape == (1, 3, 5, 6) and loaded.icc_profile is None
    expected = np.asarray(image.convert("RGB")) / np.float32(255)
    np.testing.assert_array_equal(hwc(loaded), expected)


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk_with_a_profile_goes_through_it_and_the_profile_stays_behind(
    tmp_path, suffix: str
) -> None:
    profile = cmyk_test_profile()
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / f"c{suffix}", icc_profile=profile)
    loaded = read_image(tmp_path / f"c{suffix}")
    assert loaded.pixels.shape == (1, 3, 8, 8)
    assert loaded.icc_profile is None  # a CMYK profile cannot describe RGB pixels
    red, green, blue = (hwc(loaded)[4, 4] * 255).round()
    assert red > 200 and green < 100 and blue < 100, (red, green, blue)  # naive: (0, 255, 255)
    write_image(tmp_path / "out.png", loaded.pixels, icc_profile=loaded.icc_profile)
    with Image.open(tmp_path / "out.png") as written:
        assert "icc_profile" not in written.info


def test_cmyk_with_an_unusable_profile_is_refused(tmp_path) -> None:
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.tif", icc_profile=b"\0" * 200)
    refusal(tmp_path / "c.tif", "its embedded CMYK ICC profile cannot be used", "Convert it")


# Animations and multi-page files


def frames(count: int, mode: str = "RGB") -> list[Image.Image]:
    return [Image.fromarray(random8(8, 8, seed=i)).convert(mode) for i in range(count)]


@pytest.mark.parametrize("suffix, count", [(".webp", 12), (".png", 5), (".tif", 3)])
def test_animations_and_multi_page_files_are_refused(tmp_path, suffix: str, count: int) -> None:
    first, *rest = frames(count)
    first.save(tmp_path / f"anim{suffix}", save_all=True, append_images=rest, duration=40)
    refusal(
        tmp_path / f"anim{suffix}",
        f"has {count} frames (an animation or a multi-page file); only still images are upscaled",
        "Extract the frames first (for example with ffmpeg) and upscale the folder",
    )


def test_a_16_bit_colour_apng_is_refused(tmp_path) -> None:
    values = random8(4, 4).astype(np.uint16) * 257
    write_png16(tmp_path / "anim.png", values, [(b"acTL", struct.pack(">II", 7, 0))])
    refusal(tmp_path / "anim.png", "has 7 frames", "Extract the frames first")


def test_a_one_frame_webp_still_reads(tmp_path) -> None:
    values = random8(5, 5)
    Image.fromarray(values).save(tmp_path / "still.webp", lossless=True)
    np.testing.assert_array_equal(hwc(read_image(tmp_path / "still.webp")) * 255, values)


# Links


def symlink(target, link) -> None:
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available here")


def test_a_symbolic_link_loop(tmp_path) -> None:
    symlink(tmp_path / "b.png", tmp_path / "a.png")
    symlink(tmp_path / "a.png", tmp_path / "b.png")
    refusal(tmp_path / "a.png", "is a symbolic link loop", "Point the link at an image file")


def test_a_link_to_itself(tmp_path) -> None:
    symlink(tmp_path / "self.png", tmp_path / "self.png")
    refusal(tmp_path / "self.png", "is a symbolic link loop")


def test_a_dangling_symbolic_link(tmp_path) -> None:
    symlink(tmp_path / "gone.png", tmp_path / "link.png")
    refusal(
        tmp_path / "link.png",
        "is a symbolic link to a missing file",
        "Fix the link or remove it",
    )


def test_a_link_to_a_real_image_reads_it(tmp_path) -> None:
    values = random8(3, 4)
    Image.fromarray(values).save(tmp_path / "real.png")
    symlink(tmp_path / "real.png", tmp_path / "link.png")
    np.testing.assert_array_equal(hwc(read_image(tmp_path / "link.png")) * 255, values)


def test_a_missing_file_is_still_not_found(tmp_path) -> None:
    refusal(tmp_path / "nowhere.png", "file not found")
