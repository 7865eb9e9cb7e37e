"""Reading and writing image files as float tensors in [0, 1].

8-bit images of every common mode go through Pillow. Pillow silently drops 16-bit RGB(A) PNGs
to 8 bits, so 16-bit PNGs go through pypng instead (pure Python), and 16-bit colour TIFFs, which
Pillow cannot keep either, are refused with a message. 16-bit input keeps 16-bit output where the
output format can hold it (PNG, and grayscale TIFF).

Nothing is read as silently wrong pixels: the EXIF orientation is applied, CMYK and CIELAB are
converted to sRGB through colour management, 32-bit float images are taken as values in [0, 1],
and what cannot be read faithfully (HDR floats, animations, multi-page files) is refused with a
one-line reason. An embedded ICC profile is carried from input to output where the output
format can hold it.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .choices import DEFAULT_MAX_PIXELS
from .errors import ParagonSRError
from .files import atomic_write, missing_file_problem

DATA = Path(__file__).resolve().parent / "data"
SAMPLE_IMAGE = DATA / "chelsea_160x120.png"  # CC0, see data/README.md
SAMPLE_DATASET = DATA  # two small CC0/public-domain photos: enough to try the trainer

SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}

# Float images a hair outside [0, 1] are rounding noise from the program that wrote them, not HDR.
FLOAT_TOLERANCE = 1e-4
# Real ICC profiles are kilobytes to a few megabytes; a larger one is a decompression bomb.
MAX_ICC_BYTES = 64 << 20
ORIENTATION_TAG = 0x0112
_EXTRACT_FRAMES = "Extract the frames first (for example with ffmpeg) and upscale the folder"


class ImageError(ParagonSRError, ValueError):
    """An image file that cannot be read or written, naming the file and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = str(path)
        super().__init__(f"{path}: {problem}" + (f". {fix}" if fix else ""))


@dataclass
class LoadedImage:
    pixels: torch.Tensor  # [1, C, H, W] float32 in [0, 1]; C is 1, 2, 3 or 4
    bits: int  # 8 or 16
    icc_profile: bytes | None = None  # describes ``pixels``; None means sRGB


def check_suffix(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            path,
            f"unsupported image type {path.suffix or '(no extension)'!r}",
            f"Use one of {', '.join(sorted(SUFFIXES))}",
        )
    return fmt


def _one_line(error: BaseException) -> str:
    # Library messages can span lines; ours are one line so a folder run's log stays readable.
    return " ".join(str(error).split()) or type(error).__name__


def _check_is_file(path: Path) -> None:
    try:
        os.stat(path)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            raise ImageError(path, *missing_file_problem(path, "an image file")) from None
        raise ImageError(path, f"cannot be opened ({error.strerror or error})") from None
    if not path.is_file():
        raise ImageError(path, "is not a file")


def _png_bit_depth(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's header, or None if it is not a PNG."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    if len(header) < 26 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return header[24], header[25]


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file; ``max_pixels`` refuses larger images from their header, before
    decoding them (a 48 KB PNG can declare 20000x20000). ``None`` lifts the limit."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_is_file(path)
    check_suffix(path)
    try:
        header = _png_bit_depth(path)
        if header is not None and header[0] == 16 and header[1] in (2, 4, 6):
            return _read_png16(path, max_pixels)
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, before decoding
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        with image:
            _check_size(path, *image.size, max_pixels)
            _check_still(path, getattr(image, "n_frames", 1))
            if image.format == "TIFF" and image.mode in ("RGB", "RGBA"):
                samples = image.tag_v2.get(258, (8,))
                if max(samples if isinstance(samples, tuple) else (samples,)) > 8:
                    raise ImageError(
                        path,
                        "16-bit colour TIFF cannot be read without losing precision",
                        "Convert it to a 16-bit PNG",
                    )
            array, bits, icc_profile = _to_array(path, image)
            orientation = image.getexif().get(ORIENTATION_TAG)
    except ImageError:
        raise
    except PermissionError as error:
        raise ImageError(
            path, f"cannot be read ({error.strerror})", "Check the file's permissions"
        ) from None
    except (
        UnidentifiedImageError,
        OSError,
        EOFError,
        SyntaxError,
        ValueError,
        struct.error,
        zlib.error,
    ) as error:
        raise ImageError(
            path,
            f"not a readable image, probably truncated or corrupt ({_one_line(error)})",
            "Check the file or export it again",
        ) from None
    return _loaded(_orient(array, orientation), bits, icc_profile)


def _loaded(array: np.ndarray, bits: int, icc_profile: bytes | None) -> LoadedImage:
    pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clamp_(0, 1)
    return LoadedImage(pixels.permute(2, 0, 1).unsqueeze(0).contiguous(), bits, icc_profile)


def _check_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if width == 0 or height == 0:
        raise ImageError(path, f"the image is empty ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            path,
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}",
            "Raise the limit with --max-pixels if you have the memory",
        )


