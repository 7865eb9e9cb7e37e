"""The ``paragonsr`` command. Only this module prints and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .arch import FORMS, ParagonSR, macs_per_pixel
from .checkpoint import (
    Inspection,
    empty_model,
    expected_shapes,
    inspect_checkpoint,
    load_model,
    save_checkpoint,
)
from .errors import CheckpointError, ParagonSRError
from .fusion import fuse_for_release, optimize_for_inference

EXIT_ERROR = 2
EXIT_NOTHING_DONE = 1


def optimized_tensor_count(inspection: Inspection) -> int:
    with torch.device("meta"):
        model = ParagonSR(inspection.config, fused=inspection.form == "fused")
    return sum(t.numel() for t in optimize_for_inference(model).buffers())


def describe(inspection: Inspection) -> dict:
    config = inspection.config
    params = {
        form: sum(shape.numel() for shape in expected_shapes(config, form).values())
        for form in FORMS
    }
    params["optimized"] = optimized_tensor_count(inspection)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported in the output instead
        inspection = inspect_checkpoint(args.file)
    info = describe(inspection)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def max_fusion_error(training: ParagonSR, fused: ParagonSR, seed: int = 0, size: int = 48) -> float:
    """Max |fused - training| on a seeded random image, both in float64 so that only a wrong
    fusion, not float32 rounding, can show up."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(
        1, training.config.in_chans, size, size, generator=generator, dtype=torch.float64
    )
    with torch.no_grad():
        expected = training.double().forward_plain(image)
        actual = fused.double().forward_plain(image)
    training.float(), fused.float()
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    # Non-finite weights (already warned about) give non-finite pixels in both forms alike.
    return (expected[finite] - actual[finite]).abs().max().item() if finite.any() else 0.0


def cmd_fuse(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"paragonsr: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.handler(args)
    except ParagonSRError as error:
        print(f"paragonsr: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("paragonsr: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
