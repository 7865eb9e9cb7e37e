"""Seeded random models of every shape we may meet, round-tripped through spandrel's loader."""

from __future__ import annotations

import dataclasses

import pytest
import spandrel
import torch

from helpers import exact_streamed, float64_reference, randomized_model, seeded_image
from paragonsr import (
    VARIANTS,
    ParagonSRConfig,
    config_for_variant,
    fuse_for_release,
    optimize_for_inference,
)
from paragonsr.config import variant_name
from paragonsr.inference import GRAPH
from paragonsr.upscale import optimized_network

TOLERANCE = 1e-4


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, plain: tuple[torch.Tensor, ...], path: str
) -> None:
    """Within 1e-4 absolute of the float64 result, or, for deep random networks whose outputs
    reach the thousands, no further from it than 4x the float32 plain forward's own rounding
    (in either memory layout: oneDNN's channels_last kernels round differently)."""
    error = (actual.double() - expected).abs().max().item()
    plain_error = max((p.double() - expected).abs().max().item() for p in plain)
    assert error < max(TOLERANCE, 4 * plain_error), (path, error, plain_error)


def widths(config: ParagonSRConfig) -> tuple[int, ...]:
    """What a configuration builds; ratios such as 1.3 and 1.292 can give the same widths."""
    return (
        config.scale,
        config.in_chans,
        config.out_chans,
        config.num_feat,
        config.num_groups,
        config.num_blocks,
        config.ffn_hidden,
        config.square_kernel_size,
        config.band_kernel_size,
        config.branch_channels,
    )


def assert_loads_correctly(model, *, expected_variant: str | None = "unchanged") -> None:
    """Save ``model``'s state dict, load it through spandrel with no hints, and compare the
    detected hyper-parameters and every inference path's output with the float64 plain
    forward."""
    config = model.config
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    loaded = descriptor.model
    assert descriptor.architecture.id == "ParagonSR"
    assert widths(loaded.config) == widths(config)
    assert loaded.form == model.form
    assert descriptor.scale == config.scale
    assert descriptor.purpose == ("Restoration" if config.scale == 1 else "SR")
    assert (descriptor.input_channels, descriptor.output_channels) == (
        config.in_chans,
        config.out_chans,
    )
    assert descriptor.supports_half is False and descriptor.supports_bfloat16 is False
    if expected_variant != "unchanged":
        assert variant_name(config) == expected_variant
    image = seeded_image(config.in_chans, 13, 10)
    expected = float64_reference(model, image)
    with torch.inference_mode():
        plain = (
            loaded(image),
            loaded(image.contiguous(memory_format=torch.channels_last)),
        )
        network = optimized_network(descriptor)
        # Every inference path is built from the same block passes; each must land on the
        # float64 plain forward. The graph form is what the ONNX export traces.
        paths = {
            "plain": plain[0],
            "optimized": network(image),
            "exact-streamed": exact_streamed(network, image, tile=8),
            "graph form": optimize_for_inference(loaded, channels_last=False, numerics=GRAPH)(
                image
            ),
        }
        served = descriptor(image)
    assert served.shape == (1, config.out_chans, 13 * config.scale, 10 * config.scale)
    for path, actual in paths.items():
        assert_matches(actual, expected, plain, path)
    assert_matches(served, expected.clamp(0, 1), plain, "descriptor")


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_at_every_scale(variant: str, scale: int) -> None:
    model = randomized_model(config_for_variant(variant, scale))
    assert_loads_correctly(model, expected_variant=variant)


@pytest.mark.parametrize(
    "changes",
    [
        {"in_chans": 1, "out_chans": 1},
        {"in_chans": 4, "out_chans": 4},
        {"band_kernel_size": 7},
        {"branch_ratio": 0.25},
        {"band_kernel_size": 7, "branch_ratio": 0.25, "square_kernel_size": 5},
        {"ffn_expansion": 2.5},
        {"ffn_expansion": 1.3},  # int(24 * 1.3) == 31: the hidden width truncates
        {"num_feat": 40, "num_groups": 2, "num_blocks": 5},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_non_default_configurations(changes: dict) -> None:
    config = dataclasses.replace(config_for_variant("nano", 2), **changes)
    model = randomized_model(config)
    # Variant names describe the body: a grayscale nano is still a nano.
    variant = "nano" if set(changes) <= {"in_chans", "out_chans"} else None
    assert_loads_correctly(model, expected_variant=variant)
    assert_loads_correctly(fuse_for_release(model), expected_variant=variant)


def test_fractional_ratios_are_recovered_as_the_same_widths() -> None:
    config = ParagonSRConfig(num_feat=24, ffn_expansion=1.3, branch_ratio=0.2)
    model = randomized_model(config)
    loaded = spandrel.ModelLoader().load_from_state_dict(model.state_dict()).model.config
    assert (loaded.ffn_hidden, loaded.branch_channels) == (31, 4)


def test_the_reference_tiny_layout_keeps_the_tiny_name() -> None:
    three_by_two = dataclasses.replace(config_for_variant("tiny", 4), num_blocks=2)
    assert variant_name(three_by_two) == "tiny"
    assert variant_name(dataclasses.replace(three_by_two, num_blocks=4)) is None


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3), (4, 17), (31, 2)])
def test_optimized_tail_is_exact_on_tiny_and_thin_images(size: tuple[int, int]) -> None:
    model = randomized_model(config_for_variant("nano", 3))
    image = seeded_image(3, *size)
    expected = float64_reference(model, image)
    with torch.inference_mode():
        optimized = optimize_for_inference(model)(image)
    assert (optimized.double() - expected).abs().max().item() < TOLERANCE


def test_batches_run_each_image_independently() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    batch = torch.cat([seeded_image(3, 9, 12, seed=s) for s in range(3)])
    optimized = optimize_for_inference(model)
    with torch.inference_mode():
        together = optimized(batch)
        alone = torch.cat([optimized(image[None]) for image in batch])
    # oneDNN picks its convolution kernels by batch size, so frames differ by float rounding
    # (1e-6 relative); statistics shared across the batch would differ by 1e-1.
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        config_for_variant("tiny", 4),
        config_for_variant("nano", 3, in_chans=1),
        ParagonSRConfig(
            scale=2,
            num_feat=32,
            num_groups=2,
            num_blocks=2,
            band_kernel_size=7,
            branch_ratio=0.25,
            ffn_expansion=1.3,
        ),
    ],
    ids=["tiny-x4", "nano-x3-gray", "custom"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["training", "fused"])
def test_every_fold_is_exact_in_float64(config: ParagonSRConfig, fused: bool) -> None:
    """In float64 the optimized network equals the plain one to rounding: the folds are exact
    algebra, and any float32 difference is rounding alone."""
    model = randomized_model(config, fused=fused).double()
    image = seeded_image(config.in_chans, 11, 14).double()
    with torch.no_grad():
        expected = model(image)
        optimized = optimize_for_inference(model)(image)
    assert optimized.dtype == torch.float64
    assert (optimized - expected).abs().max().item() < 1e-10 * max(1.0, expected.abs().max())
