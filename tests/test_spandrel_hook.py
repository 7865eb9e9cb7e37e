"""The opt-in spandrel hook in a fresh virtual environment with the pack installed (not
editable): `import spandrel` alone then knows ParagonSR, start-up stays torch-free, uninstall
restores spandrel's own refusal, and a broken pack only warns."""

from __future__ import annotations

import os
import site
import subprocess
import sys
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
    status = run(fresh_python, "-m", "paragonsr", "spandrel-hook", "status")
    assert status.stdout.startswith("installed") and status.stderr == ""
    # The pack imported first imports spandrel itself: the hook stays quiet and out of the way.
    first = run(fresh_python, "-c", f"import paragonsr; {LOAD}")
    assert first.stdout.strip() == "ParagonSR" and first.stderr == ""
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


def in_a_user_site(user_site: Path, setup: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this test's Python with ``user_site`` as its user site (the real one is never
    touched) and ``setup`` run first to say what this Python looks like."""
    code = (
        "import site, sys\n"
        f"site.getusersitepackages = lambda: {str(user_site)!r}\n"
        f"{setup}\n"
        "from paragonsr.cli import main\n"
        f"sys.exit(main({['spandrel-hook', *args]!r}))\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONNOUSERSITE"}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO.parent,
        env=environment,
    )


OUTSIDE_A_VENV = "sys.base_prefix = sys.prefix; site.ENABLE_USER_SITE = True"


def test_user_install_is_refused_in_a_virtual_environment(fresh_python: str, tmp_path) -> None:
    base = tmp_path / "userbase"
    environment = {**os.environ, "PYTHONUSERBASE": str(base)}
    result = subprocess.run(
        [fresh_python, "-m", "paragonsr", "spandrel-hook", "install", "--user"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO.parent,
        env=environment,
    )
    assert result.returncode == 2
    assert "virtual environment" in result.stderr and "drop --user" in result.stderr
    assert "-m pip install --no-deps" in result.stderr  # the way for chaiNNer
    assert not base.exists()  # nothing written

    # Files left there by hand (or by an older version) are reported as present but inactive.
    user_site = subprocess.run(
        [fresh_python, "-c", "import site; print(site.getusersitepackages())"],
        capture_output=True,
        text=True,
        env=environment,
    ).stdout.strip()
    Path(user_site).mkdir(parents=True)
    for name in ("paragonsr_spandrel_hook.pth", "_paragonsr_spandrel_hook.py"):
        (Path(user_site) / name).write_text("")
    status = subprocess.run(
        [fresh_python, "-m", "paragonsr", "spandrel-hook", "status", "--user"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO.parent,
        env=environment,
    )
    assert status.returncode == 0
    assert (
        status.stdout.startswith("present but inactive") and "virtual environment" in status.stdout
    )


@pytest.mark.parametrize(
    ("setting", "reason"),
    [("False", "-s or PYTHONNOUSERSITE"), ("None", "user and effective user differ")],
)
def test_user_install_is_refused_where_the_user_site_is_off(tmp_path, setting, reason) -> None:
    user_site = tmp_path / "base" / "site-packages"
    setup = f"sys.base_prefix = sys.prefix; site.ENABLE_USER_SITE = {setting}"
    result = in_a_user_site(user_site, setup, "install", "--user")
    assert result.returncode == 2 and reason in result.stderr
    assert not user_site.exists()
    status = in_a_user_site(user_site, setup, "status", "--user")
    assert status.stdout.startswith("not installed")


def test_user_install_warns_that_chainner_never_sees_it(tmp_path) -> None:
    user_site = tmp_path / "base" / "site-packages"
    code = OUTSIDE_A_VENV
    result = in_a_user_site(user_site, code, "install", "--user")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"installed in {user_site}")
    assert "paragonsr: warning: programs started with PYTHONNOUSERSITE=1" in result.stderr
    assert "chaiNNer" in result.stderr and "spandrel-hook install`" in result.stderr
    assert sorted(p.name for p in user_site.iterdir()) == [
        "_paragonsr_spandrel_hook.py",
        "paragonsr_spandrel_hook.pth",
    ]
    status = in_a_user_site(user_site, code, "status", "--user")
    assert status.stdout.startswith("installed") and "PYTHONNOUSERSITE=1" in status.stderr
    inactive = in_a_user_site(
        user_site, code + "; site.ENABLE_USER_SITE = False", "status", "--user"
    )
    assert inactive.stdout.startswith("present but inactive")
    assert "removed" in in_a_user_site(user_site, code, "uninstall", "--user").stdout
    assert list(user_site.iterdir()) == []


def test_an_unwritable_site_packages_names_the_right_fix(tmp_path) -> None:
    blocked = tmp_path / "a file"
    blocked.write_text("")
    code = (
        "from pathlib import Path; from paragonsr import spandrel_hook; "
        f"spandrel_hook.site_folder = lambda user=False: Path({str(blocked / 'sp')!r})"
    )
    result = in_a_user_site(tmp_path / "unused" / "site", code, "install")
    assert result.returncode == 2
    assert "cannot install the hook" in result.stderr and "--user" not in result.stderr
    assert "owns this Python environment" in result.stderr
    assert "<chaiNNer's python> -m pip install --no-deps" in result.stderr
