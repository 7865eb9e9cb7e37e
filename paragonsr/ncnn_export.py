"""NCNN export: a ``.param`` / ``.bin`` pair for Upscayl, realesrgan-ncnn-vulkan and chaiNNer.

Written by hand from the optimized network's folded weights (:mod:`paragonsr.inference`), not
traced, with only layers and parameters that ncnn from 2022 (what Upscayl and
realesrgan-ncnn-vulkan ship), current ncnn and chaiNNer's own .param parser all accept:

- GroupNorm(1) has no Vulkan kernel in ncnn 2022 and chaiNNer cannot read its weights, so it is
  spelled out: per-channel means by global average Pooling, their mean by an InnerProduct, the
  centring as an ADD of the negated mean (chaiNNer's optimizer breaks on a SUB feeding a Split),
  the variance the same way over the squares with eps as the InnerProduct's bias, RSQRT, MUL.
  Scalars are 1-D ``[1]`` blobs: ncnn 2022 broadcasts a 3-D ``[1,1,1]`` blob wrongly, silently.
- The norm's affine is a BatchNorm (mean 0, var 1): chaiNNer reads its raw arrays, and it is not
  a convolution, which chaiNNer's channel-count inference would otherwise count.
- Band convolutions use SAME padding (``4=-233``): chaiNNer rewrites the file before running it
  and drops ``14=0`` when ``pad_left`` is set, which would pad a 1xk kernel vertically.
- Mish is fused into the spatial mixer (``9=5``), as chaiNNer's optimizer would do anyway.
- Blobs are named ``data`` and ``output``: Upscayl's and realesrgan-ncnn-vulkan's binaries hard-code
  them; chaiNNer takes the first layer's input and the last layer's output, whatever the names.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .errors import ExportError
from .files import atomic_write
from .inference import OptimizedParagonSR, optimize_for_inference
from .network import ParagonSR, not_a_plain_network
from .onnx_export import FP32_TOLERANCE, check_images
from .tiles import Progress

FP32_TAG = struct.pack("<I", 0)
FP16_TAG = struct.pack("<I", 0x01306B47)
SAME = -233

# The layers (and their parameter ids) this exporter may write: each is in ncnn 2022, has a
# Vulkan kernel there, and chaiNNer's parser knows it. A test holds the files to this list.
ALLOWED_PARAMS = {
    "Input": set(),
    "Convolution": {0, 1, 11, 4, 5, 6, 9},
    "ConvolutionDepthWise": {0, 1, 11, 4, 5, 6, 7, 9},
    "Pooling": {0, 4},
    "InnerProduct": {0, 1, 2},
    "BinaryOp": {0},
    "UnaryOp": {0},
    "BatchNorm": {0},
    "Split": set(),
    "Slice": {-23300, 1},
    "Concat": {0},
    "PixelShuffle": {0},
    "Crop": {-23309, -23310, -23311},
}
UNARY_SQUARE, UNARY_RSQRT = 4, 6
BINARY_ADD, BINARY_MUL = 0, 2
ACTIVATION_MISH = 5


@dataclass
class NcnnGraph:
    """Layers in topological order and the weight bytes they load, in the same order."""

    fp16: bool = False
    lines: list[str] = field(default_factory=list)
    blobs: set[str] = field(default_factory=set)
    weights: list[bytes] = field(default_factory=list)
    _names: dict[str, int] = field(default_factory=dict)

    def name(self, stem: str) -> str:
        count = self._names.get(stem, 0)
        self._names[stem] = count + 1
        return stem if count == 0 else f"{stem}_{count}"

    def layer(
        self,
        kind: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        params: dict[int, object] | None = None,
        stem: str | None = None,
    ) -> list[str]:
        layer_name = self.name(stem or kind.lower())
        names = (
            outputs
            if isinstance(outputs, list)
            else ([layer_name] if outputs == 1 else [f"{layer_name}_{i}" for i in range(outputs)])
        )
        text = " ".join(f"{key}={_value(value)}" for key, value in (params or {}).items())
        self.lines.append(
            f"{kind:<20} {layer_name:<24} {len(inputs)} {len(names)} {' '.join(inputs)} "
            f"{' '.join(names)}" + (f" {text}" if text else "")
        )
        self.blobs.update(inputs)
        self.blobs.update(names)
        return names

    def tagged(self, values: torch.Tensor) -> None:
        """A weight ncnn loads with a type tag: fp16 on request where chaiNNer reads it back
        right (an even count: it ignores ncnn's 4-byte padding of odd fp16 arrays), else fp32."""
        array = values.detach().double().flatten().numpy()
        if self.fp16 and array.size % 2 == 0:
            self.weights.append(FP16_TAG + array.astype("<f2").tobytes())
        else:
            self.weights.append(FP32_TAG + array.astype("<f4").tobytes())

    def raw(self, values: torch.Tensor) -> None:
        self.weights.append(values.detach().double().flatten().numpy().astype("<f4").tobytes())

    def param_text(self) -> str:
        return "7767517\n" + f"{len(self.lines)} {len(self.blobs)}\n" + "\n".join(self.lines) + "\n"

    def bin_bytes(self) -> bytes:
        return b"".join(self.weights)

    # -- layers with weights -----------------------------------------------------------------

    def conv(
        self,
        blob: str,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *,
        depthwise: bool = False,
        activation: int = 0,
        stem: str = "conv",
        output: str | None = None,
    ) -> str:
        out_channels, _, kernel_h, kernel_w = weight.shape
        params: dict[int, object] = {0: out_channels, 1: kernel_w}
        if kernel_h != kernel_w:
            params[11] = kernel_h
        # Odd kernels at stride 1: SAME is PyTorch's k//2 on each axis (1xk: none vertically).
        if kernel_h > 1 or kernel_w > 1:
            params[4] = SAME
        params[5] = 1
        params[6] = weight.numel()
        if depthwise:
            params[7] = out_channels
        if activation:
            params[9] = activation
        kind = "ConvolutionDepthWise" if depthwise else "Convolution"
        (result,) = self.layer(
            kind, [blob], outputs=[output] if output else 1, params=params, stem=stem
        )
        self.tagged(weight)
        self.raw(bias)
        return result

    def batch_norm(self, blob: str, weight: torch.Tensor, bias: torch.Tensor, stem: str) -> str:
        channels = weight.numel()
        (output,) = self.layer("BatchNorm", [blob], params={0: channels}, stem=stem)
        # slope, mean, variance, bias; eps stays 0: x * weight + bias exactly.
        for values in (weight, torch.zeros(channels), torch.ones(channels), bias):
            self.raw(values)
        return output

    def mean_of_channels(self, blob: str, channels: int, sign: float, bias: float, stem: str):
        """``sign * mean`` over channels of a per-channel ``[C]`` blob (+ ``bias``): ``[1]``."""
        params = {0: 1, 1: 1, 2: channels}
        (output,) = self.layer("InnerProduct", [blob], params=params, stem=stem)
        self.tagged(torch.full((channels,), sign / channels, dtype=torch.float64))
        self.raw(torch.tensor([bias], dtype=torch.float64))
        return output

    def group_norm(self, inputs: list[str], channels: int, eps: float, stem: str) -> str:
        """GroupNorm(1) without affine (see the module docstring for the layer choice) of a blob
        given as two consumers: one for the statistics, one to normalize."""
        x0, x1 = inputs
        (channel_means,) = self.layer("Pooling", [x0], params={0: 1, 4: 1}, stem=stem + "_mean")
        negated_mean = self.mean_of_channels(channel_means, channels, -1.0, 0.0, stem + "_negmean")
        (centred,) = self.layer(
            "BinaryOp", [x1, negated_mean], params={0: BINARY_ADD}, stem=stem + "_centre"
        )
        c0, c1 = self.split(centred, 2, stem + "_centred")
        (squares,) = self.layer("UnaryOp", [c0], params={0: UNARY_SQUARE}, stem=stem + "_square")
        (channel_var,) = self.layer("Pooling", [squares], params={0: 1, 4: 1}, stem=stem + "_var")
        variance = self.mean_of_channels(channel_var, channels, 1.0, eps, stem + "_vareps")
        (scale,) = self.layer("UnaryOp", [variance], params={0: UNARY_RSQRT}, stem=stem + "_rstd")
        (normed,) = self.layer("BinaryOp", [c1, scale], params={0: BINARY_MUL}, stem=stem)
        return normed

    def split(self, blob: str, count: int, stem: str) -> list[str]:
        return self.layer("Split", [blob], outputs=count, stem=stem + "_split")


def _value(value: object) -> str:
    if isinstance(value, float):
        # ncnn reads a value as float only if its text has "." or "e" (ints and floats share
        # a slot); chaiNNer only knows a lowercase "e".
        return np.format_float_scientific(value, precision=8, unique=False, exp_digits=2)
    if isinstance(value, (list, tuple)):
        return ",".join([str(len(value)), *(_value(v) for v in value)])
    return str(value)


def ncnn_graph(net: OptimizedParagonSR, fp16: bool = False) -> NcnnGraph:
    """The optimized network as NCNN layers, from the same folded weights every other inference
    path runs.

    Every blob with several consumers goes through one Split with one output per consumer: a
    Split feeding a Split trips chaiNNer's optimizer, which reads parameter 0 of the layer before
    a Split whose output meets a two-input BinaryOp, and Split has none.
    """
    features = net.config.num_feat
    graph = NcnnGraph(fp16=fp16)
    (data,) = graph.layer("Input", [], outputs=["data"], stem="data")
    shallow = graph.conv(data, net.conv_in_weight, net.conv_in_bias, stem="conv_in")
    # The shallow features: the long skip, the first group's skip, and the first block's input.
    shallow_skip, group_skip, *block_input = graph.split(shallow, 5, "shallow")
    for g, group in enumerate(net.groups):
        for b, block in enumerate(group):
            last_in_group = b == len(group) - 1
            output = _block(graph, block, block_input, features, f"g{g}b{b}")
            if last_in_group:
                (output,) = graph.layer(
                    "BinaryOp", [output, group_skip], params={0: BINARY_ADD}, stem=f"group{g}"
                )
                last_group = g == len(net.groups) - 1
                if last_group:
                    body_output = output
                    break
                group_skip, *block_input = graph.split(output, 4, f"group{g}")
            else:
                block_input = graph.split(output, 3, f"g{g}b{b}")
    deep = graph.conv(body_output, net.conv_fuse_weight, net.conv_fuse_bias, stem="conv_fuse")
    (body,) = graph.layer("BinaryOp", [deep, shallow_skip], params={0: BINARY_ADD}, stem="body")
    _tail(graph, body, net)
    return graph


def polyphase_kernel(out_weight: torch.Tensor, scale: int) -> torch.Tensor:
    """conv_out (3x3 at high resolution, after PixelShuffle) as a 3x3 low-resolution kernel from
    the upsampler's features*s^2 channels to out*s^2 phase channels (PixelShuffle's order). With
    zero padding at low resolution it equals conv_out exactly, borders included: the padding row
    a high-resolution border pixel reads lies in the low-resolution padding row."""
    out_channels, features = out_weight.shape[:2]
    kernel = torch.zeros(
        out_channels, scale, scale, features, scale, scale, 3, 3, dtype=torch.float64
    )
    for a in range(scale):
        for b in range(scale):
            for dy in (-1, 0, 1):
                row, a2 = divmod(a + dy, scale)
                for dx in (-1, 0, 1):
                    column, b2 = divmod(b + dx, scale)
                    kernel[:, a, b, :, a2, b2, row + 1, column + 1] += out_weight[
                        :, :, dy + 1, dx + 1
                    ].double()
    return kernel.reshape(out_channels * scale**2, features * scale**2, 3, 3)


@dataclass(frozen=True)
class BorderTerms:
    """What the collapsed 5x5 tail gets wrong, per border, as convolutions of the tail input's
    outermost row or column. The collapsed kernel is conv_out's polyphase kernel applied to the
    upsampler's output *extended* one pixel beyond the image (bias plus a partial convolution
    there), where the real network has zero padding: the difference is the polyphase kernel over
    that one-pixel ring. A ring row reads only the image's outermost row, so the top and bottom
    terms are one 1x5 convolution plus a constant (the ring row has all its pixels, corners
    included); the left and right terms take the ring column without its corners (counted in the
    rows) as two 3x1 convolutions, so that the ring ends where the image does."""

    top: tuple[torch.Tensor, torch.Tensor]
    bottom: tuple[torch.Tensor, torch.Tensor]
    left: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    right: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def border_terms(net: OptimizedParagonSR) -> BorderTerms:
    polyphase = polyphase_kernel(net.out_weight, net.scale)
    up_weight, up_bias = net.up_weight.double(), net.up_bias.double()

    def ring_row(polyphase_row: int, up_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = torch.zeros(polyphase.shape[0], up_weight.shape[1], 1, 5, dtype=torch.float64)
        for dx in range(3):
            for dx_up in range(3):
                kernel[:, :, 0, dx + dx_up] += (
                    polyphase[:, :, polyphase_row, dx] @ up_weight[:, :, up_row, dx_up]
                )
        bias = sum(polyphase[:, :, polyphase_row, dx] @ up_bias for dx in range(3))
        return kernel, bias

    def ring_column(polyphase_column: int, up_column: int):
        return (
            up_weight[:, :, :, up_column : up_column + 1],
            up_bias,
            polyphase[:, :, :, polyphase_column : polyphase_column + 1],
        )

    return BorderTerms(ring_row(0, 2), ring_row(2, 0), ring_column(0, 2), ring_column(2, 0))


def _crop(graph: NcnnGraph, blob: str, axis: int, start: int, end: int, stem: str) -> str:
    """Rows (axis 1) or columns (axis 2) [start, end) of a [C, H, W] blob; negative counts from
    the end and SAME (-233) means the end, as in ncnn's numpy-style Crop (there since 2021)."""
    params = {-23309: [start], -23310: [end], -23311: [axis]}
    (cropped,) = graph.layer("Crop", [blob], params=params, stem=stem)
    return cropped


def _tail(graph: NcnnGraph, body: str, net: OptimizedParagonSR) -> None:
    """Upsampler and conv_out, exact: the collapsed 5x5 kernel torch runs, with its outermost
    output pixels corrected by :class:`BorderTerms`, then one PixelShuffle.

    Written this way, not as convolution, PixelShuffle, convolution: chaiNNer derives a model's
    output channels from the last convolution divided by the PixelShuffle factors squared (0 for
    ParagonSR's own order), and the collapsed kernel is a quarter of the work. Needs inputs of
    at least 3x3 pixels (every host tiles far larger)."""
    terms = border_terms(net)
    channels = net.tail_weight.shape[0]
    to_main, to_top, to_bottom, to_left, to_right = graph.split(body, 5, "tail_in")
    main = graph.conv(to_main, net.tail_weight, net.tail_bias, stem="tail")
    # Each correction is computed negated, so that it is added (see group_norm on SUB).
    corrections = {}
    for side, axis, (start, end) in (("top", 1, (0, 1)), ("bottom", 1, (-1, SAME))):
        kernel, bias = getattr(terms, side)
        edge = _crop(graph, to_top if side == "top" else to_bottom, axis, start, end, side)
        corrections[side] = graph.conv(edge, -kernel, -bias, stem=f"tail_{side}")
    for side, (start, end) in (("left", (0, 1)), ("right", (-1, SAME))):
        up_weight, up_bias, polyphase = getattr(terms, side)
        edge = _crop(graph, to_left if side == "left" else to_right, 2, start, end, side)
        ring = graph.conv(edge, up_weight, up_bias, stem=f"tail_{side}_ring")
        zero = torch.zeros(channels, dtype=torch.float64)
        corrections[side] = graph.conv(ring, -polyphase, zero, stem=f"tail_{side}")
    columns = _add_to_edges(graph, main, 2, corrections["left"], corrections["right"], "columns")
    fixed = _add_to_edges(graph, columns, 1, corrections["top"], corrections["bottom"], "rows")
    # A factor of 1 is a no-op that keeps one layout for every scale.
    graph.layer("PixelShuffle", [fixed], outputs=["output"], params={0: net.scale}, stem="shuffle")


def _add_to_edges(graph: NcnnGraph, blob: str, axis: int, first: str, last: str, stem: str) -> str:
    """``blob`` with ``first`` added to its first row (axis 1) or column (axis 2) and ``last``
    to its last, the rest unchanged: cut into three, added, concatenated back."""
    head, middle, tail = graph.split(blob, 3, f"tail_{stem}")
    head = _crop(graph, head, axis, 0, 1, f"tail_first_{stem}")
    middle = _crop(graph, middle, axis, 1, -1, f"tail_middle_{stem}")
    tail = _crop(graph, tail, axis, -1, SAME, f"tail_last_{stem}")
    add = {0: BINARY_ADD}
    (head,) = graph.layer("BinaryOp", [head, first], params=add, stem=f"tail_first_{stem}_fixed")
    (tail,) = graph.layer("BinaryOp", [tail, last], params=add, stem=f"tail_last_{stem}_fixed")
    (joined,) = graph.layer(
        "Concat", [head, middle, tail], params={0: axis}, stem=f"tail_{stem}_fixed"
    )
    return joined


def _block(graph: NcnnGraph, block, inputs: list[str], features: int, stem: str) -> str:
    """One block from its input's three consumers: the residual, and the norm's statistics and
    centring (one three-way Split made by the caller)."""
    residual, to_norm = inputs[0], inputs[1:]
    normed = graph.group_norm(to_norm, features, block.eps1, stem + "_norm1")
    normed = graph.batch_norm(normed, block.norm1_weight, block.norm1_bias, stem + "_affine1")
    sizes = list(block.split_sizes)
    parts = graph.layer(
        "Slice",
        [normed],
        outputs=len(sizes),
        params={-23300: [*sizes[:-1], SAME], 1: 0},
        stem=stem + "_branches",
    )
    convolved = [
        graph.conv(
            part,
            getattr(block, f"context{index}_weight"),
            getattr(block, f"context{index}_bias"),
            depthwise=True,
            stem=f"{stem}_context{index}",
        )
        for index, part in enumerate(parts[1:])
    ]
    (context,) = graph.layer(
        "Concat", [parts[0], *convolved], params={0: 0}, stem=stem + "_context"
    )
    (mixed,) = graph.layer(
        "BinaryOp", [residual, context], params={0: BINARY_ADD}, stem=stem + "_mixed"
    )
    residual, *to_norm = graph.split(mixed, 3, stem + "_mixed")
    normed = graph.group_norm(to_norm, features, block.eps2, stem + "_norm2")
    to_gate, to_value = graph.split(normed, 2, stem + "_normed2")
    hidden = block.hidden
    gate = graph.conv(
        to_gate,
        block.project_in_weight[:hidden],
        block.project_in_bias[:hidden],
        stem=stem + "_gate",
    )
    gate = graph.conv(
        gate,
        block.mixer_weight,
        block.mixer_bias,
        depthwise=True,
        activation=ACTIVATION_MISH,
        stem=stem + "_mixer",
    )
    value = graph.conv(
        to_value,
        block.project_in_weight[hidden:],
        block.project_in_bias[hidden:],
        stem=stem + "_value",
    )
    (gated,) = graph.layer("BinaryOp", [gate, value], params={0: BINARY_MUL}, stem=stem + "_gated")
    delta = graph.conv(gated, block.project_out_weight, block.project_out_bias, stem=stem + "_out")
    (output,) = graph.layer("BinaryOp", [residual, delta], params={0: BINARY_ADD}, stem=stem)
    return output


def run_with_ncnn(param_text: str, weights: bytes, image: torch.Tensor, threads: int = 1):
    """Run an exported pair in the ``ncnn`` package on the CPU, in full fp32 (no fp16 storage or
    arithmetic): [1, C, H, W] in [0, 1] to [1, C', H*s, W*s]. Through files, because the older
    wheels cannot load a model from memory."""
    import tempfile
    from pathlib import Path

    import ncnn

    with tempfile.TemporaryDirectory(prefix="paragonsr-ncnn-") as folder:
        param_path, bin_path = Path(folder) / "model.param", Path(folder) / "model.bin"
        param_path.write_text(param_text)
        bin_path.write_bytes(weights)
        net = ncnn.Net()
        options = net.opt
        options.use_vulkan_compute = False
        options.num_threads = threads
        options.use_fp16_packed = options.use_fp16_storage = options.use_fp16_arithmetic = False
        if net.load_param(str(param_path)) != 0 or net.load_model(str(bin_path)) != 0:
            raise RuntimeError("ncnn could not load the exported pair")
        extractor = net.create_extractor()
        pixels = np.ascontiguousarray(image[0].detach().float().cpu().numpy())
        extractor.input("data", ncnn.Mat(pixels))
        status, result = extractor.extract("output")
        if status != 0:
            raise RuntimeError(f"ncnn failed to run the exported pair (status {status})")
        return torch.from_numpy(np.array(result).copy())[None]


# Upscayl's binary reads the scale from the model's name: the first of these substrings present
# wins (so "x1" in "x16" reads as 1), and a name with none of them means x4.
UPSCAYL_SCALE_MARKERS = (
    (1, ("x1", "1x")),
    (2, ("x2", "2x")),
    (3, ("x3", "3x")),
    (4, ("x4", "4x")),
    (8, ("x8", "8x")),
    (16, ("x16", "16x")),
)
UPSCAYL_DEFAULT_SCALE = 4
FP16_TOLERANCE = 5e-3
EXPORT_STEPS = 4  # load, build, write, verify


def upscayl_scale(name: str) -> int:
    """The scale Upscayl's binary would read from a model file's name (without its suffix)."""
    for scale, markers in UPSCAYL_SCALE_MARKERS:
        if any(marker in name for marker in markers):
            return scale
    return UPSCAYL_DEFAULT_SCALE


def name_for_upscayl(stem: str, scale: int) -> str:
    """``stem`` with every scale-like substring removed and ``{scale}x-`` in front: a name
    Upscayl reads as ``scale``."""
    cleaned = re.sub(r"(?i)x\d+|\d+x", "", stem).strip("-_ .") or "ParagonSR"
    return f"{scale}x-{cleaned}"


@dataclass(frozen=True)
class HostView:
    """What chaiNNer's NCNN loader concludes about a pair from its .param alone (it never runs
    the model): walking the layers in order, each PixelShuffle multiplies the scale, each
    Deconvolution multiplies it by its stride, each Convolution divides it by its stride; the
    first convolution's weight count gives the input channels; the last convolution's outputs
    divided by the square of all PixelShuffle factors give the output channels."""

    scale: float
    in_channels: int
    out_channels: int


def host_view(param_text: str) -> HostView:
    scale, shuffle, in_channels, last_outputs = 1.0, 1, 0, 0
    for line in param_text.splitlines()[2:]:
        kind, _, inputs, outputs, *rest = line.split()
        params = dict(p.split("=") for p in rest[int(inputs) + int(outputs) :])
        if kind == "PixelShuffle":
            scale *= int(params.get("0", 1))
            shuffle *= int(params.get("0", 1))
        elif kind in ("Convolution", "ConvolutionDepthWise", "Deconvolution"):
            if not in_channels:
                kernel_w = int(params.get("1", 0))
                kernel_h = int(params.get("11", kernel_w))
                in_channels = int(params["6"]) // int(params["0"]) // kernel_w // kernel_h
            stride = int(params.get("3", 1))
            scale = scale * stride if kind == "Deconvolution" else scale / stride
            last_outputs = int(params["0"])
    return HostView(scale, in_channels, last_outputs // shuffle**2)


@dataclass
class NcnnReport:
    """What the NCNN export wrote and checked; ``lines()`` gives the printable report."""

    param: str
    weights: str
    precision: str
    layers: int
    scale: int
    max_abs_random: float | None
    max_abs_natural: float | None
    ncnn_version: str
    host_view: HostView

    def lines(self) -> list[str]:
        lines = [
            f"wrote {self.param} and {self.weights} ({self.precision} weights, {self.layers} "
            f"layers; blobs data -> output, RGB in [0, 1], x{self.scale})"
        ]
        if self.max_abs_random is None:
            lines.append("not verified: the ncnn package is missing (pip install ncnn)")
        else:
            lines.append(
                f"ncnn {self.ncnn_version} (CPU, fp32 arithmetic) vs torch, max abs diff of the "
                f"[0, 1] output: seeded random image {self.max_abs_random:.3g}, natural image "
                f"{self.max_abs_natural:.3g}"
            )
        view = self.host_view
        lines.append(
            "layers: ncnn 2022 set (Upscayl, realesrgan-ncnn-vulkan), no GroupNorm/MemoryData; "
            f"chaiNNer reads scale {view.scale:g}, channels {view.in_channels} -> "
            f"{view.out_channels}"
        )
        if self.precision == "fp16":
            lines.append(
                "fp16: chaiNNer switches on fp16 arithmetic for a model whose first convolution "
                "is fp16; GroupNorm's statistics then run in fp16 too, which can cost accuracy "
                "on some images - use the fp32 pair there"
            )
        return lines


def export_ncnn(
    source: str | os.PathLike | ParagonSR,
    output: str | os.PathLike,
    *,
    fp16: bool = False,
    overwrite: bool = False,
    tick: Callable[[int, int], None] | None = None,
) -> NcnnReport:
    """Export a ParagonSR checkpoint (or model) to an NCNN pair ``output`` (``.param``) plus the
    ``.bin`` beside it, then verify it in the ``ncnn`` package when that is installed. Raises
    :class:`ExportError` and leaves no file when anything fails."""
    step = Progress(tick, total=EXPORT_STEPS).step
    if isinstance(source, torch.nn.Module) and not isinstance(source, ParagonSR):
        raise ExportError(not_a_plain_network(source, "export_ncnn"))
    param_path = Path(output)
    if param_path.suffix.lower() != ".param":
        raise ExportError(f"{param_path}: name the output *.param (its .bin is written beside it)")
    bin_path = param_path.with_suffix(".bin")
    for path in (param_path, bin_path):
        if path.is_dir():
            raise ExportError(f"{path}: is a folder; name the .param file to write")
        if path.exists() and not overwrite:
            raise ExportError(f"{path}: already exists. Pass --overwrite to replace it")
    if not param_path.parent.is_dir():
        raise ExportError(f"{param_path}: the output folder does not exist. Create it first")
    if not os.access(param_path.parent, os.W_OK):
        raise ExportError(f"{param_path}: the output folder is not writable")

    model = source if isinstance(source, ParagonSR) else load_model(source)
    config = model.config
    if config.in_chans != 3 or config.out_chans != 3:
        raise ExportError(
            f"the model has {config.in_chans} input and {config.out_chans} output channels; NCNN "
            "hosts (Upscayl, realesrgan-ncnn-vulkan, chaiNNer) feed and read RGB: export ONNX "
            "for other channel counts"
        )
    read = upscayl_scale(param_path.stem)
    if read != config.scale:
        suggestion = name_for_upscayl(param_path.stem, config.scale) + ".param"
        raise ExportError(
            f"{param_path}: Upscayl would read this name as x{read} but the model is "
            f"x{config.scale}; name it {suggestion}"
        )
    step()
    net = optimize_for_inference(model.float().cpu(), channels_last=False)
    graph = ncnn_graph(net, fp16=fp16)
    text, weights = graph.param_text(), graph.bin_bytes()
    step()
    report = NcnnReport(
        param=str(param_path),
        weights=str(bin_path),
        precision="fp16" if fp16 else "fp32",
        layers=len(graph.lines),
        scale=config.scale,
        max_abs_random=None,
        max_abs_natural=None,
        ncnn_version="",
        host_view=host_view(text),
    )
    if report.host_view != HostView(config.scale, 3, 3):
        raise ExportError(f"chaiNNer would misread this pair ({report.host_view}); not written")
    # The .bin goes in last: a reader that finds the .param finds its weights.
    with atomic_write(param_path) as param_temporary, atomic_write(bin_path) as bin_temporary:
        param_temporary.write_text(text)
        bin_temporary.write_bytes(weights)
        step()
        _verify(model, text, weights, report, fp16)
        step()
    return report


def _verify(model: ParagonSR, text: str, weights: bytes, report: NcnnReport, fp16: bool) -> None:
    try:
        import ncnn
    except ImportError:
        return  # the report says so
    config = model.config
    errors = []
    for image in check_images(3):
        with torch.no_grad():
            expected = model.float()(image).clamp(0, 1)
        if not torch.isfinite(expected).all():
            raise ExportError(
                "the model itself outputs NaN or inf on the check images: its weights hold "
                "NaN/inf or its activations overflow. Nothing was written"
            )
        actual = run_with_ncnn(text, weights, image).clamp(0, 1)
        if actual.shape != expected.shape:
            raise ExportError(
                f"ncnn returned {tuple(actual.shape)} where torch gives "
                f"{tuple(expected.shape)}; nothing was written"
            )
        if not torch.isfinite(actual).all():
            raise ExportError("ncnn outputs NaN or inf where torch does not; nothing was written")
        errors.append((actual - expected).abs().max().item())
    limit = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    if max(errors) > limit:
        raise ExportError(
            f"ncnn differs from torch by {max(errors):.3g} (limit {limit:.3g}, x{config.scale}); "
            "nothing was written"
        )
    report.max_abs_random, report.max_abs_natural = errors
    report.ncnn_version = getattr(ncnn, "__version__", "?")
