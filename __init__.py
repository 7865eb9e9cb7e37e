"""ComfyUI entry point of the ParagonSR pack.

ComfyUI imports this folder as a package from ``custom_nodes/``. Importing the core library
registers ParagonSR with spandrel, so ComfyUI's stock "Load Upscale Model" loads ParagonSR
checkpoints from then on. The folder is put on ``sys.path`` first so that the core is importable
as ``paragonsr`` whether or not the pack was also pip-installed.

ComfyUI skips (and reports as failed) a pack that exports neither ``NODE_CLASS_MAPPINGS`` nor
``comfy_entrypoint``, so the V3 entry point is defined here; it imports ComfyUI's API only when
ComfyUI calls it, so importing this folder elsewhere works too.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

import paragonsr  # noqa: E402,F401  (registers the architecture with spandrel)

# The browser extension that shows each node's report text on the node.
WEB_DIRECTORY = "./web/js"

REQUIRED_COMFYUI = "0.3.47"  # the V3 node API: comfy_api.latest and comfy_entrypoint


async def comfy_entrypoint():
    from paragonsr_nodes import extension

    return extension(_PACK_DIR)


def _warn_if_comfyui_lacks_the_v3_api() -> None:
    """Inside a ComfyUI older than REQUIRED_COMFYUI, say so in one log line: such a ComfyUI
    never calls comfy_entrypoint and would otherwise only report the pack as failed."""
    if "folder_paths" not in sys.modules:  # not inside ComfyUI
        return
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        import logging

        logging.getLogger("paragonsr").error(
            "ParagonSR needs ComfyUI %s or newer (the V3 node API, comfy_api.latest); this "
            "ComfyUI lacks it, so the ParagonSR nodes are not loaded. Update ComfyUI.",
            REQUIRED_COMFYUI,
        )


_warn_if_comfyui_lacks_the_v3_api()
