"""Reading checkpoints, working out what they hold (:func:`paragonsr.detection.detect` on their
tensors' shapes), and writing them back.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch

from .config import ParagonSRConfig
from .detection import (
    Inspection,
    TensorFacts,
    checked_checkpoint_file,
    detect,
    strip_common_prefix,
)
from .detection import looks_like_paragonsr as looks_like_paragonsr
from .errors import CheckpointError
from .files import atomic_write
from .network import ParagonSR, not_a_plain_network

StateDict = dict[str, torch.Tensor]
Source: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any]"

# Checked in this order: an EMA copy is what traiNNer-redux users want to deploy.
WRAPPER_KEYS = (
    "params_ema",
    "params-ema",
    "params",
    "state_dict",
    "model_state_dict",
    "model",
    "net_g",
    "net",
)


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint holds NaN or infinite weights; its outputs will be garbage."""


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, unwrapped and de-prefixed.

    Pickles (.pth/.ckpt/.pt) go through torch's weights-only unpickler: a file that references any
    global beyond tensors and plain containers is refused without running it.
    """
    path = Path(path)
    if checked_checkpoint_file(path) == "safetensors":
        raw: Any = _read_safetensors(path)
    else:
        raw = _read_pickle(path)
    try:
        return canonical_state_dict(raw)
    except CheckpointError as error:
        raise error.with_source(path) from None


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types and OSError
        raise CheckpointError(
            path,
            f"not a readable safetensors file, probably truncated or corrupt ({one_line(error)})",
            "Download or export it again",
        ) from None


def _read_pickle(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says more.
            warnings.simplefilter("ignore", UserWarning)
            # Memory-mapped where the format allows (zip, torch >= 1.6): tensors nobody reads,
            # such as an optimizer state or a hostile padding tensor, never enter memory.
            mapped = zipfile.is_zipfile(path)
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(str(error))
        if "GLOBAL" in detail:
            raise CheckpointError(
                path,
                "refused: the pickle references Python objects beyond tensors and plain "
                f"containers, and loading it could run arbitrary code ({detail})",
                "If you trust its origin, re-save only its state dict as .safetensors",
            ) from None
        raise CheckpointError(
            path,
            f"not a readable PyTorch checkpoint ({detail})",
            "Download or export it again, or convert it to .safetensors",
        ) from None
    except Exception as error:  # any byte sequence reaches the unpickler: any error can come
        detail = one_line(error)
        raise CheckpointError(
            path,
            f"not a readable PyTorch checkpoint, probably truncated or corrupt ({detail})",
            "Download or export it again",
        ) from None


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line: the first line that says something (torch's and
    spandrel's messages open with a heading such as "Error(s) in loading state_dict for X:")."""
    if isinstance(error, KeyError) and error.args:
        return f"missing key {error.args[0]!r}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if not line.endswith(":")] or lines
    text = telling[0] if telling else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _unpickler_detail(message: str) -> str:
    """The one informative line of torch's long weights-only refusal: what the pickle asked for.
    torch's own advice in that text, to retry with weights_only=False, is exactly what would run
    a hostile file, so it is never passed on. (torch words the refusal differently by version.)"""
    lines = [line.strip() for line in message.splitlines()]
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines]
    found = next((line for line in lines if "GLOBAL" in line), None)
    if found is None:
        found = next(
            (line for line in lines if line and "weights_only" not in line.replace(" ", "_")),
            "",
        )
        if found.startswith(("Weights only load failed", "Check the documentation")):
            found = ""
    return found.split(" was not an allowed global")[0] or "refused by the weights-only unpickler"


def canonical_state_dict(raw: Any) -> StateDict:
    """Unwrap ``{"params_ema": ...}``-style containers and strip ``module.``-style prefixes."""
    state = raw
    for _ in range(4):
        if not isinstance(state, Mapping):
            break
        inner = next(
            (state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping) and state[k]),
            None,
        )
        if inner is None and len(state) == 1:
            only = next(iter(state.values()))
            inner = only if isinstance(only, Mapping) else None
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            None,
            "holds no state dict (expected a mapping of parameter names to tensors)",
            "Save the model's state_dict(), not the model object or a training state",
        )
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            None,
            f"entry {non_tensors[0]!r} is a {type(state[non_tensors[0]]).__name__}, not a tensor",
            "Save the model's state_dict() alone",
        )
    return strip_common_prefix({str(k): v for k, v in state.items()})


