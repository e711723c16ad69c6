"""The one way gemma-edge keeps LiteRT's native log off the user's terminal.

LiteRT's native library writes INFO/WARNING lines (accelerator registry, plugins) to file
descriptor 2, some of them only at process exit; Python's ``sys.stderr`` cannot filter them.
Both functions point fd 2 at /dev/null for native code; errors still surface as exceptions.
``GEMMA_EDGE_DEBUG=1`` keeps the native log.

- ``silenced()``: for the library (a model load), fd 2 restored afterwards.
- ``silence_process()``: for the command-line tools, for the rest of the process; Python's
  ``sys.stderr`` is moved to a copy of the real stderr, so messages and tracebacks still show.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys


def _enabled() -> bool:
    return not os.environ.get("GEMMA_EDGE_DEBUG")


def _point_fd2_at_devnull() -> int | None:
    """Duplicate the real fd 2 and point fd 2 at /dev/null; returns the duplicate (None if it failed)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return None
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


@contextlib.contextmanager
def silenced():
    saved = _point_fd2_at_devnull() if _enabled() else None
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def silence_process() -> None:
    if not _enabled() or getattr(sys.stderr, "_gemma_edge_real_stderr", False):
        return
    saved = _point_fd2_at_devnull()
    if saved is None:
        return
    stream = io.TextIOWrapper(io.FileIO(saved, "w"), encoding="utf-8", errors="replace",
                              line_buffering=True, write_through=True)
    stream._gemma_edge_real_stderr = True
    sys.stderr = stream
