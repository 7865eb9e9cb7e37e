"""Writing files so that a reader never meets a half-written one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder to write to; when the block ends without an
    error it is renamed over ``path`` (atomic on one file system), otherwise removed.

    ``durable`` also flushes the data to disk before the rename, so a crash right after cannot
    leave an empty file under the final name. Written through the caller's own open() in the
    same folder, the file gets the user's usual permissions (mkstemp would make it 0600).
    """
    path = Path(path)
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
