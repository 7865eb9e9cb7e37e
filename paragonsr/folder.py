"""Upscaling a list of image files, with decoding and encoding overlapped with inference.

A reader thread decodes the next image while the calling thread runs the model, and a writer
thread encodes and writes the previous result. Pillow's codecs, numpy's conversions and torch's
operators release the GIL for most of their work, so on a CPU the encoding of a PNG (as long as
the model itself for nano x2 on 2 cores: bench/bench_folder.py) runs beside the model instead of
after it. The model keeps the caller's torch threads: their number changes how some sums are
split, and so a few output values, and a folder must give the bytes a single file gives.

What stays as in a plain loop: outputs are written in order, each through ``atomic_write``
(a reader never sees half a file); a file that cannot be read, upscaled or written is reported
as that file's outcome and the rest go on; an exception that is not a :class:`ParagonSRError`
(a bug, KeyboardInterrupt, SIGTERM's exception) stops everything, and nothing returns or raises
before both threads have stopped: a write in progress finishes (or removes its temporary) and
nothing queued behind it is started. Memory stays bounded: at most ``depth`` images are decoded
ahead of the model and at most ``depth`` results wait for or are in the writer, whatever the
number of files.

The model runs in the calling thread, so signals reach it there (only the main thread receives
them) and the model's device and thread settings are the caller's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ParagonSRError
from .images import DEFAULT_MAX_PIXELS, LoadedImage, read_image, write_image


@dataclass(frozen=True)
class FileJob:
    index: int  # position in the list: outcomes come back in this order
    source: Path
    target: Path


@dataclass
class FileOutcome:
    job: FileJob
    error: ParagonSRError | None = None  # its message names the file
    pixels: int = 0  # output pixels written (width x height)

    @property
    def ok(self) -> bool:
        return self.error is None


UpscaleOne = Callable[[FileJob, LoadedImage], torch.Tensor]
ReadOne = Callable[[Path], LoadedImage]
WriteOne = Callable[[Path, torch.Tensor, LoadedImage], object]


def write_like_source(target: Path, result: torch.Tensor, image: LoadedImage) -> None:
    """The output in the source's bit depth and colour profile, replacing what is there (plans
    decide beforehand which outputs may be replaced)."""
    write_image(target, result, image.bits, overwrite=True, icc_profile=image.icc_profile)


def upscale_files(
    pairs: Sequence[tuple[Path, Path]],
    upscale_one: UpscaleOne,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    read: ReadOne | None = None,
    write: WriteOne = write_like_source,
    pipeline: bool = True,
    depth: int = 1,
    on_done: Callable[[FileOutcome], None] | None = None,
) -> list[FileOutcome]:
    """Read, upscale and write every (source, target) pair; one outcome per pair, in order.

    ``upscale_one(job, image)`` runs in the calling thread and returns the [1, C, H, W] result.
    ``on_done(outcome)`` is also called in the calling thread, in order, as each file is
    written or fails (a caller can print from it). ``pipeline=False`` does the same work in
    one thread, one file after the other. ``read`` defaults to :func:`read_image` with
    ``max_pixels``; ``read`` and ``write`` raise :class:`ParagonSRError` for a bad file.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    jobs = [FileJob(i, Path(s), Path(t)) for i, (s, t) in enumerate(pairs)]
    if not jobs:
        return []
    if read is None:

        def read(path: Path) -> LoadedImage:
            return read_image(path, max_pixels)

    stages = _Stages(upscale_one, read, write)
    report = on_done or (lambda outcome: None)
    if not pipeline:
        outcomes = []
        for job in jobs:
            outcome = stages.write(stages.upscale(job, stages.read(job)))
            report(outcome)
            outcomes.append(outcome)
        return outcomes
    return _Pipeline(jobs, stages, depth, report).run()


@dataclass
class _Step:
    """One file between stages: the decoded image, then the result, or the error that ended
    it. ``fatal`` is an exception that must stop the whole run, carried to the calling thread."""

    job: FileJob
    image: LoadedImage | None = None
    result: torch.Tensor | None = None
    error: ParagonSRError | None = None
    fatal: BaseException | None = None


