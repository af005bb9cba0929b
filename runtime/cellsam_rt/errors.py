"""One error family. Every error a user can cause is a `CellsamRtError` whose str() is one line
naming the file (or store, or option) and the problem; the CLI prints it as `error: ...`."""
from __future__ import annotations

from pathlib import Path


class CellsamRtError(Exception):
    """Base of the errors the command line reports as one line, without a traceback."""


class ModelDirError(CellsamRtError, ValueError):
    """A model directory that cannot be used; the message names the file and the problem."""


class BackendError(CellsamRtError, RuntimeError):
    """A backend that cannot be created or cannot run a graph; the message says why."""


class ImageReadError(CellsamRtError):
    """An input image that cannot be used; str() is the one line "<file>: <reason>"."""

    def __init__(self, path: "str | Path", reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{path}: {self.reason}")


class OutputDirError(CellsamRtError):
    """An output folder that cannot be created or written to."""


class OptionError(CellsamRtError, ValueError):
    """Options that do not go together (the message names them)."""
