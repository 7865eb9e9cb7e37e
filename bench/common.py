"""What every benchmark here shares."""

from __future__ import annotations

import torch

from paragonsr import ParagonSR, config_for_variant


def seeded_model(variant: str, scale: int) -> ParagonSR:
    """A seeded network of a named variant with LayerScale gammas of 0.05-0.4, as trained
    models have (a fresh model's 1e-5 would leave the blocks nearly idle)."""
    torch.manual_seed(0)
    model = ParagonSR(config_for_variant(variant, scale)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.05, 0.4)
    return model
