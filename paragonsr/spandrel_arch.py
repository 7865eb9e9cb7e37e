"""ParagonSR as a spandrel architecture, so every spandrel-based tool can load it.

Importing this module adds ParagonSR to spandrel's main registry (``import paragonsr`` imports it
as soon as spandrel is imported too, in either order). ``register()`` is idempotent, survives
the module being imported twice under different names (ComfyUI imports custom-node folders by
path), and steps aside if spandrel itself, or another pack, already provides an architecture
with the id ``ParagonSR``.
"""

from __future__ import annotations

import inspect
import logging

import torch
from spandrel import (
    MAIN_REGISTRY,
    Architecture,
    ArchRegistry,
    ArchSupport,
    ImageModelDescriptor,
    ModelTiling,
    StateDict,
)

from .checkpoint import Source, empty_model, inspect_state_dict, looks_like_paragonsr, state_dict_of
from .errors import CheckpointError
from .inference import OptimizedCall
from .network import ParagonSR

log = logging.getLogger(__name__)

_TAKES_CALL_FN = "call_fn" in inspect.signature(ImageModelDescriptor.__init__).parameters

ARCH_ID = "ParagonSR"
# spandrel detectors that accept state dicts by a couple of generic keys; ParagonSR must be tried
# before them. Used only if ordering before every registered architecture is impossible.
LOOSE_DETECTORS = ("Compact", "ESRGAN", "DnCNN", "DRUNet", "SwiftSRGAN", "SPAN", "RealCUGAN")


class ParagonSRArch(Architecture[ParagonSR]):
    def __init__(self) -> None:
        super().__init__(id=ARCH_ID, name="ParagonSR", detect=looks_like_paragonsr)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ParagonSR]:
        inspection = inspect_state_dict(state_dict)
        config = inspection.config
        # Hosts call the descriptor: it runs the optimized network, rebuilt whenever the
        # model's weights, device or dtype change. spandrel before 0.4 has no call_fn; there
        # the descriptor runs the plain network, slower but the same result.
        fast = {"call_fn": OptimizedCall()} if _TAKES_CALL_FN else {}
        return ImageModelDescriptor(
            empty_model(config, inspection.form),
            state_dict,
            architecture=self,
            purpose="Restoration" if config.scale == 1 else "SR",
            tags=inspection.tags,
            # Unproven until a GPU comparison shows reduced precision stays accurate: activations
            # of trained models can exceed fp16's range inside GroupNorm.
            supports_half=False,
            supports_bfloat16=False,
            scale=config.scale,
            input_channels=config.in_chans,
            output_channels=config.out_chans,
            # GroupNorm(1) normalizes over the whole image: independent tiles change the result.
            tiling=ModelTiling.DISCOURAGED,
            **fast,
        )


def register(registry: ArchRegistry | None = None) -> bool:
    """Add ParagonSR to spandrel's registry (the main one by default), ahead of every
    architecture already there. Returns True if this call added it."""
    registry = MAIN_REGISTRY if registry is None else registry
    existing = registry.get(ARCH_ID)
    if existing is not None:
        if type(existing.architecture).__name__ != ParagonSRArch.__name__:
            log.info("spandrel already provides %r; leaving its loader in place", ARCH_ID)
        return False
    others = tuple(support.architecture.id for support in registry.architectures())
    try:
        added = registry.add(
            ArchSupport.from_architecture(ParagonSRArch(), before=others), ignore_duplicates=True
        )
    except ValueError:  # another entry orders itself before us: a cycle; settle for the loose ones
        loose = tuple(arch_id for arch_id in LOOSE_DETECTORS if arch_id in registry)
        added = registry.add(
            ArchSupport.from_architecture(ParagonSRArch(), before=loose), ignore_duplicates=True
        )
    return bool(added)


def load_descriptor(
    source: Source, *, device: str | torch.device = "cpu"
) -> ImageModelDescriptor[ParagonSR]:
    """Load a ParagonSR checkpoint as the spandrel descriptor ComfyUI and chaiNNer carry."""
    state_dict, label = state_dict_of(source)
    try:
        descriptor = ParagonSRArch().load(state_dict)
    except CheckpointError as error:
        raise error.with_source(label) from None
    return descriptor.to(device).eval()


register()
