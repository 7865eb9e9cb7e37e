"""chaiNNer's Convert To ONNX and Convert To NCNN, with chaiNNer's exact calls (tests/chainner.py),
on ParagonSR checkpoints of both forms, at every opset chaiNNer offers."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime
import pytest
import spandrel
import torch
from chainner import (
    OPSETS,
    convert_to_onnx,
    largest_difference,
    load_model,
    scale_by_shape_inference,
    verification_images,
)

from helpers import REFERENCE, float64_reference, randomized_model, seeded_image
from paragonsr import config_for_variant, fuse_for_release


def assert_verified(plain: float, served: float, rounding: float = 0.0) -> None:
    """Within 1e-4 of the exported network (or, for seeded deep networks whose outputs reach
    the hundreds, 4x torch's own float32 rounding of it), and within chaiNNer's own
    verification tolerance (atol 1e-3) of what its PyTorch node returns (the optimized
    network)."""
    assert plain < max(1e-4, 4 * rounding), (plain, rounding)
    assert served < 1e-3


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


CHECKPOINTS = [
    "nano_x2.train.safetensors",
    "nano_x2.fused.safetensors",
    "tiny_x4.train.safetensors",
    "tiny_x4.fused.safetensors",
    "tiny_x4.params_ema.pth",
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_convert_to_onnx_on_the_reference_checkpoints(checkpoint: str, opset: int) -> None:
    descriptor = load_model(REFERENCE / checkpoint)
    data = convert_to_onnx(descriptor, opset)
    assert scale_by_shape_inference(data) == descriptor.scale
    assert_verified(*largest_difference(data, descriptor))


@pytest.mark.parametrize("form", ["training", "fused"])
def test_convert_to_ncnn_first_step(form: str) -> None:
    """The NCNN node converts to ONNX first: fp32, opset 14, input named "data"."""
    descriptor = load_model(
        REFERENCE / f"tiny_x4.{'train' if form == 'training' else 'fused'}.safetensors"
    )
    data = convert_to_onnx(descriptor, 14, input_name="data")
    assert scale_by_shape_inference(data, "data") == 4
    assert_verified(*largest_difference(data, descriptor, "data"))


# m, l and xl take minutes to export; bench/chainner_conversion.py runs every variant.
@pytest.mark.parametrize("fused", [False, True], ids=["training", "fused"])
@pytest.mark.parametrize(
    ("variant", "scale", "opset"), [("nano", 1, 17), ("tiny", 3, 16), ("xs", 2, 15), ("s", 4, 14)]
)
def test_convert_to_onnx_on_seeded_variants(variant, scale, opset, fused) -> None:
    model = randomized_model(config_for_variant(variant, scale))
    if fused:
        fuse_for_release(model)
    descriptor = load_model(model.state_dict())
    data = convert_to_onnx(descriptor, opset)
    assert scale_by_shape_inference(data) == scale
    assert_verified(*largest_difference(data, descriptor), float32_rounding(model))


@pytest.mark.parametrize("grad", ["inference_mode", "no_grad", "enabled"])
def test_exporting_the_module_itself_in_every_grad_mode(grad: str) -> None:
    """torch.onnx.export(descriptor.model): the plain network, training form, exports as it is
    (it used to swap in the optimized network under no_grad, which the exporter refused)."""
    descriptor = spandrel.ModelLoader().load_from_file(REFERENCE / "tiny_x4.train.safetensors")
    model = descriptor.model.eval()
    context = {
        "inference_mode": torch.inference_mode(),
        "no_grad": torch.no_grad(),
        "enabled": torch.enable_grad(),
    }[grad]
    buffer = io.BytesIO()
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, 8, 8),),
            buffer,
            opset_version=14,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {2: "h", 3: "w"}, "output": {2: "h", 3: "w"}},
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    image = seeded_image(3, 20, 28)
    with torch.no_grad():
        expected = model(image).numpy()
    actual = session.run(None, {"input": image.numpy()})[0]
    assert np.abs(actual - expected).max() < 1e-4
