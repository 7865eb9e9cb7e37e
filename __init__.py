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


async def comfy_entrypoint():
    from paragonsr_nodes import extension

    return extension()
