"""Files gemma-edge writes: checked before the work starts, written to a temporary name beside
the target and renamed into place, never over an input, never left half-written; and the one
way to hash files and bytes."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import GemmaEdgeError, OutputExistsError


def _tmp_name(out: Path, pid: int) -> Path:
    return out.with_name(f".{out.name}.tmp{pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.NAME.tmpPID`` files beside ``out`` left by processes that no longer run (a
    SIGKILL cannot be caught, so its temporary stays until the next run). Returns them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp([0-9]+)")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # hard links and symlinks too
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(out, force: bool = False, inputs: Iterable = (), example: str = "model.tflite") -> Path:
    """Refuse an output before any work is done: a directory, a file that exists (without
    ``force``), any file the work reads (``inputs``: ``--force`` must never replace a source),
    a folder that does not exist or cannot be written. Returns ``out`` as a Path."""
    out = Path(out)
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name such as {out / example}")
    for src in inputs:
        if _same_file(out, Path(src)):
            same = "" if str(src) == str(out) else f" ({src})"
            raise OutputExistsError(f"{out} is an input of this command{same} and would be destroyed; choose another "
                                    f"output name (e.g. {out.with_name(out.stem + '-converted' + example[example.rfind('.'):])})")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force (force=True) to overwrite it, or choose another -o")
    folder = out.parent
    if not folder.exists():
        raise GemmaEdgeError(f"the output folder {folder} does not exist; create it first")
    probe = _tmp_name(out, os.getpid())
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        pass  # our own temporary from a write under way in this process
    except OSError as e:
        raise GemmaEdgeError(f"cannot write in the output folder {folder} ({e.strerror or e}); choose a "
                             "folder you can write to") from None
    remove_stale_temporaries(out)
    return out


@contextlib.contextmanager
def atomic_output(out, force: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; it replaces ``out`` when the block succeeds and
    is removed on any failure (Ctrl-C and SIGTERM included, see ``terminate_as_interrupt``),
    so no half file is ever left. ``check_output`` runs first. A failed write (disk full, file
    size limit, a read-only folder) becomes a GemmaEdgeError naming ``out``."""
    out = check_output(out, force, inputs)
    tmp = _tmp_name(out, os.getpid())
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the cleanup must never hide the real error
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise GemmaEdgeError(f"could not write {out}: {e.strerror or e}. Free disk space or "
                                 "choose another output folder") from None
        raise


_SMALL = 1 << 20  # bytes up to which ``sha256`` does without OpenSSL


def sha256(data: bytes = b""):
    """A sha256 hash object over ``data`` (``update``, ``digest``, ``hexdigest``).

    Python's own sha256 for up to ``_SMALL`` bytes: hashlib's default is OpenSSL's, six times
    faster, but importing it maps libcrypto, about 3.5 MB resident for the life of the process,
    and a load hashes only a few hundred bytes (its weight cache's name, a file's metadata).
    Larger data (a header on a file's first load, the weights) goes to OpenSSL."""
    if len(data) <= _SMALL:
        try:
            from _sha2 import sha256 as small  # Python 3.12+
        except ImportError:
            try:
                from _sha256 import sha256 as small
            except ImportError:  # a Python built without its own: OpenSSL's is as good
                small = None
        if small is not None:
            return small(data)
    import hashlib

    return hashlib.sha256(data)


def sha256_files(paths: Iterable, chunk: int = 8 << 20) -> str:
    """sha256 over the files' names and bytes, in the order given (a checkpoint's provenance)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
