"""A hostile corpus through the command line: every bad argument and file ends in one line that
names the file or argument, the problem and the fix; no traceback, no hang, and nothing left
behind (no half-written file, no empty output folder, no stray temporary)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from helpers import REFERENCE, REPO
from paragonsr import cli
from paragonsr.checkpoint import save_checkpoint
from paragonsr.cli import main
from paragonsr.config import ParagonSRConfig
from paragonsr.network import ParagonSR

NANO = REFERENCE / "nano_x2.train.safetensors"
FUSED = REFERENCE / "nano_x2.fused.safetensors"
CHANNEL_MODELS = {"c34": (3, 4), "c13": (1, 3), "c43": (4, 3), "c32": (3, 2)}
GARBAGE = bytes(range(256)) * 4  # as a safetensors header length: 506 PB


class _Exploit:
    """Unpickled by plain pickle, this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _image(path: Path, channels: int = 3, size: int = 16) -> None:
    rng = np.random.default_rng(channels)
    array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array).save(path)


def _safetensors_with_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _small_model(in_chans: int, out_chans: int) -> ParagonSR:
    config = ParagonSRConfig(
        scale=2, in_chans=in_chans, out_chans=out_chans, num_feat=8, num_groups=1, num_blocks=1
    )
    return ParagonSR(config).eval()


def _compact_state() -> dict[str, torch.Tensor]:
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict()


