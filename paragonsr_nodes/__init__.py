"""ComfyUI nodes over the :mod:`paragonsr` core.

The node pack itself (Load, Fuse, Upscale, Export ONNX, Train) is still to come. Until then the
extension below has no nodes of its own; importing the pack registers ParagonSR with spandrel,
which already lets ComfyUI's stock "Load Upscale Model" and "Upscale Image (using Model)" run
ParagonSR checkpoints. Only this package imports ComfyUI's modules, and only when ComfyUI asks.
"""

from __future__ import annotations


def extension():
    """The ComfyExtension ComfyUI's ``comfy_entrypoint`` hands back."""
    from comfy_api.latest import ComfyExtension, io

    class ParagonSRExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return []

    return ParagonSRExtension()
