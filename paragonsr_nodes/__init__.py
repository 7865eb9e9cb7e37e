"""ComfyUI nodes over the :mod:`paragonsr` core: Load ParagonSR, Fuse, Upscale Image (tiled),
Export ONNX, Train, and the sample image the example workflows start from.

Importing the pack also registers ParagonSR with spandrel, so ComfyUI's stock "Load Upscale
Model" and "Upscale Image (using Model)" run ParagonSR checkpoints. Only this package imports
ComfyUI's modules, and only when ComfyUI asks.
"""

from __future__ import annotations


def extension(pack_dir: str | None = None):
    """The ComfyExtension ComfyUI's ``comfy_entrypoint`` hands back. ``pack_dir``, the pack's
    folder in custom_nodes, holds the bundled models, which are listed in ComfyUI's pickers."""
    from pathlib import Path

    from comfy_api.latest import ComfyExtension, io

    from . import comfy_bridge

    if pack_dir is not None:
        comfy_bridge.register_bundled_models(Path(pack_dir) / "models")
    from .nodes import NODES

    class ParagonSRExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    return ParagonSRExtension()
