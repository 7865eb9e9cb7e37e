"""The opt-in spandrel hook in a fresh virtual environment with the pack installed (not
editable): `import spandrel` alone then knows ParagonSR, start-up stays torch-free, uninstall
restores spandrel's own refusal, and a broken pack only warns."""

from __future__ import annotations

import site
import subprocess
import venv
from pathlib import Path

import pytest

from helpers import REFERENCE, REPO

FIXTURE = REFERENCE / "nano_x2.train.safetensors"
LOAD = (
    f"import spandrel; print(spandrel.ModelLoader().load_from_file({str(FIXTURE)!r})"
    ".architecture.id)"
)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("hookvenv")
    venv.create(folder, with_pip=True)
    python = str(folder / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch, spandrel and friends come from the test environment; the pack itself is a real,
    # non-editable install into the fresh environment.
    with open(f"{purelib}/zz_test_environment.pth", "w") as link:
        link.write("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    return python


def run(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, *args], capture_output=True, text=True, timeout=120, cwd=REPO.parent
    )


def test_install_status_uninstall(fresh_python: str) -> None:
    assert (
        "spandrel.__helpers.registry.UnsupportedModelError" in run(fresh_python, "-c", LOAD).stderr
    )
    assert run(fresh_python, "-m", "paragonsr", "spandrel-hook", "install").returncode == 0
    assert run(fresh_python, "-m", "paragonsr", "spandrel-hook", "install").returncode == 0
    assert run(fresh_python, "-c", LOAD).stdout.strip() == "ParagonSR"
    assert (
        run(fresh_python, "-c", "import sys; print('torch' in sys.modules)").stdout.strip()
        == "False"
    )
    assert run(fresh_python, "-m", "paragonsr", "spandrel-hook", "status").stdout.startswith(
        "installed"
    )
    assert "removed" in run(fresh_python, "-m", "paragonsr", "spandrel-hook", "uninstall").stdout
    assert "UnsupportedModelError" in run(fresh_python, "-c", LOAD).stderr


def test_a_broken_pack_only_warns(fresh_python: str) -> None:
    assert run(fresh_python, "-m", "paragonsr", "spandrel-hook", "install").returncode == 0
    purelib = run(
        fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    ).stdout.strip()
    broken = Path(purelib) / "paragonsr" / "spandrel_arch.py"
    original = broken.read_text()
    try:
        broken.write_text("raise RuntimeError('simulated breakage')\n")
        result = run(fresh_python, "-c", "import spandrel; print(len(spandrel.MAIN_REGISTRY))")
        assert result.returncode == 0 and int(result.stdout) > 30
        assert "ParagonSR not registered (simulated breakage)" in result.stderr
    finally:
        broken.write_text(original)
        run(fresh_python, "-m", "paragonsr", "spandrel-hook", "uninstall")
