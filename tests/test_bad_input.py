"""Every kind of bad checkpoint gets an error that names the file and the problem."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import spandrel
import torch
from safetensors.torch import save_file

from helpers import REFERENCE, randomized_model
from paragonsr import (
    CheckpointError,
    NonFiniteWeightsWarning,
    UnsupportedVariantError,
    config_for_variant,
    inspect_checkpoint,
    load_model,
    read_state_dict,
)


def reference_state() -> dict[str, torch.Tensor]:
    return read_state_dict(REFERENCE / "nano_x2.train.safetensors")


def save(state: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def assert_refused(path, *fragments: str, error=CheckpointError) -> None:
    with pytest.raises(error) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path) -> None:
    assert_refused(tmp_path / "nowhere.safetensors", "file not found")


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    assert_refused(path, "the file is empty")


def test_truncated_safetensors(tmp_path) -> None:
    data = (REFERENCE / "nano_x2.train.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "not a readable safetensors file", "truncated or corrupt")


def test_garbage_pth(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    assert_refused(path, "not a readable PyTorch checkpoint")


def test_unknown_extension(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    assert_refused(path, "unsupported file type '.onnx'")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_pickle_with_foreign_globals_is_refused_and_never_runs(tmp_path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"params": reference_state(), "extra": _Payload(str(marker))}, path)
    # Plain pickle would create the marker file on load; the loader must not.
    assert_refused(path, "refused", "arbitrary code")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        inspect_checkpoint(path)
    assert not marker.exists()


class _ShellPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_blocked_module_is_refused_without_torchs_retry_advice(tmp_path) -> None:
    """torch 2.14 words this refusal differently (no "WeightsUnpickler error:"), around advice
    to retry with weights_only=False: the message must name the refusal, never that advice."""
    marker = tmp_path / "pwned"
    path = tmp_path / "shell.pth"
    torch.save({"params": reference_state(), "extra": _ShellPayload(str(marker))}, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "refused" in message and "arbitrary code" in message and "GLOBAL" in message
    assert "weights_only" not in message and "will likely succeed" not in message
    assert "\n" not in message
    assert not marker.exists()


def test_raw_pickle_protocol_with_global_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_another_architecture_is_named(tmp_path) -> None:
    # RealESRGAN Compact (SRVGGNet): body.N convolutions and PReLUs.
    state = {
        "body.0.weight": torch.randn(16, 3, 3, 3),
        "body.0.bias": torch.randn(16),
        "body.1.weight": torch.randn(16),
        "body.2.weight": torch.randn(48, 16, 3, 3),
        "body.2.bias": torch.randn(48),
    }
    path = save(state, tmp_path / "compact.safetensors")
    assert_refused(path, "not a ParagonSR checkpoint", "Compact")


def test_unrelated_state_dict(tmp_path) -> None:
    path = save({"foo.weight": torch.randn(3, 3)}, tmp_path / "foo.safetensors")
    assert_refused(path, "not a ParagonSR checkpoint")


def test_missing_key_is_named(tmp_path) -> None:
    state = reference_state()
    del state["body.1.blocks.0.transformer.project_out.bias"]
    path = save(state, tmp_path / "missing.safetensors")
    assert_refused(path, "missing key 'body.1.blocks.0.transformer.project_out.bias'")


def test_misshaped_key_is_named(tmp_path) -> None:
    state = reference_state()
    state["body.2.blocks.1.norm2.weight"] = torch.randn(25)
    path = save(state, tmp_path / "misshaped.safetensors")
    assert_refused(path, "'body.2.blocks.1.norm2.weight' has shape (25,), expected (24,)")


def test_unexpected_key_is_named(tmp_path) -> None:
    state = reference_state()
    state["head.weight"] = torch.randn(3)
    path = save(state, tmp_path / "extra.safetensors")
    assert_refused(path, "unexpected key 'head.weight'")


def test_scale_that_is_not_a_square(tmp_path) -> None:
    state = reference_state()
    state["upsampler.0.weight"] = torch.randn(24 * 3, 24, 3, 3)
    state["upsampler.0.bias"] = torch.randn(24 * 3)
    path = save(state, tmp_path / "scale.safetensors")
    assert_refused(path, "upsampler.0.weight", "not 24 features times a square scale")


def test_magic_kernel_fork_is_refused_by_name(tmp_path) -> None:
    state = reference_state()
    state["upsampler.0.weight"] = torch.randn(24, 24, 3, 3)
    state["upsampler.0.bias"] = torch.randn(24)
    state["magic_upsampler.sharpen.weight"] = torch.randn(24, 1, 3, 3)
    path = save(state, tmp_path / "magic.safetensors")
    assert_refused(path, "MagicKernel", "not supported", error=UnsupportedVariantError)


def test_early_layernorm_revision_is_refused_by_name(tmp_path) -> None:
    state = {k: v for k, v in reference_state().items() if "ls1" not in k and "ls2" not in k}
    state["body.0.blocks.0.transformer.spatial_mixer.fused_conv.weight"] = torch.randn(36, 1, 3, 3)
    path = save(state, tmp_path / "early.safetensors")
    assert_refused(path, "early ParagonSR revision", error=UnsupportedVariantError)


def test_non_float_tensor_is_refused(tmp_path) -> None:
    state = reference_state()
    state["conv_fuse.bias"] = torch.arange(24, dtype=torch.int32)
    path = save(state, tmp_path / "ints.safetensors")
    assert_refused(path, "'conv_fuse.bias' holds torch.int32 values")


def test_non_finite_weights_warn_but_load(tmp_path) -> None:
    state = reference_state()
    state["conv_in.bias"][3] = float("nan")
    path = save(state, tmp_path / "nan.safetensors")
    with pytest.warns(NonFiniteWeightsWarning, match="'conv_in.bias'"):
        inspection = inspect_checkpoint(path)
    assert inspection.non_finite_keys == ["conv_in.bias"]


def test_training_state_without_weights(tmp_path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"iter": 5, "optimizers": [1, 2]}, path)
    assert_refused(path, "is a int, not a tensor")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"params_ema": s, "params": {k: v * 0 for k, v in s.items()}},
        lambda s: {"params": s},
        lambda s: {"state_dict": s},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
    ],
    ids=["params_ema-wins", "params", "state_dict", "module-prefix", "compiled-prefix"],
)
@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_wrapped_checkpoints_load(tmp_path, wrap, suffix: str) -> None:
    state = reference_state()
    path = tmp_path / f"wrapped{suffix}"
    torch.save(wrap(state), path)
    model = load_model(path)
    for key, tensor in state.items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_loading_warns_about_nothing_for_clean_files() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(REFERENCE / "tiny_x4.params_ema.pth")


def test_half_precision_checkpoints_load_as_float32(tmp_path) -> None:
    model = randomized_model(config_for_variant("nano", 2))
    path = save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.safetensors")
    loaded = load_model(path)
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight.half().float())


@pytest.mark.parametrize("key", ["body.200000.x", "body.0.blocks.90000.x"])
def test_a_stray_key_cannot_claim_an_absurd_depth(tmp_path, key: str) -> None:
    """One 1-element tensor named for group 200000 (or block 90000) used to make detection build
    a twin that deep: hours and tens of GB. The depth is checked against the tensor count first,
    through the CLI's loader and spandrel's alike."""
    state = reference_state()
    state[key] = torch.zeros(1)
    path = tmp_path / "deep.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"claim .* but it holds \d+ tensors"):
        inspect_checkpoint(path)
    with pytest.raises(CheckpointError, match="claim"):
        spandrel.ModelLoader().load_from_file(path)
