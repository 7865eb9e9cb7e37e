"""Tile grids and the halo loop shared by the optimized network and the tiling engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """Output rows [top, bottom) and columns [left, right) of one tile."""

    top: int
    bottom: int
    left: int
    right: int


def grid(height: int, width: int, tile_height: int, tile_width: int) -> list[Tile]:
    """Tiles of at most tile_height x tile_width covering the image, row by row, balanced so
    that no thin sliver is left at the end (100 px in tiles of 64 gives 50 + 50)."""
    rows = _balanced(height, tile_height)
    cols = _balanced(width, tile_width)
    return [Tile(top, bottom, left, right) for top, bottom in rows for left, right in cols]


def _balanced(length: int, most: int) -> list[tuple[int, int]]:
    count = max(1, math.ceil(length / max(1, most)))
    size = math.ceil(length / count)
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def with_halo(tile: Tile, halo: int, height: int, width: int) -> Tile:
    return Tile(
        max(0, tile.top - halo),
        min(height, tile.bottom + halo),
        max(0, tile.left - halo),
        min(width, tile.right + halo),
    )


def crop(result: torch.Tensor, tile: Tile, region: Tile, scale: int = 1) -> torch.Tensor:
    """The part of ``result`` (computed over ``region``, ``scale`` times larger) inside ``tile``."""
    top, left = (tile.top - region.top) * scale, (tile.left - region.left) * scale
    height, width = (tile.bottom - tile.top) * scale, (tile.right - tile.left) * scale
    return result[..., top : top + height, left : left + width]


def run_tiled(
    compute: Callable[[Tile], torch.Tensor],
    tiles: list[Tile],
    halo: int,
    height: int,
    width: int,
    store: Callable[[Tile, torch.Tensor], None],
    scale: int = 1,
    between_tiles: Callable[[], None] | None = None,
) -> None:
    """For each tile, ``compute`` over the tile grown by ``halo`` (clipped to the image) and
    ``store`` the part inside the tile.

    A convolution with zero padding computed this way equals the whole-image one exactly as long
    as ``halo`` covers its reach: at the image border the clipped region's own padding is the
    image's padding, and elsewhere the wrong values that padding produces fall in the halo,
    which is cropped away.
    """
    for tile in tiles:
        region = with_halo(tile, halo, height, width)
        store(tile, crop(compute(region), tile, region, scale))
        if between_tiles is not None:
            between_tiles()
