"""MS-SSIM for the optional structural loss term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Weights of the five scales from Wang, Simoncelli and Bovik (2003).
SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    taps = torch.exp(
        -((torch.arange(size, device=device, dtype=dtype) - size // 2) ** 2) / (2 * sigma * sigma)
    )
    taps = taps / taps.sum()
    return (taps[:, None] * taps[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor):
    c1, c2 = 0.01**2, 0.03**2
    groups = x.shape[1]
    mu_x, mu_y = F.conv2d(x, window, groups=groups), F.conv2d(y, window, groups=groups)
    var_x = F.conv2d(x * x, window, groups=groups) - mu_x**2
    var_y = F.conv2d(y * y, window, groups=groups) - mu_y**2
    covariance = F.conv2d(x * y, window, groups=groups) - mu_x * mu_y
    contrast = (2 * covariance + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast).mean(), contrast.mean()


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """MS-SSIM of images in [0, 1], over as many of the five scales as the patch size allows
    (each needs at least the window's size); the weights of the scales used are renormalized."""
    levels = 1
    while levels < len(SCALE_WEIGHTS) and min(x.shape[-2:]) >> levels >= window_size:
        levels += 1
    weights = torch.tensor(SCALE_WEIGHTS[:levels], device=x.device, dtype=x.dtype)
    weights = weights / weights.sum()
    size = min(window_size, *x.shape[-2:])
    window = _window(size, 1.5, x.shape[1], x.device, x.dtype)
    values = []
    for level in range(levels):
        ssim, contrast = _ssim_terms(x, y, window)
        values.append(ssim if level == levels - 1 else contrast)
        if level < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values).clamp(min=1e-6)
    return torch.prod(stacked**weights)
