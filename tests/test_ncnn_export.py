"""NCNN graph of the optimized network, run in the registry's ``ncnn`` package on the CPU."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from helpers import REFERENCE, float64_reference, randomized_model, require, seeded_image
from paragonsr import config_for_variant, load_model, optimize_for_inference
from paragonsr.ncnn_export import ALLOWED_PARAMS, ncnn_graph, run_with_ncnn

require("ncnn", "pip install 'paragonsr[ncnn]' (or: pip install ncnn)")


@pytest.mark.parametrize("name", ["nano_x2", "tiny_x4"])
@pytest.mark.parametrize("form", ["train", "fused"])
def test_reference_fixtures_within_1e4(name, form) -> None:
    model = load_model(REFERENCE / f"{name}.{form}.safetensors")
    io = load_file(REFERENCE / f"{name}.io.safetensors")
    graph = ncnn_graph(optimize_for_inference(model))
    output = run_with_ncnn(graph.param_text(), graph.bin_bytes(), io["input"])
    assert output.shape == io["expected"].shape
    assert (output.double() - io["expected"]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("variant", "scale"), [("nano", 1), ("nano", 2), ("tiny", 3), ("nano", 4), ("xs", 2)]
)
def test_variants_and_scales_at_sizes_never_seen(variant, scale) -> None:
    """One exported pair serves any input size (nothing is traced at a size)."""
    model = randomized_model(config_for_variant(variant, scale))
    graph = ncnn_graph(optimize_for_inference(model))
    for height, width in ((19, 33), (40, 27)):
        image = seeded_image(3, height, width, seed=height)
        output = run_with_ncnn(graph.param_text(), graph.bin_bytes(), image)
        expected = float64_reference(model, image)
        # Seeded random weights drive outputs far outside [0, 1]: compare relative to their size.
        tolerance = 1e-4 * max(1.0, expected.abs().max().item())
        assert (output.double() - expected).abs().max().item() < tolerance


def test_only_layers_and_parameters_every_host_accepts() -> None:
    """ncnn 2022 (Upscayl, realesrgan-ncnn-vulkan), current ncnn and chaiNNer's parser: the list
    in ALLOWED_PARAMS. Floats carry a "." and a lowercase "e"; blobs are data and output."""
    model = randomized_model(config_for_variant("tiny", 4))
    text = ncnn_graph(optimize_for_inference(model)).param_text()
    lines = text.splitlines()
    assert lines[0] == "7767517"
    layer_count, blob_count = map(int, lines[1].split())
    layers = [line.split() for line in lines[2:]]
    assert len(layers) == layer_count
    produced, consumed = [], []
    for kind, _name, n_in, n_out, *rest in layers:
        inputs, outputs = rest[: int(n_in)], rest[int(n_in) : int(n_in) + int(n_out)]
        params = rest[int(n_in) + int(n_out) :]
        assert kind in ALLOWED_PARAMS, kind
        for param in params:
            key, value = param.split("=")
            assert int(key) in ALLOWED_PARAMS[kind], (kind, key)
            assert not re.search(r"[.E]", value) or re.fullmatch(r"-?\d\.\d+e[+-]\d\d", value)
        consumed += inputs
        produced += outputs
    assert len(set(produced)) == len(produced) == blob_count
    assert len(set(consumed)) == len(consumed)  # one consumer per blob: fan-out goes via Split
    assert layers[0][:2] == ["Input", "data"] and produced[0] == "data"
    assert produced[-1] == "output" and "output" not in consumed
    assert not any(
        kind == "Convolution" and "14=" in " ".join(rest) for kind, _, _, _, *rest in layers
    )


def test_export_is_reproducible_byte_for_byte() -> None:
    model = load_model(REFERENCE / "nano_x2.train.safetensors")
    first = ncnn_graph(optimize_for_inference(model))
    second = ncnn_graph(optimize_for_inference(load_model(REFERENCE / "nano_x2.train.safetensors")))
    assert first.param_text() == second.param_text()
    assert first.bin_bytes() == second.bin_bytes()
