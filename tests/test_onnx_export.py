"""ONNX export: the file, its verification, chaiNNer's pinned runtime, and refusals."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from helpers import (
    ONNX_INSTALL,
    REFERENCE,
    chainner_python,
    float64_reference,
    randomized_model,
    require,
    seeded_image,
)
from paragonsr import config_for_variant
from paragonsr.cli import main
from paragonsr.onnx_export import ExportError, ExportOptions, export_onnx

onnx = require("onnx", ONNX_INSTALL)
require("onnxruntime", ONNX_INSTALL)

TINY = REFERENCE / "tiny_x4.params_ema.pth"
NANO = REFERENCE / "nano_x2.fused.safetensors"


@pytest.mark.parametrize(
    "options",
    [
        ExportOptions(),
        ExportOptions(opset=18),
        ExportOptions(opset=20, mish_op=False),
        ExportOptions(fp16=True),
        ExportOptions(fp16=True, keep_io_fp32=True),
        ExportOptions(static=(24, 40), dynamic_batch=False),
    ],
    ids=["opset17", "opset18-mish", "opset20-no-mish", "fp16", "fp16-io32", "static"],
)
def test_chainners_pinned_runtime_opens_and_runs_the_export(tmp_path, options) -> None:
    path = tmp_path / "model.onnx"
    report = export_onnx(TINY, path, options)
    assert report.ir_version <= 9 and report.opset <= 20
    height, width = options.static or (20, 28)
    image = seeded_image(3, height, width).numpy()
    io_dtype = np.float16 if options.fp16 and not options.keep_io_fp32 else np.float32
    np.save(tmp_path / "input.npy", image.astype(io_dtype))
    script = textwrap.dedent(f"""
        import json, numpy, onnx, onnxruntime
        model = onnx.load({str(path)!r})
        onnx.checker.check_model(model)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, 16, 16
        if {options.static is None}:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            shape = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
        else:
            shape = None
        session = onnxruntime.InferenceSession({str(path)!r},
                                               providers=["CPUExecutionProvider"])
        out = session.run(None, {{"input": numpy.load({str(tmp_path / "input.npy")!r})}})[0]
        numpy.save({str(tmp_path / "output.npy")!r}, out.astype(numpy.float32))
        print(json.dumps({{"versions": [onnx.__version__, onnxruntime.__version__],
                          "shape": shape, "dtype": str(out.dtype)}}))
    """)
    result = subprocess.run(
        [chainner_python(), "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["versions"] == ["1.16.0", "1.17.1"]
    if options.static is None:
        assert report["shape"] == [1, 3, 64, 64]  # chaiNNer reads the scale from this
    assert report["dtype"] == ("float16" if io_dtype == np.float16 else "float32")
    from paragonsr import load_model

    with torch.no_grad():
        expected = load_model(TINY)(torch.from_numpy(image)).numpy()
    error = np.abs(np.load(tmp_path / "output.npy") - expected).max()
    assert error < (2e-2 if options.fp16 else 1e-4)


def test_metadata_and_graph_form(tmp_path) -> None:
    path = tmp_path / "nano.onnx"
    export_onnx(NANO, path, ExportOptions(opset=18))
    model = onnx.load(path)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["architecture"] == "ParagonSR"
    assert metadata["variant"] == "nano" and metadata["scale"] == "2"
    import hashlib

    assert metadata["source_sha256"] == hashlib.sha256(NANO.read_bytes()).hexdigest()
    ops = {node.op_type for node in model.graph.node}
    assert "Mish" in ops and "ReduceMean" in ops and "DepthToSpace" in ops
    assert not ops & {"GroupNormalization", "InstanceNormalization"}
    assert [i.name for i in model.graph.input] == ["input"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    export_onnx(NANO, tmp_path / "plain.onnx", ExportOptions(opset=18, mish_op=False))
    assert "Mish" not in {n.op_type for n in onnx.load(tmp_path / "plain.onnx").graph.node}


def test_batched_dynamic_input(tmp_path) -> None:
    import onnxruntime

    path = tmp_path / "m.onnx"
    export_onnx(NANO, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.cat([seeded_image(3, 13, 17, seed=s) for s in range(2)]).numpy()
    assert session.run(None, {"input": batch})[0].shape == (2, 3, 26, 34)


def test_cli_export_prints_the_verification(tmp_path) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            ["export", str(NANO), str(tmp_path / "n.onnx"), "--static", "32x32", "--batch", "1"]
        )
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "onnx.checker: passed" in text
    assert "strict shape inference 32x32 -> [1, 3, 64, 64]" in text


@pytest.mark.parametrize("opset", [13, 21])
def test_opset_outside_the_range(tmp_path, opset: int) -> None:
    with pytest.raises(ExportError, match="outside 14-20"):
        export_onnx(NANO, tmp_path / "x.onnx", ExportOptions(opset=opset))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tmp_path) -> None:
    with pytest.raises(ExportError, match="the output folder does not exist"):
        export_onnx(NANO, tmp_path / "missing" / "x.onnx")
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(NANO, tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"


def test_fp16_overflow_fails_and_writes_nothing(tmp_path) -> None:
    model = randomized_model(config_for_variant("nano", 2))
    with torch.no_grad():
        model.conv_in.weight.mul_(1e5)
    with pytest.raises(ExportError, match="fp16 graph overflows on a natural image"):
        export_onnx(model, tmp_path / "x.onnx", ExportOptions(fp16=True))
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_package(tmp_path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with pytest.raises(ExportError, match="no onnxruntime is installed: pip install onnxruntime"):
        export_onnx(NANO, tmp_path / "x.onnx")


@pytest.mark.parametrize(("variant", "scale"), [("nano", 1), ("tiny", 2), ("xs", 3), ("s", 4)])
def test_seeded_variants_in_onnxruntime_land_on_float64(tmp_path, variant, scale) -> None:
    """The exported graph (built from the same passes as every other path) in onnxruntime,
    against the float64 plain forward: within 1e-4, or 4x the float32 plain forward's own
    rounding where deep random networks reach outputs in the hundreds. m, l and xl take
    minutes to export and are left to bench/bench_onnx.py."""
    import onnxruntime

    model = randomized_model(config_for_variant(variant, scale))
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = seeded_image(3, 13, 10)
    expected = float64_reference(model, image)
    with torch.no_grad():
        rounding = (model(image).double() - expected).abs().max().item()
    actual = torch.from_numpy(session.run(None, {"input": image.numpy()})[0]).double()
    assert (actual - expected).abs().max().item() < max(1e-4, 4 * rounding)


def test_a_model_that_outputs_nan_is_not_exported(tmp_path) -> None:
    """NaN weights made both runtimes output NaN, the comparison skipped every value, and the
    export 'verified' with max difference 0 (issue 13)."""
    model = randomized_model(config_for_variant("nano", 2))
    with torch.no_grad():
        model.body[0].blocks[0].ls1.gamma[0] = float("nan")
    with pytest.raises(ExportError, match="the model itself outputs NaN or inf"):
        export_onnx(model, tmp_path / "nan.onnx")
    assert list(tmp_path.iterdir()) == []


def test_exporting_onto_a_folder_is_refused(tmp_path) -> None:
    target = tmp_path / "taken.onnx"
    target.mkdir()
    with pytest.raises(ExportError, match="is a folder; name the .onnx file to write"):
        export_onnx(NANO, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.onnx"] and target.is_dir()


def test_ffn_slices_and_mish_form_in_the_graph(tmp_path) -> None:
    """The default graph computes each block's gated product in 16-channel slices (tiny: 64
    hidden channels, 4 slices, one Mish each) with Mish as Exp/BatchNormalization/Softsign; one
    slice (ffn_group=0) is the same arithmetic, so onnxruntime's outputs agree to rounding, and
    both land on the float64 plain forward at a size neither graph was traced at."""
    import onnxruntime

    model = randomized_model(config_for_variant("tiny", 4))
    blocks = model.config.num_groups * model.config.num_blocks
    slices = model.config.ffn_hidden // 16
    outputs = []
    image = seeded_image(3, 37, 29)
    for ffn_group, mishes in ((16, blocks * slices), (0, blocks)):
        path = tmp_path / f"group{ffn_group}.onnx"
        export_onnx(model, path, ExportOptions(ffn_group=ffn_group))
        ops = [node.op_type for node in onnx.load(path).graph.node]
        assert ops.count("Softsign") == ops.count("BatchNormalization") == mishes
        assert not {"Softplus", "Mish", "Tanh"} & set(ops)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(torch.from_numpy(session.run(None, {"input": image.numpy()})[0]).double())
    expected = float64_reference(model, image)
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-6
    for actual in outputs:
        assert (actual - expected).abs().max().item() < 1e-4


def test_an_uneven_last_ffn_slice(tmp_path) -> None:
    """nano's 36 hidden channels split 16 + 16 + 4; an odd size and a batch of two."""
    import onnxruntime

    model = randomized_model(config_for_variant("nano", 2))
    path = tmp_path / "nano.onnx"
    export_onnx(model, path)
    assert [node.op_type for node in onnx.load(path).graph.node].count("Softsign") == 3 * 2 * 3
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.cat([seeded_image(3, 19, 23, seed=seed) for seed in (1, 2)])
    actual = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0]).double()
    assert (actual - float64_reference(model, batch)).abs().max().item() < 1e-4


