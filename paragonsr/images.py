"""Reading and writing image files as float tensors in [0, 1].

8-bit images of every common mode go through Pillow. Pillow silently drops 16-bit RGB(A) PNGs
to 8 bits, so 16-bit PNGs go through pypng instead (pure Python), and 16-bit colour TIFFs, which
Pillow cannot keep either, are refused with a message. 16-bit input keeps 16-bit output where the
output format can hold it (PNG, and grayscale TIFF).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ParagonSRError
from .files import atomic_write

DATA = Path(__file__).resolve().parent / "data"
SAMPLE_IMAGE = DATA / "chelsea_160x120.png"  # CC0, see data/README.md
SAMPLE_DATASET = DATA  # two small CC0/public-domain photos: enough to try the trainer
# The one pixel limit for every image read (upscale inputs, training and validation data);
# --max-pixels raises it. 8000x8000: about 0.8 GB as float32 RGB.
DEFAULT_MAX_PIXELS = 64_000_000

SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


class ImageError(ParagonSRError, ValueError):
    """An image file that cannot be read or written, naming the file and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = str(path)
        super().__init__(f"{path}: {problem}" + (f". {fix}" if fix else ""))


@dataclass
class LoadedImage:
    pixels: torch.Tensor  # [1, C, H, W] float32 in [0, 1]; C is 1, 2, 3 or 4
    bits: int  # 8 or 16


def check_suffix(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            path,
            f"unsupported image type {path.suffix or '(no extension)'!r}",
            f"Use one of {', '.join(sorted(SUFFIXES))}",
        )
    return fmt


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
    if not path.is_file():
        raise ImageError(path, "file not found" if not path.exists() else "is not a file")
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
            bits = 16 if image.mode.startswith("I;16") or image.mode in ("I", "F") else 8
            if image.format == "TIFF" and image.mode in ("RGB", "RGBA"):
                samples = image.tag_v2.get(258, (8,))
                if max(samples if isinstance(samples, tuple) else (samples,)) > 8:
                    raise ImageError(
                        path,
                        "16-bit colour TIFF cannot be read without losing precision",
                        "Convert it to a 16-bit PNG",
                    )
            array = _to_array(image)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as error:
        raise ImageError(
            path,
            f"not a readable image, probably truncated or corrupt ({error})",
            "Check the file or export it again",
        ) from None
    scale = 65535.0 if bits == 16 else 255.0
    pixels = torch.from_numpy(array.astype(np.float32) / scale).clamp_(0, 1)
    return LoadedImage(pixels.permute(2, 0, 1).unsqueeze(0).contiguous(), bits)


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


def _to_array(image) -> np.ndarray:
    """HxWxC array of an open Pillow image, in its own bit depth."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16)[..., None]
    if mode in ("I", "F"):
        return np.clip(np.asarray(image), 0, 65535)[..., None]
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "L"):
        image = image.convert("L")
    elif mode not in ("LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in mode else "RGB")
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def _pypng(path: Path):
    """pypng, which reads and writes 16-bit colour PNGs (Pillow drops them to 8 bits)."""
    try:
        import png
    except ImportError:
        raise ImageError(
            path, "16-bit PNG needs the pypng package, which is not installed", "pip install pypng"
        ) from None
    return png


def _read_png16(path: Path, max_pixels: int | None) -> LoadedImage:
    png = _pypng(path)

    reader = png.Reader(filename=str(path))
    width, height, rows, info = reader.asDirect()
    _check_size(path, width, height, max_pixels)
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    array = array.reshape(height, width, planes).astype(np.float32) / 65535.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    return LoadedImage(pixels, 16)


def write_image(
    path: str | os.PathLike, pixels: torch.Tensor, bits: int = 8, overwrite: bool = False
) -> Path:
    """Write [1, C, H, W] or [C, H, W] values in [0, 1] atomically (temporary name, rename).
    16 bits are kept where the format holds them (PNG; grayscale TIFF), else 8 are written."""
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
    try:
        with atomic_write(path) as temporary:
            _encode(temporary, array, fmt, channels, sixteen)
    except OSError as error:
        raise ImageError(path, f"could not be written ({error.strerror or error})") from None
    return path


def _encode(temporary: Path, array: np.ndarray, fmt: str, channels: int, sixteen: bool) -> None:
    from PIL import Image

    if sixteen and fmt == "PNG" and channels > 1:
        import png  # write_image checked it is there

        values = np.rint(array * 65535).astype(np.uint16)
        writer = png.Writer(
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
        Image.fromarray(values).save(temporary, format=fmt)
    else:
        values = np.rint(array * 255).astype(np.uint8)
        if fmt in ("JPEG", "BMP") and channels in (2, 4):
            values = values[..., : channels - 1]  # these formats have no alpha
        image = Image.fromarray(values[..., 0] if values.shape[-1] == 1 else values)
        options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        image.save(temporary, format=fmt, **options)
