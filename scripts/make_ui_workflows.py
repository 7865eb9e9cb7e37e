"""Write the UI-format example workflows (workflows/*.json) from their API-format copies
(tests/workflows/*_api.json), using a running ComfyUI's /object_info for each node's inputs,
outputs and widget order.

    python scripts/make_ui_workflows.py http://127.0.0.1:8188

The API copies are the ones the harness runs, so the examples users open are the graphs that
were checked.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "paragonsr_upscale_api.json": "ParagonSR - upscale an image (exact tiling).json",
    "paragonsr_upscale_x4_api.json": "ParagonSR - upscale x4 with the default x4 model.json",
    "fuse_and_save_api.json": "ParagonSR - fuse and save a release checkpoint.json",
    "export_onnx_api.json": "ParagonSR - export ONNX for chaiNNer.json",
    "train_then_upscale_api.json": "ParagonSR - train then upscale.json",
    "stock_loader_into_paragonsr_upscale_api.json": (
        "ParagonSR - stock Load Upscale Model into the exact upscaler.json"
    ),
}
EXTRA_WIDGETS = {"LoadImage": ["image"]}  # the upload button's value after the file name


def convert(api: dict, info: dict) -> dict:
    ids = {key: index + 1 for index, key in enumerate(api)}
    nodes, links = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for key, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                source, slot = ids[value[0]], value[1]
                kind = info[api[value[0]]["class_type"]]["output"][slot]
                links.append([link_id, source, slot, ids[key], name, kind])
                outgoing.setdefault((source, slot), []).append(link_id)
    for order, (key, node) in enumerate(api.items()):
        spec = info[node["class_type"]]
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        inputs, widgets = [], []
        for name, definition in declared.items():
            value = node["inputs"].get(name)
            kind = definition[0] if isinstance(definition[0], str) else "COMBO"
            if isinstance(value, list):
                link = next(link[0] for link in links if link[3] == ids[key] and link[4] == name)
                inputs.append({"name": name, "type": kind, "link": link})
            elif value is not None:
                widgets.append(value)
        widgets += EXTRA_WIDGETS.get(node["class_type"], [])
        outputs = [
            {
                "name": out_name,
                "type": out_type,
                "slot_index": slot,
                "links": outgoing.get((ids[key], slot), []),
            }
            for slot, (out_type, out_name) in enumerate(
                zip(spec["output"], spec["output_name"], strict=True)
            )
        ]
        nodes.append(
            {
                "id": ids[key],
                "type": node["class_type"],
                "pos": [60 + 380 * order, 120],
                "size": [340, 60 + 26 * (len(widgets) + len(inputs))],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    for link in links:  # litegraph links name the target slot by index
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, slot in enumerate(target["inputs"]) if slot["name"] == link[4])
    return {
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188"
    with urllib.request.urlopen(f"{base}/object_info") as response:
        info = json.load(response)
    target = ROOT / "workflows"
    target.mkdir(exist_ok=True)
    for source, name in EXAMPLES.items():
        api = json.loads((ROOT / "tests" / "workflows" / source).read_text())
        (target / name).write_text(json.dumps(convert(api, info), indent=1) + "\n")
        print(f"wrote workflows/{name}")


if __name__ == "__main__":
    main()
