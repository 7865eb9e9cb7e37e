"""NCNN graph of the optimized network, run in the registry's ``ncnn`` package on the CPU."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from helpers import REFERENCE, float64_reference, randomized_model, require, seeded_image
from paragonsr import config_for_variant, load_model, optimize_for_inference
from paragonsr.ncnn_export import ALLOWED_PARAMS, ncnn_graph, run_with_ncnn

require("ncnn", "pip install 'paragonsr[ncnn]' (or: pip install ncnn)")


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("nano_x2", "nano_x2.train.safetensors"),
        ("nano_x2", "nano_x2.fused.safetensors"),
        ("tiny_x4", "tiny_x4.train.safetensors"),
        ("tiny_x4", "tiny_x4.fused.safetensors"),
        ("tiny_x4", "tiny_x4.params_ema.pth"),
    ],
)
def test_reference_fixtures_within_1e4(name, file) -> None:
    model = load_model(REFERENCE / file)
    io = load_file(REFERENCE / f"{name}.io.safetensors")
    graph = ncnn_graph(optimize_for_inference(model))
    output = run_with_ncnn(graph.param_text(), graph.bin_bytes(), io["input"])
    assert output.shape == io["expected"].shape
    assert (output.double() - io["expected"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", ["nano", "tiny", "xs", "s", "m", "l", "xl"])
def test_every_variant_and_scale_at_sizes_never_seen(variant, scale) -> None:
    """One exported pair serves any input size (nothing is traced at a size)."""
    model = randomized_model(config_for_variant(variant, scale))
    graph = ncnn_graph(optimize_for_inference(model))
    for height, width in ((9, 14), (12, 7)):
        image = seeded_image(3, height, width, seed=height)
        output = run_with_ncnn(graph.param_text(), graph.bin_bytes(), image)
        expected = float64_reference(model, image)
        # Seeded random weights drive outputs far outside [0, 1]: compare relative to their size.
        tolerance = 1e-4 * max(1.0, expected.abs().max().item())
        assert (output.double() - expected).abs().max().item() < tolerance


@pytest.mark.parametrize(("height", "width"), [(3, 3), (3, 17), (16, 3)])
def test_the_corrected_tail_is_exact_down_to_3x3(height, width) -> None:
    """The collapsed 5x5 tail plus its border terms (every output pixel next to a border) on
    the smallest inputs the pair serves."""
    model = randomized_model(config_for_variant("tiny", 4))
    graph = ncnn_graph(optimize_for_inference(model))
    image = seeded_image(3, height, width, seed=width)
    output = run_with_ncnn(graph.param_text(), graph.bin_bytes(), image)
    expected = float64_reference(model, image)
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


# -- the export command ----------------------------------------------------------------------

from paragonsr.cli import main  # noqa: E402
from paragonsr.ncnn_export import (  # noqa: E402
    HostView,
    host_view,
    name_for_upscayl,
    upscayl_scale,
)

TINY = REFERENCE / "tiny_x4.params_ema.pth"


def test_export_writes_a_verified_pair_that_chainner_reads_as_x4(tmp_path, capsys) -> None:
    target = tmp_path / "4x-ParagonSR-tiny.param"
    assert main(["export", str(TINY), str(target)]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith(f"wrote {target} and {target.with_suffix('.bin')} (fp32 weights")
    assert "vs torch, max abs diff" in report[1]
    assert report[2].endswith("chaiNNer reads scale 4, channels 3 -> 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "4x-ParagonSR-tiny.bin",
        "4x-ParagonSR-tiny.param",
    ]
    io = load_file(REFERENCE / "tiny_x4.io.safetensors")
    output = run_with_ncnn(target.read_text(), target.with_suffix(".bin").read_bytes(), io["input"])
    assert (output.double() - io["expected"]).abs().max().item() < 1e-4


def test_fp16_weights_within_5e3_with_the_chainner_caveat(tmp_path, capsys) -> None:
    target = tmp_path / "4x-tiny-fp16.param"
    assert main(["export", str(TINY), str(target), "--fp16"]) == 0
    report = capsys.readouterr().out
    assert "(fp16 weights" in report and "chaiNNer switches on fp16 arithmetic" in report
    weights = target.with_suffix(".bin").read_bytes()
    fp32 = ncnn_graph(optimize_for_inference(load_model(TINY))).bin_bytes()
    assert len(weights) < 0.6 * len(fp32)
    io = load_file(REFERENCE / "tiny_x4.io.safetensors")
    output = run_with_ncnn(target.read_text(), weights, io["input"])
    assert (output.double() - io["expected"]).abs().max().item() < 5e-3


@pytest.mark.parametrize(
    ("name", "scale"),
    [("4x-ParagonSR-tiny", 4), ("x16-model", 1), ("v1x_model", 1), ("plain", 4), ("2x_3x", 2)],
)
def test_upscayl_reads_the_scale_from_names_in_its_order(name, scale) -> None:
    assert upscayl_scale(name) == scale


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("stem", ["ParagonSR-x16-v1x", "model_x10", "4x-old", "plain"])
def test_suggested_names_read_right(stem, scale) -> None:
    assert upscayl_scale(name_for_upscayl(stem, scale)) == scale


def test_a_name_upscayl_would_misread_is_refused_with_the_name_to_use(tmp_path, capsys) -> None:
    target = tmp_path / "ParagonSR-tiny-v1x.param"
    assert main(["export", str(TINY), str(target)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"paragonsr: error: {target}: Upscayl would read this name as x1 but the model is x4; "
        "name it 4x-ParagonSR-tiny-v.param"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["out.txt"], "name the output *.onnx (ONNX: chaiNNer, onnxruntime, TensorRT) or *.param"),
        (["missing/4x.param"], "the output folder does not exist. Create it first"),
        (["4x.param", "--static", "64x64"], "--static: ONNX options; an NCNN pair takes any"),
        (["4x.param", "--opset", "18"], "--opset: ONNX options"),
    ],
)
def test_bad_targets_are_refused_before_any_work(tmp_path, capsys, arguments, message) -> None:
    target, *options = arguments
    assert main(["export", str(TINY), str(tmp_path / target), *options]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_other_architectures_are_refused_in_one_line(tmp_path, capsys) -> None:
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    compact = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)
    source = tmp_path / "compact.safetensors"
    save_file(compact.state_dict(), source)
    assert main(["export", str(source), str(tmp_path / "4x.param")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(source) in error
    assert "Export writes ParagonSR models only, as ONNX (.onnx) or an NCNN pair" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.safetensors"]


def test_a_failed_verification_leaves_no_file(tmp_path, monkeypatch) -> None:
    from paragonsr import ncnn_export
    from paragonsr.errors import ExportError

    def grey(text, weights, image):
        return torch.full((1, 3, image.shape[2] * 4, image.shape[3] * 4), 0.5)

    monkeypatch.setattr(ncnn_export, "run_with_ncnn", grey)
    with pytest.raises(ExportError, match="ncnn differs from torch by .*nothing was written"):
        ncnn_export.export_ncnn(TINY, tmp_path / "4x.param")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_chainner_reads_scale_and_channels_from_the_param(scale) -> None:
    """chaiNNer's documented reading of a .param (see host_view): the exported layout gives the
    model's scale and 3 -> 3; ParagonSR's own layout (PixelShuffle, then conv_out) would give 0
    output channels, which is why the tail is written as one collapsed convolution (plus border
    terms) followed by the PixelShuffle."""
    model = randomized_model(config_for_variant("nano", scale))
    text = ncnn_graph(optimize_for_inference(model)).param_text()
    assert host_view(text) == HostView(scale, 3, 3)
    plain_layout = "\n".join(
        [
            "7767517",
            "3 3",
            "Convolution up 1 1 data a 0=96 1=3 5=1 6=2592",
            "PixelShuffle shuffle 1 1 a b 0=4",
            "Convolution out 1 1 b output 0=3 1=3 5=1 6=54",
        ]
    )
    assert host_view(plain_layout) == HostView(4, 3, 0)
