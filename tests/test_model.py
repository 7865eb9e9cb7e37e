"""The network itself: complexity figures, forms, training, and the FFN row bands."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import randomized_model, seeded_image
from paragonsr import (
    build_model,
    config_for_variant,
    fuse_for_release,
    optimize_for_inference,
)
from paragonsr.config import macs_per_pixel

CONFIGS = [
    config_for_variant("tiny", 4),
    config_for_variant("nano", 3, in_chans=1),
    dataclasses.replace(config_for_variant("nano", 2), band_kernel_size=7, branch_ratio=0.25),
]


def counted_macs(module, image: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(image)
    return counter.get_total_flops() / 2  # one multiply-accumulate is two FLOPs


@pytest.mark.parametrize("config", CONFIGS, ids=["tiny-x4", "nano-x3-gray", "nano-k7-br0.25"])
def test_macs_per_pixel_match_torch_flop_counter(config) -> None:
    height, width = 80, 96
    pixels = height * width
    image = seeded_image(config.in_chans, height, width)
    model = randomized_model(config)
    # This package's training forward convolves with the summed mixer kernel, so it costs what
    # the fused form costs; "training" reports the original's three-branch forward.
    hidden_taps = 10 * config.ffn_hidden * config.num_groups * config.num_blocks
    assert macs_per_pixel(config, "training") == macs_per_pixel(config, "fused") + hidden_taps
    assert counted_macs(model, image) == macs_per_pixel(config, "fused") * pixels
    fuse_for_release(model)
    assert counted_macs(model, image) == macs_per_pixel(config, "fused") * pixels
    optimized = counted_macs(optimize_for_inference(model), image) / pixels
    # The analytic figure leaves out the exact border strips of the tail, O(perimeter) work.
    assert (
        macs_per_pixel(config, "optimized") < optimized < 1.3 * macs_per_pixel(config, "optimized")
    )


def test_optimized_form_is_cheaper_than_fused_for_every_scale() -> None:
    for scale in (1, 2, 3, 4, 8):
        config = config_for_variant("s", scale)
        assert macs_per_pixel(config, "optimized") < macs_per_pixel(config, "fused")


def test_training_mode_runs_the_trainable_network_with_gradients() -> None:
    model = build_model("nano", 2).train()
    image = seeded_image(3, 16, 16)
    model(image).square().mean().backward()
    mixer = model.body[0].blocks[0].transformer.spatial_mixer
    for branch in (mixer.conv3x3, mixer.conv1x1, mixer.dw_conv3x3):
        assert branch.weight.grad is not None and branch.weight.grad.abs().sum() > 0


def test_eval_with_gradients_enabled_stays_differentiable() -> None:
    model = randomized_model(config_for_variant("nano", 2)).eval()
    image = seeded_image(3, 12, 12).requires_grad_()
    model(image).sum().backward()
    assert image.grad is not None and model.conv_in.weight.grad is not None


def test_fresh_models_start_with_small_layerscale_as_the_original() -> None:
    model = build_model("s", 4)
    gammas = torch.cat([p for n, p in model.named_parameters() if n.endswith("gamma")])
    assert torch.all(gammas == 1e-5)
    assert model.form == "training" and build_model("s", 4, fused=True).form == "fused"


@pytest.mark.parametrize("bad", [{"scale": 0}, {"branch_ratio": 0.5}, {"band_kernel_size": 4}])
def test_invalid_configurations_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="invalid ParagonSR configuration"):
        build_model("nano", 2).__class__(dataclasses.replace(config_for_variant("nano", 2), **bad))


def test_unknown_variant_lists_the_family() -> None:
    with pytest.raises(ValueError, match="nano, tiny, xs, s, m, l, xl"):
        build_model("huge", 4)


@pytest.mark.parametrize("height", [16, 17, 33, 40])
def test_ffn_bands_join_without_seams(monkeypatch, height: int) -> None:
    """With the smallest bands (16 rows) images split into several; each band's halo row must
    reproduce the whole-image result exactly, including the last partial band."""
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, height, 11)
    with torch.no_grad():
        whole = optimize_for_inference(model)(image)
        monkeypatch.setattr("paragonsr.inference.BAND_BYTES", 1)
        banded = optimize_for_inference(model)(image)
        expected = model.double()(image.double())
    assert (banded.double() - expected).abs().max().item() < 1e-4
    torch.testing.assert_close(banded, whole, rtol=1e-6, atol=1e-6)
