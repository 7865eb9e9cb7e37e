"""Reading checkpoints, working out what they hold, and writing them back.

Everything about a network comes from its tensors: form (training or release), scale, channels,
width, depth, FFN expansion, kernel sizes and branch ratio. File names are never consulted.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

import torch

from .errors import CheckpointError, UnsupportedVariantError
from .files import atomic_write, missing_file_problem
from .network import (
    ParagonBlock,
    ParagonSR,
    ParagonSRConfig,
    not_a_plain_network,
    ratio_for,
    variant_name,
)

StateDict = dict[str, torch.Tensor]
Source: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any]"

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt")
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
COMMON_PREFIXES = ("module.", "netG.", "_orig_mod.")

# Keys every ParagonSR network has, whatever its form and configuration.
SIGNATURE_KEYS = (
    "conv_in.weight",
    "body.0.blocks.0.norm1.weight",
    "body.0.blocks.0.context.dwconv_hw.weight",
    "body.0.blocks.0.transformer.project_in_g.weight",
    "body.0.blocks.0.transformer.project_in_i.weight",
    "body.0.blocks.0.transformer.project_out.weight",
    "body.0.blocks.0.ls1.gamma",
    "conv_fuse.weight",
    "upsampler.0.weight",
    "conv_out.weight",
)
_MIXER = "body.0.blocks.0.transformer.spatial_mixer."
# Buffers only the optimized copy has: its state dict is no checkpoint, and saying so helps.
OPTIMIZED_SIGNATURE_KEYS = ("conv_in_weight", "tail_weight", "groups.0.0.project_in_weight")


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint holds NaN or infinite weights; its outputs will be garbage."""


@dataclass
class Inspection:
    """What a checkpoint holds."""

    config: ParagonSRConfig
    form: str  # "training" or "fused"
    variant: str | None
    source: str = "state dict"
    non_finite_keys: list[str] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        """spandrel descriptor tags: ``["nano", "24nf", "3ng", "2nb", "1.5ffn", "training"]``.

        They follow spandrel's own: a size name first where the family table has one (DAT, SwinIR),
        then a number with a short unit (ESRGAN's ``"64nf"``, ``"23nb"``; RCAN counts groups and
        blocks per group apart): features, groups, blocks per group, FFN expansion, kernel sizes
        and branch ratio where they are not the defaults, and the form last. chaiNNer shows them
        joined by "x" as the model's size, so no tag holds an "x" of its own.
        """
        c = self.config
        tags = [f"{c.num_feat}nf", f"{c.num_groups}ng", f"{c.num_blocks}nb"]
        tags.append(f"{c.ffn_expansion:g}ffn")
        if (c.square_kernel_size, c.band_kernel_size) != (3, 11):
            tags += [f"{c.square_kernel_size}ks", f"{c.band_kernel_size}bks"]
        if c.branch_ratio != 0.125:
            tags.append(f"{c.branch_ratio:g}br")
        tags.append(self.form)
        return ([self.variant] if self.variant else []) + tags


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, unwrapped and de-prefixed.

    Pickles (.pth/.ckpt/.pt) go through torch's weights-only unpickler: a file that references any
    global beyond tensors and plain containers is refused without running it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, *missing_file_problem(path))
    if not path.is_file():
        raise CheckpointError(path, "is not a file", "Give the path of a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "permission denied", "Make the file readable for this user")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty", "Download or export it again")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        raw: Any = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_pickle(path)
    else:
        raise CheckpointError(
            path,
            f"unsupported file type {suffix or '(no extension)'!r}",
            "Use a .safetensors, .pth, .ckpt or .pt checkpoint",
        )
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
    state = {str(k): v for k, v in state.items()}
    for prefix in COMMON_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def looks_like_paragonsr(state_dict: Mapping[str, Any]) -> bool:
    """True for the ParagonSR networks this package loads (spandrel's detection hook).

    Related networks that reuse some key names (the MagicKernel-upsampler fork, the early
    LayerNorm revision) are left to other loaders; :func:`inspect_state_dict` names them.
    """
    return (
        all(k in state_dict for k in SIGNATURE_KEYS) and _unsupported_relative(state_dict) is None
    )


