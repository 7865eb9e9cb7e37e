"""Typed errors: the library raises them; only the command line prints them and exits."""

from __future__ import annotations

from pathlib import Path


class ParagonSRError(Exception):
    """Base of every error this package raises on purpose."""


class CheckpointError(ParagonSRError, ValueError):
    """A checkpoint that cannot be read or is not a ParagonSR network we can load.

    ``source`` is the file (or a description such as "state dict"), ``problem`` what is wrong and
    ``fix`` what the user can do about it.
    """

    def __init__(self, source: str | Path | None, problem: str, fix: str = "") -> None:
        self.source = str(source) if source is not None else "state dict"
        self.problem = problem
        self.fix = fix
        message = f"{self.source}: {problem}"
        if fix:
            message += f". {fix}"
        super().__init__(message)

    def with_source(self, source: str | Path) -> CheckpointError:
        """The same error, naming the file it came from."""
        return type(self)(source, self.problem, self.fix)


class UnsupportedVariantError(CheckpointError):
    """A network related to ParagonSR (a fork or an early revision) that this package refuses."""


class UpscaleError(ParagonSRError, ValueError):
    """Input the upscaling engine cannot process, with the reason and what to do."""


class UpscaleCancelled(ParagonSRError):
    """The caller's cancel check asked the upscaling engine to stop."""


class ExportError(ParagonSRError, ValueError):
    """An export that cannot be made or did not verify; nothing was written."""