def test_a_negative_ffn_group_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match="ffn_group -1 must be 0"):
        export_onnx(NANO, tmp_path / "x.onnx", ExportOptions(ffn_group=-1))
    assert list(tmp_path.iterdir()) == []


def test_graph_mish_against_float64() -> None:
    """float32: as close to float64 Mish as ATen's own, from where it underflows to where it
    is x; float16: finite where e^x overflows fp16 (x > 11), within fp16 rounding."""
    import torch.nn.functional as F

    from paragonsr.inference import mish_graph

    x = torch.cat([torch.linspace(-60, 30, 90001), torch.linspace(-1e4, 1e4, 20001)])
    exact = x.double() * torch.tanh(F.softplus(x.double()))
    actual = mish_graph(x.view(1, -1, 1, 1)).flatten().double()
    normal = exact.abs() > 1e-30
    relative = ((actual - exact).abs() / exact.abs())[normal].max().item()
    assert relative < 5e-7
    half = torch.linspace(-20, 6e4, 20001).half()
    exact = half.double() * torch.tanh(F.softplus(half.double()))
    actual = mish_graph(half.view(1, -1, 1, 1)).flatten().double()
    assert torch.isfinite(actual).all()
    visible = exact.abs() > 1e-3
    assert ((actual - exact).abs() / exact.abs())[visible].max().item() < 4e-3


