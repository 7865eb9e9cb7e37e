"""One explicit inference path: a plain forward everywhere, the optimized network only where it is
asked for (optimize_for_inference, the spandrel descriptor), and nothing stale."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import spandrel
import torch

from helpers import REFERENCE, float64_reference, randomized_model, seeded_image
from paragonsr import (
    CheckpointError,
    ExportError,
    config_for_variant,
    export_onnx,
    fuse_for_release,
    inspect_checkpoint,
    load_descriptor,
    optimize_for_inference,
    save_checkpoint,
    upscale,
)
from paragonsr.upscale import optimized_network

GRAD_MODES = {
    "train": lambda: torch.enable_grad(),
    "eval, grad": lambda: torch.enable_grad(),
    "eval, no_grad": lambda: torch.no_grad(),
    "eval, inference_mode": lambda: torch.inference_mode(),
}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_forward_is_the_plain_network_in_every_mode(mode: str) -> None:
    model = randomized_model(config_for_variant("nano", 2)).train(mode == "train")
    image = seeded_image(3, 14, 12)
    seen = []
    model.body[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model.body[1].blocks[0].transformer.register_forward_hook(
        lambda module, args, output: seen.append("ffn")
    )
    with GRAD_MODES[mode]():
        output = model(image)
    assert seen == [(1, 24, 14, 12), "ffn"]
    assert (output.double() - float64_reference(model, image)).abs().max().item() < 1e-4


def test_the_descriptor_serves_the_optimized_network_built_once() -> None:
    descriptor = load_descriptor(REFERENCE / "tiny_x4.train.safetensors")
    image = seeded_image(3, 16, 20)
    calls = []
    descriptor.model.body[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        first = optimized_network(descriptor)
        served = descriptor(image)
        again = descriptor(image)
        assert optimized_network(descriptor) is first  # cached while nothing changed
        expected = first(image).clamp(0, 1)
    assert torch.equal(served, expected) and torch.equal(again, expected)
    assert calls == []  # the plain layers did not run


@pytest.mark.parametrize("inside", [True, False], ids=["inference_mode", "no_grad"])
def test_an_in_place_weight_change_reaches_the_next_call(inside: bool) -> None:
    """ComfyUI loads models inside inference_mode, where tensors carry no version counter; an
    edit made there must not leave the descriptor returning the old weights' result."""
    context = torch.inference_mode if inside else torch.no_grad
    image = seeded_image(3, 16, 20)
    with context():
        descriptor = load_descriptor(REFERENCE / "tiny_x4.train.safetensors")
        before = descriptor(image)
        first = optimized_network(descriptor)
        descriptor.model.conv_out.bias.add_(0.1)
        after = descriptor(image)
        expected = descriptor.model(image).clamp(0, 1)
    assert optimized_network(descriptor) is not first
    assert (after - before).abs().max().item() > 0.05
    assert (after - expected).abs().max().item() < 1e-5


def test_the_descriptor_follows_dtype_and_release_fusion() -> None:
    model = randomized_model(config_for_variant("nano", 2))
    descriptor = spandrel.ModelLoader().load_from_state_dict(model.state_dict())
    image = seeded_image(3, 10, 9)
    with torch.inference_mode():
        float32 = descriptor(image)
        descriptor.model.double()
        float64 = descriptor(image.double())
        assert float64.dtype == torch.float64
        descriptor.model.float()
        fuse_for_release(descriptor.model)
        fused = descriptor(image)
    assert descriptor.model.form == "fused"
    torch.testing.assert_close(float64.float(), float32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, float32, rtol=1e-5, atol=1e-5)


def test_a_traced_descriptor_records_the_plain_network() -> None:
    """Tracers (chaiNNer's Convert To ONNX, torch.jit.trace) get the plain network, valid at
    every size, not the optimized one whose row bands depend on the traced size."""
    descriptor = load_descriptor(REFERENCE / "nano_x2.train.safetensors")
    descriptor.model.requires_grad_(False)  # traced as constants of the closure
    calls = []
    descriptor.model.body[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation, spandrel's padding
        traced = torch.jit.trace(lambda x: descriptor(x), seeded_image(3, 8, 8), check_trace=False)
        assert calls == [1]
        image = seeded_image(3, 40, 24)
        torch.testing.assert_close(traced(image), descriptor(image), rtol=1e-5, atol=1e-5)


def test_torch_compile_of_the_optimized_network_has_no_graph_breaks() -> None:
    net = optimize_for_inference(randomized_model(config_for_variant("nano", 2)))
    image = seeded_image(3, 24, 20)
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(net)(image)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_the_optimized_copy_refuses_what_only_the_plain_network_does(tmp_path) -> None:
    model = randomized_model(config_for_variant("nano", 2))
    optimized = optimize_for_inference(model)
    instead = "ParagonSR module"
    with pytest.raises(AttributeError, match="Hooks, exporters and weight edits belong on the"):
        optimized.body[0].register_forward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="train the ParagonSR module"):
        optimized.train()
    with pytest.raises(ExportError, match=instead):
        export_onnx(optimized, tmp_path / "x.onnx")
    with pytest.raises(CheckpointError, match=instead):
        save_checkpoint(optimized, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match=instead):
        fuse_for_release(optimized)
    with pytest.raises(TypeError, match=instead):
        optimize_for_inference(optimized)
    with pytest.raises(TypeError, match=instead):
        upscale(optimized, seeded_image(3, 8, 8))
    with pytest.raises(CheckpointError, match="the state of an OptimizedParagonSR"):
        inspect_checkpoint(optimized.state_dict())
    assert list(tmp_path.iterdir()) == []


def test_the_core_has_no_import_cycles() -> None:
    """Module-level imports between the core's modules form no cycle (imports inside functions
    run later and cannot deadlock start-up)."""
    package = Path(__file__).resolve().parent.parent / "paragonsr"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        targets = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                targets.add(node.module.split(".")[0])
        graph[path.stem] = {t for t in targets if (package / f"{t}.py").exists()}
    assert graph["config"] == set()  # what a network is depends on nothing of ours
    assert graph["network"] == {"config"}  # the plain network: only on that

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, " -> ".join((*trail, module))
        for target in graph.get(module, ()):
            visit(target, (*trail, module))

    for module in graph:
        visit(module, ())


def test_one_atomic_write_helper() -> None:
    """Temporary-name-then-rename is written once, in paragonsr/files.py."""
    package = Path(__file__).resolve().parent.parent / "paragonsr"
    writers = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if re.search(r"os\.replace\(|\.rename\(", path.read_text())
    ]
    assert writers == ["files.py"]


def test_moving_the_model_drops_the_optimized_copy() -> None:
    """When a host offloads the model (ComfyUI moves it to the CPU), the optimized copy built
    on the device must not stay there unaccounted for."""
    descriptor = load_descriptor(REFERENCE / "nano_x2.train.safetensors")
    image = seeded_image(3, 12, 12)
    with torch.inference_mode():
        expected = descriptor(image)
        assert descriptor._call_fn._network is not None
        descriptor.model.to("cpu")  # any move or conversion goes through Module._apply
        assert descriptor._call_fn._network is None
        assert torch.equal(descriptor(image), expected)  # rebuilt on the next call
