"""What every tiled computation here shares: tile grids, the halo loop, per-tile progress and
cancellation, and recognizing out-of-memory errors. Used by the inference network's row bands
and by both tiling modes (:mod:`paragonsr.exact_tiling`, :mod:`paragonsr.overlap_tiling`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UpscaleCancelled

MIN_TILE = 32


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [MemoryError]
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        kind = getattr(owner, name, None)
        if isinstance(kind, type) and kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


OUT_OF_MEMORY = _out_of_memory_types()
# A failed CPU allocation is a plain RuntimeError from c10's allocator (under ulimit -v, a
# cgroup limit or overcommit off); this is its wording since torch 1.x.
_CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means "too big for the memory left": CUDA's out-of-memory, a failed
    CPU allocation, or Python's MemoryError. Retrying smaller can help with each."""
    if isinstance(error, OUT_OF_MEMORY):
        return True
    return isinstance(error, RuntimeError) and _CPU_ALLOCATION_FAILED in str(error)


def release_cached_memory() -> None:
    """Hand CUDA's cached blocks back after an out-of-memory error, before retrying smaller."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Progress:
    """Callbacks from the engine: ``tick(done, total)`` after every tile, ``cancelled()`` before
    every tile (return True to stop with :class:`~paragonsr.errors.UpscaleCancelled`)."""

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


def region_of(tensor: torch.Tensor, region: Tile) -> torch.Tensor:
    """The view of ``tensor``'s last two dimensions that ``region`` covers."""
    return tensor[..., region.top : region.bottom, region.left : region.right]


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
