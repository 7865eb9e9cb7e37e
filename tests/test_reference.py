"""Compatibility with checkpoints and outputs made by the original implementation."""

from __future__ import annotations

import pytest
import spandrel
import torch
from safetensors.torch import load_file

from helpers import MANIFEST, ONNX_INSTALL, REFERENCE, exact_streamed, randomized_model, require
from paragonsr import (
    export_onnx,
    fuse_for_release,
    inspect_checkpoint,
    load_descriptor,
    load_model,
    optimize_for_inference,
    save_checkpoint,
)
from paragonsr.config import ParagonSRConfig

TOLERANCE = 1e-4
FILES = [
    ("nano_x2", "train.safetensors", "training"),
    ("nano_x2", "fused.safetensors", "fused"),
    ("tiny_x4", "train.safetensors", "training"),
    ("tiny_x4", "fused.safetensors", "fused"),
    ("tiny_x4", "params_ema.pth", "training"),
]
IDS = [f"{case}.{suffix}" for case, suffix, _ in FILES]


def reference_io(case: str) -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / f"{case}.io.safetensors")


@pytest.mark.parametrize(("case", "suffix", "form"), FILES, ids=IDS)
def test_hyper_parameters_come_from_the_tensors(case: str, suffix: str, form: str) -> None:
    inspection = inspect_checkpoint(REFERENCE / f"{case}.{suffix}")
    expected = MANIFEST[case]
    config = inspection.config
    assert inspection.form == form
    assert (config.scale, config.in_chans, config.out_chans) == (
        expected["scale"],
        expected["in_chans"],
        expected["in_chans"],
    )
    assert (config.num_feat, config.num_groups, config.num_blocks) == (
        expected["num_feat"],
        expected["num_groups"],
        expected["num_blocks"],
    )
    assert config.ffn_expansion == expected["ffn_expansion"]
    assert (config.square_kernel_size, config.band_kernel_size, config.branch_ratio) == (
        3,
        11,
        0.125,
    )
    assert inspection.variant == case.split("_")[0]


@pytest.mark.parametrize(("case", "suffix", "form"), FILES, ids=IDS)
def test_spandrel_loads_without_hints_and_reproduces_expected(
    case: str, suffix: str, form: str
) -> None:
    io = reference_io(case)
    descriptor = spandrel.ModelLoader().load_from_file(REFERENCE / f"{case}.{suffix}")
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.architecture.id == "ParagonSR"
    assert descriptor.scale == MANIFEST[case]["scale"]
    assert descriptor.input_channels == descriptor.output_channels == 3
    assert form in descriptor.tags
    # The descriptor runs the inference-optimized network and clamps to [0, 1].
    output = descriptor(io["input"])
    assert output.shape == io["expected"].shape
    error = (output.double() - io["expected"].clamp(0, 1)).abs().max().item()
    assert error < TOLERANCE


@pytest.mark.parametrize(("case", "suffix", "form"), FILES, ids=IDS)
def test_every_path_matches_float64_ground_truth(
    case: str, suffix: str, form: str, tmp_path
) -> None:
    require("onnx", ONNX_INSTALL)
    onnxruntime = require("onnxruntime", ONNX_INSTALL)
    io = reference_io(case)
    image = io["input"]
    model = load_model(REFERENCE / f"{case}.{suffix}")
    assert model.form == form
    onnx_file = tmp_path / "model.onnx"
    export_onnx(model, onnx_file)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        optimized = optimize_for_inference(model)
        paths = {
            "plain": model(image),
            "optimized": optimized(image),
            "optimized NCHW": optimize_for_inference(model, channels_last=False)(image),
            "exact-streamed": exact_streamed(optimized, image, tile=24),
            "ONNX": torch.from_numpy(session.run(None, {"input": image.numpy()})[0]),
        }
    for path, output in paths.items():
        assert (output.double() - io["expected"]).abs().max().item() < TOLERANCE, path
    # forward is the plain network in every mode; the descriptor serves the optimized one.
    with torch.inference_mode():
        assert torch.equal(model(image), paths["plain"])
        descriptor = load_descriptor(REFERENCE / f"{case}.{suffix}")
        assert torch.equal(descriptor(image), paths["optimized"].clamp(0, 1))


@pytest.mark.parametrize("case", ["nano_x2", "tiny_x4"])
def test_release_fusion_matches_the_reference_fused_file(case: str, tmp_path) -> None:
    reference = load_file(REFERENCE / f"{case}.fused.safetensors")
    model = fuse_for_release(load_model(REFERENCE / f"{case}.train.safetensors"))
    written = save_checkpoint(model, tmp_path / "fused.safetensors")
    ours = load_file(written)
    assert list(sorted(ours)) == list(sorted(reference))
    for key, tensor in reference.items():
        assert ours[key].shape == tensor.shape, key
        assert ours[key].dtype == tensor.dtype, key
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=1e-6, msg=key)
    io = reference_io(case)
    with torch.no_grad():
        fused_output = model(io["input"])
    assert (fused_output - io["expected_fused"]).abs().max().item() < 1e-5


def test_descriptor_api_names_the_file_on_error(tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_descriptor(bad)


def test_load_descriptor_matches_spandrel() -> None:
    path = REFERENCE / "nano_x2.train.safetensors"
    ours = load_descriptor(path)
    theirs = spandrel.ModelLoader().load_from_file(path)
    image = reference_io("nano_x2")["input"]
    assert torch.equal(ours(image), theirs(image))
    assert ours.tags == theirs.tags == ["nano", "24nf", "3ng", "2nb", "1.5ffn", "training"]


def test_tags_read_well_joined_by_x() -> None:
    """chaiNNer shows a model's size as its tags joined by "x": no tag may hold an "x"."""
    config = ParagonSRConfig(
        scale=3,
        num_feat=40,
        num_groups=2,
        num_blocks=3,
        ffn_expansion=2.5,
        square_kernel_size=5,
        band_kernel_size=7,
        branch_ratio=0.25,
    )
    model = randomized_model(config, fused=True)
    tags = spandrel.ModelLoader().load_from_state_dict(model.state_dict()).tags
    assert "x".join(tags) == "40nfx2ngx3nbx2.5ffnx5ksx7bksx0.25brxfused"
    fused = load_descriptor(REFERENCE / "tiny_x4.fused.safetensors").tags
    assert "x".join(fused) == "tinyx32nfx3ngx2nbx2ffnxfused"
