"""``upscale``: images in, images out, with any spandrel model (ParagonSR gets exact tiling).

Handles what sits around the tiling: device and precision, tile size, channel layouts
(grayscale, RGBA), frame-by-frame batches into a preallocated CPU output, progress and
cancellation. The tiling itself is :mod:`paragonsr.exact_tiling` (ParagonSR, the whole-image
result) and :mod:`paragonsr.overlap_tiling` (any model, blended tiles).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor

from .choices import ALPHA_MODES, DEFAULT_MAX_PIXELS, MODES, PRECISIONS
from .errors import UpscaleError
from .exact_tiling import ExactStreamer
from .inference import OptimizedCall, OptimizedParagonSR, optimize_for_inference
from .network import ParagonSR, not_a_plain_network
from .overlap_tiling import overlap_upscale
from .runtime import available_cpu_memory
from .tiles import MIN_TILE, Progress, Tile, grid

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class UpscaleSettings:
    """How to upscale. ``tile=None`` picks a size from free memory; ``mode=None`` is exact for
    ParagonSR and overlap for other models."""

    tile: int | None = None
    mode: str | None = None
    overlap: int = 32
    precision: str = "auto"
    alpha: str = "bilinear"
    device: str | torch.device | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise UpscaleError(f"unknown mode {self.mode!r}; choose {' or '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise UpscaleError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if self.alpha not in ALPHA_MODES:
            raise UpscaleError(f"unknown alpha mode {self.alpha!r}; choose bilinear or model")
        if self.tile is not None and self.tile < MIN_TILE:
            raise UpscaleError(
                f"--tile {self.tile}: the tile size is below the minimum of {MIN_TILE} px; use "
                f"{MIN_TILE} or more, or auto"
            )
        if self.overlap < 0:
            raise UpscaleError(f"--overlap {self.overlap}: the overlap must not be negative")
        if self.device is not None and str(self.device) != "auto":
            try:
                resolve_device(self.device)
            except UpscaleError as error:
                raise UpscaleError(f"--device {self.device}: {error}") from None
        if self.max_pixels < 1:
            raise UpscaleError(
                f"--max-pixels {self.max_pixels}: the pixel limit must be at least 1 (the "
                f"default is {DEFAULT_MAX_PIXELS:,})"
            )
        # Each tile computes `overlap` px of context on every side: from half the tile up,
        # that context is most of the work, and the tiles would be better off as one.
        if self.mode == "overlap" and self.tile is not None and 2 * self.overlap >= self.tile:
            raise UpscaleError(
                f"--overlap {self.overlap} is at least half of --tile {self.tile}, so each tile "
                f"would spend most of its work on context; use --overlap {(self.tile - 1) // 2} "
                f"or less, or --tile {2 * self.overlap + 1} or more"
            )


def as_descriptor(model: ImageModelDescriptor | ParagonSR) -> ImageModelDescriptor:
    if isinstance(model, ImageModelDescriptor):
        return model
    if isinstance(model, ParagonSR):
        from .spandrel_arch import ParagonSRArch

        descriptor = ParagonSRArch().load(model.state_dict())
        return descriptor.to(next(model.parameters()).device)
    if isinstance(model, OptimizedParagonSR):
        raise TypeError(not_a_plain_network(model, "upscale"))
    raise TypeError(f"expected a spandrel ImageModelDescriptor or ParagonSR, got {type(model)}")


def descriptor_call(descriptor: ImageModelDescriptor) -> OptimizedCall | None:
    """The OptimizedCall a ParagonSR descriptor of ours runs, or None for any other."""
    call = getattr(descriptor, "_call_fn", None)  # spandrel keeps call_fn there
    return call if isinstance(call, OptimizedCall) else None


def optimized_network(descriptor: ImageModelDescriptor) -> OptimizedParagonSR:
    """The optimized network a ParagonSR descriptor runs: the one its call function holds (built
    once, shared with every other caller of the descriptor), or a new one."""
    return (descriptor_call(descriptor) or OptimizedCall()).network(descriptor.model)


def release_optimized(descriptor: ImageModelDescriptor) -> None:
    """Drop the optimized copy a ParagonSR descriptor holds (rebuilt on its next call)."""
    call = descriptor_call(descriptor)
    if call is not None:
        call.release()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UpscaleError(f"unknown device {device!r}; use auto, cpu or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UpscaleError("CUDA was requested but is not available; use --device cpu")
    return device


def resolve_dtype(descriptor: ImageModelDescriptor, precision: str, device: torch.device):
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        if descriptor.supports_bfloat16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if descriptor.supports_half else torch.float32
    dtype = DTYPES[precision]
    supported = {
        torch.float16: descriptor.supports_half,
        torch.bfloat16: descriptor.supports_bfloat16,
    }.get(dtype, True)
    if not supported:
        warnings.warn(
            f"{descriptor.architecture.name} is not known to be accurate in {precision}; "
            "frames with inf/NaN are recomputed in fp32",
            RuntimeWarning,
            stacklevel=3,
        )
    return dtype


def is_paragonsr(descriptor: ImageModelDescriptor) -> bool:
    return isinstance(descriptor.model, ParagonSR)


def available_memory(device: torch.device) -> int:
    """Free bytes: CUDA's free memory, or what this process may still allocate on the host
    (system, cgroup and ulimit limits alike)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_cpu_memory()


