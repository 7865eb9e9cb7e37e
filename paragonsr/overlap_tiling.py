"""Overlap tiling for any spandrel model: independent tiles, blended.

Each tile is grown by ``overlap`` pixels. Half of the overlap on each interior side is dropped
(those pixels saw the tile's zero padding, not the image), and the other half is blended with the
neighbour under a raised-cosine ramp whose weights sum to one. For ParagonSR it is an
approximation (each tile normalizes itself over its own pixels) and never the silent default:
:mod:`paragonsr.exact_tiling` gives the whole-image result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .tiles import (
    MIN_TILE,
    Progress,
    Tile,
    crop,
    grid,
    is_out_of_memory,
    region_of,
    release_cached_memory,
    with_halo,
)

log = logging.getLogger(__name__)


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
            result = crop(run(region_of(image, region)), kept, region, scale).float().cpu()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            side = max(tile.bottom - tile.top, tile.right - tile.left)
            if side <= MIN_TILE:
                raise
            tile_size = min(tile_size, max(MIN_TILE, side // 2))
            log.warning("out of memory: splitting a %d px tile", side)
            release_cached_memory()
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
        region_of(accumulated, scaled).add_(result * weights)
        region_of(weight_sum, scaled).add_(weights)
        progress.step()
    return accumulated.div_(weight_sum), tile_size
