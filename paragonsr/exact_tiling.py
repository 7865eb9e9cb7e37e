"""Exact tiling: ParagonSR's whole-image result while holding only a tile's worth of temporaries.

ParagonSR normalizes every block with GroupNorm over the *whole image*, so independent tiles
cannot give the whole-image result. :class:`ExactStreamer` instead streams the network pass by
pass over a grid of tiles, calling the passes :mod:`paragonsr.inference` defines (``head``, each
block's ``context`` and ``ffn_delta``, ``fuse``, ``tail``):

- the residual stream (``num_feat`` channels at input resolution) is kept for the whole image;
  everything wider (the FFN's 2*hidden channels, the upsampler's out*s^2 channels, the
  high-resolution output) exists one tile at a time;
- each pass computes every tile from the previous pass's map over the tile grown by the pass's
  *halo* (5 px for the context convolutions, 1 px for the FFN, 2 px for the collapsed tail) and
  keeps only the tile, so zero padding acts exactly where the image ends;
- while a pass stores its tiles it accumulates the sums and sums of squares (float64) of its
  output, which are the next GroupNorm's statistics: no extra pass over the map. A pass retried
  after running out of memory starts its statistics afresh.

The result equals the whole-image forward to float rounding (a few 1e-6). The high-resolution
output goes tile by tile to the caller's ``store_output``. On CUDA out-of-memory the tile is
halved and only the current pass is redone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .inference import BAND_BYTES, Moments, OptimizedParagonSR
from .tiles import (
    MIN_TILE,
    OUT_OF_MEMORY,
    Progress,
    Tile,
    grid,
    region_of,
    release_cached_memory,
    run_tiled,
)

log = logging.getLogger(__name__)

# store(tile, values, statistics): put one computed tile in place, adding it to the statistics
# of the map being written when the pass gathers them.
Store = Callable[[Tile, torch.Tensor, "Moments | None"], None]


def into(target: torch.Tensor, add: torch.Tensor | None = None) -> Store:
    """A store that writes tiles into ``target`` (plus the same region of ``add``)."""

    def store(tile: Tile, values: torch.Tensor, statistics: Moments | None) -> None:
        destination = region_of(target, tile)
        if add is None:
            destination.copy_(values)
        else:
            torch.add(values, region_of(add, tile), out=destination)
        if statistics is not None:
            statistics.add(destination)

    return store


class ExactStreamer:
    """Pass-by-pass tiled execution of an :class:`OptimizedParagonSR` (see module docstring)."""

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
        features = net.config.num_feat
        shapes = [(2 * features * element_size, net.head_halo)]
        for block in net.blocks:
            shapes.append((3 * features * element_size, block.context_halo))
            shapes.append((6 * block.hidden * element_size, block.ffn_halo))
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
        store: Store,
        bytes_per_pixel: int,
        *,
        gather: bool = False,
        scale: int = 1,
    ) -> Moments | None:
        """Run one pass over the image; returns the statistics of what it stored if ``gather``."""
        while True:
            started = self.progress.done
            # Afresh for every attempt: the tiles an attempt stored before running out of
            # memory are stored again by the retry and must be counted once.
            statistics = Moments() if gather else None
            try:
                tiles = self.pass_grid(height, width, bytes_per_pixel, halo)
                self.progress.check()
                run_tiled(
                    compute,
                    tiles,
                    halo,
                    height,
                    width,
                    lambda tile, values, s=statistics: store(tile, values, s),
                    scale,
                    between_tiles=self._between_tiles,
                )
                return statistics
            except OUT_OF_MEMORY:
                if self.tile <= MIN_TILE:
                    raise
                finished = self.progress.done - started
                self.tile = max(MIN_TILE, self.tile // 2)
                retry = self.pass_grid(height, width, bytes_per_pixel, halo)
                self.progress.total += finished + len(retry) - len(tiles)
                log.warning("out of memory: retrying this pass with %d px tiles", self.tile)
                release_cached_memory()

    def _between_tiles(self) -> None:
        self.progress.step()
        self.progress.check()

    def __call__(
        self, image: torch.Tensor, store_output: Callable[[Tile, torch.Tensor], None]
    ) -> None:
        net = self.net
        numerics = net.numerics
        batch, _, height, width = image.shape
        layout = torch.channels_last if net.channels_last else torch.contiguous_format
        image = image.contiguous(memory_format=layout)
        dtype = image.dtype
        shapes = iter(self._pass_shapes(image.element_size()))
        # Three maps of the residual stream: a group's input, and the two sides of each pass.
        # The shallow features the head makes are needed again at the end; recomputing them
        # there (a 3-channel convolution) is cheaper than holding a fourth map.
        maps = [
            torch.empty(
                (batch, net.config.num_feat, height, width),
                dtype=dtype,
                device=image.device,
                memory_format=layout,
            )
            for _ in range(3)
        ]

        def fresh(*busy: torch.Tensor) -> torch.Tensor:
            return next(m for m in maps if all(m is not b for b in busy))

        def shallow(region: Tile) -> torch.Tensor:
            return net.head(region_of(image, region))

        def run(halo: int, compute, store: Store, gather: bool = True, scale: int = 1):
            size = next(shapes)[0]
            return self._pass(height, width, halo, compute, store, size, gather=gather, scale=scale)

        def normalized(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
            """GroupNorm of a region of ``x`` with whole-image statistics."""
            scale, shift = scale.to(dtype), shift.to(dtype)
            return lambda region: torch.addcmul(shift, region_of(x, region), scale)

        current = maps[0]
        statistics = run(net.head_halo, shallow, into(current))
        for group in net.groups:
            group_input = current
            for index, block in enumerate(group):
                norm1 = normalized(
                    current,
                    *statistics.normalizer(block.eps1, block.norm1_weight, block.norm1_bias),
                )
                mixed = fresh(group_input, current)
                statistics = run(
                    block.context_halo,
                    lambda r, k=block, x=current, n=norm1: k.context(region_of(x, r), n(r)),
                    into(mixed),
                )
                norm2 = normalized(mixed, *statistics.normalizer(block.eps2))
                output = fresh(group_input, mixed)
                last = index == len(group) - 1
                statistics = run(
                    block.ffn_halo,
                    lambda r, k=block, x=mixed, n=norm2: k.ffn_delta(n(r), numerics).add_(
                        region_of(x, r)
                    ),
                    into(output, add=group_input if last else None),
                )
                current = output
        deep = fresh(current)
        run(1, lambda r: net.fuse(region_of(current, r), shallow(r)), into(deep), gather=False)
        run(
            net.tail_halo,
            lambda r: net.tail(region_of(deep, r)),
            lambda tile, values, _: store_output(tile, values),
            gather=False,
            scale=net.scale,
        )