def build_corpus(c: Path) -> None:
    """Every hostile file the cases below name, plus a finished two-iteration training run."""
    _image(c / "image.png")
    _image(c / "rgba.png", 4)
    (c / "hr").mkdir()
    for index in range(2):
        _image(c / "hr" / f"{index}.png")
    (c / "broken").mkdir()
    for name in ("a.png", "b.png"):
        (c / "broken" / name).write_bytes(b"not a png at all")
    (c / "noimages").mkdir()
    (c / "notes.txt").write_text("hello")
    (c / "text.pth").write_text("this is not a checkpoint\n" * 20)
    (c / "empty.pth").touch()
    (c / "adir.pth").mkdir()
    (c / "loop.pth").symlink_to(c / "loop.pth")
    (c / "dangling.pth").symlink_to(c / "gone.pth")
    data = NANO.read_bytes()
    (c / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (c / "garbage.safetensors").write_bytes(GARBAGE)
    lie = {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}
    _safetensors_with_header(c / "lying.safetensors", lie, b"\0" * 16)
    huge = {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    _safetensors_with_header(c / "huge.safetensors", huge, b"\0" * 16)
    state = load_file(NANO)
    torch.save({"params": state, "extra": _Exploit(c / "PWNED")}, c / "exploit.pth")
    torch.save({**state, "body.200000.x": torch.zeros(1)}, c / "deep.pth")
    save_file({**state, "conv_in.bias": torch.full((24,), float("nan"))}, c / "nan.safetensors")
    for name, (cin, cout) in CHANNEL_MODELS.items():
        save_checkpoint(_small_model(cin, cout), c / f"{name}.safetensors")
    compact = _compact_state()
    save_file(compact, c / "compact.safetensors")
    cut = dict(compact)
    last = max((k for k in cut if k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    cut[last] = cut[last][:-3].contiguous()
    save_file(cut, c / "compact_cut.safetensors")
    save_file(
        {k: v for k, v in compact.items() if k != "body.1.weight"}, c / "compact_nokey.safetensors"
    )
    (c / "exists.png").write_bytes(b"keep")
    (c / "exists.safetensors").write_bytes(b"keep")
    (c / "exists.onnx").write_bytes(b"keep")
    (c / "adir.onnx").mkdir()
    (c / "locked").mkdir()
    (c / "locked").chmod(0o555)
    code = main([*TRAIN.format(c=c, t=c).split(), "--iters", "2"])
    assert code == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("hostile")
    build_corpus(root)
    yield root
    (root / "locked").chmod(0o755)


def _corrupt_state(change):
    """A setup that copies the corpus run into the case's folder and edits its resume state."""

    def setup(c: Path, t: Path) -> None:
        shutil.copytree(c / "run", t / "run")
        path = t / "run" / "resume_state.pt"
        state = torch.load(path, weights_only=True)
        state = change(state)
        if isinstance(state, bytes):
            path.write_bytes(state)
        else:
            torch.save(state, path)

    return setup


def _without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _with(key, value):
    return lambda state: {**state, key: value}


def _other_variant(state):
    from paragonsr.network import build_model

    return {**state, "model": build_model("tiny", 2).state_dict()}


ROOT = os.geteuid() == 0
TRAIN = "train --data {c}/hr --out {t}/run --iters 3 --batch 1 --lq-size 8 --threads 1"
RESUME = TRAIN + " --iters 4 --resume"
UP = "upscale {c}/image.png {t}/out.png"
STATE_FIX = "start without --resume or point --out at the right run"


def case(name, argv, *fragments, code=2, lines=1, setup=None, marks=()):
    return pytest.param(argv, fragments, code, lines, setup, id=name, marks=marks)


CASES = [
    # --- info: files that are not checkpoints, or lie about what they hold -----------------
    case("info-missing", "info {c}/nowhere.pth", "nowhere.pth", "file not found"),
    case("info-txt", "info {c}/notes.txt", "notes.txt", "unsupported file type '.txt'"),
    case("info-text-pth", "info {c}/text.pth", "text.pth", "not a readable PyTorch checkpoint"),
    case("info-empty", "info {c}/empty.pth", "empty.pth", "the file is empty"),
    case("info-dir", "info {c}/adir.pth", "adir.pth", "is not a file"),
    case("info-loop", "info {c}/loop.pth", "loop.pth", "symbolic link loop"),
    case("info-dangling", "info {c}/dangling.pth", "dangling.pth", "symbolic link to a missing"),
    case("info-truncated", "info {c}/truncated.safetensors", "truncated", "truncated or corrupt"),
    case("info-garbage", "info {c}/garbage.safetensors", "garbage", "not a readable safetensors"),
    case("info-lying-header", "info {c}/lying.safetensors", "lying", "not a readable safetensors"),
    case("info-1e12-elements", "info {c}/huge.safetensors", "huge", "not a readable safetensors"),
    case("info-pickle-exploit", "info {c}/exploit.pth", "exploit.pth", "arbitrary code"),
    case("info-depth-bomb", "info {c}/deep.pth", "deep.pth", "claim 200001 groups"),
    case("info-compact", "info {c}/compact.safetensors", "compact", "not a ParagonSR checkpoint"),
    # --- fuse ------------------------------------------------------------------------------
    case("fuse-fused", f"fuse {FUSED} {{t}}/f.safetensors", "already fused", code=1),
    case("fuse-suffix", f"fuse {NANO} {{t}}/f.pth", "f.pth", "Name the output *.safetensors"),
    case("fuse-exists", f"fuse {NANO} {{c}}/exists.safetensors", "exists", "--overwrite"),
    case("fuse-no-folder", f"fuse {NANO} {{t}}/no/f.safetensors", "the folder does not exist"),
    case("fuse-compact", "fuse {c}/compact.safetensors {t}/f.safetensors", "compact", "Compact"),
    # --- upscale: arguments ------------------------------------------------------------------
    case("tile-5", f"{UP} --model {NANO} --tile 5", "--tile 5", "minimum of 32"),
    case("tile-0", f"{UP} --model {NANO} --tile 0", "--tile 0", "minimum of 32"),
    case("tile-negative", f"{UP} --model {NANO} --tile -64", "--tile -64", "minimum of 32"),
    case("tile-abc", f"{UP} --model {NANO} --tile abc", "--tile must be 'auto'", "'abc'"),
    case(
        "overlap-half-tile",
        f"{UP} --model {NANO} --mode overlap --tile 48 --overlap 24",
        "--overlap 24",
        "--tile 48",
        "--overlap 23 or less",
    ),
    case(
        "overlap-other-model",
        f"{UP} --model {{c}}/compact.safetensors --tile 40",
        "--overlap 32",
        "--tile 40",
    ),
    case("overlap-negative", f"{UP} --model {NANO} --overlap -1", "--overlap -1", "negative"),
    case("overlap-abc", f"{UP} --model {NANO} --overlap abc", "--overlap", "invalid int"),
    case("max-pixels-0", f"{UP} --model {NANO} --max-pixels 0", "--max-pixels 0", "at least 1"),
    case("max-pixels-neg", f"{UP} --model {NANO} --max-pixels -5", "--max-pixels -5"),
    case("max-pixels-small", f"{UP} --model {NANO} --max-pixels 10", "image.png", "--max-pixels"),
    case(
        "device-banana", f"{UP} --model {NANO} --device banana", "--device banana", "use auto, cpu"
    ),
    case("precision-x", f"{UP} --model {NANO} --precision x", "--precision", "invalid choice"),
    case(
        "mode-exact-compact",
        UP + " --model {c}/compact.safetensors --mode exact",
        "--mode exact needs a ParagonSR model",
        "compact.safetensors",
        "--mode overlap",
    ),
    # --- upscale: model files ------------------------------------------------------------------
    case("model-missing", UP + " --model {c}/nowhere.pth", "nowhere.pth", "file not found"),
    case("model-txt", UP + " --model {c}/notes.txt", "notes.txt", "unsupported file type"),
    case("model-text-pth", UP + " --model {c}/text.pth", "text.pth", "not a readable PyTorch"),
    case("model-empty", UP + " --model {c}/empty.pth", "empty.pth", "the file is empty"),
    case("model-dir", UP + " --model {c}/adir.pth", "adir.pth", "is not a file"),
    case("model-loop", UP + " --model {c}/loop.pth", "loop.pth", "symbolic link loop"),
    case("model-truncated", UP + " --model {c}/truncated.safetensors", "truncated", "corrupt"),
    case("model-lying", UP + " --model {c}/lying.safetensors", "lying", "not a readable"),
    case("model-1e12", UP + " --model {c}/huge.safetensors", "huge", "not a readable"),
    case("model-exploit", UP + " --model {c}/exploit.pth", "exploit.pth", "refused"),
    case("model-depth-bomb", UP + " --model {c}/deep.pth", "deep.pth", "claim"),
    case("compact-cut", UP + " --model {c}/compact_cut.safetensors", "compact_cut", "damaged"),
    case("compact-nokey", UP + " --model {c}/compact_nokey.safetensors", "compact_nokey"),
    case(
        "rgba-into-3-to-4",
        "upscale {c}/rgba.png {t}/out.png --model {c}/c34.safetensors",
        "rgba.png",
        "4 output channels",
        "alpha",
    ),
    case("rgb-into-1-to-3", UP + " --model {c}/c13.safetensors", "image.png", "grayscale"),
    case("rgb-into-4-to-3", UP + " --model {c}/c43.safetensors", "image.png", "4-channel"),
    case("rgb-into-3-to-2", UP + " --model {c}/c32.safetensors", "image.png", "2 output channels"),
    # --- upscale: inputs and outputs ----------------------------------------------------------
    case("input-missing", f"upscale {{c}}/nope.png {{t}}/o.png --model {NANO}", "nope.png"),
    case("input-suffix", f"upscale {{c}}/notes.txt {{t}}/o.png --model {NANO}", "notes.txt"),
    case("output-suffix", f"upscale {{c}}/image.png {{t}}/o.txt --model {NANO}", "o.txt"),
    case(
        "output-exists",
        f"upscale {{c}}/image.png {{c}}/exists.png --model {NANO}",
        "exists.png",
        "--overwrite",
    ),
    case(
        "output-folder-missing",
        f"upscale {{c}}/image.png {{t}}/no/o.png --model {NANO}",
        "the output folder does not exist",
    ),
    case(
        "output-folder-locked",
        f"upscale {{c}}/image.png {{c}}/locked/o.png --model {NANO}",
        "locked",
        "not writable",
        marks=pytest.mark.skipif(ROOT, reason="root writes anywhere"),
    ),
    case("folder-no-images", f"upscale {{c}}/noimages {{t}}/o --model {NANO}", "no images"),
    case(
        "folder-all-broken",
        f"upscale {{c}}/broken {{t}}/o --model {NANO}",
        "skipped",
        "a.png",
        lines=2,
    ),
    case("folder-into-file", f"upscale {{c}}/hr {{c}}/image.png --model {NANO}", "is a file"),
    # --- export --------------------------------------------------------------------------------
    case("export-onto-dir", f"export {NANO} {{c}}/adir.onnx", "adir.onnx", "is a folder"),
    case("export-suffix", f"export {NANO} {{t}}/m.engine", "m.engine", "*.onnx"),
    case("export-exists", f"export {NANO} {{c}}/exists.onnx", "exists.onnx", "--overwrite"),
    case("export-opset", f"export {NANO} {{t}}/m.onnx --opset 30", "--opset 30", "14-20"),
    case("export-static", f"export {NANO} {{t}}/m.onnx --static big", "--static", "'big'"),
    case("export-static-2", f"export {NANO} {{t}}/m.onnx --static 2x2", "--static 2x2", "3x3"),
    case("export-io-fp32", f"export {NANO} {{t}}/m.onnx --keep-io-fp32", "--fp16"),
    case("export-missing", "export {c}/nowhere.pth {t}/m.onnx", "nowhere.pth", "not found"),
    case("export-nan", "export {c}/nan.safetensors {t}/m.onnx", "nan.safetensors", "NaN"),
    # --- train: every numeric argument out of range --------------------------------------
    *(
        case(f"train{flag}{value}", f"{TRAIN} {flag} {value}", f"{flag} {shown}", problem)
        for flag, value, shown, problem in [
            ("--batch", "0", "0", "at least 1"),
            ("--lq-size", "0", "0", "at least 1"),
            ("--scale", "0", "0", "at least 1"),
            ("--scale", "17", "17", "scales 1-16"),
            ("--threads", "-1", "-1", "0 (all cores) or more"),
            ("--milestones", "a", "'a'", "separated by commas"),
            ("--milestones", "0", "0", "at least 1"),
            ("--val-every", "0", "0", "at least 1"),
            ("--save-every", "0", "0", "at least 1"),
            ("--iters", "0", "0", "at least 1"),
            ("--iters", "-5", "-5", "at least 1"),
            ("--lr", "0", "0", "must be positive"),
            ("--lr", "-1", "-1", "must be positive"),
            ("--lr", "nan", "nan", "must be positive"),
            ("--lr", "inf", "inf", "must be positive"),
            ("--ema", "2", "2", "from 0 up to"),
            ("--ema", "-0.5", "-0.5", "from 0 up to"),
            ("--clip", "-1", "-1", "must be positive"),
            ("--clip", "nan", "nan", "must be positive"),
            ("--warmup", "-1", "-1", "0 or more"),
            ("--ms-ssim", "-1", "-1", "0 or more"),
            ("--ms-ssim", "nan", "nan", "0 or more"),
        ]
    ),
    case("train-scale-9", f"{TRAIN} --scale 9", "HR crop"),
    case("train-device", f"{TRAIN} --device banana", "--device banana"),
    case("train-batch-abc", f"{TRAIN} --batch abc", "--batch", "invalid int"),
    case("train-no-data", "train --data {c}/nowhere --out {t}/run", "nowhere", "not found"),
    case("train-lr-data", f"{TRAIN} --lr-data {{c}}/nowhere", "nowhere"),
    case("train-init-missing", f"{TRAIN} --init {{c}}/nowhere.pth", "nowhere.pth"),
    case("train-init-fused", f"{TRAIN} --init {FUSED}", "fused checkpoint cannot be trained"),
    case("train-init-exploit", TRAIN + " --init {c}/exploit.pth", "exploit.pth", "refused"),
    case(
        "train-variant-and-init",
        f"{TRAIN} --init {NANO} --variant tiny",
        "--variant tiny",
        "nano",
        "--init",
    ),
    case("train-variant-unknown", f"{TRAIN} --variant huge", "--variant", "invalid choice"),
    case("train-previous-run", TRAIN, "previous run", "--resume", setup=_corrupt_state(dict)),
    case("resume-nothing", RESUME, "resume_state.pt", "no resume state"),
    # --- train --resume: state files with a key missing or of the wrong type or shape -------
    *(
        case(
            f"resume-{name}", RESUME + extra, "resume_state.pt", *fix, setup=_corrupt_state(change)
        )
        for name, change, fix, extra in [
            ("no-ema", _without("ema"), ("'ema'", STATE_FIX), ""),
            ("no-optimizer", _without("optimizer"), ("'optimizer'", STATE_FIX), ""),
            ("no-iteration", _without("iteration"), ("'iteration'", STATE_FIX), ""),
            ("no-model-config", _without("model_config"), ("'model_config'", STATE_FIX), ""),
            ("optimizer-str", _with("optimizer", "adam"), ("'optimizer'", STATE_FIX), ""),
            ("iteration-str", _with("iteration", "abc"), ("'iteration'", STATE_FIX), ""),
            ("rng-str", _with("rng", "x"), ("'rng'", STATE_FIX), ""),
            ("history-int", _with("history", 3), ("'history'", STATE_FIX), ""),
            ("other-variant", _other_variant, ("'model'", STATE_FIX), ""),
            ("a-list", lambda s: [1, 2], ("not a resume state", STATE_FIX), ""),
            ("garbage", lambda s: GARBAGE, ("unreadable", STATE_FIX), ""),
            ("another-scale", dict, ("another network", "--scale"), " --scale 3 --lq-size 5"),
        ]
    ),
]


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under ``folder``, with size and mtime for files (a folder's own mtime moves
    when a write probe comes and goes)."""
    stats = ((p, p.lstat()) for p in folder.rglob("*"))
    return sorted(
        (str(p), 0, 0) if stat.S_ISDIR(st.st_mode) else (str(p), st.st_size, st.st_mtime_ns)
        for p, st in stats
    )


@pytest.mark.parametrize(("argv", "fragments", "code", "lines", "setup"), CASES)
def test_hostile_input_is_one_line(
    corpus, tmp_path, capsys, monkeypatch, argv, fragments, code, lines, setup
) -> None:
    monkeypatch.setattr(cli, "_tqdm", lambda total, unit: tqdm(total=total, disable=True))
    if setup is not None:
        setup(corpus, tmp_path)
    before = _listing(tmp_path), _listing(corpus)
    try:
        result = main([part.format(c=corpus, t=tmp_path) for part in argv.split()])
    except SystemExit as exit_:  # argparse
        result = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert result == code, err
    assert len(err.strip().splitlines()) == lines, err
    for fragment in fragments:
        assert fragment.format(c=corpus, t=tmp_path) in err, err
    # Nothing written, half-written, changed or created, and the pickle exploit never ran.
    assert (_listing(tmp_path), _listing(corpus)) == before
    assert not (corpus / "PWNED").exists()


@pytest.mark.parametrize(
    ("model_in", "model_out", "image_channels", "channels_out"),
    [(3, 4, 3, 4), (1, 3, 1, 3), (1, 3, 2, 4), (4, 3, 4, 3), (3, 1, 3, 1), (3, 1, 4, 2)],
)
def test_models_that_change_the_channel_count_give_their_own_pixels(
    model_in, model_out, image_channels, channels_out
) -> None:
    """The output has the model's channels (plus the image's alpha, upscaled apart) and the
    model's pixels: a 3-in/4-out model used to crash writing 4 channels into 3."""
    import torch.nn.functional as F

    from helpers import randomized_model, seeded_image
    from paragonsr.upscale import UpscaleSettings, upscale

    model = randomized_model(
        ParagonSRConfig(2, model_in, model_out, num_feat=8, num_groups=1, num_blocks=1)
    )
    image = seeded_image(image_channels, 16, 12)
    result = upscale(model, image, UpscaleSettings(device="cpu"))
    assert result.shape == (1, channels_out, 32, 24)
    with torch.no_grad():
        expected = model(image[:, :model_in]).clamp(0, 1)
    torch.testing.assert_close(result[:, :model_out], expected, atol=1e-4, rtol=0)
    if channels_out > model_out:
        alpha = F.interpolate(image[:, -1:], scale_factor=2, mode="bilinear").clamp(0, 1)
        torch.testing.assert_close(result[:, model_out:], alpha, atol=1e-6, rtol=0)


def test_a_three_to_four_channel_model_writes_rgba(corpus, tmp_path, capsys) -> None:
    target = tmp_path / "out.png"
    argv = ["upscale", str(corpus / "image.png"), str(target), "--model"]
    assert main([*argv, str(corpus / "c34.safetensors")]) == 0, capsys.readouterr().err
    with Image.open(target) as written:
        assert written.mode == "RGBA" and written.size == (32, 32)


def test_a_failed_folder_run_keeps_an_output_folder_it_did_not_create(corpus, tmp_path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    assert main(["upscale", str(corpus / "broken"), str(target), "--model", str(NANO)]) == 2
    assert target.is_dir()


SLOW_WRITER = """
import contextlib, sys, time
import paragonsr.checkpoint as checkpoint
from paragonsr.cli import main

real = checkpoint.atomic_write

@contextlib.contextmanager
def slow(path, **options):
    with real(path, **options) as temporary:
        yield temporary
        print("WRITING", flush=True)
        time.sleep(120)  # the test's SIGTERM arrives here, with the temporary written

checkpoint.atomic_write = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_write_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "out.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, "fuse", str(NANO), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        for line in process.stdout:
            if line.strip() == "WRITING":
                break
        assert [p.name for p in tmp_path.iterdir()][0].endswith(".tmp")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip() == "paragonsr: stopped by SIGTERM"
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_swept(tmp_path) -> None:
    from paragonsr.files import atomic_write

    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    dead, running = finished.pid, os.getppid()
    names = {
        "stale": f".out.png.{dead}.0123abcd.tmp",
        "running": f".out.png.{running}.0123abcd.tmp",
        "own": f".out.png.{os.getpid()}.0123abcd.tmp",
        "another output's": f".out.png.bak.{dead}.0123abcd.tmp",
        "other naming": f".out.png.{dead}.backup.tmp",
        "not hidden": f"out.png.{dead}.0123abcd.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    with atomic_write(tmp_path / "out.png") as temporary:
        temporary.write_text("new")
    left = {p.name for p in tmp_path.iterdir()}
    swept = {names["stale"], names["another output's"]}
    assert left == {"out.png", *names.values()} - swept


HOOKED_IMPORT = """
import site, sys
site.addsitedir(sys.argv[1])
assert any(type(f).__name__ == "_RegisterParagonSR" for f in sys.meta_path)
import spandrel
print("ParagonSR" in spandrel.MAIN_REGISTRY, "paragonsr" in sys.modules)
"""


def test_a_hook_left_behind_by_uninstall_stays_silent(tmp_path, monkeypatch) -> None:
    """pip uninstall paragonsr leaves the hook in site-packages: without the pack, importing
    spandrel says nothing; with the pack present but broken, it warns once."""
    import site

    from paragonsr import spandrel_hook

    hook_site = tmp_path / "site"
    monkeypatch.setattr(spandrel_hook, "site_folder", lambda user=False: hook_site)
    spandrel_hook.install()
    # -S and PYTHONPATH: torch and spandrel, but not the .pth that makes this checkout
    # (an editable install) importable.
    libraries = os.pathsep.join(site.getsitepackages())

    def run(*paths: Path) -> subprocess.CompletedProcess:
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), libraries])}
        return subprocess.run(
            [sys.executable, "-S", "-c", HOOKED_IMPORT, str(hook_site)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=environment,
        )

    gone = run()
    assert gone.returncode == 0 and gone.stderr == "", gone.stderr
    assert gone.stdout.split() == ["False", "False"]
    broken = tmp_path / "broken"
    (broken / "paragonsr").mkdir(parents=True)
    (broken / "paragonsr" / "__init__.py").write_text("raise RuntimeError('simulated breakage')\n")
    present = run(broken)
    assert present.returncode == 0, present.stderr
    assert present.stderr.count("ParagonSR not registered (simulated breakage)") == 1
