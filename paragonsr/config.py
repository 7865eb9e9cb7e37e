"""What a ParagonSR network is, without torch: its hyper-parameters, the family table, the
layout of its checkpoints and its cost.

Everything here is plain Python, so that answering questions about a checkpoint (``paragonsr
info`` on a ``.safetensors`` header, argument choices, ``--help``) never waits for torch to
import. :mod:`paragonsr.network` builds the modules from these configurations; a test holds
:func:`parameter_shapes` to their state dicts for every variant, form and a set of custom shapes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

FORMS = ("training", "fused")


@dataclass(frozen=True)
class ParagonSRConfig:
    """Every hyper-parameter of a ParagonSR network; each one shows in some tensor shape."""

    scale: int = 4
    in_chans: int = 3
    out_chans: int = 3
    num_feat: int = 64
    num_groups: int = 6
    num_blocks: int = 6
    ffn_expansion: float = 2.0
    square_kernel_size: int = 3
    band_kernel_size: int = 11
    branch_ratio: float = 0.125

    @property
    def ffn_hidden(self) -> int:
        # int() truncation, as in the original, decides the hidden width for fractional ratios.
        return int(self.num_feat * self.ffn_expansion)

    @property
    def branch_channels(self) -> int:
        return int(self.num_feat * self.branch_ratio)

    def validate(self) -> None:
        problems = []
        if not 1 <= self.scale <= 16:
            problems.append(f"scale {self.scale} is outside 1-16")
        if self.in_chans < 1 or self.out_chans < 1:
            problems.append("channel counts must be positive")
        if self.num_groups < 1 or self.num_blocks < 1:
            problems.append("num_groups and num_blocks must be at least 1")
        if self.ffn_hidden < 1:
            problems.append(f"ffn_expansion {self.ffn_expansion} leaves no hidden channels")
        if self.branch_channels < 1 or 3 * self.branch_channels > self.num_feat:
            problems.append(
                f"branch_ratio {self.branch_ratio} gives {self.branch_channels} channels per "
                f"branch "
                f"for {self.num_feat} features (need 1 to {self.num_feat // 3})"
            )
        for name in ("square_kernel_size", "band_kernel_size"):
            size = getattr(self, name)
            if size < 1 or size % 2 == 0:
                problems.append(f"{name} {size} must be odd and positive")
        if problems:
            raise ValueError("invalid ParagonSR configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    name: str
    num_feat: int
    num_groups: int
    num_blocks: int
    ffn_expansion: float = 2.0
    # Other (groups, blocks) layouts published under the same name.
    other_layouts: tuple[tuple[int, int], ...] = ()

    def config(self, scale: int, in_chans: int = 3) -> ParagonSRConfig:
        return ParagonSRConfig(
            scale=scale,
            in_chans=in_chans,
            out_chans=in_chans,
            num_feat=self.num_feat,
            num_groups=self.num_groups,
            num_blocks=self.num_blocks,
            ffn_expansion=self.ffn_expansion,
        )


# The family table of the architecture's README. The original training code builds "tiny" as
# 3 groups x 2 blocks; checkpoints of either layout carry the name.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("nano", 24, 3, 2, 1.5),
        Variant("tiny", 32, 3, 3, 2.0, other_layouts=((3, 2),)),
        Variant("xs", 48, 4, 4),
        Variant("s", 64, 6, 6),
        Variant("m", 96, 8, 8),
        Variant("l", 128, 10, 10),
        Variant("xl", 160, 12, 12),
    )
}


def variant_name(config: ParagonSRConfig) -> str | None:
    """The family member whose shape ``config`` has, or None for a custom configuration."""
    defaults = ParagonSRConfig()
    if (config.square_kernel_size, config.band_kernel_size) != (
        defaults.square_kernel_size,
        defaults.band_kernel_size,
    ) or config.branch_channels != int(config.num_feat * defaults.branch_ratio):
        return None
    for variant in VARIANTS.values():
        layouts = ((variant.num_groups, variant.num_blocks), *variant.other_layouts)
        if (
            config.num_feat == variant.num_feat
            and (config.num_groups, config.num_blocks) in layouts
            and config.ffn_hidden == int(variant.num_feat * variant.ffn_expansion)
        ):
            return variant.name
    return None


def config_for_variant(name: str, scale: int, in_chans: int = 3) -> ParagonSRConfig:
    try:
        variant = VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown ParagonSR variant {name!r}; choose one of {', '.join(VARIANTS)}"
        ) from None
    return variant.config(scale, in_chans)


def ratio_for(count: int, total: int) -> float:
    """The smallest float ratio r with int(total * r) == count, shown rounded when that is exact."""
    for digits in (2, 3, 4, 6):
        rounded = round(count / total, digits)
        if int(total * rounded) == count:
            return rounded
    ratio = count / total
    while int(total * ratio) < count:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def macs_per_pixel(config: ParagonSRConfig, form: str) -> int:
    """Multiply-accumulates per low-resolution input pixel of the convolutions in ``form``.

    "training" is the original's three-branch forward (this package's training forward convolves
    with the summed mixer kernel and costs what "fused" costs); "optimized" is the inference
    network of :mod:`paragonsr.inference`. Normalization, activation and LayerScale are
    elementwise and not counted; neither are the optimized tail's exact border strips, which
    cost O(perimeter)."""
    nf, hidden, branch = config.num_feat, config.ffn_hidden, config.branch_channels
    mixer_taps = 9 + 1 + 9 if form == "training" else 9
    block = (
        branch * (config.square_kernel_size**2 + 2 * config.band_kernel_size)
        + 2 * nf * hidden
        + mixer_taps * hidden
        + hidden * nf
    )
    head = 9 * config.in_chans * nf + 9 * nf * nf
    s2 = config.scale**2
    if form == "optimized":
        tail = 25 * nf * config.out_chans * s2
    elif form in FORMS:
        tail = 9 * nf * nf * s2 + 9 * nf * config.out_chans * s2
    else:
        raise ValueError(f"unknown form {form!r}")
    return head + config.num_groups * config.num_blocks * block + tail


Shape = tuple[int, ...]


def _block_shapes(config: ParagonSRConfig, form: str) -> dict[str, Shape]:
    """One ParagonBlock's keys (relative to the block) and shapes, in state-dict order."""
    nf, hidden, branch = config.num_feat, config.ffn_hidden, config.branch_channels
    square, band = config.square_kernel_size, config.band_kernel_size
    if form == "training":
        mixer = {
            "conv3x3.weight": (hidden, 1, 3, 3),
            "conv3x3.bias": (hidden,),
            "conv1x1.weight": (hidden, 1, 1, 1),
            "conv1x1.bias": (hidden,),
            "dw_conv3x3.weight": (hidden, 1, 3, 3),
            "dw_conv3x3.bias": (hidden,),
        }
    elif form == "fused":
        mixer = {"weight": (hidden, 1, 3, 3), "bias": (hidden,)}
    else:
        raise ValueError(f"unknown form {form!r}")
    return {
        "norm1.weight": (nf,),
        "norm1.bias": (nf,),
        "context.dwconv_hw.weight": (branch, 1, square, square),
        "context.dwconv_hw.bias": (branch,),
        "context.dwconv_w.weight": (branch, 1, 1, band),
        "context.dwconv_w.bias": (branch,),
        "context.dwconv_h.weight": (branch, 1, band, 1),
        "context.dwconv_h.bias": (branch,),
        "norm2.weight": (nf,),
        "norm2.bias": (nf,),
        "transformer.project_in_g.weight": (hidden, nf, 1, 1),
        "transformer.project_in_g.bias": (hidden,),
        "transformer.project_in_i.weight": (hidden, nf, 1, 1),
        "transformer.project_in_i.bias": (hidden,),
        **{f"transformer.spatial_mixer.{key}": shape for key, shape in mixer.items()},
        "transformer.project_out.weight": (nf, hidden, 1, 1),
        "transformer.project_out.bias": (nf,),
        "ls1.gamma": (nf,),
        "ls2.gamma": (nf,),
    }