def _unsupported_relative(state_dict: Mapping[str, Any]) -> str | None:
    if any(k.startswith("magic_upsampler.") for k in state_dict):
        return (
            "a ParagonSR fork with a MagicKernel upsampler (magic_upsampler.* keys): a different "
            "network whose scale is not stored in the file, so it is not supported"
        )
    if any(k.startswith(("hr_conv_in.", "hr_head.")) for k in state_dict):
        return (
            "a ParagonSR v2 network (hr_conv_in/hr_head keys), which this package does not support"
        )
    if any(
        ".spatial_mixer.fused_conv." in k or ".spatial_mixer.identity." in k for k in state_dict
    ):
        return (
            "an early ParagonSR revision (LayerNorm blocks, BatchNorm identity branch), "
            "which this package does not support"
        )
    return None


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


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    return max(indices) + 1 if indices else 0


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    tensor = state_dict.get(key)
    if tensor is None:
        raise CheckpointError(None, f"missing key {key!r}", "The checkpoint is incomplete")
    if tensor.ndim != ndim:
        raise CheckpointError(
            None,
            f"key {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dimensions",
            "The checkpoint is damaged or from another network",
        )
    return tuple(tensor.shape)


def inspect_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Inspection:
    """Work out form and every hyper-parameter from tensor shapes, and check every key."""
    relative = _unsupported_relative(state_dict)
    if relative is not None:
        raise UnsupportedVariantError(None, f"this is {relative}")
    if all(k in state_dict for k in OPTIMIZED_SIGNATURE_KEYS):
        raise CheckpointError(
            None,
            "this is the state of an OptimizedParagonSR (the folded, inference-only copy that "
            "optimize_for_inference makes), not a ParagonSR checkpoint",
            "Save the ParagonSR module it was made from instead: "
            "paragonsr.save_checkpoint(model, path)",
        )
    missing = [k for k in SIGNATURE_KEYS if k not in state_dict]
    if missing:
        other = _other_architecture(state_dict)
        if other is not None or len(missing) > len(SIGNATURE_KEYS) // 2:
            what = f"it looks like {other}" if other else "its keys match no ParagonSR network"
            raise CheckpointError(
                None,
                f"not a ParagonSR checkpoint: {what}",
                "Load it with ComfyUI's Load Upscale Model or spandrel" if other else "",
            )
        raise CheckpointError(None, f"missing key {missing[0]!r}", "The checkpoint is incomplete")

    non_float = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if non_float:
        key = non_float[0]
        raise CheckpointError(
            None,
            f"key {key!r} holds {state_dict[key].dtype} values; ParagonSR weights are floating "
            "point",
            "The checkpoint is damaged or from another network",
        )

    num_feat, in_chans = _shape(state_dict, "conv_in.weight", 4)[:2]
    out_chans = _shape(state_dict, "conv_out.weight", 4)[0]
    num_groups = _count(state_dict, r"body\.(\d+)\.")
    num_blocks = _count(state_dict, r"body\.0\.blocks\.(\d+)\.")
    hidden = _shape(state_dict, "body.0.blocks.0.transformer.project_in_g.weight", 4)[0]
    branch, _, square, _ = _shape(state_dict, "body.0.blocks.0.context.dwconv_hw.weight", 4)
    band = _shape(state_dict, "body.0.blocks.0.context.dwconv_w.weight", 4)[3]
    upsampled = _shape(state_dict, "upsampler.0.weight", 4)[0]
    scale = round((upsampled / num_feat) ** 0.5)
    if scale < 1 or scale * scale * num_feat != upsampled:
        raise CheckpointError(
            None,
            f"key 'upsampler.0.weight' has {upsampled} output channels, which is not "
            f"{num_feat} features times a square scale",
            "The checkpoint is damaged or from another network",
        )
    if f"{_MIXER}conv3x3.weight" in state_dict:
        form = "training"
    elif f"{_MIXER}weight" in state_dict:
        form = "fused"
    else:
        raise CheckpointError(
            None,
            f"missing key {_MIXER + 'conv3x3.weight'!r} (training form) or "
            f"{_MIXER + 'weight'!r} (fused form)",
            "The checkpoint is incomplete",
        )
    try:
        config = ParagonSRConfig(
            scale=scale,
            in_chans=in_chans,
            out_chans=out_chans,
            num_feat=num_feat,
            num_groups=num_groups,
            num_blocks=num_blocks,
            ffn_expansion=ratio_for(hidden, num_feat),
            square_kernel_size=square,
            band_kernel_size=band,
            branch_ratio=ratio_for(branch, num_feat),
        )
        config.validate()
    except ValueError as error:
        raise CheckpointError(None, str(error), "The checkpoint is damaged") from None
    _check_depth(state_dict, config, form)
    _check_keys(state_dict, expected_shapes(config, form))

    non_finite = [k for k, v in state_dict.items() if not torch.isfinite(v).all()]
    if non_finite:
        warnings.warn(
            f"{len(non_finite)} tensors hold NaN or inf values (first: {non_finite[0]!r}); "
            "the model's output will be garbage",
            NonFiniteWeightsWarning,
            stacklevel=2,
        )
    return Inspection(config, form, variant_name(config), non_finite_keys=non_finite)


