"""Run this package's ParagonSR modules the way the original implementation executes them.

The original deploys with two costs our plain forward does not have: LayerScale permutes to
channels-last, makes the tensor contiguous, multiplies and permutes back (two extra copies of the
activation per call); in training mode each spatial mixer runs its three branch convolutions;
and in eval mode the training form rebuilds every spatial mixer's fused kernel on each forward,
filling the depthwise kernel channel by channel in a Python loop. These
patches reproduce those operations so benchmarks can compare against the form users deploy today.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from paragonsr.network import LayerScale, ReparamDepthwise3x3


def _layerscale_forward(self: LayerScale, x: torch.Tensor) -> torch.Tensor:
    return (x.permute(0, 2, 3, 1).contiguous() * self.gamma).permute(0, 3, 1, 2).contiguous()


def _mixer_forward(self: ReparamDepthwise3x3, x: torch.Tensor) -> torch.Tensor:
    if self.is_fused:
        return F.conv2d(x, self.weight, self.bias, padding=1, groups=self.channels)
    if self.training:  # three branch convolutions, summed
        return self.conv3x3(x) + self.conv1x1(x) + self.dw_conv3x3(x)
    weight = self.conv3x3.weight.clone() + F.pad(self.conv1x1.weight, [1, 1, 1, 1])
    bias = self.conv3x3.bias.clone() + self.conv1x1.bias
    depthwise = torch.zeros_like(weight)
    for channel in range(self.channels):
        depthwise[channel, 0] = self.dw_conv3x3.weight[channel, 0]
    weight = weight + depthwise
    bias = bias + self.dw_conv3x3.bias
    return F.conv2d(x, weight, bias, padding=1, groups=self.channels)


@contextlib.contextmanager
def reference_style() -> Iterator[None]:
    saved = LayerScale.forward, ReparamDepthwise3x3.forward
    LayerScale.forward, ReparamDepthwise3x3.forward = _layerscale_forward, _mixer_forward
    try:
        yield
    finally:
        LayerScale.forward, ReparamDepthwise3x3.forward = saved
