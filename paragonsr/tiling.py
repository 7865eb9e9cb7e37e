"""Upscaling images with any spandrel model, in bounded memory.

Two modes.

**exact** (the default for ParagonSR) reproduces whole-image inference while holding only a
tile's worth of temporaries per layer. ParagonSR normalizes every block with GroupNorm over the
*whole image*, so independent tiles cannot give the whole-image result. The engine instead streams
the network layer by layer over a grid of tiles:

- the residual stream (``num_feat`` channels at input resolution) is kept for the whole image;
  everything wider (the FFN's 2*hidden channels, the upsampler's out*s^2 channels, the
  high-resolution output) exists one tile at a time;
- each layer pass computes every tile from the previous layer's map over the tile grown by the
  pass's *halo* (5 px for the context convolutions, 1 px for the FFN, 2 px for the collapsed
  tail) and keeps only the tile, so zero padding acts exactly where the image ends;
- while a pass stores its tiles it accumulates the sums and sums of squares (float64) of its
  output, which are the next GroupNorm's statistics: no extra pass over the map.

The result equals the whole-image forward to float rounding (a few 1e-6). The high-resolution
output is written tile by tile straight into the caller's (CPU) buffer.

**overlap** works with any spandrel model: independent tiles grown by ``overlap`` pixels. Half of
the overlap on each interior side is dropped (those pixels saw the tile's zero padding, not the
image), and the other half is blended with the neighbour under a raised-cosine ramp whose weights
sum to one. For ParagonSR it is an approximation (each tile normalizes itself) and never the
silent default.

Frames of a batch are processed one after another into a preallocated CPU output, so device
memory does not grow with the batch. On CUDA out-of-memory the tile is halved and only the
current layer pass (exact) or tile (overlap) is redone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ParagonSRError
from .fusion import BAND_BYTES, OptimizedParagonSR
from .tiles import Tile, crop, grid, run_tiled, with_halo

log = logging.getLogger(__name__)

MODES = ("exact", "overlap")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ALPHA_MODES = ("bilinear", "model")
MIN_TILE = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UpscaleCancelled(ParagonSRError):
    """The caller's cancel check asked to stop."""


class UpscaleError(ParagonSRError, ValueError):
    """Input the engine cannot process, with the reason and what to do."""


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = []
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        kind = getattr(owner, name, None)
        if isinstance(kind, type) and kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


OUT_OF_MEMORY = _out_of_memory_types()


@dataclass
class Progress:
    """Callbacks from the engine: ``tick(done, total)`` after every tile, ``cancelled()`` before
    every tile (return True to stop with :class:`UpscaleCancelled`)."""

    tick: Callable[[int, int], None] | None = None
    cancelled: Callable[[], bool] | None = None
    done: int = 0
    total: int = 0

    def step(self) -> None:
        self.done += 1
        # Out-of-memory retries add tiles the first estimate did not know about.
        self.total = max(self.total, self.done)
        if self.tick is not None:
            self.tick(self.done, self.total)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise UpscaleCancelled("upscaling cancelled")


