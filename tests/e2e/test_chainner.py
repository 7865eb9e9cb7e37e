"""End to end in a real chaiNNer backend (see shared/chainner-harness/README.md): the server started
as the app starts it, chains posted to /run, results checked on disk against `paragonsr upscale`.

    CHAINNER_PATH=/path/to/chaiNNer CHAINNER_PYTHON=/path/to/its/venv/bin/python \\
        pytest -s tests/e2e/test_chainner.py

Skipped, with this message, unless both are set (CI has no chaiNNer). The test installs nothing
into chaiNNer's Python: the PyTorch chains need what a user does there, `$CHAINNER_PYTHON -m pip
install --no-deps <this pack>` and `$CHAINNER_PYTHON -m paragonsr spandrel-hook install`, and
fail with those two commands when they are missing. The ONNX chain needs neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from paragonsr import load_descriptor

CHAINNER = os.environ.get("CHAINNER_PATH")
CHAINNER_PYTHON = os.environ.get("CHAINNER_PYTHON")
pytestmark = pytest.mark.skipif(
    not (CHAINNER and CHAINNER_PYTHON),
    reason="CHAINNER_PATH and CHAINNER_PYTHON are unset: no real chaiNNer backend to run chains in",
)
SAMPLE = REPO / "paragonsr" / "data" / "chelsea_160x120.png"  # 160x120: one ONNX tile of 256
MODEL = REPO / "models" / "paragonsr_nano_x2.safetensors"
OUTPUT_SHAPE = (240, 320, 3)
OPTIONS = {
    "chaiNNer_pytorch": {"use_cpu": True, "use_fp16": False, "gpu_index": "0", "budget_limit": 0},
    "chaiNNer_onnx": {"execution_provider": "CPUExecutionProvider", "gpu_index": "0"},
}
# chaiNNer pads a dynamic ONNX model's input to a multiple of 16 (after its 16x16 shape probe) and
# GroupNorm(1) then normalizes over the padding too: the rows next to the padded border move by up
# to 14 levels on this image (measured), everything further in by at most one rounding step.
PADDED_BORDER_LEVELS = 16
BORDER = 16  # output pixels next to each edge that the padding may move


def chainner_environment(**extra: str) -> dict[str, str]:
    """The environment the app gives its Python: never the user site."""
    return {**os.environ, "PYTHONNOUSERSITE": "1", **extra}


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Backend:
    """A running chaiNNer server: its node schemas, chains posted to /run, and the events
    (node-broadcast, execution-error) it sends while they run."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.schemas: dict[str, dict] = {}
        self.events: list[tuple[str, dict]] = []
        self.listening = threading.Event()

    def request(self, path: str, payload: dict | None = None, timeout: float = 600):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def listen(self) -> None:
        try:
            with urllib.request.urlopen(self.url + "/sse", timeout=3600) as stream:
                self.listening.set()
                kind = None
                for raw in stream:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:") and kind in ("node-broadcast", "execution-error"):
                        self.events.append((kind, json.loads(line[5:])))
        except OSError:
            self.listening.set()  # the server went away

    def node(self, node_id: str, schema_id: str, values=None, edges=None) -> dict:
        """One node of a chain; ``values`` and ``edges`` by input label, an edge as
        (source node id, output index); every other input gets the schema's default."""
        values, edges = values or {}, edges or {}
        inputs = []
        for item in self.schemas[schema_id]["inputs"]:
            if item["label"] in edges:
                source, index = edges[item["label"]]
                inputs.append({"type": "edge", "id": source, "index": index})
            else:
                value = values.get(item["label"], item.get("def"))
                inputs.append({"type": "value", "value": value})
        return {"id": node_id, "schemaId": schema_id, "inputs": inputs, "nodeType": "regularNode"}

    def run(self, chain: list[dict]) -> tuple[dict, list[tuple[str, dict]]]:
        self.events.clear()
        status, answer = self.request(
            "/run", {"data": chain, "options": OPTIONS, "sendBroadcastData": True}
        )
        time.sleep(1)  # the last events arrive just after the answer
        errors = [data for kind, data in self.events if kind == "execution-error"]
        assert status == 200 and answer == {"type": "success"} and not errors, (answer, errors)
        return answer, list(self.events)

    def upscale_chain(self, package: str, model: Path, out_dir: Path, name: str, convert=False):
        """Load Image -> Load Model -> [Convert To ONNX ->] Upscale Image -> Save Image."""
        model_input = "ONNX Model File" if package == "onnx" else "Model"
        chain = [
            self.node("img", "chainner:image:load", {"Image File": str(SAMPLE)}),
            self.node("model", f"chainner:{package}:load_model", {model_input: str(model)}),
        ]
        upscaler, source = f"chainner:{package}:upscale_image", "model"
        if convert:
            convert_to_onnx = "chainner:pytorch:convert_to_onnx"
            chain.append(self.node("conv", convert_to_onnx, edges={"PyTorch Model": ("model", 0)}))
            upscaler, source = "chainner:onnx:upscale_image", "conv"
        chain.append(self.node("up", upscaler, edges={"Model": (source, 0), "Image": ("img", 0)}))
        save = {"Directory": str(out_dir), "Image Name": name}
        chain.append(self.node("save", "chainner:image:save", save, {"Image": ("up", 0)}))
        return chain


