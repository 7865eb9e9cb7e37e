"""Entry points that hand out models: fresh ones from the family table, spandrel descriptors."""

from __future__ import annotations

import torch
from spandrel import ImageModelDescriptor

from .arch import ParagonSR, config_for_variant
from .checkpoint import Source, _state_dict_of
from .errors import CheckpointError
from .spandrel_arch import ParagonSRArch


def build_model(variant: str, scale: int, *, in_chans: int = 3, fused: bool = False) -> ParagonSR:
    """A freshly initialized network of a named variant (nano, tiny, xs, s, m, l, xl)."""
    return ParagonSR(config_for_variant(variant, scale, in_chans), fused=fused)


def load_descriptor(
    source: Source, *, device: str | torch.device = "cpu"
) -> ImageModelDescriptor[ParagonSR]:
    """Load a ParagonSR checkpoint as the spandrel descriptor ComfyUI and chaiNNer carry."""
    state_dict, label = _state_dict_of(source)
    try:
        descriptor = ParagonSRArch().load(state_dict)
    except CheckpointError as error:
        raise error.with_source(label) from None
    return descriptor.to(device).eval()