def _check_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(None, f"missing key {key!r}", "The checkpoint is incomplete")
        if state_dict[key].shape != shape:
            raise CheckpointError(
                None,
                f"key {key!r} has shape {tuple(state_dict[key].shape)}, expected {tuple(shape)} "
                "for the configuration the other tensors describe",
                "The checkpoint is damaged or mixes two networks",
            )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointError(
            None,
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all)",
            "The checkpoint mixes ParagonSR with another network",
        )


def _check_depth(
    state_dict: Mapping[str, torch.Tensor], config: ParagonSRConfig, form: str
) -> None:
    """Refuse a depth the tensors cannot hold before building anything: the depth comes from the
    highest index in the key names, so one stray key such as ``body.200000.x`` would otherwise
    make the meta-device twin hundreds of thousands of groups deep (hours, tens of GB). Within
    what the tensors can hold, the key-by-key check names what is missing or extra."""
    with torch.device("meta"):
        per_block = len(ParagonBlock(config, fused=form == "fused").state_dict())
    blocks = config.num_groups * config.num_blocks
    if blocks * per_block > len(state_dict):
        raise CheckpointError(
            None,
            f"its key names claim {config.num_groups} groups of {config.num_blocks} blocks "
            f"({blocks * per_block:,} block tensors), but it holds {len(state_dict):,} tensors",
            "The checkpoint is damaged or mixes two networks",
        )


def expected_shapes(config: ParagonSRConfig, form: str) -> dict[str, torch.Size]:
    """Every key and shape of ``config``'s network in ``form``, in state-dict order.

    Blocks are all alike, so one network of one group of one block is built (on the meta device)
    and its block's entries are repeated for every group and block: xl's 144 blocks would
    otherwise take seconds to construct, for a question the file's header answers."""
    with torch.device("meta"):
        model = ParagonSR(replace(config, num_groups=1, num_blocks=1), fused=form == "fused")
    prefix = "body.0.blocks.0."
    small = {key: value.shape for key, value in model.state_dict().items()}
    block = {key[len(prefix) :]: shape for key, shape in small.items() if key.startswith(prefix)}
    first_of_block = prefix + next(iter(block))
    shapes: dict[str, torch.Size] = {}
    for key, shape in small.items():
        if not key.startswith(prefix):
            shapes[key] = shape
        elif key == first_of_block:
            for group, index in itertools.product(
                range(config.num_groups), range(config.num_blocks)
            ):
                shapes.update({f"body.{group}.blocks.{index}.{n}": s for n, s in block.items()})
    return shapes


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
