"""Training data: HR images (LR made on the fly) or HR/LR pairs, random aligned crops, 8-way
flips and rotations, optional light degradations. All randomness comes from one generator, so a
run and its resumption draw the same samples."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ParagonSRError
from ..images import SUFFIXES, ImageError, read_image

log = logging.getLogger(__name__)
CACHE_BYTES = 2 << 30  # decoded images kept in memory; larger sets are decoded per use


class DataError(ParagonSRError, ValueError):
    """Training data that cannot be used, naming the folder or file and the fix."""


def list_images(folder: Path) -> list[Path]:
    if not folder.exists():
        raise DataError(f"{folder}: data folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: contains no images ({', '.join(sorted(SUFFIXES))})")
    return files


def split_holdout(
    files: list[Path],
    share: float,
    seed: int,
    folder: Path,
    usable: Callable[[Path], bool] = lambda path: True,
) -> tuple[list[Path], list[Path]]:
    """(training, held out): a seeded ``share`` of ``files``, never fewer than one, held out for
    validation. The draw depends only on the sorted file list and the seed, so every run on the
    same folder and seed validates on the same images. A file ``usable`` rejects (unreadable)
    is passed over and left with the training files, whose loader reports it."""
    if len(files) < 2:
        raise DataError(
            f"{folder}: holds {len(files)} image, and holding one out for validation would leave "
            "none to train on; add images, name a separate validation folder, or train without "
            "validation (--holdout 0)"
        )
    count = min(len(files) - 1, max(1, round(share * len(files))))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    held: set[int] = set()
    for index in order:
        if len(held) == count:
            break
        if usable(files[index]):
            held.add(index)
    if not held:
        raise DataError(
            f"{folder}: no readable image to hold out for validation (see the warnings above)"
        )
    return (
        [path for index, path in enumerate(files) if index not in held],
        [path for index, path in enumerate(files) if index in held],
    )


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downscaling, as the LR side of every pair is made."""
    if scale == 1:
        return hr
    return F.interpolate(
        hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False
    ).clamp_(0, 1)


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0, 1)


