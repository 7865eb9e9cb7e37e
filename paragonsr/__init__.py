"""ParagonSR: loading, fusion, inference and training for the ParagonSR super-resolution network.

ParagonSR registers with spandrel as soon as both are imported, in either order, so
``spandrel.ModelLoader`` (and every tool built on it, ComfyUI's Load Upscale Model among them)
loads ParagonSR checkpoints once this package has been imported.

Importing the package itself is light: the names below load their modules (and torch) on first
use, so the command line's ``--help`` and ``info`` on a ``.safetensors`` header never wait for
torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "ARCH_ID": "spandrel_arch",
    "VARIANTS": "config",
    "CheckpointError": "errors",
    "ExportError": "errors",
    "ExportOptions": "onnx_export",
    "Inspection": "detection",
    "NonFiniteWeightsWarning": "checkpoint",
    "OptimizedParagonSR": "inference",
    "ParagonSR": "network",
    "ParagonSRArch": "spandrel_arch",
    "ParagonSRConfig": "config",
    "ParagonSRError": "errors",
    "UnsupportedVariantError": "errors",
    "UpscaleCancelled": "errors",
    "UpscaleError": "errors",
    "UpscaleSettings": "upscale",
    "build_model": "network",
    "config_for_variant": "config",
    "export_ncnn": "ncnn_export",
    "export_onnx": "onnx_export",
    "fuse_for_release": "network",
    "inspect_checkpoint": "checkpoint",
    "load_descriptor": "spandrel_arch",
    "load_model": "checkpoint",
    "optimize_for_inference": "inference",
    "read_state_dict": "checkpoint",
    "register": "spandrel_arch",
    "save_checkpoint": "checkpoint",
    "upscale": "upscale",
    "variant_name": "config",
}

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

if TYPE_CHECKING:
    from .checkpoint import (
        NonFiniteWeightsWarning,
        inspect_checkpoint,
        load_model,
        read_state_dict,
        save_checkpoint,
    )
    from .config import VARIANTS, ParagonSRConfig, config_for_variant, variant_name
    from .detection import Inspection
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
    from .network import ParagonSR, build_model, fuse_for_release
    from .onnx_export import ExportOptions, export_onnx
    from .spandrel_arch import ARCH_ID, ParagonSRArch, load_descriptor, register
    from .upscale import UpscaleSettings, upscale


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """This package's module type. Loading a submodule binds it on the package under its own
    name, and ``paragonsr.upscale`` is the function, as it was when this file imported every
    module eagerly; the module stays importable as ``paragonsr.upscale`` in ``from`` imports."""

    def __setattr__(self, name: str, value: Any) -> None:
        submodule = isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"
        if submodule and name in _EXPORTS:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _version() -> str:
    """The version pyproject.toml declares: read from it where the package sits in its source
    folder (a ComfyUI custom_nodes copy, a clone), else from the installed distribution."""
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8")
        if re.search(r'^name = "paragonsr"$', text, re.MULTILINE):
            found = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE)
            if found:
                return found.group(1)
    from importlib import metadata  # a fifth of this package's import time: only when needed

    try:
        return metadata.version("paragonsr")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _version()


class _RegisterAfterSpandrel:
    """A one-shot import finder: lets spandrel load as usual, then registers ParagonSR with it.
    A plain class, not importlib.abc.MetaPathFinder, whose import costs more than this package's."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> Any:
        if name != "spandrel":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once, and never in the way of the real search
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            _register_with_spandrel()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _register_with_spandrel() -> None:
    # Importing spandrel_arch registers; when spandrel_arch's own import is what brought spandrel
    # in, that module is half-initialized here and registers when it finishes.
    importlib.import_module(".spandrel_arch", __name__)


if "spandrel" in sys.modules:
    _register_with_spandrel()
elif not any(type(f).__name__ == "_RegisterAfterSpandrel" for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterSpandrel())
