"""Outputs are written to a temporary name beside the target and renamed into place."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import GemmaEdgeError


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; it replaces ``out`` when the block succeeds and
    is removed on any failure (Ctrl-C included), so no half file is ever left. A failed write
    (disk full, file size limit) becomes a GemmaEdgeError naming ``out``."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise GemmaEdgeError(f"could not write {out}: {e.strerror or e}. Free disk space or "
                                 "choose another output folder") from None
        raise
