"""chaiNNer's model loading and conversion, call for call, as its backend (v0.25) makes them.

Its Load Model node reads a file with spandrel's ModelLoader (which knows ParagonSR through this
pack's spandrel hook), switches requires_grad off on every parameter, and calls eval(), .to(device)
and float(). Its Convert To ONNX node then calls ``descriptor.eval().to(device)``, makes a random
3x3 input (plus the architecture's padding), ``descriptor.float()``, wraps the *descriptor* in a
module whose forward calls it, and exports that with the TorchScript exporter: opset 14-17
(default 14), names ``input``/``output`` (the NCNN node: ``data``/``output`` at opset 14), dynamic
batch, height and width, constant folding. It reads the scale back by strict shape inference.
chaiNNer pins torch 2.7, whose exporter is the TorchScript one by default; later torch needs
dynamo=False.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import spandrel
import torch

from helpers import ONNX_INSTALL, float64_reference, require

onnx = require("onnx", ONNX_INSTALL)
onnxruntime = require("onnxruntime", ONNX_INSTALL)

OPSETS = (14, 15, 16, 17)


def load_model(source) -> spandrel.ImageModelDescriptor:
    """chaiNNer's Load Model: a file path, or (for seeded models) a state dict."""
    loader = spandrel.ModelLoader("cpu")
    if isinstance(source, dict):
        descriptor = loader.load_from_state_dict(source)
    else:
        descriptor = loader.load_from_file(source)
    for _, parameter in descriptor.model.named_parameters():
        parameter.requires_grad = False
    descriptor.model.eval()
    descriptor = descriptor.to("cpu")
    descriptor.model.float()
    return descriptor


class DescriptorModule(torch.nn.Module):
    """chaiNNer's wrapper: a module whose forward is the descriptor's call."""

    def __init__(self, descriptor: spandrel.ImageModelDescriptor) -> None:
        super().__init__()
        self.model = descriptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def convert_to_onnx(
    descriptor: spandrel.ImageModelDescriptor, opset: int, input_name: str = "input"
) -> bytes:
    """The bytes chaiNNer's Convert To ONNX (or, with input_name="data", Convert To NCNN) makes,
    under torch.inference_mode() as chaiNNer runs its nodes."""
    names = {0: "batch_size", 2: "height", 3: "width"}
    with torch.inference_mode():
        descriptor.eval().to("cpu")
        size = 3 + descriptor.size_requirements.get_padding(3, 3)[0]
        dummy = torch.rand(1, descriptor.input_channels, size, size)
        descriptor.float()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                DescriptorModule(descriptor),
                (dummy.float(),),
                buffer,
                opset_version=opset,
                verbose=False,
                input_names=[input_name],
                output_names=["output"],
                dynamic_axes={input_name: names, "output": names},
                do_constant_folding=True,
                dynamo=False,
            )
    return buffer.getvalue()


def scale_by_shape_inference(data: bytes, input_name: str = "input") -> int:
    """The scale chaiNNer reads from a converted model: strict shape inference at a fixed size."""
    model = onnx.load_model_from_string(data)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, 16, 16
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    height = inferred.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    return height // 16


def verification_images(channels: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.rand(1, channels, height, width, generator=generator)
        for height, width in ((16, 16), (24, 20), (7, 33))
    ]


def largest_difference(
    data: bytes, descriptor: spandrel.ImageModelDescriptor, input_name: str = "input"
) -> tuple[float, float]:
    """Max |onnxruntime - torch| over seeded images of three sizes (height and width are dynamic;
    16 px is chaiNNer's own verification size): against the network that was exported (the
    plain ``descriptor.model``, clamped as the descriptor clamps), and against what the
    descriptor returns in chaiNNer's PyTorch node (the optimized network)."""
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst_plain = worst_served = 0.0
    for image in verification_images(descriptor.input_channels):
        with torch.inference_mode():
            plain = descriptor.model(image).clamp(0, 1).numpy()
            served = descriptor(image).numpy()
        actual = session.run(None, {input_name: image.numpy()})[0]
        worst_plain = max(worst_plain, float(np.abs(actual - plain).max()))
        worst_served = max(worst_served, float(np.abs(actual - served).max()))
    return worst_plain, worst_served


def chainner_verifies(data: bytes, descriptor: spandrel.ImageModelDescriptor) -> bool:
    """chaiNNer's own "Verify" option of Convert To ONNX: a random 16x16 image through the
    descriptor and through onnxruntime, compared with numpy's allclose at rtol 1e-2, atol 1e-3."""
    image = torch.rand(
        1, descriptor.input_channels, 16, 16, generator=torch.Generator().manual_seed(2)
    )
    with torch.inference_mode():
        expected = descriptor(image).numpy()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    actual = session.run(None, {name: image.numpy()})[0]
    return bool(np.allclose(actual, expected, rtol=0.01, atol=0.001))


def float32_rounding(model) -> float:
    """How far the float32 plain forward falls from float64 on chaiNNer's verification images,
    in the [0, 1] range the descriptor returns."""
    worst = 0.0
    for image in verification_images(model.config.in_chans):
        with torch.no_grad():
            actual = model(image).clamp(0, 1).double()
        expected = float64_reference(model, image).clamp(0, 1)
        worst = max(worst, (actual - expected).abs().max().item())
    return worst
