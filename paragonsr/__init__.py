"""ParagonSR: loading, fusion, inference and training for the ParagonSR super-resolution network.

Importing this package registers ParagonSR with spandrel, so ``spandrel.ModelLoader`` (and every
tool built on it, ComfyUI's Load Upscale Model among them) loads ParagonSR checkpoints.
"""

from __future__ import annotations

from .checkpoint import (
    Inspection,
    NonFiniteWeightsWarning,
    inspect_checkpoint,
    load_model,
    read_state_dict,
    save_checkpoint,
)
from .errors import (
    CheckpointError,
    ExportError,
    ParagonSRError,
    UnsupportedVariantError,
    UpscaleCancelled,
    UpscaleError,
)
from .inference import OptimizedParagonSR, optimize_for_inference
from .ncnn_export import export_ncnn
from .network import (
    VARIANTS,
    ParagonSR,
    ParagonSRConfig,
    build_model,
    config_for_variant,
    fuse_for_release,
    variant_name,
)
from .onnx_export import ExportOptions, export_onnx
from .spandrel_arch import ARCH_ID, ParagonSRArch, load_descriptor, register
from .upscale import UpscaleSettings, upscale


def _version() -> str:
    """The version pyproject.toml declares: read from it where the package sits in its source
    folder (a ComfyUI custom_nodes copy, a clone), else from the installed distribution."""
    import re
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8")
        if re.search(r'^name = "paragonsr"$', text, re.MULTILINE):
            found = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE)
            if found:
                return found.group(1)
    try:
        return metadata.version("paragonsr")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _version()

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
    "export_ncnn",
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
