"""The ``paragonsr`` command as users run it: a real subprocess, real files."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import MANIFEST, REFERENCE
from paragonsr.checkpoint import inspect_checkpoint
from paragonsr.cli import main
from paragonsr.config import macs_per_pixel


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str) -> Result:
    """The command in this process (a subprocess per call would pay torch's import each time)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's --help and usage errors
            code = exit_.code
    return Result(code, stdout.getvalue(), stderr.getvalue())


def test_the_installed_command_runs_as_a_program(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "paragonsr", "fuse", str(tmp_path / "missing.pth"), "x.safetensors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"paragonsr: error: {tmp_path / 'missing.pth'}: file not found. Check the path"
    )


@pytest.mark.parametrize("name", ["tiny_x4.params_ema.pth", "nano_x2.fused.safetensors"])
def test_info_json_reports_every_hyper_parameter(name: str) -> None:
    result = run("info", str(REFERENCE / name), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    case = MANIFEST[name.split(".")[0]]
    for key in ("scale", "in_chans", "num_feat", "num_groups", "num_blocks", "ffn_expansion"):
        assert info[key] == case[key], key
    assert info["form"] == ("fused" if "fused" in name else "training")
    assert info["variant"] == case["name"].split("_")[0]
    config = inspect_checkpoint(REFERENCE / name).config
    assert info["macs_per_pixel"] == {
        form: macs_per_pixel(config, form) for form in ("training", "fused", "optimized")
    }
    assert info["params"]["training"] > info["params"]["fused"] > 0


def test_info_text() -> None:
    result = run("info", str(REFERENCE / "tiny_x4.train.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "form:       training" in result.stdout
    assert "variant:    tiny" in result.stdout
    assert "scale:      x4" in result.stdout
    assert "MACs/pixel: training 216,264, fused 212,424, optimized 89,544" in result.stdout


def test_fuse_writes_the_reference_release_file(tmp_path) -> None:
    target = tmp_path / "tiny_x4.fused.safetensors"
    result = run("fuse", str(REFERENCE / "tiny_x4.params_ema.pth"), str(target))
    assert result.returncode == 0, result.stderr
    assert "max abs difference, fused vs training form" in result.stdout
    reference = load_file(REFERENCE / "tiny_x4.fused.safetensors")
    ours = load_file(target)
    assert sorted(ours) == sorted(reference)
    for key, tensor in reference.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=1e-6, msg=key)
    assert target.stat().st_mode & 0o044  # readable by others, as files the user makes


def test_fuse_refuses_a_fused_input_and_writes_nothing(tmp_path) -> None:
    target = tmp_path / "again.safetensors"
    result = run("fuse", str(REFERENCE / "nano_x2.fused.safetensors"), str(target))
    assert result.returncode == 1
    assert "already fused" in result.stderr
    assert not target.exists()


def test_fuse_keeps_an_existing_output_unless_told(tmp_path) -> None:
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"keep me")
    result = run("fuse", str(REFERENCE / "nano_x2.train.safetensors"), str(target))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert target.read_bytes() == b"keep me"
    result = run("fuse", str(REFERENCE / "nano_x2.train.safetensors"), str(target), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(load_file(target)) == sorted(load_file(REFERENCE / "nano_x2.fused.safetensors"))


@pytest.mark.parametrize("contents", [b"", b"\x00" * 100], ids=["empty", "corrupt"])
def test_bad_input_is_one_line_without_traceback_and_leaves_no_output(
    tmp_path, contents: bytes
) -> None:
    source = tmp_path / "bad.safetensors"
    source.write_bytes(contents)
    target = tmp_path / "out.safetensors"
    result = run("fuse", str(source), str(target))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paragonsr: error: ")
    assert str(source) in lines[0]
    assert list(tmp_path.iterdir()) == [source]


def test_unwritable_output_folder(tmp_path) -> None:
    target = tmp_path / "missing-folder" / "out.safetensors"
    result = run("fuse", str(REFERENCE / "nano_x2.train.safetensors"), str(target))
    assert result.returncode == 2
    assert "the folder does not exist" in result.stderr


@pytest.mark.parametrize("command", [[], ["info"], ["fuse"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: paragonsr" in result.stdout


def test_nan_weights_warn_in_one_line_and_still_fuse(tmp_path) -> None:
    state = load_file(REFERENCE / "nano_x2.train.safetensors")
    state["conv_out.bias"][0] = float("inf")
    source = tmp_path / "inf.safetensors"
    save_file(state, source)
    # A real process: pytest records warnings instead of printing them.
    result = subprocess.run(
        [sys.executable, "-m", "paragonsr", "fuse", str(source), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning_lines == [
        "paragonsr: warning: 1 tensors hold NaN or inf values (first: 'conv_out.bias'); "
        "the model's output will be garbage"
    ]
    info = run("info", str(source))
    assert "WARNING:    1 tensors hold NaN or inf values" in info.stdout
