"""Start-up without torch: the torch-free layout and detection, the safetensors header path of
`paragonsr info`, and spandrel registration with a lazily imported package."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from paragonsr import build_model, inspect_checkpoint, optimize_for_inference
from paragonsr.config import (
    FORMS,
    VARIANTS,
    config_for_variant,
    optimized_value_count,
    parameter_shapes,
)
from paragonsr.errors import CheckpointError
from paragonsr.header import _Unsettled, inspect_file, inspect_header
from paragonsr.network import ParagonSR

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "fixtures" / "reference"
SAFETENSORS_FIXTURES = sorted(REFERENCE.glob("*.safetensors")) + sorted(
    (ROOT / "models").glob("*.safetensors")
)
CHECKPOINT_FIXTURES = [p for p in SAFETENSORS_FIXTURES if not p.name.endswith(".io.safetensors")]

CUSTOM = [
    replace(config_for_variant("nano", 3), band_kernel_size=7, branch_ratio=0.25),
    replace(config_for_variant("tiny", 1), in_chans=1, out_chans=4, square_kernel_size=5),
    replace(config_for_variant("nano", 2), ffn_expansion=1.3, num_groups=2, num_blocks=1),
]


def _module_shapes(config, form: str) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = ParagonSR(config, fused=form == "fused")
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "config",
    [
        config_for_variant(name, scale)
        for name, scale in zip(VARIANTS, (2, 4, 3, 4, 2, 1, 4), strict=True)
    ]
    + CUSTOM,
    ids=lambda c: f"{c.num_feat}nf-{c.num_groups}x{c.num_blocks}-x{c.scale}",
)
def test_layout_table_is_the_modules_state_dict(config, form):
    """The torch-free layout is key for key, in order, what the network modules hold."""
    assert list(parameter_shapes(config, form).items()) == _module_shapes(config, form)


@pytest.mark.parametrize("config", [config_for_variant("tiny", 4), *CUSTOM])
def test_optimized_value_count_is_what_the_inference_network_holds(config):
    with torch.device("meta"):
        optimized = optimize_for_inference(ParagonSR(config, fused=True))
    assert optimized_value_count(config) == sum(b.numel() for b in optimized.buffers())


def _same(header, tensors) -> None:
    assert (header.config, header.form, header.variant, header.source) == (
        tensors.config,
        tensors.form,
        tensors.variant,
        tensors.source,
    )
    assert header.non_finite_keys == tensors.non_finite_keys


@pytest.mark.parametrize("path", CHECKPOINT_FIXTURES, ids=lambda p: p.name)
def test_header_and_tensors_agree_on_every_fixture(path):
    _same(inspect_header(path), inspect_checkpoint(path))


def _nano_state(dtype=torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = build_model("nano", 2).state_dict()
    return {prefix + k: v.to(dtype) for k, v in state.items()}


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
def test_header_and_tensors_agree_on_non_finite_weights(tmp_path, dtype):
    state = _nano_state(dtype, prefix="module.")
    state["module.body.1.blocks.0.ls2.gamma"][3] = float("nan")
    state["module.conv_out.bias"][0] = float("-inf")
    state["module.conv_in.weight"][0, 0, 0, 0] = 65504 if dtype == torch.float16 else 1e30
    path = tmp_path / "nan.safetensors"
    save_file(state, path, metadata={"architecture": "ParagonSR"})
    with pytest.warns(UserWarning, match="2 tensors hold NaN or inf"):
        tensors = inspect_checkpoint(path)
    header = inspect_header(path)
    _same(header, tensors)
    assert set(header.non_finite_keys) == {"body.1.blocks.0.ls2.gamma", "conv_out.bias"}


def test_large_tensors_are_scanned_in_chunks(tmp_path, monkeypatch):
    """A non-finite value past the first chunk of a tensor is still found."""
    import paragonsr.header as header_module

    monkeypatch.setattr(header_module, "CHUNK_BYTES", 256)
    state = _nano_state()
    state["body.0.blocks.0.transformer.project_in_g.weight"].view(-1)[-1] = float("inf")
    path = tmp_path / "late_inf.safetensors"
    save_file(state, path)
    assert inspect_header(path).non_finite_keys == [
        "body.0.blocks.0.transformer.project_in_g.weight"
    ]


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _bad_offsets(path: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def _integer_tensor(path: Path) -> None:
    state = _nano_state()
    state["conv_in.bias"] = torch.arange(24)
    save_file(state, path)


def _other_network(path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    save_file(Compact(num_feat=16, num_conv=2, upscale=2).state_dict(), path)


def _stray_key(path: Path) -> None:
    state = _nano_state()
    state["body.200000.x"] = torch.zeros(1)
    save_file(state, path)


def _huge_header_length(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")


@pytest.mark.parametrize(
    "damage",
    [_truncated, _bad_offsets, _integer_tensor, _other_network, _stray_key, _huge_header_length],
)
def test_what_the_header_cannot_settle_gets_the_tensor_paths_answer(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file(_nano_state(), path)
    damage(path)
    with pytest.raises(_Unsettled):
        inspect_header(path)
    with pytest.raises(CheckpointError) as expected:
        inspect_checkpoint(path)
    with pytest.raises(CheckpointError) as answered:
        inspect_file(path)
    assert str(answered.value) == str(expected.value)
    assert str(path) in str(answered.value)


def _fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line, the last of its output."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "spandrel", "torchvision", "safetensors")


@pytest.mark.parametrize(
    "argv",
    [
        ["info", str(ROOT / "models" / "paragonsr_nano_x2.safetensors")],
        ["info", "--json", str(REFERENCE / "tiny_x4.train.safetensors")],
        ["--help"],
        ["upscale", "--help"],
        ["upscale", "only-one-argument"],
        ["info", "missing.safetensors"],
        ["export", "m.safetensors", "m.onnx", "--opset", "banana"],
    ],
    ids=lambda argv: " ".join(Path(a).name for a in argv),
)
def test_commands_that_need_no_network_never_import_torch(argv):
    code = (
        "import contextlib, io, json, sys\n"
        "from paragonsr.cli import main\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code\n"
        f"heavy = [name for name in {HEAVY!r} if name in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'out': out.getvalue(), "
        "'err': err.getvalue()}))\n"
    )
    result = _fresh_python(code)
    assert result["heavy"] == [], result
    if argv[0] == "info" and "missing" not in argv[-1]:
        assert result["code"] == 0
        text = result["out"]
        assert ("tiny" in text) if "tiny" in argv[-1] else ("variant:    nano" in text)
    elif "--help" in argv:
        assert result["code"] == 0 and "usage:" in result["out"]
    else:
        assert result["code"] == 2 and result["err"].count("\n") == 1, result


def test_info_from_the_header_prints_what_the_tensor_path_prints():
    from paragonsr.cli import describe

    for path in CHECKPOINT_FIXTURES:
        assert describe(inspect_header(path)) == describe(inspect_checkpoint(path))
    # The counts the header path prints come from the layout table: they must be the tensors'.
    path = REFERENCE / "tiny_x4.train.safetensors"
    info = describe(inspect_header(path))
    from safetensors.torch import load_file

    assert info["params"]["training"] == sum(math.prod(t.shape) for t in load_file(path).values())


@pytest.mark.parametrize(
    "imports",
    [
        "import paragonsr, spandrel",
        "import spandrel, paragonsr",
        "import paragonsr.spandrel_arch",
        "import paragonsr.upscale",
        "from paragonsr import load_model; import spandrel",
    ],
)
def test_spandrel_knows_paragonsr_whatever_the_import_order(imports):
    code = (
        f"{imports}\n"
        "import json, sys, spandrel\n"
        "import paragonsr\n"
        "state = paragonsr.build_model('nano', 2).state_dict()\n"
        "descriptor = spandrel.ModelLoader().load_from_state_dict(state)\n"
        "print(json.dumps([descriptor.architecture.id, "
        "sum(s.architecture.id == 'ParagonSR' for s in spandrel.MAIN_REGISTRY.architectures()), "
        "callable(paragonsr.upscale)]))\n"
    )
    assert _fresh_python(code) == ["ParagonSR", 1, True]


def test_importing_the_package_alone_imports_no_torch():
    code = (
        "import json, sys, paragonsr\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    assert _fresh_python(code) == []


def test_every_public_name_resolves_lazily():
    import paragonsr

    assert sorted(paragonsr.__all__) == sorted(paragonsr._EXPORTS)
    for name in paragonsr.__all__:
        assert getattr(paragonsr, name) is not None
    assert callable(paragonsr.upscale) and callable(paragonsr.register)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        paragonsr.no_such_name  # noqa: B018
