"""chaiNNer's Convert To ONNX and Convert To NCNN, with chaiNNer's exact calls (tests/chainner.py),
on ParagonSR checkpoints of both forms, at every opset chaiNNer offers."""

from __future__ import annotations

import io
import subprocess
import warnings

import numpy as np
import pytest
import spandrel
import torch
from chainner import (
    OPSETS,
    convert_to_onnx,
    float32_rounding,
    largest_difference,
    load_model,
    scale_by_shape_inference,
)

from helpers import (
    ONNX_INSTALL,
    REFERENCE,
    chainner_python,
    randomized_model,
    require,
    seeded_image,
)
from paragonsr import config_for_variant, fuse_for_release

onnxruntime = require("onnxruntime", ONNX_INSTALL)


def assert_verified(plain: float, served: float, rounding: float = 0.0) -> None:
    # Stricter than chaiNNer's own "Verify" (tests/chainner.py: chainner_verifies).
    """Within 1e-4 of the exported network (or, for seeded deep networks whose outputs reach
    the hundreds, 4x torch's own float32 rounding of it), and within chaiNNer's own
    verification tolerance (atol 1e-3) of what its PyTorch node returns (the optimized
    network)."""
    assert plain < max(1e-4, 4 * rounding), (plain, rounding)
    assert served < 1e-3


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


@pytest.mark.parametrize("opset", [14, 17])
def test_chainners_pinned_runtime_runs_its_conversion(tmp_path, opset: int) -> None:
    """chaiNNer runs the converted file in its own onnxruntime 1.17.1 (with onnx 1.16.0)."""
    descriptor = load_model(REFERENCE / "tiny_x4.train.safetensors")
    path = tmp_path / "converted.onnx"
    path.write_bytes(convert_to_onnx(descriptor, opset))
    image = seeded_image(3, 20, 16)
    np.save(tmp_path / "input.npy", image.numpy())
    script = (
        "import numpy, onnxruntime\n"
        f"session = onnxruntime.InferenceSession({str(path)!r}, "
        "providers=['CPUExecutionProvider'])\n"
        f"output = session.run(None, {{'input': numpy.load({str(tmp_path / 'input.npy')!r})}})[0]\n"
        f"numpy.save({str(tmp_path / 'output.npy')!r}, output)\n"
    )
    subprocess.run([chainner_python(), "-c", script], check=True)
    with torch.inference_mode():
        expected = descriptor.model(image).clamp(0, 1).numpy()
    assert np.abs(np.load(tmp_path / "output.npy") - expected).max() < 1e-4