@dataclass
class _Stages:
    """The three steps of one file, shared by the serial loop and the pipeline so that both
    give the same bytes and the same messages."""

    upscale_one: UpscaleOne
    read_one: ReadOne
    write_one: WriteOne

    def read(self, job: FileJob) -> _Step:
        try:
            return _Step(job, image=self.read_one(job.source))
        except ParagonSRError as error:
            return _Step(job, error=error)

    def upscale(self, job: FileJob, step: _Step) -> _Step:
        if step.error is not None:
            return step
        try:
            result = self.upscale_one(job, step.image)
        except ParagonSRError as error:
            # Errors of the model and the tiling engine do not know which file they were given.
            return _Step(job, error=ParagonSRError(f"{job.source}: {error}"))
        return _Step(job, image=step.image, result=result)

    def write(self, step: _Step) -> FileOutcome:
        if step.error is not None:
            return FileOutcome(step.job, step.error)
        try:
            self.write_one(step.job.target, step.result, step.image)
        except ParagonSRError as error:
            return FileOutcome(step.job, error)
        return FileOutcome(step.job, pixels=step.result.shape[-1] * step.result.shape[-2])


_END = None  # closes a queue
_POLL_S = 0.05  # how often a waiting thread looks whether the run has been stopped


class _Pipeline:
    def __init__(
        self,
        jobs: list[FileJob],
        stages: _Stages,
        depth: int,
        report: Callable[[FileOutcome], None],
    ) -> None:
        self.jobs, self.stages, self.report = jobs, stages, report
        self.stop = threading.Event()
        # Slots rather than bounded queues: a slot is taken before an image is decoded (or a
        # result handed over) and given back when it has left the stage, so the bound counts
        # the image in progress too, not only those waiting.
        self.read_slots = threading.Semaphore(depth)
        self.write_slots = threading.Semaphore(depth)
        self.decoded: queue.Queue[_Step | None] = queue.Queue()
        self.to_write: queue.Queue[_Step | None] = queue.Queue()
        self.written: queue.Queue[FileOutcome | BaseException] = queue.Queue()
        self.outcomes: list[FileOutcome] = []

    def run(self) -> list[FileOutcome]:
        # Not daemons: should the calling thread be torn down before joining them (a second
        # Ctrl-C during the join), the interpreter still waits for a write in progress.
        reader = threading.Thread(target=self._read_all, name="paragonsr-reader")
        writer = threading.Thread(target=self._write_all, name="paragonsr-writer")
        try:
            reader.start()
            writer.start()
            for _ in self.jobs:
                step = self.decoded.get()
                self.read_slots.release()
                if step.fatal is not None:
                    raise step.fatal
                step = self.stages.upscale(step.job, step)
                if step.result is not None:
                    self._hand_over_slot(writer)
                self.to_write.put(step)
                del step  # the writer owns the result now and frees it once written
                self._report(block=False)
            self.to_write.put(_END)
            while len(self.outcomes) < len(self.jobs):
                self._report(block=True)
        finally:
            # Whatever ended the run: the reader decodes nothing new, the writer finishes the
            # write in progress and starts no other, and both are gone before this returns.
            self.stop.set()
            self.to_write.put(_END)
            for thread in (writer, reader):
                if thread.ident is not None:  # started
                    thread.join()
        return self.outcomes

    def _report(self, block: bool) -> None:
        """Take what the writer has finished, in order; its unexpected error is raised here."""
        while True:
            try:
                item = self.written.get(block=block)
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                raise item
            self.outcomes.append(item)
            self.report(item)
            block = False

    def _hand_over_slot(self, writer: threading.Thread) -> None:
        while not self.write_slots.acquire(timeout=_POLL_S):
            if not writer.is_alive():  # it stopped on an unexpected error: raise that here
                self._report(block=False)
                raise RuntimeError("the writer thread stopped")

    def _read_all(self) -> None:
        for job in self.jobs:
            while not self.read_slots.acquire(timeout=_POLL_S):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            try:
                step = self.stages.read(job)
            except BaseException as error:  # noqa: BLE001  (raised in the calling thread)
                step = _Step(job, fatal=error)
            self.decoded.put(step)
            if step.fatal is not None:
                return

    def _write_all(self) -> None:
        while True:
            step = self.to_write.get()
            if step is _END or self.stop.is_set():
                return
            try:
                outcome: FileOutcome | BaseException = self.stages.write(step)
            except BaseException as error:  # noqa: BLE001  (raised in the calling thread)
                outcome = error
            if step.result is not None:
                step.result = step.image = None
                self.write_slots.release()
            self.written.put(outcome)
            if isinstance(outcome, BaseException):
                return
