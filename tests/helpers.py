"""Helpers shared by the tests: where the reference fixtures live, seeded models and inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import paragonsr  # noqa: F401  (registers ParagonSR with spandrel)
from paragonsr.config import ParagonSRConfig
from paragonsr.exact_tiling import ExactStreamer
from paragonsr.inference import OptimizedParagonSR
from paragonsr.network import ParagonSR
from paragonsr.tiles import Progress

REPO = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    """The original implementation's checkpoints and outputs: tests/fixtures/reference in the
    repository (see its README.md), or the folder named by PARAGONSR_REFERENCE."""
    if "PARAGONSR_REFERENCE" in os.environ:
        candidate = Path(os.environ["PARAGONSR_REFERENCE"])
        if not (candidate / "manifest.json").is_file():
            raise RuntimeError(f"PARAGONSR_REFERENCE={candidate} holds no manifest.json")
        return candidate
    candidate = REPO / "tests" / "fixtures" / "reference"
    if not (candidate / "manifest.json").is_file():
        raise RuntimeError(
            f"reference fixtures not found: {candidate} holds no manifest.json (they are part of "
            "the repository: restore them with git, or set PARAGONSR_REFERENCE to such a folder)"
        )
    return candidate


REFERENCE = reference_dir()
MANIFEST = {case["name"]: case for case in json.loads((REFERENCE / "manifest.json").read_text())}


def randomized_model(config: ParagonSRConfig, *, fused: bool = False, seed: int = 0) -> ParagonSR:
    """A model whose every parameter is non-trivial (LayerScale well above its 1e-5 init,
    GroupNorm away from identity), so that a block wired wrong changes the output visibly."""
    generator = torch.Generator().manual_seed(seed)
    model = ParagonSR(config, fused=fused)
    # Gammas of 0.05-0.4 as in the reference fixtures, shrunk for deep bodies so that xl's 144
    # blocks do not drive the outputs into the tens of thousands.
    depth_factor = min(1.0, (6 / (config.num_groups * config.num_blocks)) ** 0.5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                gamma = torch.rand(parameter.shape, generator=generator) * 0.35 + 0.05
                parameter.copy_(gamma * depth_factor)
            elif ".norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
            elif ".norm" in name and name.endswith("bias"):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                fan_in = parameter[0].numel() if parameter.ndim > 1 else 4
                std = (1.0 / fan_in) ** 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def float64_reference(model: ParagonSR, image: torch.Tensor) -> torch.Tensor:
    """The plain (unoptimized) forward of ``model``'s weights, evaluated in float64."""
    twin = ParagonSR(model.config, fused=model.form == "fused").double()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        return twin(image.double())


def seeded_image(channels: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, channels, height, width, generator=generator)


def exact_streamed(net: OptimizedParagonSR, image: torch.Tensor, tile: int) -> torch.Tensor:
    """``net`` on ``image`` through the exact tiling streamer with ``tile`` px tiles (any size,
    below the engine's 32 px minimum too, so that small images still split)."""
    s = net.scale
    batch, _, height, width = image.shape
    output = torch.empty(batch, net.config.out_chans, height * s, width * s, dtype=image.dtype)

    def store(t, values: torch.Tensor) -> None:
        output[..., t.top * s : t.bottom * s, t.left * s : t.right * s].copy_(values)

    ExactStreamer(net, tile, Progress())(image, store)
    return output


def chainner_python() -> str:
    """The interpreter of .venv-chainner (onnx 1.16.0, onnxruntime 1.17.1, numpy<2), which
    scripts/setup.sh creates; the calling test is skipped where it is missing."""
    path = os.environ.get("PARAGONSR_CHAINNER_PYTHON", str(REPO / ".venv-chainner/bin/python"))
    if not os.path.exists(path):
        __tracebackhide__ = True  # report the skip at the caller
        pytest.skip(f"{path} is missing: run scripts/setup.sh to create .venv-chainner")
    return path


def require(module: str, install: str):
    """``module`` imported, or the calling test (or, at module level, the module) skipped with
    the command that installs it."""
    __tracebackhide__ = True  # report the skip at the caller
    return pytest.importorskip(module, reason=f"{module} is not installed: {install}")


ONNX_INSTALL = "pip install 'paragonsr[onnx]' (or: pip install onnx onnxscript onnxruntime)"
PYPNG_INSTALL = "pip install pypng (the png module, for 16-bit PNG)"
