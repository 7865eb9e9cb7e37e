"""The node pack's static contract, checked without ComfyUI (the harness runs the real thing):
example workflows match the API copies that were run, use only existing nodes, and every node
input has a tooltip."""

from __future__ import annotations

import ast
import importlib.util
import json
import re

import pytest

from helpers import REPO

NODES_SOURCE = (REPO / "paragonsr_nodes" / "nodes.py").read_text()
OUR_NODES = set(re.findall(r'node_id="([^"]+)"', NODES_SOURCE))
STOCK_NODES = {"LoadImage", "SaveImage", "UpscaleModelLoader", "ImageUpscaleWithModel"}
API_COPIES = sorted((REPO / "tests" / "workflows").glob("*_api.json"))


def load_examples() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location(
        "make_ui_workflows", REPO / "scripts" / "make_ui_workflows.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXAMPLES


def test_our_node_ids() -> None:
    assert {
        "ParagonSRLoader",
        "ParagonSRFuse",
        "ParagonSRUpscale",
        "ParagonSRExportONNX",
        "ParagonSRTrain",
        "ParagonSRSampleImage",
    } == OUR_NODES


@pytest.mark.parametrize("path", API_COPIES, ids=[p.stem for p in API_COPIES])
def test_workflows_need_nothing_a_fresh_install_lacks(path) -> None:
    """A fresh ComfyUI (new base directory, the pack copied in) has empty input and model
    folders: the examples read only what the pack ships."""
    bundled_models = {p.name for p in (REPO / "models").glob("*.safetensors")}
    for node in json.loads(path.read_text()).values():
        inputs = node["inputs"]
        assert node["class_type"] != "LoadImage", "use ParagonSRSampleImage"
        if node["class_type"] in ("ParagonSRLoader", "UpscaleModelLoader"):
            assert inputs["model_name"] in bundled_models
        if node["class_type"] == "ParagonSRTrain":
            assert inputs["dataset"] == "(bundled sample photos)"
            assert inputs["init_model"] in {"none", *bundled_models}


@pytest.mark.parametrize("path", API_COPIES, ids=[p.stem for p in API_COPIES])
def test_api_workflows_use_existing_nodes_and_links(path) -> None:
    graph = json.loads(path.read_text())
    for node in graph.values():
        assert node["class_type"] in OUR_NODES | STOCK_NODES
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in graph


def test_every_node_input_has_a_tooltip() -> None:
    calls = [
        node
        for node in ast.walk(ast.parse(NODES_SOURCE))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "Input"
    ]
    assert len(calls) >= 20
    missing = [
        ast.unparse(call)[:60]
        for call in calls
        if not any(k.arg == "tooltip" for k in call.keywords)
    ]
    assert missing == []


@pytest.mark.parametrize("api_name", sorted(load_examples()))
def test_ui_workflows_match_their_api_copies(api_name: str) -> None:
    api = json.loads((REPO / "tests" / "workflows" / api_name).read_text())
    ui = json.loads((REPO / "workflows" / load_examples()[api_name]).read_text())
    ids = {key: index + 1 for index, key in enumerate(api)}
    by_id = {node["id"]: node for node in ui["nodes"]}
    assert len(by_id) == len(api)
    for key, node in api.items():
        ui_node = by_id[ids[key]]
        assert ui_node["type"] == node["class_type"]
        widgets = [v for v in node["inputs"].values() if not isinstance(v, list)]
        assert ui_node["widgets_values"][: len(widgets)] == widgets
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                slot = next(s for s in ui_node["inputs"] if s["name"] == name)
                link = next(link for link in ui["links"] if link[0] == slot["link"])
                assert (link[1], link[2], link[3]) == (ids[value[0]], value[1], ids[key])


def test_the_browser_extension_that_shows_node_text_is_served() -> None:
    """ComfyUI serves the folder the entry module names in WEB_DIRECTORY; the script there
    shows the text our nodes return (ui.PreviewText) on the node."""
    entry = (REPO / "__init__.py").read_text()
    folder = re.search(r'^WEB_DIRECTORY = "([^"]+)"$', entry, re.MULTILINE).group(1)
    script = (REPO / folder / "paragonsr_node_text.js").read_text()
    assert 'nodeData.name.startsWith("ParagonSR")' in script and "message?.text" in script
    for node in ("LoadParagonSR", "FuseParagonSR", "ExportParagonSRONNX", "TrainParagonSR"):
        body = NODES_SOURCE.split(f"class {node}(")[1].split("\nclass ")[0]
        assert "ui=comfy_bridge.show_text(" in body, node
