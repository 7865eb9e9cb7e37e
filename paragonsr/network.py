"""The plain ParagonSR network and release fusion (its configurations and named variants live in
:mod:`paragonsr.config`).

One set of classes serves both checkpoint forms: the *training* form, whose FFN spatial mixers carry
three parallel depthwise branches (3x3, 1x1 and a second 3x3), and the *release* form, where each
mixer is a single depthwise 3x3 convolution. Module attribute names are fixed by the original
implementation's checkpoints (``body.G.blocks.B.transformer.spatial_mixer.conv3x3.weight`` and so
on) and must not change.

``ParagonSR.forward`` is this network and nothing else, in every mode: hooks, exporters,
torch.compile and in-place weight edits all see the module they hold. The fast inference network
is a separate, explicit copy: :func:`paragonsr.inference.optimize_for_inference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ParagonSRConfig, config_for_variant


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class MultiScaleDepthwise(nn.Module):
    """Inception-style context: three channel slices get a square, a 1xk and a kx1 depthwise
    convolution; the remaining channels pass through unchanged."""

    def __init__(self, dim: int, square_kernel_size: int, band_kernel_size: int, branch: int):
        super().__init__()
        self.dwconv_hw = nn.Conv2d(
            branch, branch, square_kernel_size, padding=square_kernel_size // 2, groups=branch
        )
        self.dwconv_w = nn.Conv2d(
            branch, branch, (1, band_kernel_size), padding=(0, band_kernel_size // 2), groups=branch
        )
        self.dwconv_h = nn.Conv2d(
            branch, branch, (band_kernel_size, 1), padding=(band_kernel_size // 2, 0), groups=branch
        )
        self.split_sizes = (dim - 3 * branch, branch, branch, branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passthrough, square, wide, tall = torch.split(x, self.split_sizes, dim=1)
        return torch.cat(
            (passthrough, self.dwconv_hw(square), self.dwconv_w(wide), self.dwconv_h(tall)), dim=1
        )


class ReparamDepthwise3x3(nn.Module):
    """Depthwise 3x3 + depthwise 1x1 + depthwise 3x3, or, once reparameterized, the one depthwise
    3x3 convolution they sum to.

    All three branches are linear and share padding, so convolving with the summed kernel gives the
    same result as summing the branch outputs; the forward uses the summed kernel in both forms, and
    autograd carries the gradients back to each branch.
    """

    def __init__(self, channels: int, fused: bool = False) -> None:
        super().__init__()
        self.channels = channels
        if fused:
            self.weight = nn.Parameter(torch.empty(channels, 1, 3, 3))
            self.bias = nn.Parameter(torch.empty(channels))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                nn.init.uniform_(self.bias, -1 / 3, 1 / 3)
        else:
            self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
            self.conv1x1 = nn.Conv2d(channels, channels, 1, groups=channels)
            self.dw_conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    @property
    def is_fused(self) -> bool:
        return "weight" in self._parameters

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_fused:
            return self.weight, self.bias
        one_by_one = self.conv1x1.weight
        # The 1x1 tap lands in the kernel's centre through a broadcast product, not F.pad: the
        # TorchScript ONNX exporter loses the padded kernel's shape under dynamic axes and then
        # refuses the convolution ("kernel of unknown shape").
        centre = torch.zeros(3, 3, dtype=one_by_one.dtype, device=one_by_one.device)
        centre[1, 1] = 1
        weight = self.conv3x3.weight + one_by_one * centre + self.dw_conv3x3.weight
        bias = self.conv3x3.bias + self.conv1x1.bias + self.dw_conv3x3.bias
        return weight, bias

    def reparameterize(self) -> None:
        """Replace the branches by their sum, in place (the release form)."""
        if self.is_fused:
            return
        with torch.no_grad():
            weight, bias = (t.detach().clone() for t in self.fused_kernel())
        del self.conv3x3, self.conv1x1, self.dw_conv3x3
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fused_kernel()
        return F.conv2d(x, weight, bias, padding=1, groups=self.channels)


class GatedFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: bool = False) -> None:
        super().__init__()
        self.project_in_g = nn.Conv2d(dim, hidden, 1)
        self.project_in_i = nn.Conv2d(dim, hidden, 1)
        self.spatial_mixer = ReparamDepthwise3x3(hidden, fused=fused)
        self.act = nn.Mish()
        self.project_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.spatial_mixer(self.project_in_g(x))
        return self.project_out(self.act(gate) * self.project_in_i(x))


class ParagonBlock(nn.Module):
    def __init__(self, config: ParagonSRConfig, fused: bool = False) -> None:
        super().__init__()
        dim = config.num_feat
        # num_groups=1 normalizes over channels *and* the whole image: see paragonsr.exact_tiling.
        self.norm1 = nn.GroupNorm(1, dim)
        self.context = MultiScaleDepthwise(
            dim, config.square_kernel_size, config.band_kernel_size, config.branch_channels
        )
        self.norm2 = nn.GroupNorm(1, dim)
        self.transformer = GatedFFN(dim, config.ffn_hidden, fused=fused)
        self.ls1 = LayerScale(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.context(self.norm1(x)))
        return x + self.ls2(self.transformer(self.norm2(x)))


class ResidualGroup(nn.Module):
    def __init__(self, config: ParagonSRConfig, fused: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ParagonBlock(config, fused=fused) for _ in range(config.num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) + x


class ParagonSR(nn.Module):
    """ParagonSR in training form (``fused=False``) or release form (``fused=True``)."""

    def __init__(self, config: ParagonSRConfig | None = None, *, fused: bool = False) -> None:
        super().__init__()
        config = config or ParagonSRConfig()
        config.validate()
        self.config = config
        nf = config.num_feat
        self.conv_in = nn.Conv2d(config.in_chans, nf, 3, padding=1)
        self.body = nn.Sequential(
            *(ResidualGroup(config, fused=fused) for _ in range(config.num_groups))
        )
        self.conv_fuse = nn.Conv2d(nf, nf, 3, padding=1)
        self.upsampler = nn.Sequential(
            nn.Conv2d(nf, nf * config.scale**2, 3, padding=1), nn.PixelShuffle(config.scale)
        )
        self.conv_out = nn.Conv2d(nf, config.out_chans, 3, padding=1)
        self._move_listeners: list[Callable[[], None]] = []

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def form(self) -> str:
        return "fused" if self.spatial_mixers()[0].is_fused else "training"

    def spatial_mixers(self) -> list[ReparamDepthwise3x3]:
        return [m for m in self.modules() if isinstance(m, ReparamDepthwise3x3)]

    def call_after_move(self, listener: Callable[[], None]) -> None:
        """Have ``listener()`` called whenever this module is moved or converted (``.to``,
        ``.cpu``, ``.cuda``, ``.float``...): an optimized copy made from it (the spandrel
        descriptor's) is dropped there, so no device memory outlives the model's own move."""
        if listener not in self._move_listeners:
            self._move_listeners.append(listener)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        for listener in self._move_listeners:
            listener()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.conv_in(x)
        deep = self.conv_fuse(self.body(shallow)) + shallow
        return self.conv_out(self.upsampler(deep))


def build_model(variant: str, scale: int, *, in_chans: int = 3, fused: bool = False) -> ParagonSR:
    """A freshly initialized network of a named variant (nano, tiny, xs, s, m, l, xl)."""
    return ParagonSR(config_for_variant(variant, scale, in_chans), fused=fused)


def fuse_for_release(model: ParagonSR) -> ParagonSR:
    """Reparameterize every spatial mixer in place (the release form); a fused model is returned
    unchanged. The result is key for key the checkpoint the original implementation writes."""
    if not isinstance(model, ParagonSR):
        raise TypeError(not_a_plain_network(model, "fuse_for_release"))
    for module in model.modules():
        if isinstance(module, ReparamDepthwise3x3):
            module.reparameterize()
    return model


def not_a_plain_network(value: object, where: str) -> str:
    """The message for a caller who handed ``where`` something other than a ParagonSR module."""
    if type(value).__name__ == "OptimizedParagonSR":
        return (
            f"{where} needs the ParagonSR module (the plain network with the original's weights), "
            "not the OptimizedParagonSR made from it by optimize_for_inference: that copy is "
            "inference-only, its weights are folded and renamed. Pass the model you optimized, "
            "or load the checkpoint again with paragonsr.load_model"
        )
    return f"{where} needs a ParagonSR module, got {type(value).__name__}"
