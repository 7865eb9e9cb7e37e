"""Exact tiling: ParagonSR's whole-image result with memory bounded by the tile, not the image.

ParagonSR normalizes every block with GroupNorm over the *whole image*, so independent tiles
cannot give the whole-image result. :class:`ExactStreamer` instead streams the network pass by
pass, calling the passes :mod:`paragonsr.inference` defines (``head``, each block's ``context``
and ``ffn_delta``, ``fuse``, ``tail``):

- the residual stream (``num_feat`` channels at input resolution) is the only thing kept for the
  whole image, and it is kept in :class:`StreamedMap`\\ s: unlinked temporary files that the
  operating system caches while memory is free and writes to disk when it is not. Two maps: a
  residual group's input and the running stream, which every pass updates in place;
- a pass walks the image in bands of rows (``tile`` rows, full width): it reads the band plus
  the pass's *halo* (5 rows for the context convolutions, 1 for the FFN, 2 for the collapsed
  tail) into host memory, computes it tile by tile on the device (the tile grown by the halo,
  so zero padding acts exactly where the image ends), and writes the band back only after the
  next band has read the rows it shares with it: updating in place never feeds a new value to a
  pass that needs the old one;
- before writing a band the pass adds it to the float64 sums and sums of squares of its output,
  which are the next GroupNorm's statistics: no extra pass over the map.

Resident memory is therefore a few bands of rows on the host (``3 x num_feat x width x tile``
values) plus one tile's temporaries on the device, whatever the image size; the maps need
``2 x num_feat x height x width`` values of temporary disk (see :func:`scratch_folder`).

The result equals the whole-image forward to float rounding (a few 1e-6). The high-resolution
output goes band by band to the caller's ``store_output``. When a tile runs out of memory (CUDA,
or a failed CPU allocation) the tile is halved and only the current band is redone: its input
rows are still in memory, and nothing of it has been written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UpscaleError
from .inference import BAND_BYTES, Moments, OptimizedParagonSR
from .runtime import available_cpu_memory
from .tiles import (
    MIN_TILE,
    Progress,
    Tile,
    crop,
    grid,
    is_out_of_memory,
    release_cached_memory,
    with_halo,
)

log = logging.getLogger(__name__)


def _file_system_types() -> list[tuple[str, str]]:
    """(mount point, type) of every mount, longest mount point first."""
    try:
        with open("/proc/self/mounts") as mounts:
            fields = [line.split() for line in mounts]
    except OSError:
        return []
    entries = [(f[1], f[2]) for f in fields if len(f) > 2]
    return sorted(entries, key=lambda entry: -len(entry[0]))


def _in_memory(folder: str) -> bool:
    resolved = os.path.realpath(folder)
    for point, kind in _file_system_types():
        if resolved == point or resolved.startswith(point.rstrip("/") + "/"):
            return kind in ("tmpfs", "ramfs")
    return False


def scratch_folder() -> str:
    """Where the streamed maps go: ``PARAGONSR_SCRATCH`` if set, else the system's temporary
    folder (``TMPDIR``), unless that is a RAM file system (tmpfs /tmp on some distributions),
    whose pages would be the very memory exact tiling saves: then /var/tmp, which is on disk."""
    chosen = os.environ.get("PARAGONSR_SCRATCH")
    if chosen:
        return chosen
    folder = tempfile.gettempdir()
    if _in_memory(folder) and os.access("/var/tmp", os.W_OK) and not _in_memory("/var/tmp"):
        return "/var/tmp"
    return folder


class StreamedMap:
    """A [batch, channels, height, width] map in an unlinked temporary file, read and written
    by whole rows. Rows are stored channels-last, so a band of rows is one contiguous range per
    image of the batch. The file has no name: it disappears with the process, even a killed one.
    """

    def __init__(
        self,
        batch: int,
        channels: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        in_memory: bool = False,
    ) -> None:
        self.shape = (batch, channels, height, width)
        self.dtype = dtype
        self.row_bytes = width * channels * torch.empty((), dtype=dtype).element_size()
        # A small map is held in a tensor instead, with the same row-wise reads and writes.
        self._memory = (
            torch.empty((batch, height, width, channels), dtype=dtype) if in_memory else None
        )
        self.folder = "memory" if in_memory else scratch_folder()
        if in_memory:
            return
        try:
            # Closed by close(), which the streamer calls in a finally block.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                dir=self.folder, prefix="paragonsr-exact-"
            )
        except OSError as error:
            raise UpscaleError(
                f"exact tiling keeps its full-size maps in {self.folder}, which cannot hold a "
                f"temporary file ({error.strerror or error}); set PARAGONSR_SCRATCH to a "
                "writable folder"
            ) from None
        self._descriptor = self._file.fileno()

    def close(self) -> None:
        if self._memory is None:
            self._file.close()
        self._memory = None

    def _offset(self, item: int, row: int) -> int:
        return (item * self.shape[2] + row) * self.row_bytes

    def band(self, top: int, bottom: int) -> torch.Tensor:
        """Rows [top, bottom) as a [batch, channels, rows, width] CPU tensor (channels-last) to
        compute into before :meth:`commit`: the map's own rows in memory, a new tensor for a
        file."""
        if self._memory is not None:
            return self._memory[:, top:bottom].permute(0, 3, 1, 2)
        batch, channels, _, width = self.shape
        rows = torch.empty((batch, bottom - top, width, channels), dtype=self.dtype)
        return rows.permute(0, 3, 1, 2)

    def read(self, top: int, bottom: int) -> torch.Tensor:
        """Rows [top, bottom) as :meth:`band` gives them, holding the map's values (in memory a
        view: the streamer never writes the map it reads)."""
        rows = self.band(top, bottom)
        if self._memory is not None:
            return rows
        channels_last = rows.permute(0, 2, 3, 1)
        for item in range(self.shape[0]):
            view = memoryview(channels_last[item].view(torch.uint8).numpy()).cast("B")
            offset, done = self._offset(item, top), 0
            while done < len(view):
                got = os.preadv(self._descriptor, [view[done:]], offset + done)
                if got <= 0:
                    raise UpscaleError(f"the exact-tiling map in {self.folder} was cut short")
                done += got
        return rows

    def commit(self, top: int, band: torch.Tensor) -> None:
        """Store a band from :meth:`band` (in memory it is already in place)."""
        if self._memory is None:
            self.write(top, band)

    def write(self, top: int, values: torch.Tensor) -> None:
        """Store [batch, channels, rows, width] ``values`` as rows from ``top`` on."""
        if self._memory is not None:
            self._memory[:, top : top + values.shape[2]].copy_(values.permute(0, 2, 3, 1))
            return
        channels_last = values.permute(0, 2, 3, 1).contiguous()
        for item in range(self.shape[0]):
            view = memoryview(channels_last[item].view(torch.uint8).numpy()).cast("B")
            offset, done = self._offset(item, top), 0
            try:
                while done < len(view):
                    done += os.pwritev(self._descriptor, [view[done:]], offset + done)
            except OSError as error:
                size = self.row_bytes * self.shape[0] * self.shape[2]
                raise UpscaleError(
                    f"exact tiling could not write its maps ({2 * size / 1e9:.1f} GB in all) to "
                    f"{self.folder}: {error.strerror or error}; free disk space there, set "
                    "PARAGONSR_SCRATCH to a folder on a larger disk, or use overlap mode"
                ) from None


@dataclass
class Rows:
    """Rows [top, top + rows) of a map, in host memory; tiles are read in image coordinates."""

    values: torch.Tensor
    top: int

    def region(self, tile: Tile, device: torch.device) -> torch.Tensor:
        local = self.values[..., tile.top - self.top : tile.bottom - self.top, :]
        return local[..., tile.left : tile.right].to(device, non_blocking=True)


# compute(region, rows): the pass's output over ``region`` (a tile grown by the halo), from
# the rows of its input map that ``rows`` holds.
Compute = Callable[[Tile, Rows], torch.Tensor]
# finish(top, band): what to do with a computed band of output rows (add, gather, write).
Finish = Callable[[int, torch.Tensor], None]


class ExactStreamer:
    """Pass-by-pass, band-by-band execution of an :class:`OptimizedParagonSR` (module docstring)."""

    def __init__(self, net: OptimizedParagonSR, tile: int, progress: Progress) -> None:
        self.net = net
        self.tile = tile
        self.progress = progress

    # -- planning --------------------------------------------------------------------------

    def bands(self, top: int, height: int) -> list[tuple[int, int]]:
        """Bands of at most ``self.tile`` rows from ``top`` to ``height``."""
        return [(top + t.top, top + t.bottom) for t in grid(height - top, 1, self.tile, 1)]

    def band_tiles(self, top: int, bottom: int, width: int, bytes_per_pixel: int, halo: int):
        """Tiles of at most ``self.tile`` px covering a band, cut further into fewer rows where a
        pass's temporaries would exceed BAND_BYTES: wide temporaries that outgrow the cache, or
        that glibc serves with fresh page-faulting mmaps, cost more than the extra halo rows."""
        columns = min(self.tile, width)
        least_rows = max(16, 4 * halo)
        rows = max(least_rows, BAND_BYTES // max(1, columns * bytes_per_pixel))
        return [
            Tile(top + t.top, top + t.bottom, t.left, t.right)
            for t in grid(bottom - top, width, min(self.tile, rows), columns)
        ]

    def passes(self, height: int, width: int, element_size: int) -> int:
        """How many tiles one frame takes, over all passes (the progress total)."""
        return sum(
            len(self.band_tiles(top, bottom, width, size, halo))
            for size, halo in self._pass_shapes(element_size)
            for top, bottom in self.bands(0, height)
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

    # -- running ---------------------------------------------------------------------------

    def _pass(
        self,
        read: Callable[[int, int], Rows],
        size: tuple[int, int, int, int],
        halo: int,
        compute: Compute,
        bytes_per_pixel: int,
        *,
        destination: StreamedMap | None = None,
        store: Finish | None = None,
        statistics: Moments | None = None,
        add: StreamedMap | None = None,
        scale: int = 1,
    ) -> None:
        """One pass over the image, band by band (see the module docstring for the order),
        into ``destination`` (a map) or, for the high-resolution output, to ``store``.

        Each tile's output, plus the same rows of ``add`` if given, goes into the band and into
        ``statistics`` while it is still in the cache; the band's share of the statistics counts
        once the whole band is done, so a band redone after running out of memory counts once.
        """
        batch, channels, height, width = size

        def finish(top: int, band: torch.Tensor) -> None:
            if destination is not None:
                destination.commit(top, band)
            elif store is not None:
                store(top, band)

        pending: tuple[int, torch.Tensor] | None = None
        top = 0
        while top < height:
            bottom = self.bands(top, height)[0][1]
            rows = read(max(0, top - halo), min(height, bottom + halo))
            addend = Rows(add.read(top, bottom), top) if add is not None else None
            if pending is not None:  # its rows are read: the band before can be written now
                finish(*pending)
                pending = None
            if destination is not None:
                band = destination.band(top, bottom)
            else:
                shape = (batch, channels, (bottom - top) * scale, width * scale)
                band = torch.empty(shape, dtype=rows.values.dtype)
            band_statistics = self._compute_band(
                band,
                (top, bottom),
                (height, width),
                rows,
                addend,
                halo,
                compute,
                bytes_per_pixel,
                gather=statistics is not None,
            )
            if statistics is not None:
                statistics.merge(band_statistics)
            pending = (top, band)
            top = bottom
        if pending is not None:
            finish(*pending)

    def _compute_band(
        self,
        band: torch.Tensor,
        rows_of_band: tuple[int, int],
        image_size: tuple[int, int],
        rows: Rows,
        addend: Rows | None,
        halo: int,
        compute: Compute,
        bytes_per_pixel: int,
        *,
        gather: bool,
    ) -> Moments:
        """Fill ``band`` tile by tile; returns the statistics of what it holds if ``gather``."""
        (top, bottom), (height, width) = rows_of_band, image_size
        scale = band.shape[-1] // width
        while True:
            started = self.progress.done
            band_statistics = Moments()
            tiles = self.band_tiles(top, bottom, width, bytes_per_pixel, halo)
            try:
                for tile in tiles:
                    self.progress.check()
                    region = with_halo(tile, halo, height, width)
                    values = crop(compute(region, rows), tile, region, scale)
                    target = band[
                        ...,
                        (tile.top - top) * scale : (tile.bottom - top) * scale,
                        tile.left * scale : tile.right * scale,
                    ]
                    target.copy_(values)
                    del values
                    if addend is not None:
                        target.add_(addend.region(tile, target.device))
                    if gather:
                        band_statistics.add(target)
                    self.progress.step()
                return band_statistics
            except Exception as error:
                if not is_out_of_memory(error) or self.tile <= MIN_TILE:
                    raise
                finished = self.progress.done - started
                self.tile = max(MIN_TILE, self.tile // 2)
                retry = self.band_tiles(top, bottom, width, bytes_per_pixel, halo)
                self.progress.total += finished + len(retry) - len(tiles)
                log.warning("out of memory: redoing this band with %d px tiles", self.tile)
                del error
                release_cached_memory()

    def __call__(
        self, image: torch.Tensor, store_output: Callable[[Tile, torch.Tensor], None]
    ) -> None:
        net = self.net
        numerics = net.numerics
        device = net.tail_weight.device
        batch, _, height, width = image.shape
        dtype = image.dtype
        features = net.config.num_feat
        layout = torch.channels_last if net.channels_last else torch.contiguous_format
        source = Rows(image.cpu().contiguous(memory_format=layout), 0)
        whole = lambda top, bottom: source  # noqa: E731 - the image is small: always in memory
        shapes = iter(self._pass_shapes(image.element_size()))
        feature_shape = (batch, features, height, width)
        # Small maps stay in memory, three of them, so that no pass writes the map it reads
        # (reads are then views, not copies); while three take at most a sixteenth of what the
        # process may allocate (about 1024x1024 for nano on 16 GB). Larger ones, or any when
        # PARAGONSR_SCRATCH asks for it, go to two scratch files updated in place: resident
        # memory then stops growing with the image.
        map_bytes = batch * features * height * width * image.element_size()
        in_memory = "PARAGONSR_SCRATCH" not in os.environ and (
            3 * map_bytes <= available_cpu_memory() // 16
        )
        maps = [StreamedMap(*feature_shape, dtype, in_memory) for _ in range(3 if in_memory else 2)]

        def reader(stream: StreamedMap) -> Callable[[int, int], Rows]:
            def read(top: int, bottom: int) -> Rows:
                values = stream.read(top, bottom)
                return Rows(values.contiguous(memory_format=layout), top)

            return read

        def target(source: StreamedMap, keep: StreamedMap) -> StreamedMap:
            """Where a pass reading ``source`` writes: a map other than it and ``keep`` (the
            group's input) if there is one, else ``source`` itself, in place."""
            return next((m for m in maps if m is not source and m is not keep), source)

        def run(read, halo: int, compute: Compute, channels=features, **options) -> None:
            size = (batch, channels, height, width)
            self._pass(read, size, halo, compute, next(shapes)[0], **options)

        def shallow(region: Tile) -> torch.Tensor:
            return net.head(source.region(region, device))

        try:
            current = group_input = maps[0]
            statistics = Moments()
            run(
                whole,
                net.head_halo,
                lambda r, rows: shallow(r),
                destination=current,
                statistics=statistics,
            )
            for group in net.groups:
                group_input = current
                for index, block in enumerate(group):
                    scale, shift = statistics.normalizer(
                        block.eps1, block.norm1_weight, block.norm1_bias
                    )
                    norm1 = _affine(scale, shift, device, dtype)
                    statistics = Moments()
                    output = target(current, group_input)
                    run(
                        reader(current),
                        block.context_halo,
                        lambda r, rows, k=block, n=norm1: _context(k, rows.region(r, device), n),
                        destination=output,
                        statistics=statistics,
                    )
                    current = output
                    norm2 = _affine(*statistics.normalizer(block.eps2), device, dtype)
                    last = index == len(group) - 1
                    statistics = Moments()
                    output = target(current, group_input)
                    run(
                        reader(current),
                        block.ffn_halo,
                        lambda r, rows, k=block, n=norm2: _ffn(
                            k, rows.region(r, device), n, numerics
                        ),
                        destination=output,
                        statistics=statistics,
                        add=group_input if last else None,
                    )
                    current = output
            deep = target(current, current)
            run(
                reader(current),
                1,
                lambda r, rows: net.fuse(rows.region(r, device), shallow(r)),
                destination=deep,
            )
            out_channels = net.tail_weight.shape[0] // net.scale**2
            run(
                reader(deep),
                net.tail_halo,
                lambda r, rows: net.tail(rows.region(r, device)),
                store=lambda top, band: store_output(
                    Tile(top, top + band.shape[-2] // net.scale, 0, width), band
                ),
                channels=out_channels,
                scale=net.scale,
            )
        finally:
            for stream in maps:
                stream.close()


def _affine(scale: torch.Tensor, shift: torch.Tensor, device, dtype):
    """GroupNorm of a region with whole-image statistics: ``x * scale + shift``."""
    scale, shift = scale.to(device, dtype), shift.to(device, dtype)
    return lambda values: torch.addcmul(shift, values, scale)


def _context(block, residual: torch.Tensor, norm) -> torch.Tensor:
    return block.context(residual, norm(residual))


def _ffn(block, mixed: torch.Tensor, norm, numerics) -> torch.Tensor:
    return block.ffn_delta(norm(mixed), numerics).add_(mixed)
