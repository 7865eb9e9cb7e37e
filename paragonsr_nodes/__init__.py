"""ComfyUI nodes over the :mod:`paragonsr` core.

Load ParagonSR and Upscale Image (ParagonSR, tiled) exist; Fuse, Export ONNX and Train are still
to come. Importing the pack also registers ParagonSR with spandrel, so ComfyUI's stock "Load
Upscale Model" and "Upscale Image (using Model)" run ParagonSR checkpoints. Only this package
imports ComfyUI's modules, and only when ComfyUI asks.
"""

from __future__ import annotations


def extension():
    """The ComfyExtension ComfyUI's ``comfy_entrypoint`` hands back."""
    from comfy_api.latest import ComfyExtension, io

    from .nodes import NODES

    class ParagonSRExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    return ParagonSRExtension()
