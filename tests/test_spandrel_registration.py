"""How ParagonSR sits in spandrel's registry."""

from __future__ import annotations

import subprocess
import sys

import spandrel
from spandrel import MAIN_REGISTRY, ArchRegistry, ArchSupport, ModelTiling

from helpers import REFERENCE, REPO, randomized_model
from paragonsr import ARCH_ID, ParagonSRArch, config_for_variant, read_state_dict, register


def detection_order(registry: ArchRegistry = MAIN_REGISTRY) -> list[str]:
    return [support.architecture.id for support in registry.architectures("detection")]


def test_registered_once_ahead_of_every_loose_detector() -> None:
    order = detection_order()
    assert order.count(ARCH_ID) == 1
    assert order.index(ARCH_ID) < order.index("Compact")
    assert register() is False  # idempotent
    assert detection_order() == order


def test_no_other_architecture_would_claim_a_paragonsr_file_first() -> None:
    for name in ("nano_x2.train.safetensors", "tiny_x4.fused.safetensors"):
        state = read_state_dict(REFERENCE / name)
        claimed_by = [
            support.architecture.id
            for support in MAIN_REGISTRY.architectures("detection")
            if support.detect(state)
        ]
        assert claimed_by[0] == ARCH_ID


def test_a_foreign_paragonsr_entry_is_left_in_place() -> None:
    class FutureSpandrelParagonSR(ParagonSRArch):
        pass

    registry = ArchRegistry()
    foreign = ArchSupport.from_architecture(FutureSpandrelParagonSR())
    registry.add(foreign)
    assert register(registry) is False
    assert registry.get(ARCH_ID) is foreign


def test_registration_into_a_fresh_registry_orders_before_existing_entries() -> None:
    registry = MAIN_REGISTRY.copy()
    # A copy already holds ParagonSR; build one without it to register into.
    bare = ArchRegistry()
    bare.add(*[s for s in registry.architectures() if s.architecture.id != ARCH_ID])
    assert register(bare) is True
    assert detection_order(bare)[0] == ARCH_ID
    assert register(bare) is False


def test_descriptor_metadata() -> None:
    model = randomized_model(config_for_variant("xs", 1, in_chans=1))
    descriptor = spandrel.ModelLoader().load_from_state_dict(model.state_dict())
    assert descriptor.purpose == "Restoration"
    assert descriptor.scale == 1
    assert descriptor.input_channels == descriptor.output_channels == 1
    assert descriptor.tags == ["xs", "48nf", "4ng", "4nb", "2ffn", "training"]
    assert descriptor.supports_half is False
    assert descriptor.supports_bfloat16 is False
    assert descriptor.tiling == ModelTiling.DISCOURAGED


def test_comfyui_style_import_of_the_pack_folder_registers(tmp_path) -> None:
    """ComfyUI imports custom_nodes/<pack>/__init__.py by path, under the folder's name."""
    script = f"""
import importlib.util, sys
import spandrel
before = "ParagonSR" in spandrel.MAIN_REGISTRY
spec = importlib.util.spec_from_file_location(
    "ComfyUI-ParagonSR", {str(REPO / "__init__.py")!r},
    submodule_search_locations=[{str(REPO)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
descriptor = spandrel.ModelLoader().load_from_file({str(REFERENCE / "nano_x2.fused.safetensors")!r})
import inspect
print(before, descriptor.architecture.id, inspect.iscoroutinefunction(module.comfy_entrypoint),
      hasattr(module, "NODE_CLASS_MAPPINGS"))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # ComfyUI skips a pack without comfy_entrypoint (or NODE_CLASS_MAPPINGS) and reports it as
    # failed; exporting both would hide the V3 entry point.
    assert result.stdout.split() == ["False", "ParagonSR", "True", "False"]


def test_spandrel_alone_does_not_know_paragonsr(tmp_path) -> None:
    """The registration above is ours: without importing the pack, spandrel refuses the file."""
    script = f"""
import spandrel
try:
    spandrel.ModelLoader().load_from_file({str(REFERENCE / "nano_x2.train.safetensors")!r})
except spandrel.UnsupportedModelError:
    print("unsupported")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.stdout.strip() == "unsupported", result.stderr


def test_pack_import_needs_no_comfyui() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import paragonsr, sys; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "[]", result.stderr
