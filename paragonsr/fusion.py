"""Fusion at two levels.

*Release fusion* (:func:`fuse_for_release`) sums each FFN spatial mixer's three depthwise branches
into one depthwise 3x3 convolution. The result is a checkpoint format of its own, key for key the
one the original implementation writes, so it stays interchangeable with other tools.

*Inference optimization* (:func:`optimize_for_inference`) goes further, in memory only, and is
what evaluation runs. Per block:

- LayerScale ``gamma1`` moves into the context convolutions (output channel scaling) and, for the
  pass-through channels that have no convolution, into GroupNorm-1's affine;
- GroupNorm-2's affine moves into the two 1x1 input projections, which become one 1x1 convolution
  producing gate and value together;
- LayerScale ``gamma2`` moves into the 1x1 output projection;
- tensors stay in channels_last order throughout, with no permute round trips.

The tail ``conv 3x3 (nf -> nf*s^2) -> PixelShuffle(s) -> conv 3x3 (nf -> out)`` is linear, so it
collapses into one 5x5 convolution at low resolution (``nf -> out*s^2``) followed by PixelShuffle,
which never materializes the nf-channel high-resolution feature map. Composition is exact except
where ``conv_out``'s zero padding meets the image border: there the original pads the
*intermediate* map with zeros, whereas the composite would see its values extrapolated. The
outermost output row and column on each side are recomputed exactly from 2- or 3-pixel strips
of the input.

Every fold is done in float64 and only then cast to the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ParagonBlock, ParagonSR, ReparamDepthwise3x3
from .tiles import grid, run_tiled


def fuse_for_release(model: ParagonSR) -> ParagonSR:
    """Reparameterize every spatial mixer in place; a fused model is returned unchanged."""
    for module in model.modules():
        if isinstance(module, ReparamDepthwise3x3):
            module.reparameterize()
    model.set_inference_optimization(model.inference_optimization)  # drop any cached copy
    return model


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class OptimizedBlock(nn.Module):
    def __init__(self, block: ParagonBlock) -> None:
        super().__init__()
        context = block.context
        passthrough, branch = context.split_sizes[0], context.split_sizes[1]
        gamma1, gamma2 = _f64(block.ls1.gamma), _f64(block.ls2.gamma)

        norm1_scale = torch.ones_like(gamma1)
        norm1_scale[:passthrough] = gamma1[:passthrough]
        self.register_buffer("norm1_weight", _f64(block.norm1.weight) * norm1_scale)
        self.register_buffer("norm1_bias", _f64(block.norm1.bias) * norm1_scale)
        self.eps1 = block.norm1.eps
        self.split_sizes = context.split_sizes

        convs = (context.dwconv_hw, context.dwconv_w, context.dwconv_h)
        self.paddings = [conv.padding for conv in convs]
        for index, conv in enumerate(convs):
            start = passthrough + index * branch
            gamma = gamma1[start : start + branch]
            self.register_buffer(
                f"context{index}_weight", _f64(conv.weight) * gamma.view(-1, 1, 1, 1)
            )
            self.register_buffer(f"context{index}_bias", _f64(conv.bias) * gamma)

        ffn = block.transformer
        norm2_weight, norm2_bias = _f64(block.norm2.weight), _f64(block.norm2.bias)
        project_in = torch.cat((_f64(ffn.project_in_g.weight), _f64(ffn.project_in_i.weight)))
        project_in_bias = torch.cat((_f64(ffn.project_in_g.bias), _f64(ffn.project_in_i.bias)))
        self.register_buffer("project_in_weight", project_in * norm2_weight.view(1, -1, 1, 1))
        self.register_buffer(
            "project_in_bias", project_in_bias + project_in.flatten(1) @ norm2_bias
        )
        self.eps2 = block.norm2.eps
        self.hidden = ffn.project_in_g.out_channels

        mixer_weight, mixer_bias = ffn.spatial_mixer.fused_kernel()
        self.register_buffer("mixer_weight", _f64(mixer_weight))
        self.register_buffer("mixer_bias", _f64(mixer_bias))
        self.register_buffer(
            "project_out_weight", _f64(ffn.project_out.weight) * gamma2.view(-1, 1, 1, 1)
        )
        self.register_buffer("project_out_bias", _f64(ffn.project_out.bias) * gamma2)

    @property
    def context_halo(self) -> int:
        """How far the context convolutions reach, in pixels (the band kernel's half width)."""
        return max(max(padding) for padding in self.paddings)

    def context(self, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """``residual + LayerScale(context(normed))`` for a region; ``normed`` is GroupNorm-1's
        output with this block's folded affine (see :meth:`norm1_affine`)."""
        # The pass-through channels are residual + normed; each branch's channels are then
        # overwritten with residual + conv(normed): no split/concatenate round trip.
        out = residual + normed
        start = self.split_sizes[0]
        for index, size in enumerate(self.split_sizes[1:]):
            channels = slice(start, start + size)
            branch = F.conv2d(
                normed[:, channels],
                getattr(self, f"context{index}_weight"),
                getattr(self, f"context{index}_bias"),
                padding=self.paddings[index],
                groups=size,
            )
            torch.add(residual[:, channels], branch, out=out[:, channels])
            start += size
        return out

    def ffn_delta(self, normed: torch.Tensor) -> torch.Tensor:
        """``LayerScale(ffn(normed))`` for a region; ``normed`` is GroupNorm-2's output without
        affine (folded into the projection). Reaches one pixel (the 3x3 mixer)."""
        gate, value = F.conv2d(normed, self.project_in_weight, self.project_in_bias).split(
            self.hidden, dim=1
        )
        gate = F.conv2d(gate, self.mixer_weight, self.mixer_bias, padding=1, groups=self.hidden)
        return F.conv2d(mish_(gate).mul_(value), self.project_out_weight, self.project_out_bias)

    def norm1_affine(self, mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, shift) with GroupNorm-1(x) == x * scale + shift, from per-sample statistics
        shaped [N, 1, 1, 1]."""
        scale = rstd * self.norm1_weight.view(1, -1, 1, 1)
        return scale, self.norm1_bias.view(1, -1, 1, 1) - mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.context(x, F.group_norm(x, 1, self.norm1_weight, self.norm1_bias, self.eps1))
        # The FFN runs in bands of rows. Its temporaries are 2*hidden channels wide; whole-image
        # ones cost page faults on every allocation (glibc returns big blocks to the system) and
        # fall out of cache between the elementwise passes. Each band reads its halo row from
        # `normed`, never from x, so x can be updated in place band by band.
        normed = F.group_norm(x, 1, None, None, self.eps2)
        height, width = x.shape[2:]
        rows = band_rows(x.shape[0] * width * 2 * self.hidden * x.element_size(), height)
        run_tiled(
            lambda region: self.ffn_delta(normed[..., region.top : region.bottom, :]),
            grid(height, width, rows, width),
            1,
            height,
            width,
            lambda tile, delta: x[..., tile.top : tile.bottom, :].add_(delta),
        )
        return x


BAND_BYTES = 8 << 20


def band_rows(bytes_per_row: int, height: int) -> int:
    """Rows per band so that one band's widest temporary holds about BAND_BYTES (at least 16
    rows, to keep the one-row halos cheap)."""
    return max(16, min(height, BAND_BYTES // max(1, bytes_per_row)))


def mish_(x: torch.Tensor) -> torch.Tensor:
    """Mish, overwriting ``x``: x * tanh(softplus(x)) = x - 2x / (e^x (e^x + 2) + 2).

    ATen's CPU Mish runs 3-4x slower than these few vectorized passes, which stay exact to float
    rounding (within 1.3e-6 of float64 Mish for |x| up to 1e4): e^x overflowing to inf
    gives x, and e^x vanishing gives 0, as Mish does.
    """
    exp = torch.exp(x)
    denominator = exp + 2
    denominator.mul_(exp).add_(2)
    return torch.addcdiv(x, x, denominator, value=-2.0, out=exp)


def composite_tail_kernel(
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    scale: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5x5 low-resolution kernel equal to conv3x3 -> PixelShuffle(scale) -> conv3x3 (interior).

    Output channel ``o*s*s + a*s + b`` holds high-resolution sub-pixel (a, b) of channel o, so a
    PixelShuffle of the composite output lines up with the original.
    """
    s = scale
    nf = out_weight.shape[1]
    out_ch = out_weight.shape[0]
    up = up_weight.reshape(nf, s, s, *up_weight.shape[1:])  # [c, a2, b2, k, 3, 3]
    up_b = up_bias.reshape(nf, s, s)
    kernel = up_weight.new_zeros(out_ch, s, s, up_weight.shape[1], 5, 5)
    bias = out_bias.view(out_ch, 1, 1).repeat(1, s, s)
    for a in range(s):
        for b in range(s):
            for dy in (-1, 0, 1):
                lr_y, a2 = divmod(a + dy, s)
                for dx in (-1, 0, 1):
                    lr_x, b2 = divmod(b + dx, s)
                    tap = out_weight[:, :, dy + 1, dx + 1]  # [o, c]
                    kernel[:, a, b, :, lr_y + 1 : lr_y + 4, lr_x + 1 : lr_x + 4] += torch.einsum(
                        "oc,ckyx->okyx", tap, up[:, a2, b2]
                    )
                    bias[:, a, b] += tap @ up_b[:, a2, b2]
    return kernel.reshape(out_ch * s * s, -1, 5, 5), bias.reshape(-1)


class OptimizedParagonSR(nn.Module):
    """Inference-only ParagonSR with every fold applied; see the module docstring."""

    def __init__(self, model: ParagonSR, channels_last: bool = True) -> None:
        super().__init__()
        self.config = model.config
        self.scale = model.config.scale
        self.channels_last = channels_last
        self.register_buffer("conv_in_weight", _f64(model.conv_in.weight))
        self.register_buffer("conv_in_bias", _f64(model.conv_in.bias))
        self.groups = nn.ModuleList(
            nn.Sequential(*(OptimizedBlock(block) for block in group.blocks))
            for group in model.body
        )
        self.register_buffer("conv_fuse_weight", _f64(model.conv_fuse.weight))
        self.register_buffer("conv_fuse_bias", _f64(model.conv_fuse.bias))
        up, out = model.upsampler[0], model.conv_out
        for name, tensor in (
            ("up_weight", up.weight),
            ("up_bias", up.bias),
            ("out_weight", out.weight),
            ("out_bias", out.bias),
        ):
            self.register_buffer(name, _f64(tensor))
        tail_weight, tail_bias = composite_tail_kernel(
            self.up_weight, self.up_bias, self.out_weight, self.out_bias, self.scale
        )
        self.register_buffer("tail_weight", tail_weight)
        self.register_buffer("tail_bias", tail_bias)
        reference = next(model.parameters())
        self.to(device=reference.device, dtype=reference.dtype)

    def tail_exact(self, x: torch.Tensor) -> torch.Tensor:
        upsampled = F.pixel_shuffle(
            F.conv2d(x, self.up_weight, self.up_bias, padding=1), self.scale
        )
        return F.conv2d(upsampled, self.out_weight, self.out_bias, padding=1)

    tail_halo = 2  # the collapsed 5x5 kernel's reach, in low-resolution pixels

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Upsampler and output convolution of a region, border pixels exact."""
        height, width = x.shape[-2:]
        if height < 3 or width < 3:
            return self.tail_exact(x)
        s = self.scale
        fast = F.pixel_shuffle(F.conv2d(x, self.tail_weight, self.tail_bias, padding=2), s)
        # Only the outermost output row/column sees conv_out's padding of the intermediate map.
        # It needs the intermediate rows 0 and 1: low-resolution row 0 alone when s >= 2, which
        # in turn needs input rows 0-1; rows 0-1 (input rows 0-2) when s == 1.
        rows = 2 if s > 1 else 3
        top = self.tail_exact(x[:, :, :rows])[:, :, :1]
        bottom = self.tail_exact(x[:, :, -rows:])[:, :, -1:]
        left = self.tail_exact(x[:, :, :, :rows])[:, :, 1:-1, :1]
        right = self.tail_exact(x[:, :, :, -rows:])[:, :, 1:-1, -1:]
        middle = torch.cat((left, fast[:, :, 1:-1, 1:-1], right), dim=3)
        return torch.cat((top, middle, bottom), dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        shallow = F.conv2d(x, self.conv_in_weight, self.conv_in_bias, padding=1)
        deep = shallow
        for group in self.groups:
            deep = group(deep).add_(deep)  # blocks return a tensor of their own
        deep = F.conv2d(deep, self.conv_fuse_weight, self.conv_fuse_bias, padding=1).add_(shallow)
        return self.tail(deep).contiguous()


@torch.no_grad()
def optimize_for_inference(model: ParagonSR, channels_last: bool = True) -> OptimizedParagonSR:
    """An inference-only copy of ``model`` (either form) with every fold applied."""
    return OptimizedParagonSR(model, channels_last=channels_last).eval()
