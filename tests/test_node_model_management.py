"""The Upscale node with ComfyUI's model management, recorded through stand-in ComfyUI modules:
what it asks ComfyUI to load, and what of ours is left on the device when it returns. (The real
ComfyUI runs in tests/e2e; on a CPU it cannot show device placement.)"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from helpers import REFERENCE, seeded_image
from paragonsr import load_descriptor


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []


@pytest.fixture
def nodes(monkeypatch):
    """paragonsr_nodes.nodes imported over stand-ins for the ComfyUI modules it touches."""
    recorder = Recorder()

    def module(name: str, **attributes) -> types.ModuleType:
        stand_in = types.ModuleType(name)
        stand_in.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, stand_in)
        return stand_in

    class Patcher:
        def __init__(self, model, load_device, offload_device) -> None:
            self.model, self.load_device = model, load_device

    management = module(
        "comfy.model_management",
        get_torch_device=lambda: torch.device("cpu"),
        unet_offload_device=lambda: torch.device("cpu"),
        load_models_gpu=lambda models, **options: recorder.calls.append(("load", models, options)),
        throw_exception_if_processing_interrupted=lambda: None,
        processing_interrupted=lambda: False,
    )
    comfy = module("comfy", model_management=management)
    comfy.model_patcher = module("comfy.model_patcher", CoreModelPatcher=Patcher)
    comfy.utils = module(
        "comfy.utils",
        ProgressBar=lambda total: types.SimpleNamespace(update_absolute=lambda done, total: None),
    )
    module("folder_paths", get_filename_list=lambda folder: [])

    class NodeOutput:
        def __init__(self, *args, ui=None) -> None:
            self.args, self.ui = args, ui

    io = types.SimpleNamespace(ComfyNode=object, NodeOutput=NodeOutput)
    module("comfy_api")
    module("comfy_api.latest", io=io, ui=types.SimpleNamespace(PreviewText=lambda text: text))
    import paragonsr_nodes

    for name in ("nodes", "comfy_bridge"):  # imported afresh over these stand-ins
        monkeypatch.delitem(sys.modules, f"paragonsr_nodes.{name}", raising=False)
        monkeypatch.delattr(paragonsr_nodes, name, raising=False)
    import paragonsr_nodes.nodes as imported

    yield imported, recorder
    for name in ("nodes", "comfy_bridge"):
        sys.modules.pop(f"paragonsr_nodes.{name}", None)
        paragonsr_nodes.__dict__.pop(name, None)


def test_upscale_loads_through_model_management_and_leaves_no_copy(nodes) -> None:
    module, recorder = nodes
    descriptor = load_descriptor(REFERENCE / "nano_x2.train.safetensors")
    module.comfy_bridge.attach_patcher(descriptor)
    image = seeded_image(3, 24, 20).movedim(1, -1)
    with torch.inference_mode():
        output = module.UpscaleParagonSR.execute(descriptor, image)
    [(kind, models, options)] = recorder.calls
    assert kind == "load" and models == [descriptor.patcher]  # the loader's patcher
    weights = sum(p.numel() * p.element_size() for p in descriptor.model.parameters())
    assert options["memory_required"] >= 2 * weights and options["force_full_load"]
    assert output.args[0].shape == (1, 48, 40, 3)
    assert descriptor._call_fn._network is None  # the optimized copy left with the node


def test_a_model_without_a_patcher_gets_one(nodes) -> None:
    """Models from other packs' loaders may carry no patcher; ComfyUI still loads them."""
    module, recorder = nodes
    descriptor = load_descriptor(REFERENCE / "nano_x2.train.safetensors")
    with torch.inference_mode():
        module.UpscaleParagonSR.execute(descriptor, seeded_image(3, 8, 8).movedim(1, -1))
    assert recorder.calls[0][1] == [descriptor.patcher]