def bytes_per_tile_pixel(descriptor: ImageModelDescriptor, element_size: int) -> int:
    """Peak temporary bytes per low-resolution tile pixel. ParagonSR's come from its shapes
    (FFN temporaries, collapsed tail, high-resolution output); for other architectures a
    conservative rule of thumb (64 features over ten live layers, at output resolution)."""
    scale2 = descriptor.scale**2
    if is_paragonsr(descriptor):
        config = descriptor.model.config
        channels = 6 * config.ffn_hidden + 4 * config.num_feat + 3 * config.out_chans * scale2
        return channels * element_size
    return 64 * 10 * scale2 * element_size


def whole_image_bytes(descriptor: ImageModelDescriptor, height: int, width: int, element_size: int):
    """What one untiled call needs: the per-pixel temporaries over the whole image, plus, for
    ParagonSR, about four maps of the residual stream."""
    per_pixel = bytes_per_tile_pixel(descriptor, element_size)
    if is_paragonsr(descriptor):
        per_pixel += 4 * descriptor.model.config.num_feat * element_size
    return per_pixel * height * width


def band_bytes_per_row(descriptor: ImageModelDescriptor, width: int, element_size: int) -> int:
    """Host memory exact tiling holds per row of its bands: the band being read (with its halo),
    the one being computed and the one waiting to be written, all full width."""
    if not is_paragonsr(descriptor):
        return 0
    return 3 * descriptor.model.config.num_feat * width * element_size


