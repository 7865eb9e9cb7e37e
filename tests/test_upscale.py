"""The upscaling engine: exact tiling, overlap blending, channels, batches, callbacks, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from spandrel import ModelLoader

from helpers import REFERENCE, randomized_model, seeded_image
from paragonsr import config_for_variant, load_descriptor, optimize_for_inference
from paragonsr.errors import UpscaleCancelled, UpscaleError
from paragonsr.inference import InferenceBlock
from paragonsr.overlap_tiling import raised_cosine_ramp
from paragonsr.upscale import UpscaleSettings, auto_tile, upscale


def whole_image(model, image: torch.Tensor) -> torch.Tensor:
    """The optimized network on the whole image, clamped: what the engine must reproduce."""
    with torch.inference_mode():
        return optimize_for_inference(model)(image).clamp(0, 1)


@pytest.mark.parametrize("tile", [32, 40, 53])
@pytest.mark.parametrize("case", ["nano_x2", "tiny_x4"])
def test_exact_tiles_reproduce_the_reference_ground_truth(case: str, tile: int) -> None:
    io = load_file(REFERENCE / f"{case}.io.safetensors")
    descriptor = load_descriptor(REFERENCE / f"{case}.train.safetensors")
    output = upscale(descriptor, io["input"], UpscaleSettings(tile=tile))
    assert (output.double() - io["expected"].clamp(0, 1)).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [(70, 45), (33, 97), (64, 64)])
def test_exact_tiles_equal_the_whole_image_forward(size: tuple[int, int]) -> None:
    model = randomized_model(config_for_variant("tiny", 3))
    image = seeded_image(3, *size)
    expected = whole_image(model, image)
    for tile in (32, 48):
        output = upscale(model, image, UpscaleSettings(tile=tile))
        assert (output - expected).abs().max().item() < 1e-4


def test_the_exact_default_beats_naive_tiles_on_paragonsr() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, 96, 96)
    expected = whole_image(model, image)
    exact = upscale(model, image, UpscaleSettings(tile=32))
    overlap = upscale(model, image, UpscaleSettings(tile=32, mode="overlap", overlap=8))
    assert (exact - expected).abs().max().item() < 1e-4
    # Each overlap tile normalizes itself: visibly different from the whole image.
    assert (overlap - expected).abs().max().item() > 1e-2


def compact_model(scale: int = 2):
    """A small RealESRGAN Compact from spandrel: purely local, reach 5 px (five 3x3 convs)."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(3)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=scale)
    return ModelLoader().load_from_state_dict(net.state_dict())


def test_overlap_blending_is_seamless_for_a_local_model() -> None:
    descriptor = compact_model()
    image = seeded_image(3, 77, 90)
    with torch.inference_mode():
        expected = descriptor(image)
    # Margin 8 >= reach 5: every kept pixel saw real image context, and blending is exact.
    output = upscale(descriptor, image, UpscaleSettings(tile=32, overlap=16))
    assert (output - expected).abs().max().item() < 1e-5
    assert upscale(descriptor, image, UpscaleSettings(tile=32, overlap=16)).shape == (
        1,
        3,
        154,
        180,
    )


def test_raised_cosine_ramps_are_complementary() -> None:
    ramp = raised_cosine_ramp(24, torch.device("cpu"))
    torch.testing.assert_close(ramp + ramp.flip(0), torch.ones(24))
    assert 0 < ramp[0] < 0.01 and 0.99 < ramp[-1] < 1


def test_batches_are_processed_frame_by_frame() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    frames = torch.cat([seeded_image(3, 40, 36, seed=s) for s in range(3)])
    output = upscale(model, frames, UpscaleSettings(tile=32))
    assert output.shape == (3, 3, 80, 72) and output.device.type == "cpu"
    for index in range(3):
        expected = whole_image(model, frames[index : index + 1])
        assert (output[index : index + 1] - expected).abs().max().item() < 1e-4


def test_grayscale_input_with_an_rgb_model() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    gray = seeded_image(1, 20, 24)
    output = upscale(model, gray)
    expected = whole_image(model, gray.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
    assert output.shape == (1, 1, 40, 48)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_one_channel_models() -> None:
    model = randomized_model(config_for_variant("nano", 2, in_chans=1))
    gray = seeded_image(1, 30, 34)
    output = upscale(model, gray, UpscaleSettings(tile=32))
    assert (output - whole_image(model, gray)).abs().max().item() < 1e-4
    with pytest.raises(UpscaleError, match="cannot serve a 3-channel image; convert"):
        upscale(model, seeded_image(3, 8, 8))


@pytest.mark.parametrize("how", ["bilinear", "model"])
def test_rgba_keeps_its_alpha(how: str) -> None:
    model = randomized_model(config_for_variant("nano", 2))
    rgba = seeded_image(4, 18, 22)
    output = upscale(model, rgba, UpscaleSettings(alpha=how))
    assert output.shape == (1, 4, 36, 44)
    torch.testing.assert_close(output[:, :3], whole_image(model, rgba[:, :3]), rtol=0, atol=1e-5)
    if how == "bilinear":
        expected = torch.nn.functional.interpolate(
            rgba[:, 3:], scale_factor=2, mode="bilinear", align_corners=False
        )
    else:
        expected = whole_image(model, rgba[:, 3:].expand(-1, 3, -1, -1)).mean(1, keepdim=True)
    torch.testing.assert_close(output[:, 3:], expected, rtol=0, atol=1e-5)


def test_progress_ticks_and_cancellation() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, 64, 64)
    ticks: list[tuple[int, int]] = []
    upscale(model, image, UpscaleSettings(tile=32), tick=lambda d, t: ticks.append((d, t)))
    total = ticks[-1][1]
    # 4 tiles x (conv_in + 6 blocks x 2 + conv_fuse + tail) passes.
    assert total == 4 * 15
    assert [done for done, _ in ticks] == list(range(1, total + 1))

    calls = []
    with pytest.raises(UpscaleCancelled):
        upscale(
            model,
            image,
            UpscaleSettings(tile=32),
            tick=lambda d, t: calls.append(d),
            cancelled=lambda: len(calls) >= 5,
        )
    assert len(calls) == 5


