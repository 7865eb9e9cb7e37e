"""End to end in a real ComfyUI (see shared/comfyui-harness/README.md): the pack symlinked into
custom_nodes, every API workflow posted to /prompt, results checked on disk.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest tests/e2e

Skipped, with this message, when COMFYUI_PATH is unset (CI has no ComfyUI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REFERENCE, REPO
from paragonsr import UpscaleSettings, load_descriptor, upscale
from paragonsr.images import read_image

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI, reason="COMFYUI_PATH is unset: no real ComfyUI to run the workflows in"
)
WORKFLOWS = REPO / "tests" / "workflows"
SAMPLE = REPO / "paragonsr" / "data" / "chelsea_160x120.png"
MODEL = REPO / "models" / "paragonsr_nano_x2.safetensors"
MODEL_X4 = REPO / "models" / "paragonsr_nano_x4.safetensors"


class Comfy:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.url = root, f"http://127.0.0.1:{port}"

    def request(self, path: str, payload: dict | None = None):
        data = json.dumps(payload).encode() if payload is not None else None
        with urllib.request.urlopen(
            urllib.request.Request(
                self.url + path, data=data, headers={"Content-Type": "application/json"}
            ),
            timeout=30,
        ) as response:
            body = response.read()
        return json.loads(body) if body else None

    def run(self, graph: dict, interrupt_after: float | None = None, timeout: float = 300):
        prompt_id = self.request("/prompt", {"prompt": graph})["prompt_id"]
        started = time.time()
        while time.time() - started < timeout:
            if interrupt_after is not None and time.time() - started > interrupt_after:
                self.request("/interrupt", {})
                interrupt_after = None
            history = self.request(f"/history/{prompt_id}")
            if history and prompt_id in history:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(prompt_id)

    def outputs(self, prefix: str) -> list[Path]:
        return sorted((self.root / "output").glob(f"{prefix}_*"))


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root``: what a test must leave as it found it."""
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A ComfyUI server over its own base directory (models, input, output, user, custom_nodes
    with the pack linked in): the ComfyUI checkout and the repository stay as they were."""
    root = Path(COMFYUI)
    python = os.environ.get("COMFYUI_PYTHON", "python3")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "paragonsr").symlink_to(REPO)
    # What a fresh install has: nothing. The bundled model and the sample image come from the
    # pack; these extra inputs are only for the tests below.
    models = base / "models" / "upscale_models"
    models.mkdir(parents=True)
    shutil.copy(REFERENCE / "tiny_x4.params_ema.pth", models / "tiny_x4.params_ema.pth")
    inputs = base / "input"
    inputs.mkdir()
    Image.open(SAMPLE).resize((960, 720), Image.BICUBIC).save(inputs / "big.png")
    rgba = np.asarray(Image.open(SAMPLE).convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)[None, :]
    Image.fromarray(rgba).save(inputs / "rgba.png")
    untouched = {
        folder: tree_state(folder) for folder in (root, REPO / "paragonsr", REPO / "models")
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("comfy") / "comfy.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-auto-launch",
                "--base-directory",
                str(base),
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            # No bytecode caches in the ComfyUI checkout or in the repository.
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        client = Comfy(base, port)
        for _ in range(120):
            try:
                client.request("/system_stats")
                break
            except OSError:
                time.sleep(1)
        yield client
        server.terminate()
        server.wait(30)
    assert "IMPORT FAILED" not in log_path.read_text()
    for folder, state in untouched.items():
        assert tree_state(folder) == state, f"the tests changed {folder}"


def with_image(graph: dict, name: str) -> dict:
    """The workflow reading ``name`` from the input folder instead of the bundled sample."""
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    return graph


def workflow(name: str, prefix: str, **changes) -> dict:
    graph = json.loads((WORKFLOWS / name).read_text())
    for node in graph.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
    for key, value in changes.items():
        node, field = key.split(".")
        graph[node]["inputs"][field] = value
    return graph


def saved(comfy: Comfy, prefix: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in comfy.outputs(prefix)]


def test_the_bundled_model_is_listed_without_copying_it(comfy) -> None:
    for node in ("ParagonSRLoader", "UpscaleModelLoader"):
        info = comfy.request(f"/object_info/{node}")[node]["input"]["required"]["model_name"]
        options = info[0] if isinstance(info[0], list) else info[1]["options"]
        assert {MODEL.name, MODEL_X4.name} <= set(options), node
    assert not (comfy.root / "models" / "upscale_models" / MODEL.name).exists()


def test_upscale_equals_the_cli_within_one_level(comfy) -> None:
    result = comfy.run(workflow("paragonsr_upscale_api.json", "e2e_upscale"))
    assert result["status"]["status_str"] == "success"
    [image] = saved(comfy, "e2e_upscale")
    expected = upscale(load_descriptor(MODEL), read_image(SAMPLE).pixels, UpscaleSettings(tile=64))
    expected = expected[0].permute(1, 2, 0).numpy() * 255
    assert image.shape == (240, 320, 3)
    assert np.abs(image.astype(float) - expected).max() <= 1.0


def test_the_default_x4_example_upscales_x4_as_the_cli_does(comfy) -> None:
    result = comfy.run(workflow("paragonsr_upscale_x4_api.json", "e2e_x4"))
    assert result["status"]["status_str"] == "success"
    [image] = saved(comfy, "e2e_x4")
    expected = upscale(load_descriptor(MODEL_X4), read_image(SAMPLE).pixels, UpscaleSettings())
    expected = expected[0].permute(1, 2, 0).numpy() * 255
    assert image.shape == (480, 640, 3)
    assert np.abs(image.astype(float) - expected).max() <= 1.0


def test_stock_loader_and_stock_upscaler_interoperate(comfy) -> None:
    for name, prefix in (
        ("stock_loader_into_paragonsr_upscale_api.json", "e2e_stock_in"),
        ("paragonsr_loader_into_stock_upscale_api.json", "e2e_stock_out"),
    ):
        assert comfy.run(workflow(name, prefix))["status"]["status_str"] == "success"
        assert saved(comfy, prefix)[0].shape == (240, 320, 3)


def test_interrupt_in_the_middle_of_an_upscale(comfy) -> None:
    graph = workflow(
        "paragonsr_upscale_api.json",
        "e2e_interrupted",
        **{"2.model_name": "tiny_x4.params_ema.pth", "3.tile": 64},
    )
    with_image(graph, "big.png")
    result = comfy.run(graph, interrupt_after=1.5)
    messages = [m[0] for m in result["status"]["messages"]]
    assert "execution_interrupted" in messages
    assert comfy.outputs("e2e_interrupted") == []


def test_rgba_and_a_batch_of_eight(comfy) -> None:
    graph = with_image(workflow("paragonsr_upscale_api.json", "e2e_rgba"), "rgba.png")
    graph["5"] = {
        "class_type": "JoinImageWithAlpha",
        "inputs": {"image": ["1", 0], "alpha": ["1", 1]},
    }
    graph["3"]["inputs"]["image"] = ["5", 0]
    assert comfy.run(graph)["status"]["status_str"] == "success"
    [rgba] = saved(comfy, "e2e_rgba")
    assert rgba.shape == (240, 320, 4)
    assert rgba[..., 3][:, 0].mean() < 20 and rgba[..., 3][:, -1].mean() > 235

    graph = workflow("paragonsr_upscale_api.json", "e2e_batch")
    graph["5"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 8}}
    graph["3"]["inputs"]["image"] = ["5", 0]
    assert comfy.run(graph)["status"]["status_str"] == "success"
    frames = saved(comfy, "e2e_batch")
    assert len(frames) == 8 and all(f.shape == (240, 320, 3) for f in frames)
    assert all(np.array_equal(frames[0], f) for f in frames)


def test_fuse_export_and_train_write_their_files(comfy) -> None:
    models = comfy.root / "models" / "upscale_models"
    result = comfy.run(workflow("fuse_and_save_api.json", "e2e_fused"))
    assert result["status"]["status_str"] == "success"
    assert len(list(models.glob("paragonsr_nano_x2_fused_*.safetensors"))) == 1
    summary = result["outputs"]["2"]["text"][0]  # shown on the node in the browser
    assert summary.startswith("ParagonSR fused") and "saved as paragonsr_nano_x2_fused_" in summary
    result = comfy.run(workflow("export_onnx_api.json", "e2e_onnx"))
    assert result["status"]["status_str"] == "success"
    [onnx_file] = (comfy.root / "output").glob("paragonsr_nano_x2_*.onnx")
    report = result["outputs"]["2"]["text"][0]
    assert report.startswith(f"wrote {onnx_file}") and "onnx.checker: passed" in report
    result = comfy.run(workflow("train_then_upscale_api.json", "e2e_trained"))
    assert result["status"]["status_str"] == "success"
    assert saved(comfy, "e2e_trained")[0].shape == (240, 320, 3)
    report = result["outputs"]["1"]["text"][0]
    assert "PSNR" in report
    # Two bundled photos and no validation folder: one is held out, and the report says so.
    assert "validation on 1 of the 2 images of" in report and "held out (seed 0)" in report


def test_the_export_node_writes_an_ncnn_pair(comfy) -> None:
    graph = workflow("export_onnx_api.json", "e2e_ncnn")
    graph["2"]["inputs"]["format"] = "NCNN"
    result = comfy.run(graph)
    messages = result["status"]["messages"]
    errors = [m[1].get("exception_message") for m in messages if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "success", errors
    # Named for Upscayl, which reads the scale from the name.
    [param] = (comfy.root / "output").glob("2x-paragonsr_nano_x2_*.param")
    weights = param.with_suffix(".bin")
    assert weights.stat().st_size > 100_000
    report = result["outputs"]["2"]["text"][0]
    assert report.startswith(f"wrote {param} and {weights} (fp32 weights")
    assert "chaiNNer reads scale 2, channels 3 -> 3" in report


def test_bad_input_is_a_node_error(comfy) -> None:
    graph = workflow("export_onnx_api.json", "e2e_bad")
    graph["2"]["inputs"]["filename_prefix"] = "../escape"
    result = comfy.run(graph)
    assert result["status"]["status_str"] == "error"
    error = next(m[1] for m in result["status"]["messages"] if m[0] == "execution_error")
    assert "must be a plain name" in error["exception_message"]