def _check_still(path: Path, frames: int) -> None:
    # Reading only the first frame of an animation would drop the rest without a word.
    if frames > 1:
        raise ImageError(
            path,
            f"has {frames} frames (an animation or a multi-page file); only still images are "
            "upscaled",
            _EXTRACT_FRAMES,
        )


def _orient(array: np.ndarray, orientation: object) -> np.ndarray:
    """``array`` (H, W, C) turned upright for an EXIF orientation, as ImageOps.exif_transpose."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.transpose(1, 0, 2)
    if orientation == 6:
        return array.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return array.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return array.transpose(1, 0, 2)[::-1]
    return array  # 1, absent, or a value no camera writes


def _to_array(path: Path, image) -> tuple[np.ndarray, int, bytes | None]:
    """(H, W, C float32 array in [0, 1], bit depth, ICC profile) of an open Pillow image."""
    mode = image.mode
    icc_profile = image.info.get("icc_profile") or None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16)[..., None] / np.float32(65535), 16, icc_profile
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageError(
                path,
                f"32-bit integer image with values outside 0..65535 (min {low}, max {high})",
                "Scale it to 0..65535 and save it as a 16-bit PNG or TIFF",
            )
        return values[..., None].astype(np.float32) / 65535, 16, icc_profile
    if mode == "F":
        return _float_array(path, np.asarray(image, dtype=np.float32)), 16, icc_profile
    if mode == "CMYK":
        return _cmyk_array(path, image, icc_profile), 8, None
    if mode == "LAB":
        return _lab_array(path, image), 8, None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "L"):
        image = image.convert("L")
    elif mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "La":
        image = image.convert("LA")
    elif mode not in ("LA", "RGB", "RGBA"):
        # RGBX, YCbCr, HSV: colour models Pillow converts exactly. Anything else is refused
        # rather than guessed at.
        try:
            image = image.convert("RGB")
        except ValueError:
            raise ImageError(
                path,
                f"image mode {mode!r} cannot be converted to RGB",
                "Save it as an RGB or grayscale image",
            ) from None
    array = np.asarray(image)
    array = array[..., None] if array.ndim == 2 else array
    return array.astype(np.float32) / 255, 8, icc_profile


def _float_array(path: Path, values: np.ndarray) -> np.ndarray:
    fix = "Tone-map it to [0, 1] or save it as a 16-bit PNG"
    if not np.isfinite(values).all():
        raise ImageError(path, "float image with NaN or infinite values", fix)
    low, high = float(values.min()), float(values.max())
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise ImageError(
            path,
            f"float image with values outside [0, 1] (HDR; min {low:.4g}, max {high:.4g})",
            fix,
        )
    return np.clip(values, 0, 1)[..., None]


def _image_cms(path: Path, what: str):
    try:
        from PIL import ImageCms
    except ImportError:
        raise ImageError(
            path,
            f"{what} needs Pillow built with LittleCMS, which this one is not",
            "Install Pillow from PyPI, or convert the image to RGB",
        ) from None
    return ImageCms


def _cmyk_array(path: Path, image, icc_profile: bytes | None) -> np.ndarray:
    # The profile describes the inks, so it cannot describe the RGB result: it is used here and
    # not passed on.
    if icc_profile is None:
        rgb = image.convert("RGB")
    else:
        ImageCms = _image_cms(path, "a CMYK image with an ICC profile")
        try:
            rgb = ImageCms.profileToProfile(
                image,
                ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
        except (ImageCms.PyCMSError, OSError, ValueError) as error:
            raise ImageError(
                path,
                f"its embedded CMYK ICC profile cannot be used ({_one_line(error)})",
                "Convert it to RGB in an image editor",
            ) from None
    return np.asarray(rgb).astype(np.float32) / 255


def _lab_array(path: Path, image) -> np.ndarray:
    ImageCms = _image_cms(path, "a CIELAB image")
    # Pillow's own convert("RGB") would read L, a and b as if they were R, G and B.
    transform = ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return np.asarray(ImageCms.applyTransform(image, transform)).astype(np.float32) / 255


def _pypng(path: Path):
    """pypng, which reads and writes 16-bit colour PNGs (Pillow drops them to 8 bits)."""
    try:
        import png
    except ImportError:
        raise ImageError(
            path, "16-bit PNG needs the pypng package, which is not installed", "pip install pypng"
        ) from None
    return png


def _png_chunks(path: Path, wanted: set[bytes]) -> dict[bytes, bytes]:
    """The first chunk of each ``wanted`` type in a PNG, skipping over the others unread."""
    found: dict[bytes, bytes] = {}
    with open(path, "rb") as handle:
        handle.seek(8)
        while True:
            head = handle.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind in wanted and kind not in found:
                found[kind] = handle.read(length)
                handle.seek(4, os.SEEK_CUR)
            else:
                handle.seek(length + 4, os.SEEK_CUR)
    return found


def _iccp_profile(data: bytes | None) -> bytes | None:
    """The profile in an iCCP chunk (name, NUL, method 0, zlib stream), or None if unusable."""
    if not data or b"\0" not in data[:80]:
        return None
    start = data.index(b"\0") + 2
    decompressor = zlib.decompressobj()
    try:
        profile = decompressor.decompress(data[start:], MAX_ICC_BYTES)
    except zlib.error:
        return None  # as Pillow does for an 8-bit PNG's broken profile
    return profile if profile and not decompressor.unconsumed_tail else None


def _png_orientation(data: bytes | None) -> object:
    if not data:
        return None
    from PIL import Image

    exif = Image.Exif()
    exif.load(data)
    return exif.get(ORIENTATION_TAG)


def _read_png16(path: Path, max_pixels: int | None) -> LoadedImage:
    png = _pypng(path)

    chunks = _png_chunks(path, {b"acTL", b"iCCP", b"eXIf"})
    if len(chunks.get(b"acTL", b"")) >= 4:
        _check_still(path, struct.unpack(">I", chunks[b"acTL"][:4])[0])
    reader = png.Reader(filename=str(path))
    width, height, rows, info = reader.asDirect()
    _check_size(path, width, height, max_pixels)
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    array = array.reshape(height, width, planes).astype(np.float32) / 65535.0
    orientation = _png_orientation(chunks.get(b"eXIf"))
    return _loaded(_orient(array, orientation), 16, _iccp_profile(chunks.get(b"iCCP")))


def write_image(
    path: str | os.PathLike,
    pixels: torch.Tensor,
    bits: int = 8,
    overwrite: bool = False,
    icc_profile: bytes | None = None,
) -> Path:
    """Write [1, C, H, W] or [C, H, W] values in [0, 1] atomically (temporary name, rename).
    16 bits are kept where the format holds them (PNG; grayscale TIFF), else 8 are written.
    ``icc_profile`` is embedded in PNG, JPEG, WebP and TIFF (BMP has no room for it) when it is
    for the colour space written (RGB, or gray); no orientation tag is ever written."""
    path = Path(path)
    fmt = check_suffix(path)
    if path.exists() and not overwrite:
        raise ImageError(path, "already exists", "Pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ImageError(path, "the output folder does not exist", "Create it first")
    if pixels.ndim == 4:
        pixels = pixels[0]
    channels = pixels.shape[0]
    array = pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    sixteen = bits == 16 and (fmt == "PNG" or (fmt == "TIFF" and channels == 1))
    if sixteen and fmt == "PNG" and channels > 1:
        _pypng(path)
    if fmt == "BMP" or not _profile_fits(icc_profile, channels):
        icc_profile = None
    try:
        with atomic_write(path) as temporary:
            _encode(temporary, array, fmt, channels, sixteen, icc_profile)
    except OSError as error:
        raise ImageError(path, f"could not be written ({error.strerror or error})") from None
    return path


def _profile_fits(icc_profile: bytes | None, channels: int) -> bool:
    # A gray profile on RGB pixels (or the reverse) makes readers reject or misdraw the file.
    if not icc_profile or len(icc_profile) < 128:
        return False
    return icc_profile[16:20] == (b"GRAY" if channels in (1, 2) else b"RGB ")


def _encode(
    temporary: Path,
    array: np.ndarray,
    fmt: str,
    channels: int,
    sixteen: bool,
    icc_profile: bytes | None = None,
) -> None:
    from PIL import Image

    options = {"icc_profile": icc_profile} if icc_profile else {}
    if sixteen and fmt == "PNG" and channels > 1:
        import png  # write_image checked it is there

        extra = [(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile))] if icc_profile else []

        class Writer(png.Writer):
            # pypng writes no iCCP chunk of its own; the PNG spec wants it before IDAT.
            def write_preamble(self, outfile) -> None:
                super().write_preamble(outfile)
                for chunk in extra:
                    png.write_chunk(outfile, *chunk)

        values = np.rint(array * 65535).astype(np.uint16)
        writer = Writer(
            values.shape[1],
            values.shape[0],
            bitdepth=16,
            greyscale=channels in (1, 2),
            alpha=channels in (2, 4),
        )
        with open(temporary, "wb") as handle:
            writer.write(handle, values.reshape(values.shape[0], -1))
    elif sixteen:
        values = np.rint(array[..., 0] * 65535).astype(np.uint16)
        Image.fromarray(values).save(temporary, format=fmt, **options)
    else:
        values = np.rint(array * 255).astype(np.uint8)
        if fmt in ("JPEG", "BMP") and channels in (2, 4):
            values = values[..., : channels - 1]  # these formats have no alpha
        image = Image.fromarray(values[..., 0] if values.shape[-1] == 1 else values)
        if fmt in ("JPEG", "WEBP"):
            options["quality"] = 95
        image.save(temporary, format=fmt, **options)