@pytest.mark.parametrize("failing_call", [0, 1, 9])
def test_out_of_memory_halves_the_tile_and_redoes_only_that_pass(monkeypatch, failing_call) -> None:
    """The FFN pass of some block runs out of memory at its first, second or a later big tile.
    The retry redoes the pass with smaller tiles; statistics gathered by the failed attempt
    must not count (they did once, and a failure after the first tile cost 1.85e-3)."""
    model = randomized_model(config_for_variant("nano", 2))
    image = seeded_image(3, 96, 96)
    expected = whole_image(model, image)
    original = InferenceBlock.ffn_delta
    calls = {"big": 0, "failed": 0}

    def flaky(self, normed, numerics):
        if normed.shape[-1] > 40 and not calls["failed"]:
            calls["big"] += 1
            if calls["big"] > failing_call:
                calls["failed"] += 1
                raise torch.OutOfMemoryError("simulated")
        return original(self, normed, numerics)

    monkeypatch.setattr(InferenceBlock, "ffn_delta", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Tiles of at most 95 px are two of 48 per row: one FFN region fails; 47 px fits.
        ticks = []
        output = upscale(
            model,
            image,
            UpscaleSettings(tile=95),
            tick=lambda done, total: ticks.append((done, total)),
        )
    assert calls["failed"] == 1
    assert ticks[-1][0] == ticks[-1][1]  # the progress total followed the smaller tiles
    assert all(done <= total for done, total in ticks)
    assert (output - expected).abs().max().item() < 1e-4


def test_reduced_precision_falls_back_to_fp32_on_overflow() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    with torch.no_grad():
        model.conv_in.weight.mul_(1e4)  # activations far beyond fp16's 65504
    image = seeded_image(3, 16, 16)
    expected = upscale(model, image, UpscaleSettings(precision="fp32"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = upscale(model, torch.cat([image, image]), UpscaleSettings(precision="fp16"))
    messages = [str(w.message) for w in caught]
    assert messages == [
        "ParagonSR is not known to be accurate in fp16; frames with inf/NaN are recomputed in fp32",
        "float16 produced inf/NaN; recomputing in fp32",
    ]
    output = output[:1]
    torch.testing.assert_close(output, expected)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is restored


def test_auto_tile_follows_free_memory() -> None:
    descriptor = load_descriptor(REFERENCE / "tiny_x4.train.safetensors")
    small = auto_tile(descriptor, torch.device("cpu"), torch.float32, 2000, 3000, free=1 << 30)
    assert small % 32 == 0 and 32 <= small < 2000
    large = auto_tile(descriptor, torch.device("cpu"), torch.float32, 200, 300, free=64 << 30)
    assert large == 300
    tiny_budget = auto_tile(descriptor, torch.device("cpu"), torch.float32, 200, 300, free=1)
    assert tiny_budget == 32


@pytest.mark.parametrize(
    ("settings", "images", "message"),
    [
        (UpscaleSettings(), torch.zeros(1, 3, 0, 5), "the image is empty"),
        (UpscaleSettings(max_pixels=100), torch.zeros(1, 3, 11, 10), "above the limit of 100"),
        (UpscaleSettings(mode="tiles"), torch.zeros(1, 3, 4, 4), "unknown mode 'tiles'"),
        (UpscaleSettings(tile=8), torch.zeros(1, 3, 4, 4), "below the minimum"),
        (UpscaleSettings(), torch.zeros(3, 4, 4), "expected images shaped"),
    ],
)
def test_bad_requests_are_refused(settings, images, message: str) -> None:
    model = randomized_model(config_for_variant("nano", 2))
    with pytest.raises(UpscaleError, match=message):
        upscale(model, images, settings)


def test_exact_mode_needs_paragonsr() -> None:
    with pytest.raises(UpscaleError, match="exact mode needs a ParagonSR model"):
        upscale(compact_model(), seeded_image(3, 8, 8), UpscaleSettings(mode="exact"))


def test_one_pixel_image() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    pixel = seeded_image(3, 1, 1)
    assert torch.equal(upscale(model, pixel), whole_image(model, pixel))


def test_overlap_splits_a_tile_that_runs_out_of_memory(monkeypatch) -> None:
    descriptor = compact_model()
    image = seeded_image(3, 64, 64)
    with torch.inference_mode():
        expected = descriptor(image)
    model = descriptor.model
    original = type(model).forward
    failures = []

    def flaky(self, x):
        if x.shape[-1] > 40 and not failures:
            failures.append(x.shape)
            raise torch.OutOfMemoryError("simulated")
        return original(self, x)

    monkeypatch.setattr(type(model), "forward", flaky)
    ticks = []
    output = upscale(
        descriptor,
        image,
        UpscaleSettings(tile=64, overlap=16),
        tick=lambda d, t: ticks.append((d, t)),
    )
    assert len(failures) == 1
    assert ticks[-1][0] == ticks[-1][1] == 4  # one tile became four
    assert (output - expected).abs().max().item() < 1e-5
