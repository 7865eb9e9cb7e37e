"""An opt-in hook that registers ParagonSR whenever spandrel is imported, for tools that load
upscalers through spandrel without importing this pack (chaiNNer, Forge/A1111, InvokeAI).

``install`` writes two files into a site-packages folder: ``paragonsr_spandrel_hook.pth``, which
Python's ``site`` runs at start-up, and the tiny module it imports, which puts a finder on
``sys.meta_path``. The finder does nothing until something imports ``spandrel``; then it lets
spandrel load normally and registers ParagonSR right after. Programs that never import spandrel
pay one small stdlib import (no torch). If this pack is broken or missing, the hook warns once
and spandrel still imports as usual.
"""

from __future__ import annotations

import site
import sysconfig
from pathlib import Path

from .errors import ParagonSRError
from .files import atomic_write

PTH_NAME = "paragonsr_spandrel_hook.pth"
MODULE_NAME = "_paragonsr_spandrel_hook"

HOOK_SOURCE = '''"""Installed by `paragonsr spandrel-hook install`; removed by `... uninstall`."""
import sys


class _RegisterParagonSR:
    # A plain class, not importlib.abc.MetaPathFinder: importing importlib.abc pulls in typing
    # and tripled the start-up time of every Python program in the environment.
    def find_spec(self, name, path=None, target=None):
        if name != "spandrel":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once, and never in the way of the real search
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            try:
                from paragonsr.spandrel_arch import register

                register()
            except Exception as error:  # never break the host program's spandrel
                import warnings

                warnings.warn(f"paragonsr spandrel hook: ParagonSR not registered ({error})")

        spec.loader.exec_module = exec_module
        return spec


if "spandrel" not in sys.modules:
    sys.meta_path.insert(0, _RegisterParagonSR())
'''


def site_folder(user: bool = False) -> Path:
    return Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])


def _files(folder: Path) -> tuple[Path, Path]:
    return folder / PTH_NAME, folder / f"{MODULE_NAME}.py"


def install(user: bool = False) -> Path:
    folder = site_folder(user)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pth, module = _files(folder)
        for path, text in ((module, HOOK_SOURCE), (pth, f"import {MODULE_NAME}\n")):
            with atomic_write(path) as temporary:
                temporary.write_text(text)
    except OSError as error:
        raise ParagonSRError(
            f"{folder}: cannot install the hook ({error.strerror}); try "
            "--user or run as the environment's owner"
        ) from None
    return folder


def uninstall(user: bool = False) -> list[Path]:
    removed = []
    for path in _files(site_folder(user)):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def installed(user: bool = False) -> bool:
    return all(path.exists() for path in _files(site_folder(user)))