def test_an_untrained_network_exports_and_loads_in_both_runtimes(tmp_path) -> None:
    """A fresh network (what the Train node starts from: unit GroupNorm weights, LayerScale 1e-5)
    has many equal constants, which the exporter deduplicates through Identity nodes; with the
    GroupNorm scale written as Div(1, Sqrt) times the weight, onnxruntime's DivMulFusion broke
    that graph and every session refused to load it. The export's own verification runs this
    pack's onnxruntime with default options; chaiNNer's 1.17.1 must load and run it too."""
    from paragonsr.network import ParagonSR

    model = ParagonSR(config_for_variant("nano", 2))
    path = tmp_path / "fresh.onnx"
    report = export_onnx(model, path)
    assert report.path == str(path)
    image = seeded_image(3, 20, 24)
    np.save(tmp_path / "input.npy", image.numpy())
    script = textwrap.dedent(f"""
        import numpy, onnxruntime
        session = onnxruntime.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        out = session.run(None, {{"input": numpy.load({str(tmp_path / "input.npy")!r})}})[0]
        numpy.save({str(tmp_path / "output.npy")!r}, out)
    """)
    result = subprocess.run(
        [chainner_python(), "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model(image).numpy()
    actual = np.load(tmp_path / "output.npy")
    assert actual.shape == (1, 3, 40, 48)
    assert np.abs(actual - expected).max() < 1e-4
