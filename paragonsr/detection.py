"""What a checkpoint holds, worked out from its key names and tensor shapes alone, without torch.

Form (training or release), scale, channels, width, depth, FFN expansion, kernel sizes and branch
ratio all show in shapes; file names are never consulted. :func:`detect` is the one detection:
:mod:`paragonsr.checkpoint` calls it with the facts of loaded tensors, :mod:`paragonsr.header`
with the facts a ``.safetensors`` header states, so both answer alike by construction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .config import (
    ParagonSRConfig,
    block_tensor_count,
    parameter_shapes,
    ratio_for,
    variant_name,
)
from .errors import CheckpointError, UnsupportedVariantError
from .files import missing_file_problem

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

T = TypeVar("T")


# Prefixes wrappers put on every key (DataParallel, some GAN trainers, torch.compile).
COMMON_PREFIXES = ("module.", "netG.", "_orig_mod.")


def strip_common_prefix(state: dict[str, T]) -> dict[str, T]:
    for prefix in COMMON_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt")


def checked_checkpoint_file(path: Path) -> str:
    """ "safetensors" or "pickle": the format a readable, non-empty checkpoint file's suffix
    names; anything else is refused, naming the file and the fix."""
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
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise CheckpointError(
        path,
        f"unsupported file type {suffix or '(no extension)'!r}",
        "Use a .safetensors, .pth, .ckpt or .pt checkpoint",
    )


@dataclass(frozen=True)
class TensorFacts:
    """What detection needs of one tensor."""

    shape: tuple[int, ...]
    dtype: str  # for messages: torch's name of it ("torch.int64")
    floating: bool


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


def looks_like_paragonsr(keys: Mapping[str, object]) -> bool:
    """True for the ParagonSR networks this package loads (spandrel's detection hook).

    Related networks that reuse some key names (the MagicKernel-upsampler fork, the early
    LayerNorm revision) are left to other loaders; :func:`detect` names them.
    """
    return all(k in keys for k in SIGNATURE_KEYS) and unsupported_relative(keys) is None


def unsupported_relative(keys: Mapping[str, object]) -> str | None:
    if any(k.startswith("magic_upsampler.") for k in keys):
        return (
            "a ParagonSR fork with a MagicKernel upsampler (magic_upsampler.* keys): a different "
            "network whose scale is not stored in the file, so it is not supported"
        )
    if any(k.startswith(("hr_conv_in.", "hr_head.")) for k in keys):
        return (
            "a ParagonSR v2 network (hr_conv_in/hr_head keys), which this package does not support"
        )
    if any(".spatial_mixer.fused_conv." in k or ".spatial_mixer.identity." in k for k in keys):
        return (
            "an early ParagonSR revision (LayerNorm blocks, BatchNorm identity branch), "
            "which this package does not support"
        )
    return None


def detect(
    facts: Mapping[str, TensorFacts],
    other_architecture: Callable[[], str | None] = lambda: None,
) -> Inspection:
    """Form and every hyper-parameter from the shapes, every key checked against the layout they
    describe. ``other_architecture`` names the network a non-ParagonSR file holds, if it can."""
    relative = unsupported_relative(facts)
    if relative is not None:
        raise UnsupportedVariantError(None, f"this is {relative}")
    if all(k in facts for k in OPTIMIZED_SIGNATURE_KEYS):
        raise CheckpointError(
            None,
            "this is the state of an OptimizedParagonSR (the folded, inference-only copy that "
            "optimize_for_inference makes), not a ParagonSR checkpoint",
            "Save the ParagonSR module it was made from instead: "
            "paragonsr.save_checkpoint(model, path)",
        )
    missing = [k for k in SIGNATURE_KEYS if k not in facts]
    if missing:
        other = other_architecture()
        if other is not None or len(missing) > len(SIGNATURE_KEYS) // 2:
            what = f"it looks like {other}" if other else "its keys match no ParagonSR network"
            raise CheckpointError(
                None,
                f"not a ParagonSR checkpoint: {what}",
                "Load it with ComfyUI's Load Upscale Model or spandrel" if other else "",
            )
        raise CheckpointError(None, f"missing key {missing[0]!r}", "The checkpoint is incomplete")

    non_float = [k for k, v in facts.items() if not v.floating]
    if non_float:
        key = non_float[0]
        raise CheckpointError(
            None,
            f"key {key!r} holds {facts[key].dtype} values; ParagonSR weights are floating point",
            "The checkpoint is damaged or from another network",
        )

    num_feat, in_chans = _shape(facts, "conv_in.weight", 4)[:2]
    out_chans = _shape(facts, "conv_out.weight", 4)[0]
    num_groups = _count(facts, r"body\.(\d+)\.")
    num_blocks = _count(facts, r"body\.0\.blocks\.(\d+)\.")
    hidden = _shape(facts, "body.0.blocks.0.transformer.project_in_g.weight", 4)[0]
    branch, _, square, _ = _shape(facts, "body.0.blocks.0.context.dwconv_hw.weight", 4)
    band = _shape(facts, "body.0.blocks.0.context.dwconv_w.weight", 4)[3]
    upsampled = _shape(facts, "upsampler.0.weight", 4)[0]
    scale = round((upsampled / num_feat) ** 0.5)
    if scale < 1 or scale * scale * num_feat != upsampled:
        raise CheckpointError(
            None,
            f"key 'upsampler.0.weight' has {upsampled} output channels, which is not "
            f"{num_feat} features times a square scale",
            "The checkpoint is damaged or from another network",
        )
    if f"{_MIXER}conv3x3.weight" in facts:
        form = "training"
    elif f"{_MIXER}weight" in facts:
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
    _check_depth(facts, config, form)
    _check_keys(facts, parameter_shapes(config, form))
    return Inspection(config, form, variant_name(config))


def _count(keys: Mapping[str, object], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(indices) + 1 if indices else 0


def _shape(facts: Mapping[str, TensorFacts], key: str, ndim: int) -> tuple[int, ...]:
    found = facts.get(key)
    if found is None:
        raise CheckpointError(None, f"missing key {key!r}", "The checkpoint is incomplete")
    if len(found.shape) != ndim:
        raise CheckpointError(
            None,
            f"key {key!r} has shape {found.shape}, expected {ndim} dimensions",
            "The checkpoint is damaged or from another network",
        )
    return found.shape


def _check_depth(facts: Mapping[str, TensorFacts], config: ParagonSRConfig, form: str) -> None:
    """Refuse a depth the tensors cannot hold before listing the layout: the depth comes from the
    highest index in the key names, so one stray key such as ``body.200000.x`` would otherwise
    make the expected layout hundreds of thousands of groups long. Within what the tensors can
    hold, the key-by-key check names what is missing or extra."""
    blocks = config.num_groups * config.num_blocks
    block_tensors = blocks * block_tensor_count(config, form)
    if block_tensors > len(facts):
        raise CheckpointError(
            None,
            f"its key names claim {config.num_groups} groups of {config.num_blocks} blocks "
            f"({block_tensors:,} block tensors), but it holds {len(facts):,} tensors",
            "The checkpoint is damaged or mixes two networks",
        )


def _check_keys(facts: Mapping[str, TensorFacts], expected: Mapping[str, tuple[int, ...]]) -> None:
    for key, shape in expected.items():
        if key not in facts:
            raise CheckpointError(None, f"missing key {key!r}", "The checkpoint is incomplete")
        if facts[key].shape != shape:
            raise CheckpointError(
                None,
                f"key {key!r} has shape {facts[key].shape}, expected {shape} "
                "for the configuration the other tensors describe",
                "The checkpoint is damaged or mixes two networks",
            )
    unexpected = [k for k in facts if k not in expected]
    if unexpected:
        raise CheckpointError(
            None,
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all)",
            "The checkpoint mixes ParagonSR with another network",
        )
