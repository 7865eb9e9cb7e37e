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

import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from .inference import OptimizedParagonSR

FP32_TAG = struct.pack("<I", 0)
FP16_TAG = struct.pack("<I", 0x01306B47)
SAME = -233

# The layers (and their parameter ids) this exporter may write: each is in ncnn 2022, has a
# Vulkan kernel there, and chaiNNer's parser knows it. A test holds the files to this list.
ALLOWED_PARAMS = {
    "Input": set(),
    "Convolution": {0, 1, 4, 5, 6, 9},
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
        (output,) = self.layer(kind, [blob], params=params, stem=stem)
        self.tagged(weight)
        self.raw(bias)
        return output

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

    def group_norm(self, blob: str, channels: int, eps: float, stem: str) -> str:
        """GroupNorm(1) without affine (see the module docstring for the layer choice)."""
        x0, x1 = self.split(blob, 2, stem + "_in")
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
    path runs."""
    config = net.config
    features = config.num_feat
    graph = NcnnGraph(fp16=fp16)
    (data,) = graph.layer("Input", [], outputs=["data"], stem="data")
    shallow = graph.conv(data, net.conv_in_weight, net.conv_in_bias, stem="conv_in")
    current, shallow_skip = graph.split(shallow, 2, "shallow")
    for g, group in enumerate(net.groups):
        current, group_skip = graph.split(current, 2, f"group{g}")
        for b, block in enumerate(group):
            stem = f"g{g}b{b}"
            current = _block(graph, block, current, features, stem)
        (current,) = graph.layer(
            "BinaryOp", [current, group_skip], params={0: BINARY_ADD}, stem=f"group{g}_out"
        )
    deep = graph.conv(current, net.conv_fuse_weight, net.conv_fuse_bias, stem="conv_fuse")
    (body,) = graph.layer("BinaryOp", [deep, shallow_skip], params={0: BINARY_ADD}, stem="body")
    upsampled = graph.conv(body, net.up_weight, net.up_bias, stem="upsample")
    (shuffled,) = graph.layer("PixelShuffle", [upsampled], params={0: net.scale}, stem="shuffle")
    (output,) = _named_output(graph, shuffled, net)
    return graph


def _named_output(graph: NcnnGraph, blob: str, net: OptimizedParagonSR) -> list[str]:
    out_channels = net.out_weight.shape[0]
    (output,) = graph.layer(
        "Convolution",
        [blob],
        outputs=["output"],
        params={0: out_channels, 1: 3, 4: SAME, 5: 1, 6: net.out_weight.numel()},
        stem="conv_out",
    )
    graph.tagged(net.out_weight)
    graph.raw(net.out_bias)
    return [output]


def _block(graph: NcnnGraph, block, x: str, features: int, stem: str) -> str:
    residual, to_norm = graph.split(x, 2, stem + "_x")
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
    residual, to_norm = graph.split(mixed, 2, stem + "_m")
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
    (output,) = graph.layer("BinaryOp", [residual, delta], params={0: BINARY_ADD}, stem=stem + "_y")
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