def block_tensor_count(config: ParagonSRConfig, form: str) -> int:
    """How many tensors one block holds: a checkpoint's key count bounds its depth."""
    return len(_block_shapes(config, form))


def parameter_shapes(config: ParagonSRConfig, form: str) -> dict[str, Shape]:
    """Every key and shape of ``config``'s network in ``form``, in state-dict order: the layout
    of its checkpoints (the original implementation's key names)."""
    nf, s2 = config.num_feat, config.scale**2
    block = _block_shapes(config, form)
    shapes: dict[str, Shape] = {
        "conv_in.weight": (nf, config.in_chans, 3, 3),
        "conv_in.bias": (nf,),
    }
    for group in range(config.num_groups):
        for index in range(config.num_blocks):
            prefix = f"body.{group}.blocks.{index}."
            shapes.update({prefix + key: shape for key, shape in block.items()})
    shapes.update(
        {
            "conv_fuse.weight": (nf, nf, 3, 3),
            "conv_fuse.bias": (nf,),
            "upsampler.0.weight": (nf * s2, nf, 3, 3),
            "upsampler.0.bias": (nf * s2,),
            "conv_out.weight": (config.out_chans, nf, 3, 3),
            "conv_out.bias": (config.out_chans,),
        }
    )
    return shapes


def parameter_count(config: ParagonSRConfig, form: str) -> int:
    return sum(math.prod(shape) for shape in parameter_shapes(config, form).values())


def optimized_value_count(config: ParagonSRConfig) -> int:
    """Values the inference network (:class:`paragonsr.inference.OptimizedParagonSR`) holds:
    the release form less each block's GroupNorm-2 affine and two LayerScales (folded into the
    convolutions), plus the collapsed 5x5 tail kept beside the exact one for the border."""
    nf, outputs = config.num_feat, config.out_chans * config.scale**2
    folded_away = config.num_groups * config.num_blocks * 4 * nf
    return parameter_count(config, "fused") - folded_away + outputs * (25 * nf + 1)