class Moments:
    """Running per-sample sum and sum of squares in float64: a GroupNorm(1)'s statistics."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        dims = tuple(range(1, values.ndim))
        total = values.sum(dim=dims, dtype=torch.float64)
        squares = torch.linalg.vector_norm(values, dim=dims, dtype=torch.float64).square()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values[0].numel()

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        variance = (self.squares / self.count - mean.square()).clamp_(min=0)
        return mean.view(-1, 1, 1, 1), (variance + eps).rsqrt().view(-1, 1, 1, 1)


def _region(tensor: torch.Tensor, region: Tile) -> torch.Tensor:
    return tensor[..., region.top : region.bottom, region.left : region.right]


class ExactStreamer:
    """Layer-by-layer tiled execution of an :class:`OptimizedParagonSR` (see module docstring)."""

    def __init__(self, net: OptimizedParagonSR, tile: int, progress: Progress) -> None:
        self.net = net
        self.tile = tile
        self.progress = progress

    def pass_grid(self, height: int, width: int, bytes_per_pixel: int, halo: int) -> list[Tile]:
        """Tiles of at most ``self.tile`` px, cut further into bands of rows where a pass's
        temporaries would exceed BAND_BYTES: wide temporaries that outgrow the cache, or that
        glibc serves with fresh page-faulting mmaps, cost more than the extra halo rows."""
        columns = min(self.tile, width)
        least_rows = max(16, 4 * halo)
        rows = max(least_rows, BAND_BYTES // max(1, columns * bytes_per_pixel))
        return grid(height, width, min(self.tile, rows), columns)

    def passes(self, height: int, width: int, element_size: int) -> int:
        """How many tiles one frame takes, over all passes (the progress total)."""
        return sum(
            len(self.pass_grid(height, width, size, halo))
            for size, halo in self._pass_shapes(element_size)
        )

    def _pass_shapes(self, element_size: int) -> list[tuple[int, int]]:
        """(temporary bytes per pixel, halo) of every pass of a frame, in order."""
        net = self.net
        features = net.conv_in_weight.shape[0]
        shapes = [(2 * features * element_size, 1)]
        for group in net.groups:
            for block in group:
                shapes.append((3 * features * element_size, block.context_halo))
                shapes.append((6 * block.hidden * element_size, 1))
        shapes.append((3 * features * element_size, 1))
        tail_channels = net.tail_weight.shape[0]
        shapes.append((3 * tail_channels * element_size, net.tail_halo))
        return shapes

    def _pass(
        self,
        height: int,
        width: int,
        halo: int,
        compute: Callable[[Tile], torch.Tensor],
        store: Callable[[Tile, torch.Tensor], None],
        bytes_per_pixel: int,
        scale: int = 1,
    ) -> None:
        while True:
            started = self.progress.done
            try:
                tiles = self.pass_grid(height, width, bytes_per_pixel, halo)
                self.progress.check()
                run_tiled(
                    compute,
                    tiles,
                    halo,
                    height,
                    width,
                    store,
                    scale,
                    between_tiles=self._between_tiles,
                )
                return
            except OUT_OF_MEMORY:
                if self.tile <= MIN_TILE:
                    raise
                finished = self.progress.done - started
                self.tile = max(MIN_TILE, self.tile // 2)
                retry = self.pass_grid(height, width, bytes_per_pixel, halo)
                self.progress.total += finished + len(retry) - len(tiles)
                log.warning("out of memory: retrying this layer with %d px tiles", self.tile)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _between_tiles(self) -> None:
        self.progress.step()
        self.progress.check()

    def __call__(
        self, image: torch.Tensor, store_output: Callable[[Tile, torch.Tensor], None]
    ) -> None:
        net = self.net
        batch, _, height, width = image.shape
        features = net.conv_in_weight.shape[0]
        layout = torch.channels_last if net.channels_last else torch.contiguous_format
        image = image.contiguous(memory_format=layout)
        shapes = iter(self._pass_shapes(image.element_size()))
        # Three maps of the residual stream: a group's input, and the two sides of each pass.
        # The shallow features conv_in makes are needed again at the end; recomputing them
        # there (a 3-channel convolution) is cheaper than holding a fourth map.
        maps = [
            torch.empty(
                (batch, features, height, width),
                dtype=image.dtype,
                device=image.device,
                memory_format=layout,
            )
            for _ in range(3)
        ]

        def fresh(*busy: torch.Tensor) -> torch.Tensor:
            return next(m for m in maps if all(m is not b for b in busy))

        def storing(target: torch.Tensor, moments: Moments | None = None, add=None):
            def store(tile: Tile, values: torch.Tensor) -> None:
                destination = _region(target, tile)
                if add is None:
                    destination.copy_(values)
                else:
                    torch.add(values, _region(add, tile), out=destination)
                if moments is not None:
                    moments.add(destination)

            return store

        def shallow(region: Tile) -> torch.Tensor:
            return F.conv2d(_region(image, region), net.conv_in_weight, net.conv_in_bias, padding=1)

        def run(halo, compute, store, scale=1):
            self._pass(height, width, halo, compute, store, next(shapes)[0], scale)

        current = maps[0]
        moments = Moments()
        run(1, shallow, storing(current, moments))
        for group in net.groups:
            group_input = current
            for index, block in enumerate(group):
                scale, shift = block.norm1_affine(*moments.mean_rstd(block.eps1))
                scale, shift = scale.to(image.dtype), shift.to(image.dtype)
                source = current
                mixed = fresh(group_input, source)
                moments = Moments()
                run(
                    block.context_halo,
                    lambda r, k=block, s=source, a=scale, b=shift: k.context(
                        _region(s, r), torch.addcmul(b, _region(s, r), a)
                    ),
                    storing(mixed, moments),
                )
                mean, rstd = moments.mean_rstd(block.eps2)
                rstd, shift = rstd.to(image.dtype), (-mean * rstd).to(image.dtype)
                last = index == len(group) - 1
                output = fresh(group_input, mixed)
                moments = Moments()
                run(
                    1,
                    lambda r, k=block, m=mixed, a=rstd, b=shift: (
                        _region(m, r) + k.ffn_delta(torch.addcmul(b, _region(m, r), a))
                    ),
                    storing(output, moments, add=group_input if last else None),
                )
                current = output
        deep = fresh(current)
        run(
            1,
            lambda r: F.conv2d(
                _region(current, r), net.conv_fuse_weight, net.conv_fuse_bias, padding=1
            ).add_(shallow(r)),
            storing(deep),
        )
        run(net.tail_halo, lambda r: net.tail(_region(deep, r)), store_output, net.scale)


def raised_cosine_ramp(length: int, device: torch.device) -> torch.Tensor:
    """Weights rising from near 0 to near 1 over ``length`` pixels; a ramp and its mirror image
    sum to exactly one at every pixel, so two overlapping tiles blend without a seam."""
    positions = (torch.arange(length, device=device, dtype=torch.float64) + 0.5) / length
    return (0.5 - 0.5 * torch.cos(math.pi * positions)).float()


def _blend_weights(kept: Tile, height: int, width: int, blend: int, scale: int) -> torch.Tensor:
    """Per-pixel weights (high resolution) of one tile's kept area. Neighbouring kept areas share
    a zone of 2*blend pixels; there one tile's weight falls along a raised cosine while the
    other's rises, summing to one."""

    def axis(start: int, stop: int, limit: int) -> torch.Tensor:
        length = (stop - start) * scale
        weights = torch.ones(length)
        ramp_length = min(2 * blend * scale, length)
        if ramp_length:
            ramp = raised_cosine_ramp(ramp_length, weights.device)
            if start > 0:
                weights[:ramp_length] *= ramp
            if stop < limit:
                weights[-ramp_length:] *= ramp.flip(0)
        return weights

    return axis(kept.top, kept.bottom, height)[:, None] * axis(kept.left, kept.right, width)[None]


