"""An opt-in hook that registers ParagonSR whenever spandrel is imported, for tools that load
upscalers through spandrel without importing this pack (chaiNNer, Forge/A1111, InvokeAI).

``install`` writes two files into a site-packages folder: ``paragonsr_spandrel_hook.pth``, which
Python's ``site`` runs at start-up, and the tiny module it imports, which puts a finder on
``sys.meta_path``. The finder does nothing until something imports ``spandrel``; then it lets
spandrel load normally and registers ParagonSR right after. Programs that never import spandrel
pay one small stdlib import (no torch). If this pack is broken, the hook warns once and spandrel
still imports as usual; if it was uninstalled (pip leaves the hook behind), the hook does nothing.

The hook belongs in the site-packages of the Python that runs the host program. The user site
(``--user``) is seen only by Pythons outside a virtual environment that start without ``-s`` or
``PYTHONNOUSERSITE``; chaiNNer always starts its Python with ``PYTHONNOUSERSITE=1``, so for chaiNNer
the hook (and this pack) must go into chaiNNer's own Python.
"""

from __future__ import annotations

import site
import sys
import sysconfig
import warnings
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
            if "paragonsr" in sys.modules:
                return  # the pack itself is importing spandrel, and registers on its own
            try:
                present = importlib.util.find_spec("paragonsr") is not None
            except (ImportError, ValueError):
                present = False
            if not present:
                return  # `pip uninstall paragonsr` leaves this hook behind: stay out of the way
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


CHAINNER_STEPS = (
    "install into chaiNNer's own Python instead: `<chaiNNer's python> -m pip install --no-deps "
    "<this pack>`, then `<that python> -m paragonsr spandrel-hook install`"
)


class UserSiteWarning(UserWarning):
    """The hook went into the user site, which some programs (chaiNNer among them) never see."""


def user_site_problem() -> str | None:
    """Why the user site cannot take effect for this Python, or None where it can."""
    if sys.prefix != sys.base_prefix:
        # A venv hides the user site unless it includes the system site-packages, and even then
        # the user site is shared with Pythons that do not have this pack: the hook belongs in
        # the environment itself.
        return (
            f"this Python runs in a virtual environment ({sys.prefix}), which is served by its "
            "own site-packages: drop --user"
        )
    if site.ENABLE_USER_SITE is None:
        return (
            "this Python has the user site turned off for security (its user and effective "
            "user differ)"
        )
    if not site.ENABLE_USER_SITE:
        return "this Python has the user site turned off (-s or PYTHONNOUSERSITE)"
    return None


def site_folder(user: bool = False) -> Path:
    return Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])


def _files(folder: Path) -> tuple[Path, Path]:
    return folder / PTH_NAME, folder / f"{MODULE_NAME}.py"


def install(user: bool = False) -> Path:
    """Write the hook into this Python's site-packages (or its user site); return the folder.

    ``user=True`` is refused, with nothing written, where the user site cannot take effect for
    this Python, and otherwise warns (``UserSiteWarning``) that programs started with
    ``PYTHONNOUSERSITE=1``, chaiNNer among them, still will not see the hook.
    """
    folder = site_folder(user)
    if user:
        problem = user_site_problem()
        if problem is not None:
            raise ParagonSRError(
                f"{folder}: not installed, because the user site would never take effect: "
                f"{problem}. For chaiNNer, {CHAINNER_STEPS}"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pth, module = _files(folder)
        for path, text in ((module, HOOK_SOURCE), (pth, f"import {MODULE_NAME}\n")):
            with atomic_write(path) as temporary:
                temporary.write_text(text)
    except OSError as error:
        raise ParagonSRError(
            f"{folder}: cannot install the hook ({error.strerror}). Run this command as the "
            "account that owns this Python environment, with the Python of the program that "
            f"should load ParagonSR; for chaiNNer, {CHAINNER_STEPS}"
        ) from None
    if user:
        warnings.warn(
            f"programs started with PYTHONNOUSERSITE=1 never see the user site ({folder}), and "
            f"chaiNNer starts its Python that way; for chaiNNer, {CHAINNER_STEPS}",
            UserSiteWarning,
            stacklevel=2,
        )
    return folder


def uninstall(user: bool = False) -> list[Path]:
    removed = []
    for path in _files(site_folder(user)):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def installed(user: bool = False) -> bool:
    """Whether the hook's files are present (in the user site with ``user=True``); whether they
    take effect there is ``user_site_problem()``'s question."""
    return all(path.exists() for path in _files(site_folder(user)))
