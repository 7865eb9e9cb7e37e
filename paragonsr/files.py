"""Writing files so that a reader never meets a half-written one."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path


def missing_file_problem(path: str | os.PathLike, what: str = "the real file") -> tuple[str, str]:
    """(problem, fix) for a path that leads to no file: "file not found" would send the user
    looking for a file that is there, when the trouble is a symbolic link (pathlib's exists()
    says False for a loop and a dangling link alike). ``what`` names the file the link should
    reach."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop", f"Point the link at {what}"
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link to a missing file ({target})", "Fix the link or remove it"
    return "file not found", "Check the path"


# How atomic_write names its temporaries: .NAME.PID.8-HEX.tmp
_TEMPORARY = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")
_swept_folders: set[str] = set()


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs as someone else; anything else: do not guess
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries that earlier writes into ``folder`` left when their process was
    killed (SIGKILL, power loss): only files named exactly as :func:`atomic_write` names them,
    and only where the process in the name no longer runs. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue  # this process's own temporaries may be writes in progress
        if _is_running(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder to write to; when the block ends without an
    error it is renamed over ``path`` (atomic on one file system), otherwise removed.

    ``durable`` also flushes the data to disk before the rename, so a crash right after cannot
    leave an empty file under the final name. Written through the caller's own open() in the
    same folder, the file gets the user's usual permissions (mkstemp would make it 0600).
    Temporaries that killed processes left in the folder are removed on its first write.
    """
    path = Path(path)
    # Once per folder and process: a folder of thousands of outputs is not rescanned per file.
    folder = os.path.abspath(path.parent)
    if folder not in _swept_folders:
        _swept_folders.add(folder)
        remove_stale_temporaries(folder)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
