"""ONNX export that chaiNNer, onnxruntime and TensorRT accept, verified on every export.

What the export must satisfy, and how:

- chaiNNer pins onnx 1.16 / onnxruntime 1.17.1, which open ONNX IR version 9 or lower and opset
  20 or lower. torch's default (dynamo) exporter writes IR 10, so the export uses the
  TorchScript exporter (IR 8 at opsets 14-20).
- chaiNNer finds the scale by strict shape inference at fixed sizes. GroupNorm(1) is written as
  explicit ReduceMean/Sub/Mul/Sqrt/Div and PixelShuffle as DepthToSpace, forms strict
  inference follows; both are checked on every export at 16x16 and 64x64.
- The exported graph is the inference-optimized network of :mod:`paragonsr.inference`, the same
  passes every other path runs, in its graph numerics: no CPU row bands (their count would be
  frozen at the traced size), out-of-place Mish, explicit GroupNorm statistics, and the FFN's
  gated product in slices of ``ffn_group`` hidden channels, which keeps each slice's chain of
  elementwise operators in cache on onnxruntime's CPU provider. (At opset 18+ ``mish_op``
  writes ONNX's Mish operator instead, with which the whole graph takes twice as long there.)
- fp16 graphs keep GroupNorm statistics in fp32 (activations of trained models exceed fp16's
  range inside the variance) and are refused if they overflow on a natural image.

The file is written under a temporary name and renamed only after verification passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model
from .config import variant_name
from .errors import ExportError
from .files import atomic_write
from .inference import Numerics, OptimizedParagonSR, optimize_for_inference
from .network import ParagonSR, not_a_plain_network
from .tiles import Progress

OPSETS = range(14, 21)  # chaiNNer's onnxruntime 1.17 stops at 20
FP32_TOLERANCE = 1e-4


def _require_onnx() -> tuple[Any, Any]:
    """onnx, to write the graph, and whichever onnxruntime build is installed (CPU, -gpu,
    -directml: all import as onnxruntime and all run on the CPU provider), to verify it. An
    export is never kept unverified, so both are needed; neither is a run-time dependency."""
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx package, which is not installed: pip install onnx"
        ) from None
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "ONNX export verifies every file in onnxruntime, and no onnxruntime is installed: "
            "pip install onnxruntime (or onnxruntime-gpu / onnxruntime-directml; any one works)"
        ) from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    fp16: bool = False
    keep_io_fp32: bool = False
    static: tuple[int, int] | None = None  # (height, width)
    dynamic_batch: bool = True
    mish_op: bool = True  # the Mish operator where the opset has it (18+)
    # Hidden channels per slice of the FFN's gated product (Numerics.ffn_group); 0: one slice.
    ffn_group: int = 16

    def validate(self) -> None:
        if self.opset not in OPSETS:
            raise ExportError(
                f"opset {self.opset} is outside {OPSETS.start}-{OPSETS.stop - 1}; chaiNNer's "
                "onnxruntime 1.17 refuses opset 21 and later, and opsets before 14 lack "
                "operators this network needs"
            )
        if self.keep_io_fp32 and not self.fp16:
            raise ExportError("--keep-io-fp32 only applies together with --fp16")
        if self.ffn_group < 0:
            raise ExportError(f"ffn_group {self.ffn_group} must be 0 (one slice) or positive")
        if self.static is not None and min(self.static) < 3:
            raise ExportError("a static input size must be at least 3x3")


@dataclass
class Verification:
    """What was checked after export; ``lines()`` gives the printable report."""

    path: str
    ir_version: int
    opset: int
    checker: str
    max_abs_random: float
    max_abs_natural: float
    non_finite_random: int
    non_finite_natural: int
    dtype: str
    inferred_shapes: dict[str, list[int | str]] = field(default_factory=dict)
    torch_rounding: float = 0.0
    mish: str = ""

    def lines(self) -> list[str]:
        shapes = ", ".join(f"{size} -> {shape}" for size, shape in self.inferred_shapes.items())
        return [
            f"wrote {self.path} ({self.dtype}, IR {self.ir_version}, opset {self.opset}; "
            f"Mish as {self.mish})",
            f"onnx.checker: {self.checker}",
            "onnxruntime vs torch, max abs diff of the [0, 1] output: seeded random image "
            f"{self.max_abs_random:.3g}, "
            f"natural image {self.max_abs_natural:.3g}; non-finite outputs: "
            f"{self.non_finite_random} and {self.non_finite_natural} (torch's own plain vs "
            f"optimized float32 paths: {self.torch_rounding:.3g})",
            f"chaiNNer: IR {self.ir_version} <= 9, opset {self.opset} <= 20, strict shape "
            f"inference {shapes}",
        ]


class ExportedIO(nn.Module):
    """The graph's input and output precision around the optimized network: with
    ``keep_io_fp32`` an fp16 graph takes and returns float32."""

    def __init__(self, net: OptimizedParagonSR, io_fp32: bool) -> None:
        super().__init__()
        self.net = net
        self.io_fp32 = io_fp32

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.io_fp32:
            return self.net(image)
        return self.net(image.to(self.net.conv_in_weight.dtype)).float()


@contextlib.contextmanager
def _mish_operator(enabled: bool, opset: int) -> Iterator[None]:
    """Map aten::mish to ONNX's Mish operator (opset 18+) for the duration of one export; the
    TorchScript exporter otherwise always writes x * tanh(softplus(x))."""
    if not enabled:
        yield
        return
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::mish", lambda graph, x: graph.op("Mish", x), opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::mish", opset)


def _source_hash(path: Path | None) -> str:
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_images(channels: int, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """What every export is verified on: a seeded random image (48x40 unless ``size``) and the
    bundled photo (resized to ``size`` if given), with ``channels`` channels."""
    from .images import SAMPLE_IMAGE, read_image

    height, width = size or (48, 40)
    generator = torch.Generator().manual_seed(1)
    random_image = torch.rand(1, channels, height, width, generator=generator)
    natural = read_image(SAMPLE_IMAGE).pixels
    if channels == 1:
        natural = natural.mean(dim=1, keepdim=True)
    elif channels == 4:
        natural = torch.cat([natural, torch.ones_like(natural[:, :1])], dim=1)
    if size is not None:
        natural = F.interpolate(natural, size=size, mode="bilinear", align_corners=False)
    return [random_image, natural]


def export_onnx(
    source: str | os.PathLike | ParagonSR,
    output: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    overwrite: bool = False,
    tick: Callable[[int, int], None] | None = None,
) -> Verification:
    """Export a ParagonSR checkpoint (or model) to ONNX and verify it; see the module docstring.
    Raises :class:`ExportError` and leaves no file when anything fails. ``tick(done, total)`` is
    called after each of the EXPORT_STEPS steps (load, trace, check, run, shapes)."""
    step = Progress(tick, total=EXPORT_STEPS).step
    if isinstance(source, torch.nn.Module) and not isinstance(source, ParagonSR):
        raise ExportError(not_a_plain_network(source, "export_onnx"))
    options = options or ExportOptions()
    options.validate()
    onnx, onnxruntime = _require_onnx()
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"{output}: name the output *.onnx")
    if output.is_dir():
        raise ExportError(f"{output}: is a folder; name the .onnx file to write")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists. Pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise ExportError(f"{output}: the output folder does not exist. Create it first")
    if not os.access(output.parent, os.W_OK):
        raise ExportError(f"{output}: the output folder is not writable")

    source_path = None if isinstance(source, ParagonSR) else Path(source)
    model = source if isinstance(source, ParagonSR) else load_model(source)
    step()
    config = model.config
    dtype = torch.float16 if options.fp16 else torch.float32
    mish_op = options.mish_op and options.opset >= 18
    numerics = Numerics(graph=True, mish_operator=mish_op, ffn_group=options.ffn_group)
    net = optimize_for_inference(model.float().cpu(), channels_last=False, numerics=numerics)
    exportable = ExportedIO(net.to(dtype), io_fp32=options.keep_io_fp32).eval()
    io_dtype = torch.float32 if options.keep_io_fp32 or not options.fp16 else torch.float16

    height, width = options.static or (64, 64)
    example = torch.rand(
        1, config.in_chans, height, width, generator=torch.Generator().manual_seed(0)
    ).to(io_dtype)
    dynamic: dict[int, str] = {}
    if options.dynamic_batch:
        dynamic[0] = "batch"
    if options.static is None:
        dynamic.update({2: "height", 3: "width"})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _mish_operator(mish_op, options.opset):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            exportable,
            (example,),
            buffer,
            dynamo=False,
            opset_version=options.opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": dynamic, "output": dynamic} if dynamic else None,
            do_constant_folding=True,
        )
    step()
    graph = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "architecture": "ParagonSR",
        "variant": variant_name(config) or "custom",
        "scale": str(config.scale),
        "in_channels": str(config.in_chans),
        "out_channels": str(config.out_chans),
        "source_form": model.form,
        "source_sha256": _source_hash(source_path),
        "precision": "fp16" if options.fp16 else "fp32",
        "io_precision": str(io_dtype).split(".")[-1],
        "exporter": f"paragonsr {_version()}, torch {torch.__version__}",
    }
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    data = graph.SerializeToString()

    with atomic_write(output) as temporary:
        temporary.write_bytes(data)
        report = _verify(
            onnx, onnxruntime, temporary, graph, model, config, options, io_dtype, step
        )
    report.path = str(output)
    report.mish = (
        "the Mish operator"
        if mish_op
        else "x*Softsign(e^x(e^x/2+1)), in Exp/BatchNormalization/Softsign"
    )
    return report


EXPORT_STEPS = 5


def _version() -> str:
    from . import __version__

    return __version__


def _verify(onnx, onnxruntime, path: Path, graph, model, config, options, io_dtype, step):
    """Run the file in onnxruntime against the source model's own float32 forward."""
    try:
        onnx.checker.check_model(graph, full_check=True)
        checker = "passed"
    except Exception as error:
        raise ExportError(f"onnx.checker rejected the export: {error}") from None
    if graph.ir_version > 9:
        raise ExportError(f"the export has IR version {graph.ir_version}; chaiNNer opens <= 9")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    rounding = [0.0]
    model_non_finite = [0]

    def compare(image: torch.Tensor) -> tuple[float, int]:
        with torch.no_grad():
            expected = model(image).clamp(0, 1)
            # How far two float32 torch paths of the same weights (plain and optimized) fall
            # apart on this image: no runtime can be held closer than that.
            optimized = optimize_for_inference(model)(image).clamp(0, 1)
        model_non_finite[0] += int((~torch.isfinite(expected)).sum())
        rounding[0] = max(rounding[0], (optimized - expected).abs().max().item())
        actual = torch.from_numpy(session.run(None, {"input": image.to(io_dtype).numpy()})[0])
        actual = actual.float()
        non_finite = int((~torch.isfinite(actual)).sum())
        finite = torch.isfinite(actual) & torch.isfinite(expected)
        # Compared as users see the result: clamped to [0, 1].
        actual, expected = actual[finite].clamp(0, 1), expected[finite]
        error = (actual - expected).abs().max().item() if finite.any() else 0.0
        return error, non_finite

    random_image, natural = check_images(config.in_chans, options.static)
    step()
    random_error, random_bad = compare(random_image)
    natural_error, natural_bad = compare(natural)
    step()
    # 1e-4, unless the model's own float32 rounding (activations in the thousands) is larger.
    tolerance = max(FP32_TOLERANCE, 2 * rounding[0])
    if not options.fp16 and max(random_error, natural_error) > tolerance:
        raise ExportError(
            f"onnxruntime differs from torch by {max(random_error, natural_error):.3g} "
            f"(limit {tolerance:.3g}); nothing was written"
        )
    if model_non_finite[0]:
        raise ExportError(
            f"the model itself outputs NaN or inf ({model_non_finite[0]} values on the check "
            "images): its weights hold NaN/inf or its activations overflow, so any export "
            "would be garbage. Check the checkpoint (paragonsr info warns of such weights); "
            "nothing was written"
        )
    if not options.fp16 and (random_bad or natural_bad):
        raise ExportError(
            f"onnxruntime outputs NaN or inf ({random_bad + natural_bad} values) where torch "
            "does not; nothing was written"
        )
    if options.fp16 and natural_bad:
        raise ExportError(
            f"the fp16 graph overflows on a natural image ({natural_bad} non-finite output "
            "values); export in fp32 instead. Nothing was written"
        )
    if options.fp16 and not math.isfinite(natural_error):
        raise ExportError("the fp16 graph produced unusable output; nothing was written")
    shapes = _strict_shapes(onnx, graph, config, options)
    step()
    return Verification(
        path=str(path),
        ir_version=graph.ir_version,
        opset=max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        checker=checker,
        max_abs_random=random_error,
        max_abs_natural=natural_error,
        non_finite_random=random_bad,
        non_finite_natural=natural_bad,
        dtype="fp16" if options.fp16 else "fp32",
        inferred_shapes=shapes,
        torch_rounding=rounding[0],
    )


def _strict_shapes(onnx, graph, config, options) -> dict[str, list[int | str]]:
    """Output shapes from onnx.shape_inference in strict mode with the input fixed, as chaiNNer
    does to find a model's scale."""
    sizes = [options.static] if options.static else [(16, 16), (64, 64)]
    shapes = {}
    for height, width in sizes:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(graph)
        dims = fixed.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_value = 1
        dims[2].dim_value, dims[3].dim_value = height, width
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True)
        except Exception as error:
            raise ExportError(
                f"strict shape inference failed at {height}x{width}: {error}"
            ) from None
        out_dims = inferred.graph.output[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in out_dims]
        expected = [1, config.out_chans, height * config.scale, width * config.scale]
        if shape != expected:
            raise ExportError(
                f"strict shape inference at {height}x{width} gives {shape}, not {expected}: "
                "chaiNNer could not read the scale"
            )
        shapes[f"{height}x{width}"] = shape
    return shapes
