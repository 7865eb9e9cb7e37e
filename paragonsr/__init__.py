"""ParagonSR: loading, fusion, inference and training for the ParagonSR super-resolution network.

Importing this package registers ParagonSR with spandrel, so ``spandrel.ModelLoader`` (and every
tool built on it, ComfyUI's Load Upscale Model among them) loads ParagonSR checkpoints.
"""

from __future__ import annotations

from .arch import VARIANTS, ParagonSR, ParagonSRConfig, config_for_variant, variant_name
from .checkpoint import (
    Inspection,
    NonFiniteWeightsWarning,
    inspect_checkpoint,
    load_model,
    read_state_dict,
    save_checkpoint,
)
from .errors import CheckpointError, ParagonSRError, UnsupportedVariantError
from .fusion import OptimizedParagonSR, fuse_for_release, optimize_for_inference
from .models import build_model, load_descriptor
from .onnx_export import ExportError, ExportOptions, export_onnx
from .spandrel_arch import ARCH_ID, ParagonSRArch, register
from .tiling import UpscaleCancelled, UpscaleError
from .upscale import UpscaleSettings, upscale

__version__ = "0.1.0"

register()

__all__ = [
    "ARCH_ID",
    "VARIANTS",
    "CheckpointError",
    "ExportError",
    "ExportOptions",
    "Inspection",
    "NonFiniteWeightsWarning",
    "OptimizedParagonSR",
    "ParagonSR",
    "ParagonSRArch",
    "ParagonSRConfig",
    "ParagonSRError",
    "UnsupportedVariantError",
    "UpscaleCancelled",
    "UpscaleError",
    "UpscaleSettings",
    "build_model",
    "config_for_variant",
    "export_onnx",
    "fuse_for_release",
    "inspect_checkpoint",
    "load_descriptor",
    "load_model",
    "optimize_for_inference",
    "read_state_dict",
    "register",
    "save_checkpoint",
    "upscale",
    "variant_name",
]