def auto_tile(
    descriptor,
    device: torch.device,
    dtype: torch.dtype,
    height: int,
    width: int,
    free: int | None = None,
) -> int:
    """The image's longer side when an untiled call fits in half of the free memory; otherwise
    the largest tile (a multiple of 32, at least MIN_TILE) whose temporaries fit there. On the
    CPU the exact-tiling bands share that memory with the tile (on CUDA they stay on the host)."""
    element_size = torch.finfo(dtype).bits // 8
    free = available_memory(device) if free is None else free
    budget = free // 2
    if whole_image_bytes(descriptor, height, width, element_size) <= budget:
        return max(height, width)
    per_pixel = bytes_per_tile_pixel(descriptor, element_size)
    per_row = band_bytes_per_row(descriptor, width, element_size) if device.type == "cpu" else 0
    # The largest side t with per_pixel * t^2 + per_row * t <= budget.
    side = int((math.sqrt(per_row**2 + 4 * per_pixel * budget) - per_row) / (2 * per_pixel))
    return max(MIN_TILE, min(side, max(height, width)) // 32 * 32)


@dataclass
class _Frame:
    color: torch.Tensor  # [1, model channels, H, W]
    alpha: torch.Tensor | None  # [1, 1, H, W]
    gray_output: bool


def plan_channels(channels: int, model_channels: int) -> tuple[int, bool]:
    """(colour channels, has alpha) of an image for a model, or an error naming the mismatch."""
    if channels == model_channels:
        return channels, False
    color, alpha = (channels - 1, True) if channels in (2, 4) else (channels, False)
    if color == model_channels or (color == 1 and model_channels == 3):
        return color, alpha
    fix = {1: "; convert the image to grayscale", 4: "; give it an RGBA image"}
    raise UpscaleError(
        f"the model takes {model_channels}-channel images and cannot serve a {channels}-channel "
        "image" + fix.get(model_channels, "")
    )


def plan_output(color_channels: int, has_alpha: bool, model_in: int, model_out: int) -> int:
    """Colour channels of the output image: what the model returns, except that a gray image
    run through an RGB model comes back gray; or an error where the model's output and the
    image's alpha make no image layout (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA)."""
    if color_channels == 1 and model_in == 3 and model_out == 3:
        return 1
    # Two channels read as gray + alpha: only a model that takes two gives back two.
    if model_out + has_alpha <= 4 and (model_out != 2 or model_in == 2):
        return model_out
    if model_out == 4 and has_alpha:
        raise UpscaleError(
            f"the model has 4 output channels ({model_in} in), which leave no room for the "
            "image's alpha channel; remove the alpha channel or use a model with 3 output channels"
        )
    raise UpscaleError(
        f"the model has {model_out} output channels ({model_in} in), which make no image "
        "layout (1 gray, 3 RGB, 4 RGBA); use a model with 1, 3 or 4 output channels"
    )


def upscale(
    model: ImageModelDescriptor | ParagonSR,
    images: torch.Tensor,
    settings: UpscaleSettings | None = None,
    *,
    tick: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Upscale ``images`` [B, C, H, W] (float, [0, 1], any device) to a float32 CPU tensor
    [B, C, H*s, W*s] clamped to [0, 1]. C may be 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA).

    ``tick(done, total)`` is called after every tile of every frame; ``cancelled()`` before
    every tile, and returning True stops with :class:`~paragonsr.errors.UpscaleCancelled`.
    """
    settings = settings or UpscaleSettings()
    settings.validate()
    descriptor = as_descriptor(model)
    if images.ndim != 4:
        raise UpscaleError(f"expected images shaped [B, C, H, W], got {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if batch == 0 or height == 0 or width == 0:
        raise UpscaleError(f"the image is empty ({width}x{height}, batch {batch})")
    if height * width > settings.max_pixels:
        raise UpscaleError(
            f"the image is {width}x{height} = {height * width:,} pixels, above the limit of "
            f"{settings.max_pixels:,}; raise the limit (--max-pixels) if you have the memory"
        )
    color_channels, has_alpha = plan_channels(channels, descriptor.input_channels)
    mode = settings.mode or ("exact" if is_paragonsr(descriptor) else "overlap")
    if mode == "exact" and not is_paragonsr(descriptor):
        raise UpscaleError(
            f"exact mode needs a ParagonSR model; {descriptor.architecture.name} uses overlap"
        )
    device = resolve_device(settings.device)
    dtype = resolve_dtype(descriptor, settings.precision, device)
    scale = descriptor.scale
    out_color = plan_output(
        color_channels, has_alpha, descriptor.input_channels, descriptor.output_channels
    )
    output = torch.empty((batch, out_color + int(has_alpha), height * scale, width * scale))

    tile = settings.tile or auto_tile(descriptor, device, dtype, height, width)
    tile = min(tile, max(height, width))
    log.info(
        "upscaling %d frame(s) %dx%d x%d: %s mode, %d px tiles, %s on %s",
        batch,
        width,
        height,
        scale,
        mode,
        tile,
        str(dtype).split(".")[-1],
        device,
    )

    original_device = descriptor.device
    try:
        # On the device first: counting exact mode's passes builds the optimized network, which
        # is then built once, where it runs.
        descriptor.model.to(device=device)
        passes = _passes_per_frame(descriptor, mode, tile, height, width, dtype)
        alpha_passes = passes if has_alpha and settings.alpha == "model" else 0
        progress = Progress(tick, cancelled, total=batch * (passes + alpha_passes))
        runner = _Runner(descriptor, mode, tile, settings.overlap, progress)
        with torch.inference_mode():
            for index in range(batch):
                frame = _split_frame(
                    images[index : index + 1], color_channels, has_alpha, descriptor.input_channels
                )
                # Streamed straight into the output where the channels match: a second
                # full-size copy would be the largest allocation of an exact-tiled frame.
                direct = not frame.gray_output and out_color == descriptor.output_channels
                destination = output[index : index + 1, :out_color] if direct else None
                color = runner.run(frame.color.to(device), dtype, into=destination)
                if color is not destination:
                    if frame.gray_output and color.shape[1] == 3:
                        color = color.mean(dim=1, keepdim=True)
                    output[index, :out_color] = color[0]
                if frame.alpha is not None:
                    output[index, out_color] = _upscale_alpha(
                        runner, frame.alpha, settings.alpha, descriptor, device, dtype
                    )[0, 0]
    finally:
        descriptor.model.to(device=original_device)
    return output


def _passes_per_frame(
    descriptor, mode: str, tile: int, height: int, width: int, dtype: torch.dtype
) -> int:
    if mode == "exact" and tile < max(height, width):
        streamer = ExactStreamer(optimized_network(descriptor), tile, Progress())
        return streamer.passes(height, width, torch.finfo(dtype).bits // 8)
    return len(grid(height, width, tile, tile))


def _split_frame(
    image: torch.Tensor, color_channels: int, has_alpha: bool, model_channels: int
) -> _Frame:
    image = image.float()
    color = image[:, :color_channels]
    alpha = image[:, color_channels:] if has_alpha else None
    gray = color_channels == 1 and model_channels == 3
    if gray:
        color = color.expand(-1, 3, -1, -1)
    return _Frame(color, alpha, gray)


def _upscale_alpha(runner, alpha: torch.Tensor, how: str, descriptor, device, dtype):
    if how == "bilinear":
        return F.interpolate(
            alpha, scale_factor=descriptor.scale, mode="bilinear", align_corners=False
        ).clamp_(0, 1)
    replicated = alpha.expand(-1, descriptor.input_channels, -1, -1).to(device)
    return runner.run(replicated, dtype).mean(dim=1, keepdim=True)


class _Runner:
    """Runs one frame in the chosen mode; recomputes it in fp32 if reduced precision gave
    inf/NaN. Reduced precision runs a converted copy, so the caller's model keeps its weights."""

    def __init__(self, descriptor, mode: str, tile: int, overlap: int, progress: Progress):
        self.descriptor = descriptor
        self.mode = mode
        self.tile = tile
        self.overlap = overlap
        self.progress = progress
        self._reduced: dict[torch.dtype, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._warned = False

    def network(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """What to run: ParagonSR's optimized network, or the spandrel descriptor itself (which
        pads to the architecture's size requirements and applies its own call function)."""
        descriptor = self.descriptor
        if dtype == torch.float32:
            return optimized_network(descriptor) if is_paragonsr(descriptor) else descriptor
        if dtype not in self._reduced:
            if is_paragonsr(descriptor):
                # Folded in float64 from the full-precision weights, then rounded once.
                self._reduced[dtype] = optimize_for_inference(descriptor.model).to(dtype)
            else:
                reduced = copy.deepcopy(descriptor)
                reduced.model.to(dtype)  # spandrel's .to() would refuse unsupported dtypes
                self._reduced[dtype] = reduced
        return self._reduced[dtype]

    def run(
        self, image: torch.Tensor, dtype: torch.dtype, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The frame's output in [0, 1]; exact tiling writes it into ``into`` when given (and
        returns that tensor), other paths return a new tensor."""
        result, finite = self._attempt(image.to(dtype), self.network(dtype), into)
        if not finite and dtype != torch.float32:
            if not self._warned:  # once per job, not once per frame
                self._warned = True
                warnings.warn(
                    f"{str(dtype).split('.')[-1]} produced inf/NaN; recomputing in fp32",
                    RuntimeWarning,
                    stacklevel=3,
                )
            result, _ = self._attempt(image.float(), self.network(torch.float32), into)
        return result.clamp_(0, 1)

    def _attempt(
        self, image: torch.Tensor, network, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, bool]:
        descriptor = self.descriptor
        _, _, height, width = image.shape
        scale = descriptor.scale
        if self.mode == "exact":
            if self.tile >= max(height, width):
                self.progress.check()
                result = network(image).float().cpu()
                self.progress.step()
                return result, bool(torch.isfinite(result).all())
            shape = (1, descriptor.output_channels, height * scale, width * scale)
            output = into if into is not None else torch.empty(shape)
            finite = [True]

            def store(tile: Tile, values: torch.Tensor) -> None:
                finite[0] = finite[0] and bool(torch.isfinite(values).all())
                output[
                    ...,
                    tile.top * scale : tile.bottom * scale,
                    tile.left * scale : tile.right * scale,
                ].copy_(values)

            streamer = ExactStreamer(network, self.tile, self.progress)
            streamer(image, store)
            self.tile = streamer.tile  # keep a size that fitted after out-of-memory halving
            return output, finite[0]
        finite_tiles = []

        def run_model(region: torch.Tensor) -> torch.Tensor:
            result = network(region)
            finite_tiles.append(bool(torch.isfinite(result).all()))
            return result

        result, self.tile = overlap_upscale(
            run_model,
            image,
            scale,
            descriptor.output_channels,
            self.tile,
            self.overlap,
            self.progress,
        )
        return result, all(finite_tiles)
