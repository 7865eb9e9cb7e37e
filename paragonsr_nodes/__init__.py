"""ComfyUI nodes over the :mod:`paragonsr` core (added with the node-pack work).

Until then the pack's ComfyUI entry only registers ParagonSR with spandrel, which already lets
the stock "Load Upscale Model" and "Upscale Image (using Model)" nodes run ParagonSR checkpoints.
"""