def to_rgb(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """[1, C, H, W] image as ``channels`` channels (alpha dropped, gray replicated or averaged)."""
    if pixels.shape[1] in (2, 4):
        pixels = pixels[:, :-1]
    if pixels.shape[1] == channels:
        return pixels
    if channels == 3:
        return pixels.expand(-1, 3, -1, -1)
    return pixels.mean(dim=1, keepdim=True)


@dataclass
class Pair:
    hr: Path
    lr: Path | None


class PatchSampler:
    """Draws batches of (lr, hr) patches."""

    def __init__(
        self,
        folder: Path,
        scale: int,
        lq_size: int,
        channels: int,
        lr_folder: Path | None = None,
        degrade: bool = False,
        hr_files: list[Path] | None = None,
    ) -> None:
        """``hr_files``: the images of ``folder`` to train on (default: all of them)."""
        self.scale, self.lq_size, self.channels, self.degrade = scale, lq_size, channels, degrade
        hr_files = list_images(folder) if hr_files is None else hr_files
        pairs = [Pair(p, None) for p in hr_files]
        if lr_folder is not None:
            by_stem = {
                p.relative_to(lr_folder).with_suffix("").as_posix(): p
                for p in list_images(lr_folder)
            }
            pairs = []
            for hr in hr_files:
                key = hr.relative_to(folder).with_suffix("").as_posix()
                if key not in by_stem:
                    raise DataError(f"{hr}: no LR image of the same name in {lr_folder}")
                pairs.append(Pair(hr, by_stem[key]))
        self.images: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.unreadable: list[str] = []
        self.too_small: list[str] = []
        cached = 0
        crop = lq_size * scale
        for pair in pairs:
            try:
                hr = to_rgb(read_image(pair.hr).pixels, channels)
                lr = to_rgb(read_image(pair.lr).pixels, channels) if pair.lr else None
            except ImageError as error:
                self.unreadable.append(str(error))
                continue
            if lr is not None and (lr.shape[-2] * scale, lr.shape[-1] * scale) != hr.shape[-2:]:
                raise DataError(
                    f"{pair.lr}: {lr.shape[-1]}x{lr.shape[-2]} times the scale {scale} is not "
                    f"the size of {pair.hr} ({hr.shape[-1]}x{hr.shape[-2]})"
                )
            if min(hr.shape[-2:]) < crop:
                self.too_small.append(str(pair.hr))
                continue
            # uint8 keeps four times as many images in memory; training sees [0, 1] floats.
            self.images.append((_pack(hr), _pack(lr) if lr is not None else None))
            cached += hr.numel()
            if cached > CACHE_BYTES:
                log.warning("training images exceed %d GB in memory", CACHE_BYTES >> 30)
        for message in self.unreadable:
            log.warning("skipped: %s", message)
        if self.too_small:
            log.warning("skipped %d images smaller than the %d px crop", len(self.too_small), crop)
        if not self.images:
            reasons = []
            if self.unreadable:
                reasons.append(f"{len(self.unreadable)} unreadable")
            if self.too_small:
                reasons.append(
                    f"{len(self.too_small)} smaller than the {crop} px HR crop (lower --lq-size)"
                )
            raise DataError(f"{folder}: no usable training image ({', '.join(reasons)})")

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lrs, hrs = [], []
        for _ in range(size):
            index = int(torch.randint(len(self.images), (1,), generator=generator))
            lr, hr = self._patch(*self.images[index], generator)
            lrs.append(lr)
            hrs.append(hr)
        return torch.cat(lrs), torch.cat(hrs)

    def _patch(self, hr_packed, lr_packed, generator):
        scale, size = self.scale, self.lq_size
        hr_height, hr_width = hr_packed.shape[-2:]
        top = int(torch.randint(hr_height // scale - size + 1, (1,), generator=generator))
        left = int(torch.randint(hr_width // scale - size + 1, (1,), generator=generator))
        hr = _unpack(
            hr_packed[..., top * scale : (top + size) * scale, left * scale : (left + size) * scale]
        )
        if lr_packed is not None:
            lr = _unpack(lr_packed[..., top : top + size, left : left + size])
        else:
            lr = downscale(blur(hr, generator) if self.degrade else hr, scale)
            if self.degrade:
                lr = add_noise_and_jpeg(lr, generator)
        flip_h, flip_v, transpose = torch.randint(2, (3,), generator=generator).tolist()
        if flip_h:
            lr, hr = lr.flip(-1), hr.flip(-1)
        if flip_v:
            lr, hr = lr.flip(-2), hr.flip(-2)
        if transpose:  # with the two flips: all eight rotations and reflections
            lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
        return lr.contiguous(), hr.contiguous()


def _pack(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 255).round_().to(torch.uint8)


def _unpack(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(255)


def blur(hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with sigma drawn from 0.2-1.2 px, half of the time."""
    if float(torch.rand((), generator=generator)) < 0.5:
        return hr
    sigma = 0.2 + float(torch.rand((), generator=generator))
    radius = 3
    taps = torch.exp(
        -(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma * sigma)
    )
    taps /= taps.sum()
    channels = hr.shape[1]
    padded = F.pad(hr, (radius,) * 4, mode="reflect")
    horizontal = F.conv2d(padded, taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def add_noise_and_jpeg(lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (sigma up to 5/255) half of the time, then JPEG (quality 60-95) half of
    the time."""
    if float(torch.rand((), generator=generator)) < 0.5:
        sigma = float(torch.rand((), generator=generator)) * 5 / 255
        lr = (lr + torch.randn(lr.shape, generator=generator) * sigma).clamp_(0, 1)
    if float(torch.rand((), generator=generator)) < 0.5:
        from PIL import Image

        quality = 60 + int(torch.randint(36, (1,), generator=generator))
        array = (lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        image.save(buffer, format="JPEG", quality=quality)
        decoded = read_jpeg(buffer.getvalue())
        lr = decoded.view(lr.shape)
    return lr


def read_jpeg(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        channels = len(image.getbands())
        height, width = image.size[1], image.size[0]
    return array.view(height, width, channels).permute(2, 0, 1)[None].float() / 255


def readable(path: Path) -> bool:
    """Whether ``path`` decodes as an image (held to the pixel limit); a warning says why not."""
    try:
        read_image(path)
    except ImageError as error:
        log.warning("not held out for validation: %s", error)
        return False
    return True


def load_validation(
    files: list[Path], scale: int, channels: int, source: str
) -> list[tuple[str, torch.Tensor]]:
    """Held-out HR images, cropped to a multiple of the scale; ``source`` names where they came
    from in the error when none is readable."""
    images = []
    for path in files:
        try:
            hr = to_rgb(read_image(path).pixels, channels)
        except ImageError as error:  # as for training images: reported, not fatal
            log.warning("skipped for validation: %s", error)
            continue
        height, width = hr.shape[-2] // scale * scale, hr.shape[-1] // scale * scale
        images.append((path.name, hr[..., :height, :width].contiguous()))
    if not images:
        raise DataError(f"{source}: no readable validation image (see the warnings above)")
    return images