def overlap_upscale(
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    out_channels: int,
    tile_size: int,
    overlap: int,
    progress: Progress,
) -> tuple[torch.Tensor, int]:
    """Independent tiles with ``overlap`` px of context, blended (see module docstring).

    Returns the image and the tile size that fitted: a tile that runs out of memory is split
    into four, and tiles already blended in are kept.
    """
    _, _, height, width = image.shape
    blend, margin = overlap - overlap // 2, overlap // 2
    accumulated = torch.zeros((1, out_channels, height * scale, width * scale))
    weight_sum = torch.zeros((1, 1, height * scale, width * scale))
    pending = grid(height, width, tile_size, tile_size)
    while pending:
        tile = pending.pop(0)
        progress.check()
        kept = with_halo(tile, blend, height, width)
        region = with_halo(tile, blend + margin, height, width)
        try:
            result = crop(run(_region(image, region)), kept, region, scale).float().cpu()
        except OUT_OF_MEMORY:
            side = max(tile.bottom - tile.top, tile.right - tile.left)
            if side <= MIN_TILE:
                raise
            tile_size = min(tile_size, max(MIN_TILE, side // 2))
            log.warning("out of memory: splitting a %d px tile", side)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            halves = grid(tile.bottom - tile.top, tile.right - tile.left, tile_size, tile_size)
            pending[:0] = [
                Tile(tile.top + t.top, tile.top + t.bottom, tile.left + t.left, tile.left + t.right)
                for t in halves
            ]
            progress.total += len(halves) - 1
            continue
        # Blending divides by the summed weights, so any covering set of tiles is valid.
        weights = _blend_weights(kept, height, width, blend, scale)
        scaled = Tile(kept.top * scale, kept.bottom * scale, kept.left * scale, kept.right * scale)
        _region(accumulated, scaled).add_(result * weights)
        _region(weight_sum, scaled).add_(weights)
        progress.step()
    return accumulated.div_(weight_sum), tile_size
