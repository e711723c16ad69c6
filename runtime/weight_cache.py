"""The XNNPACK weight cache: one packed copy of a file's weights, shared by every signature.

Without it every signature packs its own copy (the 270M int8 file: 1165 MB peak RSS, 1.1 s
load); with it one packed copy is written once and then memory-mapped (545 MB, 0.28 s on
later loads; benchmarks/runtime_memory.py). It lives under ``$GEMMA_EDGE_CACHE``, else
``$XDG_CACHE_HOME/gemma-edge/xnnpack`` or ``~/.cache/gemma-edge/xnnpack``.

The cache must never make a run fail or lie, so:

- it is built by a child process (``python -m gemma_edge.runtime.weight_cache``) into a
  temporary name: XNNPACK aborts the process when a write fails (a full disk, ``ulimit -f``),
  and a child that dies costs only the cache. The parent then runs without it and says so;
- before building, the free space and the file size limit are checked against the model's size;
- while the child packs, the parent reads every weight of the model against the file's checksum
  (the first load of a file on a machine checks its weights once; later loads check its header
  and metadata, unless the record below says a load already did with the file unchanged since);
  damaged weights stop the child and keep no cache;
- a built cache is renamed into place with a record beside it (size and CRC-32 of the packed
  bytes, the model it belongs to and that model file's identity when its digests were checked,
  and the cache file's identity: inode, size, mtime and ctime). A load whose cache still has
  that identity (nothing has written to it since its bytes were checked; ctime cannot be set
  back) maps it at once; any other reads the whole cache against the CRC first (0.15 s for the
  270M here, seconds from an SD card), and rebuilds a cache that does not match (a truncated,
  damaged or foreign file) instead of trusting it;
- caches of an earlier version of the same model path, and of models that no longer exist,
  are removed when a new one is built.

Beside each cache lives the tokenizer's compact vocabulary (``vocab.py``; ``vocab_for``,
``keep_vocab``): derived from the model on its first load, kept under the same key with a record
of the same kind, checked the same way, pruned with the cache.

Every note goes to stderr as one line starting ``gemma-edge: note:``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import resource
import struct
import sys
import zlib
from pathlib import Path

from . import fileio
from .modelfile import ModelInfo, verify_weights

SUFFIX = ".xnnpack"
VOCAB_SUFFIX = ".vocab"  # the tokenizer's compact vocabulary (vocab.py), beside the model's cache
RECORD = ".ok"  # beside each cache: {"size", "crc32", "model", "key"}
_HEADROOM = 1.25  # packed weights take about the file's size; int4 packs a little larger
_SLACK = 64 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma-edge", "xnnpack"))


def note(message: str) -> None:
    sys.stderr.write(f"gemma-edge: note: {message}\n")
    sys.stderr.flush()


def _key(info: ModelInfo) -> tuple[str, str]:
    """(stem shared by every version of this model path, key of this version's content)."""
    return _key_of(info.path, info.checksums)


def _key_of(model_path: str, checksums: bytes) -> tuple[str, str]:
    real = os.path.realpath(model_path)
    place = fileio.sha256(real.encode()).hexdigest()[:8]
    if checksums:  # the file's own digests: the same content always finds the same cache
        content = fileio.sha256(checksums).hexdigest()[:16]
    else:  # format 1: its identity on disk
        st = os.stat(model_path)
        content = fileio.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{os.path.basename(model_path)}.{place}", content


def checked_before(model_path: str, checksums: bytes, identity) -> bool:
    """Did a load that built or checked this model's cache also check these header and metadata
    digests on the file while it had this ``identity`` (modelfile.file_identity)? Its record says
    so (``model_identity``); read_info then need not hash them again. False when unsure."""
    try:
        stem, key = _key_of(model_path, checksums)
        record = _read_record(cache_dir() / f"{stem}.{key}{SUFFIX}")
    except (OSError, ValueError):
        return False
    return bool(record) and record.get("key") == key and record.get("model_identity") == list(identity)


def crc32_file(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:  # read(), not mmap: the bytes stay out of this process's RSS
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(Path(str(path) + RECORD).read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    for p in (path, Path(str(path) + RECORD)):
        with contextlib.suppress(OSError):
            p.unlink()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _write_record(path: Path, record: dict) -> None:
    tmp = Path(f"{path}{RECORD}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**record, "identity": _identity(path)}))
    os.replace(tmp, str(path) + RECORD)


def _valid(path: Path, key: str) -> bool:
    record = _read_record(path)
    try:
        if record is None or record.get("key") != key or path.stat().st_size != record.get("size"):
            return False
        if record.get("identity") == _identity(path):
            return True  # untouched since its bytes were checked
        if crc32_file(path) != record.get("crc32"):
            return False
        _write_record(path, record)  # checked again (a copy, a touch): the next load need not
        return True
    except OSError:
        return False


def _vouch(path: Path, info: ModelInfo) -> None:
    """Record that ``info``'s file, under the identity it had when read_info checked (or was
    vouched for) its digests, has them right: the next load of the unchanged file skips them."""
    record = _read_record(path)
    if record is None or not info.identity or record.get("model_identity") == list(info.identity):
        return
    try:
        _write_record(path, {**record, "model_identity": list(info.identity)})
    except OSError:
        pass  # the next load checks the digests again


def _prune(folder: Path, stem: str, keep: tuple[Path, ...]) -> None:
    """Remove caches (and vocabularies) of earlier versions of this model path, those of models
    that are gone, and unfinished builds of processes that no longer run."""
    from .fileio import _pid_alive

    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        name = p.name
        if p in keep or name.endswith(RECORD):
            continue  # a record goes with its cache
        tmp = re.fullmatch(r".*\.tmp([0-9]+)", name)
        if tmp:
            if not _pid_alive(int(tmp.group(1))):
                _remove(p)
        elif name.endswith((SUFFIX, VOCAB_SUFFIX)):
            record = _read_record(p)
            if name.startswith(stem + ".") or record is None or not os.path.exists(record.get("model", "")):
                _remove(p)


def _room_for(folder: Path, need: int) -> str | None:
    """Why ``need`` bytes cannot be written in ``folder`` (None if they can)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        return f"the file size limit (ulimit -f) is {limit} bytes"
    try:
        st = os.statvfs(folder)
    except OSError as e:
        return f"{folder} cannot be checked ({e.strerror or e})"
    free = st.f_bavail * st.f_frsize
    if free < need:
        return f"{folder} has {free / 1e6:.0f} MB free"
    return None


def prepare(info: ModelInfo, threads: int) -> str | None:
    """The path of a verified weight cache for ``info``, built if need be; None to run without
    one (the reason was noted). Raises ModelFileError if the model's weights are damaged."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        note(f"no XNNPACK weight cache ({folder}: {e.strerror or e}); every signature packs its own weights")
        return None
    stem, key = _key(info)
    path = folder / f"{stem}.{key}{SUFFIX}"
    if path.exists():
        if _valid(path, key):
            _vouch(path, info)
            return str(path)
        note(f"the XNNPACK weight cache {path} does not match its record (damaged or cut short); rebuilding it")
        _remove(path)
    need = int(os.path.getsize(info.path) * _HEADROOM) + _SLACK
    why = _room_for(folder, need)
    if why:
        note(f"no XNNPACK weight cache: it needs about {need / 1e6:.0f} MB and {why}; running without it "
             "(every signature packs its own weights: more memory). Set GEMMA_EDGE_CACHE to a folder with room")
        return None
    _prune(folder, stem, (path, folder / f"{stem}.{key}{VOCAB_SUFFIX}"))
    tmp = folder / f"{stem}.{key}.tmp{os.getpid()}"
    import subprocess  # only a cold load packs: a warm one does not import it (3 ms at start-up)

    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gemma_edge.runtime.weight_cache", info.path, str(tmp), str(threads)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # While the child packs, this process reads every weight against the file's digest (the
        # two overlap: 0.4 s of the 270M int8's 1.5 s first load). Damaged weights raise here and
        # the child is stopped (below): no cache is kept from weights that failed their check.
        verify_weights(info)
        out, _ = proc.communicate()
        if proc.returncode != 0 or not tmp.exists():
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            detail = (out.strip().splitlines() or [""])[-1]
            note(f"building the XNNPACK weight cache failed ({how}{': ' + detail if detail else ''}); running "
                 "without it (every signature packs its own weights: more memory)")
            return None
        record = {"size": tmp.stat().st_size, "crc32": crc32_file(tmp), "key": key,
                  "model": os.path.realpath(info.path), "model_identity": list(info.identity)}
        os.replace(tmp, path)  # a cache without a record is rebuilt, so the record goes last
        _write_record(path, record)
        return str(path)
    except OSError as e:
        note(f"the XNNPACK weight cache could not be kept ({e.strerror or e}); running without it")
        return None
    finally:
        if proc is not None and proc.poll() is None:  # interrupted, or the weights are damaged
            proc.kill()
            proc.wait()
        _remove(tmp)


def vocab_for(info: ModelInfo):
    """(the compact vocabulary of ``info``'s tokenizer (``vocab.Vocab``) or None, the bytes to keep
    with ``keep_vocab`` or None). The vocabulary is read from beside the model's weight cache, or
    derived from the model (about 0.6 s for Gemma's) and then kept there by the caller once the
    model has loaded. None when SentencePiece must hold the tokenizer: one ``vocab.build`` does not
    take (recorded too, so that later loads do not derive it again), or a cache folder that cannot
    be written (it would be derived at every load). Like the weight cache, it
    never makes a load fail: a kept vocabulary that does not match its record (cut short,
    damaged, foreign) is noted and derived again."""
    from .vocab import Vocab, build

    path = _vocab_path(info)
    if _read_record(path) is not None:
        if _valid(path, _key(info)[1]):
            try:
                with open(path, "rb") as f:  # mapped: only the pages a text touches are read (Vocab)
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
                return (Vocab(data) if data else None), None
            except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, struct.error):
                pass
        note(f"the tokenizer's vocabulary {path} does not match its record (damaged or cut short); deriving it again")
        _remove(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # it could not be kept: SentencePiece, rather than deriving it at every load
        return None, None
    data = build(info.tokenizer_model) or b""  # b"": SentencePiece holds this tokenizer
    return (Vocab(data) if data else None), data


def keep_vocab(info: ModelInfo, data: bytes) -> None:
    """Keep ``vocab_for``'s derived bytes beside the model's weight cache (a temporary name, then
    renamed, with a record), for the next load; a folder that cannot take them is noted."""
    path = _vocab_path(info)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        record = {"size": len(data), "crc32": zlib.crc32(data), "key": _key(info)[1],
                  "model": os.path.realpath(info.path)}
        os.replace(tmp, path)
        _write_record(path, record)
    except OSError as e:
        note(f"the tokenizer's vocabulary could not be kept in {path.parent} ({e.strerror or e}); each load "
             "derives it again")
    finally:
        _remove(tmp)


def _vocab_path(info: ModelInfo) -> Path:
    stem, key = _key(info)
    return cache_dir() / f"{stem}.{key}{VOCAB_SUFFIX}"


def _build(model_path: str, cache_path: str, threads: int) -> int:
    """In the child: let LiteRT pack the model's weights into ``cache_path`` (the parent checks
    them against the file's digest meanwhile)."""
    from . import native_log
    from .litert import compile_file

    try:
        with native_log.silenced():
            compile_file(model_path, threads, cache_path)
    except Exception as e:  # the native loader reports with RuntimeError/ValueError
        print(f"LiteRT could not load the model ({e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_build(sys.argv[1], sys.argv[2], int(sys.argv[3])))
