"""The ``paragonsr`` command. Only this module prints and chooses exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .config import FORMS, macs_per_pixel, optimized_value_count, parameter_count
from .detection import Inspection
from .errors import CheckpointError, ExportError, ParagonSRError

if TYPE_CHECKING:
    from .network import ParagonSR

# torch, spandrel and the network load inside the commands that run one: --help, argument errors
# and `info` on a .safetensors file answer in a fraction of the seconds those imports take.

EXIT_ERROR = 2
EXIT_NOTHING_DONE = 1


def describe(inspection: Inspection) -> dict:
    config = inspection.config
    params = {form: parameter_count(config, form) for form in FORMS}
    params["optimized"] = optimized_value_count(config)
    return {
        "file": inspection.source,
        "architecture": "ParagonSR",
        "form": inspection.form,
        "variant": inspection.variant,
        **config.to_dict(),
        "ffn_hidden": config.ffn_hidden,
        "branch_channels": config.branch_channels,
        "params": params,
        "macs_per_pixel": {form: macs_per_pixel(config, form) for form in (*FORMS, "optimized")},
        "non_finite_keys": inspection.non_finite_keys,
    }


def format_info(info: dict) -> str:
    macs, params = info["macs_per_pixel"], info["params"]
    lines = [
        f"file:       {info['file']}",
        f"form:       {info['form']}"
        + (" (multi-branch spatial mixers)" if info["form"] == "training" else " (release)"),
        f"variant:    {info['variant'] or 'custom (not in the family table)'}",
        f"scale:      x{info['scale']}   channels: {info['in_chans']} in, {info['out_chans']} out",
        f"body:       {info['num_feat']} features, {info['num_groups']} groups x "
        f"{info['num_blocks']} blocks, FFN expansion {info['ffn_expansion']:g} "
        f"({info['ffn_hidden']} hidden)",
        f"context:    square {info['square_kernel_size']}, band {info['band_kernel_size']}, "
        f"branch ratio {info['branch_ratio']:g} ({info['branch_channels']} channels per branch)",
        "parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()),
        "MACs/pixel: " + ", ".join(f"{k} {v:,}" for k, v in macs.items()) + "  (per input pixel)",
    ]
    if info["non_finite_keys"]:
        lines.append(f"WARNING:    {len(info['non_finite_keys'])} tensors hold NaN or inf values")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from .header import inspect_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported in the output instead
        inspection = inspect_file(args.file)
    info = describe(inspection)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def max_fusion_error(training: ParagonSR, fused: ParagonSR, seed: int = 0, size: int = 48) -> float:
    """Max |fused - training| on a seeded random image, both in float64 so that only a wrong
    fusion, not float32 rounding, can show up."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(
        1, training.config.in_chans, size, size, generator=generator, dtype=torch.float64
    )
    with torch.no_grad():
        expected = training.double()(image)
        actual = fused.double()(image)
    training.float(), fused.float()
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    # Non-finite weights (already warned about) give non-finite pixels in both forms alike.
    return (expected[finite] - actual[finite]).abs().max().item() if finite.any() else 0.0