def broadcast(events: list[tuple[str, dict]], node_id: str) -> dict:
    return next(
        data for kind, data in events if kind == "node-broadcast" and data["nodeId"] == node_id
    )


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("chainner")
    for folder in ("storage", "logs", "pycache"):
        (root / folder).mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                CHAINNER_PYTHON,
                str(Path(CHAINNER) / "backend" / "src" / "run.py"),
                str(port),
                "--storage-dir",
                str(root / "storage"),
                "--logs-dir",
                str(root / "logs"),
            ],
            cwd=root,
            # bytecode into the temporary folder, not into chaiNNer's checkout
            env=chainner_environment(PYTHONPYCACHEPREFIX=str(root / "pycache")),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = Backend(port)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                status, nodes = client.request("/nodes", timeout=10)
                if status == 200:
                    client.schemas = {n["schemaId"]: n for n in nodes["nodes"]}
                    break
            except OSError:
                pass
            time.sleep(1)
        if not client.schemas:
            pytest.fail(f"chaiNNer's backend did not start:\n{log_path.read_text()[-3000:]}")
        threading.Thread(target=client.listen, daemon=True).start()
        client.listening.wait(30)
        yield client
    finally:
        started = [server.pid, *descendants(server.pid)]
        with contextlib.suppress(OSError):  # the server may close the connection as it goes
            client.request("/shutdown", {}, timeout=30)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(pid) for pid in started):
            time.sleep(0.5)
        left = [pid for pid in started if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"chaiNNer processes {left} outlived POST /shutdown (killed)"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    """`paragonsr upscale` of the sample, as 8-bit pixels."""
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    subprocess.run(
        [sys.executable, "-m", "paragonsr", "upscale", "--model", str(MODEL), "--device", "cpu"]
        + ["--precision", "fp32", str(SAMPLE), str(path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return pixels(path)


@pytest.fixture(scope="module")
def hook_in_chainner(tmp_path_factory) -> None:
    status = subprocess.run(
        [CHAINNER_PYTHON, "-m", "paragonsr", "spandrel-hook", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path_factory.mktemp("status"),  # not the repository: the installed pack
        env=chainner_environment(),
    )
    if status.returncode != 0 or not status.stdout.startswith("installed"):
        pytest.fail(
            "the PyTorch chains need this pack and its spandrel hook in chaiNNer's Python, as a "
            f"user installs them: `{CHAINNER_PYTHON} -m pip install --no-deps {REPO}` then "
            f"`{CHAINNER_PYTHON} -m paragonsr spandrel-hook install` (status said: "
            f"{(status.stdout + status.stderr).strip()[-500:]})"
        )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def differences(name: str, image: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """Max difference overall and away from the borders; printed for the record."""
    difference = np.abs(image - reference)
    interior = difference[BORDER:-BORDER, BORDER:-BORDER].max()
    print(
        f"\n{name}: {image.shape[1]}x{image.shape[0]}, max difference {difference.max()} levels "
        f"(mean {difference.mean():.4f}, {np.mean(difference > 1):.2%} of values above 1), "
        f"{interior} more than {BORDER} px from the borders"
    )
    return int(difference.max()), int(interior)


def test_pytorch_chain_through_the_hook(hook_in_chainner, backend, reference, tmp_path) -> None:
    _, events = backend.run(backend.upscale_chain("pytorch", MODEL, tmp_path, "pytorch"))
    model = broadcast(events, "model")
    fields = model["types"]["0"]["fields"]
    assert fields["arch"]["value"] == "ParagonSR" and fields["scale"] == 2
    assert fields["size"]["value"] == "x".join(load_descriptor(MODEL).tags)
    assert fields["tiling"] == "ModelTiling::Discouraged"
    print(f"\nchaiNNer shows: {model['data']['0']['tags']}, size {fields['size']['value']}")
    image = pixels(tmp_path / "pytorch.png")
    assert image.shape == OUTPUT_SHAPE
    worst, _ = differences("PyTorch chain", image, reference)
    assert worst <= 1


def onnx_chain(backend, model: Path, out_dir: Path, name: str) -> np.ndarray:
    _, events = backend.run(backend.upscale_chain("onnx", model, out_dir, name))
    fields = broadcast(events, "model")["types"]["0"]["fields"]
    assert fields["scaleWidth"] == fields["scaleHeight"] == 2  # chaiNNer found the scale
    image = pixels(out_dir / f"{name}.png")
    assert image.shape == OUTPUT_SHAPE
    return image


def test_onnx_chain_with_our_exports(backend, reference, tmp_path) -> None:
    height, width = pixels(SAMPLE).shape[:2]
    for name, extra in (("dynamic", []), ("static", ["--static", f"{height}x{width}"])):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "paragonsr",
                "export",
                str(MODEL),
                str(tmp_path / f"{name}.onnx"),
            ]
            + extra,
            check=True,
            capture_output=True,
            timeout=300,
        )
    # A static export at the image's size runs as one exact tile, without padding.
    worst, _ = differences(
        "ONNX chain, static export",
        onnx_chain(backend, tmp_path / "static.onnx", tmp_path, "static"),
        reference,
    )
    assert worst <= 1
    worst, interior = differences(
        "ONNX chain, dynamic export",
        onnx_chain(backend, tmp_path / "dynamic.onnx", tmp_path, "dynamic"),
        reference,
    )
    assert worst <= PADDED_BORDER_LEVELS and interior <= 2


def test_convert_to_onnx_in_chainner(hook_in_chainner, backend, reference, tmp_path) -> None:
    """chaiNNer's own Convert To ONNX (opset 14, dynamic) on a ParagonSR model, then its ONNX
    upscaler: the same padding as a dynamic export of ours."""
    chain = backend.upscale_chain("pytorch", MODEL, tmp_path, "converted", convert=True)
    _, events = backend.run(chain)
    fields = broadcast(events, "conv")["types"]["0"]["fields"]
    assert fields["scaleWidth"] == fields["scaleHeight"] == 2
    image = pixels(tmp_path / "converted.png")
    assert image.shape == OUTPUT_SHAPE
    worst, interior = differences("Convert To ONNX chain", image, reference)
    assert worst <= PADDED_BORDER_LEVELS and interior <= 2