def _other_architecture(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    try:
        from spandrel import MAIN_REGISTRY
    except ImportError:
        return None
    for support in MAIN_REGISTRY.architectures("detection"):
        if support.architecture.id == "ParagonSR":
            continue
        try:
            if support.detect(state_dict):
                return f"{support.architecture.name} (spandrel id {support.architecture.id})"
        except Exception:  # another architecture's detector failing tells us nothing
            continue
    return None


def tensor_facts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorFacts]:
    return {
        key: TensorFacts(tuple(value.shape), str(value.dtype), value.is_floating_point())
        for key, value in state_dict.items()
    }


def inspect_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Inspection:
    """Work out form and every hyper-parameter from tensor shapes, check every key, and warn
    about NaN or infinite weights."""
    inspection = detect(tensor_facts(state_dict), lambda: _other_architecture(state_dict))
    non_finite = [k for k, v in state_dict.items() if not torch.isfinite(v).all()]
    if non_finite:
        warn_non_finite(non_finite)
    inspection.non_finite_keys = non_finite
    return inspection


def warn_non_finite(keys: list[str]) -> None:
    warnings.warn(
        f"{len(keys)} tensors hold NaN or inf values (first: {keys[0]!r}); "
        "the model's output will be garbage",
        NonFiniteWeightsWarning,
        stacklevel=3,
    )


def empty_model(config: ParagonSRConfig, form: str) -> ParagonSR:
    """A model with uninitialized weights, for loading a state dict into (skips random init)."""
    with torch.device("meta"):
        model = ParagonSR(config, fused=form == "fused")
    return model.to_empty(device="cpu").eval()


def inspect_checkpoint(source: Source) -> Inspection:
    """Inspect a checkpoint file or an in-memory state dict."""
    state_dict, label = state_dict_of(source)
    try:
        inspection = inspect_state_dict(state_dict)
    except CheckpointError as error:
        raise error.with_source(label) from None
    inspection.source = label
    return inspection


def state_dict_of(source: Source) -> tuple[StateDict, str]:
    """A file's or a mapping's canonical state dict, and the label errors name it by."""
    if isinstance(source, Mapping):
        try:
            return canonical_state_dict(source), "state dict"
        except CheckpointError as error:
            raise error.with_source("state dict") from None
    return read_state_dict(source), str(source)


def load_model(source: Source, *, device: str | torch.device = "cpu") -> ParagonSR:
    """Load a ParagonSR checkpoint (file or state dict) in the form it was saved, in eval mode:
    the plain network with the original key names. For fast inference pass it to
    :func:`paragonsr.optimize_for_inference`, or load a descriptor (:func:`load_descriptor`)."""
    state_dict, label = state_dict_of(source)
    try:
        inspection = inspect_state_dict(state_dict)
    except CheckpointError as error:
        raise error.with_source(label) from None
    model = empty_model(inspection.config, inspection.form)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device)


def save_checkpoint(
    model: ParagonSR | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a flat safetensors checkpoint atomically: a temporary file, then a rename."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(
            path, "checkpoints are written as safetensors", "Name it *.safetensors"
        )
    if path.exists() and not overwrite:
        raise CheckpointError(path, "already exists", "Choose another name or allow overwriting")
    if not path.parent.is_dir():
        raise CheckpointError(path, "the folder does not exist", "Create it first")
    if isinstance(model, torch.nn.Module) and not isinstance(model, ParagonSR):
        raise CheckpointError(
            path, not_a_plain_network(model, "save_checkpoint"), "Nothing was written"
        )
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = save(tensors, metadata=dict(metadata or {}))
    try:
        with atomic_write(path, durable=True) as temporary:
            temporary.write_bytes(data)
    except OSError as error:
        raise CheckpointError(path, f"could not be written ({error.strerror})") from None
    return path