def cmd_fuse(args: argparse.Namespace) -> int:
    from .checkpoint import empty_model, load_model, save_checkpoint
    from .network import fuse_for_release

    source, target = Path(args.input), Path(args.output)
    training = load_model(source)
    if training.form == "fused":
        print(f"{source} is already fused (release form); nothing written", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if target.suffix.lower() != ".safetensors":
        raise CheckpointError(
            target, "fused checkpoints are written as safetensors", "Name the output *.safetensors"
        )
    if target.exists() and not args.overwrite:
        raise CheckpointError(target, "already exists", "Pass --overwrite to replace it")
    fused = empty_model(training.config, "training")
    fused.load_state_dict(training.state_dict())
    fuse_for_release(fused)
    error = max_fusion_error(training, fused)
    print(f"max abs difference, fused vs training form (float64, seeded 48x48 input): {error:.3g}")
    if not error < 1e-6:
        raise ParagonSRError(
            f"{source}: fusion check failed (difference {error:.3g}); nothing written"
        )
    save_checkpoint(
        fused,
        target,
        overwrite=args.overwrite,
        metadata={"architecture": "ParagonSR", "form": "fused"},
    )
    print(f"wrote {target}")
    return 0


def load_any_model(path: str):
    """A spandrel descriptor for any model spandrel knows; ParagonSR through our own loader,
    whose errors name the file and the problem."""
    import spandrel

    from .checkpoint import looks_like_paragonsr, one_line, read_state_dict
    from .spandrel_arch import load_descriptor

    state_dict = read_state_dict(path)
    if looks_like_paragonsr(state_dict):
        try:
            return load_descriptor(state_dict)
        except CheckpointError as error:
            raise error.with_source(path) from None
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(
            path,
            "not a model that spandrel or this pack recognizes",
            "It may be damaged, or of an architecture spandrel does not support",
        ) from None
    except ParagonSRError:
        raise
    except Exception as error:  # a detected architecture whose tensors do not fit it
        raise CheckpointError(
            path,
            f"damaged or incomplete {_detected_architecture(state_dict)} model ({one_line(error)})",
            "Download it again",
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(
            path, "is not an image-to-image model (inpainting models are not supported)"
        )
    return descriptor


def _detected_architecture(state_dict) -> str:
    import spandrel

    for support in spandrel.MAIN_REGISTRY.architectures("detection"):
        try:
            if support.detect(state_dict):
                return support.architecture.name
        except Exception:  # another detector failing on foreign keys says nothing
            continue
    return "spandrel"


def plan_outputs(source: Path, target: Path, overwrite: bool) -> list[tuple[Path, Path]]:
    from .images import SUFFIXES, ImageError, check_suffix

    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not inputs:
            raise ImageError(
                source, "contains no images", f"Supported types: {', '.join(sorted(SUFFIXES))}"
            )
        if target.exists() and not target.is_dir():
            raise ImageError(target, "is a file; a folder input needs an output folder")
        pairs = [(p, target / p.name) for p in inputs]
    elif source.exists():
        check_suffix(source)
        pairs = [(source, target / source.name if target.is_dir() else target)]
    else:
        from .files import missing_file_problem

        raise ImageError(source, *missing_file_problem(source))
    for _, output in pairs:
        check_suffix(output)
    folder = pairs[0][1].parent
    if source.is_dir():
        if not folder.parent.is_dir():
            raise ImageError(folder, "its parent folder does not exist", "Create it first")
    elif not folder.is_dir():
        raise ImageError(pairs[0][1], "the output folder does not exist", "Create it first")
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise ImageError(folder, "the output folder is not writable", "Choose another folder")
    existing = [out for _, out in pairs if out.exists()]
    if existing and not overwrite:
        raise ImageError(
            existing[0],
            f"already exists ({len(existing)} of {len(pairs)} outputs do)",
            "Pass --overwrite to replace them",
        )
    return pairs


def _tqdm(total: int, unit: str):
    """A tqdm bar, or None where tqdm is not installed (callers then print plain lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, dynamic_ncols=True)


class _Bar:
    """tqdm where installed, otherwise a plain percentage on stderr. It counts the images the
    model has finished plus the tiles done of the one it runs; files are reported done (written
    or failed) a little behind the model, so it only ever moves forward."""

    def __init__(self, total_images: int) -> None:
        self.bar = _tqdm(total_images, "img")
        self.image = 0  # the image the model runs, else the first one not done
        self.position = 0.0
        self.total_images = total_images

    def start(self, index: int) -> None:
        self.image = max(self.image, index)

    def tiles(self, done: int, total: int) -> None:
        self._move(self.image + done / max(total, 1), plain=done == total or done % 50 == 0)

    def finished(self, index: int) -> None:
        self.image = max(self.image, index + 1)
        self._move(self.image, plain=False)

    def _move(self, position: float, plain: bool) -> None:
        if position <= self.position:
            return
        self.position = position
        if self.bar is not None:
            self.bar.update(position - self.bar.n)  # tqdm throttles redraws
        elif plain:
            fraction = position / self.total_images
            print(f"\r{100 * fraction:5.1f}%", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def cmd_upscale(args: argparse.Namespace) -> int:
    import time

    import torch

    from .folder import FileJob, FileOutcome, upscale_files
    from .runtime import keep_freed_cpu_memory
    from .upscale import UpscaleSettings, is_paragonsr, upscale

    settings = UpscaleSettings(
        tile=None if args.tile == "auto" else _tile_size(args.tile),
        mode=args.mode,
        overlap=args.overlap,
        precision=args.precision,
        alpha=args.alpha,
        device=args.device,
        max_pixels=args.max_pixels,
    )
    settings.validate()  # --device banana is refused here, before torchrun's ranks read it
    from .distributed import ranks

    world = ranks()
    if world.distributed:
        # One process per GPU (or per share of the CPU cores); each takes every world-th file.
        settings = replace(settings, device=str(world.device(args.device)))
        if torch.device(settings.device).type == "cpu":
            torch.set_num_threads(world.cpu_threads())
    settings.validate()
    skip_existing = args.skip_existing or world.distributed
    pairs = plan_outputs(Path(args.input), Path(args.output), args.overwrite or skip_existing)
    # Shard the full sorted list first, then skip finished files: every rank gets the same
    # shard whatever the others have already written by the time it looks.
    pairs = pairs[world.rank :: world.world]
    done = [pair for pair in pairs if pair[1].exists() and not args.overwrite]
    pairs = [pair for pair in pairs if pair not in done]
    if not pairs:
        print(f"nothing to do: {len(done)} output(s) already exist")
        return 0
    descriptor = load_any_model(args.model)
    # The mode decides which settings conflict (--overlap against --tile): refuse before work.
    if settings.mode == "exact" and not is_paragonsr(descriptor):
        raise ParagonSRError(
            f"--mode exact needs a ParagonSR model, and {args.model} is "
            f"{descriptor.architecture.name}; use --mode overlap"
        )
    default_mode = "exact" if is_paragonsr(descriptor) else "overlap"
    settings = replace(settings, mode=settings.mode or default_mode)
    settings.validate()
    keep_freed_cpu_memory()  # this process only runs the job: let glibc reuse freed memory
    folder_input = Path(args.input).is_dir()
    created = _make_folder(Path(args.output)) if folder_input else None
    if world.distributed:
        created = None  # the other ranks may still write into it after this one fails
    bar = _Bar(len(pairs))

    def upscale_one(job: FileJob, image) -> torch.Tensor:
        bar.start(job.index)
        return upscale(descriptor, image.pixels, settings, tick=bar.tiles)

    def report(outcome: FileOutcome) -> None:
        if outcome.ok or folder_input:
            bar.finished(outcome.job.index)
        if not outcome.ok and folder_input:
            # One bad file must not stop a folder: it is reported, the others are written.
            print(f"paragonsr: skipped {outcome.error}", file=sys.stderr)

    started = time.perf_counter()
    try:
        outcomes = upscale_files(
            pairs,
            upscale_one,
            max_pixels=settings.max_pixels,
            pipeline=len(pairs) > 1,  # one file has nothing to overlap with
            on_done=report,
        )
    finally:
        bar.close()
        if created is not None:
            _remove_if_empty(created)
    failures = [outcome.error for outcome in outcomes if outcome.error is not None]
    if failures and not folder_input:
        raise failures[0]  # one file: its error is the answer
    pixels = sum(outcome.pixels for outcome in outcomes)
    elapsed = time.perf_counter() - started
    mode = settings.mode
    rank_note = f"rank {world.rank}/{world.world}: " if world.distributed else ""
    skipped = f", {len(done)} already done" if done else ""
    failed = f", {len(failures)} failed" if failures else ""
    print(
        f"{rank_note}upscaled {len(pairs) - len(failures)} image(s){skipped}{failed} "
        f"x{descriptor.scale} with {descriptor.architecture.name} ({mode} mode) in "
        f"{elapsed:.1f} s: {pixels / 1e6 / elapsed:.2f} output megapixels/s"
    )
    return EXIT_ERROR if failures else 0


def _make_folder(folder: Path) -> Path | None:
    """Create ``folder``; return it if this call created it (so a failed run can take it back)."""
    try:
        folder.mkdir()
    except FileExistsError:
        return None
    except OSError as error:
        from .images import ImageError

        raise ImageError(folder, f"cannot create the output folder ({error.strerror})") from None
    return folder


def _remove_if_empty(folder: Path) -> None:
    """A failed run leaves no empty folder behind; one with any file in it is the user's."""
    with contextlib.suppress(OSError):  # rmdir refuses a folder that holds anything
        folder.rmdir()


def _tile_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParagonSRError(f"--tile must be 'auto' or a number of pixels, not {text!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    try:
        return _export(args)
    except CheckpointError as error:
        if "not a ParagonSR checkpoint" not in str(error):
            raise
        raise ExportError(
            f"{error}. Export writes ParagonSR models only, as ONNX (.onnx) or an NCNN pair "
            "(.param); chaiNNer converts other architectures"
        ) from None


def _export(args: argparse.Namespace) -> int:
    suffix = Path(args.output).suffix.lower()
    if suffix == ".param":
        return _export_ncnn(args)
    if suffix != ".onnx":
        raise ExportError(
            f"{args.output}: name the output *.onnx (ONNX: chaiNNer, onnxruntime, TensorRT) or "
            "*.param (NCNN: Upscayl, realesrgan-ncnn-vulkan, chaiNNer)"
        )
    from .onnx_export import OPSETS, ExportOptions, export_onnx

    options = ExportOptions(
        opset=args.opset,
        fp16=args.fp16,
        keep_io_fp32=args.keep_io_fp32,
        static=_static_size(args.static) if args.static else None,
        dynamic_batch=args.batch == "dynamic",
        mish_op=not args.no_mish,
    )
    try:
        options.validate()
    except ExportError as error:
        if args.opset not in OPSETS:
            raise ExportError(f"--opset {args.opset}: {error}") from None
        raise
    return _report_export(
        args, lambda: export_onnx(args.model, args.output, options, overwrite=args.overwrite)
    )


def _report_export(args: argparse.Namespace, export) -> int:
    """Run one exporter and print its report; an error that names neither file gets the
    model's name in front."""
    from .checkpoint import NonFiniteWeightsWarning

    try:
        with warnings.catch_warnings():
            # Such a model's export is refused by the exporter, with a message that says why.
            warnings.simplefilter("ignore", NonFiniteWeightsWarning)
            report = export()
    except ExportError as error:
        if args.model in str(error) or args.output in str(error):
            raise
        raise ExportError(f"{args.model}: not exported: {error}") from None
    print("\n".join(report.lines()))
    return 0


def _export_ncnn(args: argparse.Namespace) -> int:
    from .ncnn_export import export_ncnn
    from .onnx_export import ExportOptions

    onnx_only = {
        "--opset": args.opset != ExportOptions().opset,
        "--keep-io-fp32": args.keep_io_fp32,
        "--static": bool(args.static),
        "--batch 1": args.batch != "dynamic",
        "--no-mish": args.no_mish,
    }
    given = [flag for flag, used in onnx_only.items() if used]
    if given:
        raise ExportError(
            f"{', '.join(given)}: ONNX options; an NCNN pair takes any input size and only "
            "--fp16 and --overwrite"
        )
    return _report_export(
        args, lambda: export_ncnn(args.model, args.output, fp16=args.fp16, overwrite=args.overwrite)
    )


def _static_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ParagonSRError(f"--static takes HEIGHTxWIDTH such as 256x256, not {text!r}") from None
    if min(height, width) < 3:
        raise ParagonSRError(f"--static {text}: the input size must be at least 3x3")
    return height, width


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    from .train.loop import MODEL_FILE, STATE_FILE

    config = TrainConfig(
        data=args.data,
        out=args.out,
        val=args.val,
        holdout=args.holdout,
        lr_data=args.lr_data,
        variant=args.variant or "nano",
        scale=args.scale,
        iters=args.iters,
        batch=args.batch,
        lq_size=args.lq_size,
        lr=args.lr,
        warmup=args.warmup,
        schedule=args.schedule,
        milestones=_milestones(args.milestones),
        loss=args.loss,
        ms_ssim_weight=args.ms_ssim,
        clip=args.clip,
        ema_decay=args.ema,
        val_every=args.val_every,
        save_every=args.save_every,
        log_every=args.log_every,
        seed=args.seed,
        threads=args.threads,
        init=args.init,
        resume=args.resume,
        degrade=args.degrade,
        device=args.device,
    )
    from .distributed import ranks

    if not ranks().is_main:  # under torchrun only rank 0 reports
        train(config)
        return 0
    config.validate()  # before the progress bar appears
    if args.init and args.variant:
        _check_variant_of_init(args.variant, args.init)
    bar = _TrainBar(config.iters)
    with StopRequests() as stop:
        try:
            result = train(config, progress=bar.update, cancelled=stop.requested)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last periodic save
            bar.close()
            print(
                "paragonsr: interrupted twice; rerun with --resume to continue from the last "
                "periodic save",
                file=sys.stderr,
            )
            return 130
        finally:
            bar.close()  # an error message then starts on a line of its own
    if result.cancelled:
        print(
            f"paragonsr: stopped by {stop.signal_name} at iteration {result.iteration}; the "
            f"state is saved in {Path(args.out) / STATE_FILE}: rerun the same command with "
            "--resume to continue",
            file=sys.stderr,
        )
        return 130
    print(f"validation: {result.validation_source}")
    for row in result.validation:
        print(
            f"iteration {row['iteration']:>6}: PSNR {row['psnr']:.2f} dB, bicubic "
            f"{row['bicubic']:.2f} dB ({row['psnr'] - row['bicubic']:+.2f} dB)"
        )
    print(
        f"trained {result.iteration} iterations in {result.seconds:.0f} s; EMA weights: "
        f"{Path(args.out) / MODEL_FILE}; log: {result.log_path}"
    )
    return 0


def _check_variant_of_init(variant: str, init: str) -> None:
    """Fine-tuning keeps the architecture of the --init checkpoint: a --variant that names
    another would be silently ignored."""
    from .header import inspect_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training reads the checkpoint again and warns there
        held = inspect_file(init).variant
    if held != variant:
        raise ParagonSRError(
            f"--variant {variant}: fine-tuning keeps the architecture of --init {init} "
            f"({'variant ' + held if held else 'a custom configuration'}); drop --variant"
        )


def _milestones(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ParagonSRError(
            f"--milestones {text!r}: give iterations separated by commas, e.g. 3000,4500"
        ) from None


class StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM only ask the work to stop at its next safe point
    (``requested()``), so a training run saves a resumable state on the way out instead of
    dying mid-step; a second signal stops at once, as usual."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return bool(self.signal_name)

    def _handle(self, number: int, frame) -> None:
        if self.signal_name:  # the second request: the default behaviour
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def __enter__(self) -> StopRequests:
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class _TrainBar:
    """tqdm with iteration, loss, lr, it/s, ETA and the last PSNR; plain lines without tqdm."""

    def __init__(self, total: int) -> None:
        self.bar = _tqdm(total, "it")
        self.last_psnr = ""

    def update(self, report: dict) -> None:
        if "psnr" in report:
            self.last_psnr = f"{report['psnr']:.2f} dB (bicubic {report['bicubic']:.2f})"
        text = f"loss {report['loss']:.4f} lr {report['lr']:.2e} {self.last_psnr}".strip()
        if self.bar is not None:
            self.bar.n = report["iteration"]
            self.bar.set_postfix_str(text, refresh=True)
        elif report["iteration"] % 100 == 0 or "psnr" in report:
            print(f"{report['iteration']}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_spandrel_hook(args: argparse.Namespace) -> int:
    from . import spandrel_hook

    if args.action == "install":
        folder = spandrel_hook.install(user=args.user)
        where = "for this user's Python" if args.user else "in this environment"
        print(f"installed in {folder}: every `import spandrel` {where} now registers ParagonSR")
    elif args.action == "uninstall":
        removed = spandrel_hook.uninstall(user=args.user)
        print("removed " + ", ".join(str(p) for p in removed) if removed else "not installed")
    else:
        folder = spandrel_hook.site_folder(args.user)
        problem = spandrel_hook.user_site_problem() if args.user else None
        if not spandrel_hook.installed(user=args.user):
            print(f"not installed ({folder})")
        elif problem is not None:
            print(f"present but inactive ({folder}): {problem}")
        else:
            print(f"installed ({folder})")
            if args.user:
                print(
                    "paragonsr: note: programs started with PYTHONNOUSERSITE=1, chaiNNer among "
                    "them, do not see the user site",
                    file=sys.stderr,
                )
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (argparse prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}. See {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="paragonsr",
        description="Inspect, fuse and run ParagonSR super-resolution checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"paragonsr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="show a checkpoint's form and hyper-parameters",
        description="Show a checkpoint's form, every hyper-parameter (read from the tensors), "
        "the matching variant, parameter counts and MACs per input pixel.",
    )
    info.add_argument("file", help="checkpoint (.safetensors, .pth, .ckpt)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=cmd_info)

    fuse = commands.add_parser(
        "fuse",
        help="write the release (fused) form of a training checkpoint",
        description="Fold each spatial mixer's three branches into one convolution and write "
        "the release checkpoint (safetensors, the original implementation's key names). The "
        "fused network is checked against the training form before anything is written.",
    )
    fuse.add_argument("input", help="training-form checkpoint")
    fuse.add_argument("output", help="fused checkpoint to write (.safetensors)")
    fuse.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    fuse.set_defaults(handler=cmd_fuse)

    from .choices import ALPHA_MODES, DEFAULT_MAX_PIXELS, MODES, PRECISIONS

    up = commands.add_parser(
        "upscale",
        help="upscale an image or a folder of images",
        description="Upscale images with any spandrel model. ParagonSR runs in exact mode by "
        "default: tiled in bounded memory, equal to whole-image inference.",
    )
    up.add_argument("input", help="image file or folder (png, jpg, webp, tif, bmp)")
    up.add_argument("output", help="output file, or folder for a folder input")
    up.add_argument("--model", required=True, help="model checkpoint (any spandrel model)")
    up.add_argument(
        "--tile",
        default="auto",
        help="tile size in input pixels, or auto "
        "(from free memory); larger than the image means whole-image",
    )
    up.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="exact (ParagonSR default) or "
        "overlap (independent blended tiles; default for other models)",
    )
    up.add_argument(
        "--overlap",
        type=int,
        default=32,
        help="overlap mode: pixels of context shared by neighbouring tiles (default 32)",
    )
    up.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: fp32 on the CPU, on CUDA bf16/fp16 only where the model is known to be safe",
    )
    up.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    up.add_argument(
        "--alpha", choices=ALPHA_MODES, default="bilinear", help="how to upscale an alpha channel"
    )
    up.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse input images larger than this (default {DEFAULT_MAX_PIXELS:,})",
    )
    up.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    up.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave outputs that exist "
        "alone and do the rest (always on under torchrun, so a restart resumes)",
    )
    up.set_defaults(handler=cmd_upscale)

    export = commands.add_parser(
        "export",
        help="export ONNX (chaiNNer, onnxruntime, TensorRT) or NCNN (Upscayl, "
        "realesrgan-ncnn-vulkan, chaiNNer)",
        description="Export the inference-optimized network, chosen by the output's extension: "
        ".onnx (IR <= 9, opset 14-20, one NCHW input in [0, 1]), verified by onnx.checker, "
        "onnxruntime against torch on a random and a natural image, and chaiNNer's strict shape "
        "inference; or .param (an NCNN .param/.bin pair with blobs data and output, in layers "
        "ncnn 2022 and chaiNNer accept), verified in the ncnn package against torch.",
    )
    export.add_argument("model", help="ParagonSR checkpoint (training or fused)")
    export.add_argument(
        "output",
        help="file to write: .onnx, or .param (its .bin beside it; name it like "
        "4x-ParagonSR-tiny.param, since Upscayl reads the scale from the name)",
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, 14-20 (default 17)")
    export.add_argument(
        "--fp16",
        action="store_true",
        help="ONNX: half-precision weights and activations (GroupNorm statistics stay fp32); "
        "NCNN: half-precision weights in the .bin",
    )
    export.add_argument(
        "--keep-io-fp32", action="store_true", help="with --fp16: keep the input and output float32"
    )
    export.add_argument(
        "--static", metavar="HxW", help="fix the input size instead of dynamic height and width"
    )
    export.add_argument(
        "--batch",
        choices=("dynamic", "1"),
        default="dynamic",
        help="dynamic batch size (default) or fixed at 1",
    )
    export.add_argument(
        "--no-mish",
        action="store_true",
        help="write Mish as x * tanh(softplus(x)) even at opset 18+, for runtimes without it",
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    export.set_defaults(handler=cmd_export)

    from .config import VARIANTS

    tr = commands.add_parser(
        "train",
        help="train or fine-tune a ParagonSR model",
        description="Train on a folder of HR images (LR made by antialiased bicubic "
        "downscaling) or HR/LR pairs; EMA weights are saved as a training-form safetensors "
        "checkpoint, with a resumable state beside it.",
    )
    tr.add_argument("--data", required=True, help="folder of HR images (searched recursively)")
    tr.add_argument(
        "--val",
        help="folder of held-out HR images for PSNR against bicubic (its images never train, "
        "even inside --data)",
    )
    tr.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="without --val: the share of --data held out for validation, chosen by --seed, at "
        "least one image (default 0.1; 0: validate on nothing)",
    )
    tr.add_argument("--lr-data", help="folder of LR images paired with --data by name")
    tr.add_argument("--out", required=True, help="run folder for checkpoints")
    tr.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="network size (default nano); with --init the checkpoint decides it",
    )
    tr.add_argument("--scale", type=int, default=2)
    tr.add_argument("--iters", type=int, default=5000)
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--lq-size", type=int, default=64, help="LR crop size in pixels")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 5e-4; 2e-5 with --init)")
    tr.add_argument("--warmup", type=int, help="linear warm-up iterations (default 2%%)")
    tr.add_argument("--schedule", choices=("constant", "cosine", "multistep"), default="cosine")
    tr.add_argument("--milestones", help="multistep: comma-separated iterations")
    tr.add_argument("--loss", choices=("l1", "charbonnier"), default="l1")
    tr.add_argument("--ms-ssim", type=float, default=0.0, help="weight of a 1 - MS-SSIM term")
    tr.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    tr.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    tr.add_argument("--val-every", type=int, default=500)
    tr.add_argument("--save-every", type=int, default=1000)
    tr.add_argument(
        "--log-every",
        type=int,
        default=100,
        help="iterations per row of training_log.csv in --out (each validation adds a row)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--threads",
        type=int,
        help="CPU threads (training slows badly when its threads compete with another process)",
    )
    tr.add_argument("--init", help="fine-tune from a training-form checkpoint")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument(
        "--degrade", action="store_true", help="light random blur, noise and JPEG on the LR side"
    )
    tr.add_argument("--device", default="auto")
    tr.set_defaults(handler=cmd_train)

    hook = commands.add_parser(
        "spandrel-hook",
        help="make `import spandrel` register ParagonSR in this environment",
        description="For tools that use spandrel without importing this pack (chaiNNer, "
        "Forge/A1111, InvokeAI): install a start-up hook into this Python's site-packages "
        "that registers ParagonSR whenever spandrel is imported. Run it with the Python of "
        "that program, after `<that python> -m pip install --no-deps <this pack>`.",
    )
    hook.add_argument("action", choices=("install", "uninstall", "status"))
    hook.add_argument(
        "--user",
        action="store_true",
        help="the user site instead of the environment's site-packages; refused in a virtual "
        "environment or where the user site is off, and never seen by chaiNNer, which starts "
        "its Python with PYTHONNOUSERSITE=1 (install into chaiNNer's own Python instead)",
    )
    hook.set_defaults(handler=cmd_spandrel_hook)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"paragonsr: warning: {message}\n"


class Terminated(BaseException):
    """SIGTERM, raised wherever the program is, so that every ``finally`` runs on the way out:
    atomic_write removes its temporary, upscale takes back an output folder it left empty.
    A BaseException, so that no ``except Exception`` swallows it."""


def _raise_terminated(number: int, frame) -> NoReturn:
    raise Terminated(signal.Signals(number).name)


@contextlib.contextmanager
def _terminate_by_exception():
    """SIGTERM as :class:`Terminated` for the duration of a command (training's StopRequests
    replaces it while it runs, to save a resumable state first)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        installed = True
    except ValueError:  # not the main thread: only the main thread may handle signals
        installed = False
    try:
        yield
    finally:
        if installed:
            # None: a handler installed outside Python, which cannot be put back; the default
            # is what it almost always was.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with _terminate_by_exception():
            return args.handler(args)
    except ParagonSRError as error:
        print(f"paragonsr: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("paragonsr: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"paragonsr: stopped by {stop}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
