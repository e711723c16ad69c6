"""Lazy, memory-mapped readers for checkpoint tensors (safetensors and GGUF).

A checkpoint is opened once; its headers are parsed and validated up front, and
tensor data stays on disk (``mmap``).  ``read(name, rows=(r0, r1))`` copies just
those rows out as float32, so a converter that walks the model one tensor (or one
row block) at a time holds at most one block in memory, whatever the model size.

    with open_checkpoint("gemma-3-270m/") as ckpt:
        for name, info in ckpt.tensors().items():      # TensorInfo(name, shape, dtype)
            block = ckpt.read(name, rows=(0, 1024))    # [1024, *info.shape[1:]] float32

Every problem with the files (missing, truncated, a header that lies about its
offsets, an index naming absent shards) raises ``SourceError`` naming the file,
the numbers and what to do.  Bad arguments from calling code (a row range outside
the tensor) raise ``ValueError``.

GGUF note: the file's header is parsed here rather than by ``gguf.GGUFReader``.
GGUFReader builds one numpy view per element of every metadata array; for Gemma's
262,144-token vocabulary that costs ~15 s and ~700 MB of RSS just to open a 253 MB
file.  Our parser walks the same header with ``struct`` in well under a second and
keeps only the tensor table; ``GGUFCheckpoint.reader`` still hands out a real
GGUFReader (built lazily, on first access) for code that wants one, and dequantizing
goes through ``gguf.quants.dequantize`` exactly as with GGUFReader's tensor views.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gemma_edge.runtime.errors import GemmaEdgeError, SourceError

__all__ = [
    "Checkpoint",
    "GGUFCheckpoint",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "open_checkpoint",
]

_REDOWNLOAD = "Re-download or re-export the checkpoint (compare its size and sha256 with the source)."
_MAX_LISTED = 8  # names listed in a message before "... and N more"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: ``shape`` in numpy (row-major) order, ``dtype`` as the file names it
    (safetensors: ``"F32"``, ``"BF16"``, ...; GGUF: ``"Q4_K"``, ``"F32"``, ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class Checkpoint(Protocol):
    """What every reader offers; ``open_checkpoint`` returns one of these."""

    path: Path

    def tensors(self) -> dict[str, TensorInfo]: ...
    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray: ...
    def metadata(self) -> dict[str, object]: ...
    def close(self) -> None: ...


def _listing(names: list[str] | set[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _row_range(rows: tuple[int, int] | None, shape: tuple[int, ...], name: str) -> tuple[int, int] | None:
    """Validate an optional (start, stop) range over axis 0; None means the whole tensor."""
    if rows is None:
        return None
    if not shape:
        raise ValueError(f"tensor {name!r} is a scalar (shape ()); it has no rows to select, call read() without rows")
    try:
        r0, r1 = rows
    except (TypeError, ValueError):
        raise ValueError(f"rows must be a (start, stop) pair, got {rows!r}") from None
    if isinstance(r0, bool) or isinstance(r1, bool) or not isinstance(r0, (int, np.integer)) or not isinstance(r1, (int, np.integer)):
        raise ValueError(f"rows must be a pair of ints, got {rows!r}")
    r0, r1 = int(r0), int(r1)
    if not 0 <= r0 <= r1 <= shape[0]:
        raise ValueError(
            f"rows ({r0}, {r1}) are outside tensor {name!r} with {shape[0]} rows (shape {shape}); "
            f"need 0 <= start <= stop <= {shape[0]}"
        )
    return r0, r1


def _map_file(path: Path) -> tuple[mmap.mmap | None, int]:
    """Memory-map a file read-only.  Empty files cannot be mapped; they return (None, 0)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None, 0
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise SourceError(f"{path}: cannot open the file ({e.strerror or e}). Check the path and its permissions.") from e


def _release(mm: mmap.mmap | None, offset: int, nbytes: int) -> None:
    """Drop the mapped pages just read: file-backed pages count in RSS until released, so
    a whole streamed checkpoint would otherwise show up as resident (4.8 GB for Gemma 2B)."""
    if mm is None or nbytes <= 0 or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), offset + nbytes) - start)
    except (OSError, ValueError):
        pass  # only an optimisation


def _unmap(mm: mmap.mmap | None) -> None:
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:
        # A view handed out by numpy is still alive somewhere (e.g. a traceback frame);
        # dropping our reference lets the garbage collector close the map later.
        pass


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

# Every dtype in the safetensors spec with its size in bits (so headers of tensors we cannot
# convert are still checked), and the subset read() converts to float32.
_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_ST_READABLE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_ST_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too
_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class _STEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class _SafetensorsFile:
    """One validated .safetensors file, memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        self._mm, size = _map_file(path)
        try:
            self.entries, self.metadata = self._parse(size)
        except BaseException:
            _unmap(self._mm)
            self._mm = None
            raise

    def _fail(self, problem: str, todo: str = _REDOWNLOAD) -> SourceError:
        return SourceError(f"{self.path}: {problem}. {todo}")

    def _parse(self, size: int) -> tuple[dict[str, _STEntry], dict[str, str]]:
        if size < 8:
            raise self._fail(
                f"file is {size} bytes, too short for the 8-byte header length of a safetensors file; "
                "it is truncated or not a safetensors file"
            )
        assert self._mm is not None
        (n,) = struct.unpack_from("<Q", self._mm, 0)
        if n > size - 8:
            raise self._fail(
                f"header length {n} is larger than the {size - 8} bytes after the length field; "
                "the file is truncated or not a safetensors file"
            )
        if n > _ST_MAX_HEADER:
            raise self._fail(f"header length {n} exceeds the {_ST_MAX_HEADER}-byte safetensors limit; the header is corrupt")
        raw = self._mm[8 : 8 + n]
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._fail(
                f"the {n}-byte header is not valid JSON ({e}); the file is corrupt or not a safetensors file"
            ) from None
        if not isinstance(header, dict):
            raise self._fail(f"the header is a JSON {type(header).__name__}, not an object of tensors; the file is corrupt")

        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("'__metadata__' is not an object of strings; the header is corrupt")

        data_start, data_len = 8 + n, size - 8 - n
        spans: list[tuple[int, int, str]] = []
        entries: dict[str, _STEntry] = {}
        for name, desc in header.items():
            dtype, shape, begin, end = self._check_entry(name, desc)
            spans.append((begin, end, name))
            entries[name] = _STEntry(dtype, shape, data_start + begin, data_start + end)

        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(
                    f"tensor {n1!r} data_offsets [{b1}, {e1}] overlap tensor {n0!r} [{b0}, {e0}]; "
                    "the header lies about where the data is"
                )
        need = max((e for _, e, _ in spans), default=0)
        if need > data_len:
            last = max(spans, key=lambda s: s[1])[2]
            raise self._fail(
                f"the file is truncated: tensor {last!r} ends at byte {need} of the data section but only "
                f"{data_len} data bytes follow the {n}-byte header (file size {size})"
            )
        return entries, dict(metadata)

    def _check_entry(self, name: str, desc: Any) -> tuple[str, tuple[int, ...], int, int]:
        if not isinstance(desc, dict):
            raise self._fail(f"tensor {name!r} is described by a JSON {type(desc).__name__}, not an object; the header is corrupt")
        dtype, shape, offsets = desc.get("dtype"), desc.get("shape"), desc.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BITS:
            raise self._fail(
                f"tensor {name!r} has unknown dtype {dtype!r} (safetensors dtypes: {', '.join(_ST_DTYPE_BITS)}); "
                "the header is corrupt or from a newer safetensors",
                "Re-export the checkpoint with F32, F16 or BF16 weights.",
            )
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise self._fail(f"tensor {name!r} has shape {shape!r}, not a list of non-negative ints; the header is corrupt")
        if _too_big(shape):
            raise self._fail(f"tensor {name!r} has shape {shape}, larger than any tensor can be; the header is corrupt")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise self._fail(
                f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end; the header is corrupt"
            )
        n_bits = math.prod(shape) * _ST_DTYPE_BITS[dtype]
        span = offsets[1] - offsets[0]
        if n_bits % 8 or n_bits // 8 != span:
            raise self._fail(
                f"tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {n_bits / 8:g} bytes but its "
                f"data_offsets [{offsets[0]}, {offsets[1]}] span {span}; the header lies about the data"
            )
        return dtype, tuple(shape), offsets[0], offsets[1]

    def read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        e = self.entries[name]
        if e.dtype not in _ST_READABLE:
            raise SourceError(
                f"{self.path}: tensor {name!r} has dtype {e.dtype}; gemma-edge reads F32, F16 and BF16 weights. "
                "Re-export the checkpoint in one of those (e.g. model.to(torch.bfloat16).save_pretrained(...))."
            )
        rng = _row_range(rows, e.shape, name)
        r0, r1 = rng if rng is not None else (0, e.shape[0] if e.shape else 1)
        row_shape = e.shape[1:]
        out_shape = (r1 - r0, *row_shape) if e.shape else ()
        count = (r1 - r0) * math.prod(row_shape)
        if count == 0:
            return np.zeros(out_shape, np.float32)
        src = _ST_READABLE[e.dtype]
        offset = e.begin + r0 * math.prod(row_shape) * src.itemsize
        raw = np.frombuffer(self._mm, dtype=src, count=count, offset=offset)
        if e.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 is the high half of an f32
        else:
            out = raw.astype(np.float32)  # astype copies, so nothing keeps the map alive
        del raw
        _release(self._mm, offset, count * src.itemsize)
        return out.reshape(out_shape)

    def close(self) -> None:
        _unmap(self._mm)
        self._mm = None


_MAX_ELEMENTS = 1 << 48  # no tensor comes close; numpy cannot even describe (0, 2**63)


def _too_big(shape) -> bool:
    """True if the dimensions, zeros aside, multiply past _MAX_ELEMENTS (a zero-size tensor of shape
    (0, 2**63) holds no data, so no size check catches it, but numpy cannot make one)."""
    return math.prod(max(int(d), 1) for d in shape) > _MAX_ELEMENTS


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


class SafetensorsCheckpoint:
    """Tensors of a Hugging Face checkpoint in safetensors format, read lazily.

    ``path`` is a directory holding ``model.safetensors`` or a sharded set described by
    ``model.safetensors.index.json``, a single ``.safetensors`` file, or an ``*.index.json`` file.
    All headers (and the index) are validated when the checkpoint is opened.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._files: list[_SafetensorsFile] = []
        self._where: dict[str, _SafetensorsFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        p = self.path
        if not p.exists():
            raise SourceError(
                f"{p}: no such file or directory. Pass a Hugging Face checkpoint directory "
                f"(with {_SINGLE_NAME} or {_INDEX_NAME}) or a .safetensors file."
            )
        if p.is_dir():
            if (p / _SINGLE_NAME).is_file():
                self._open_single(p / _SINGLE_NAME)
            elif (p / _INDEX_NAME).is_file():
                self._open_sharded(p / _INDEX_NAME)
            else:
                found = sorted(c.name for c in p.iterdir() if c.suffix in (".safetensors", ".gguf"))
                hint = (
                    f" It holds {_listing(found)}; pass one of those files directly."
                    if found
                    else " Download the checkpoint into it (e.g. `huggingface-cli download google/gemma-3-270m --local-dir DIR`)."
                )
                raise SourceError(f"{p}: directory has no {_SINGLE_NAME} and no {_INDEX_NAME}.{hint}")
        elif p.name.endswith(".index.json"):
            self._open_sharded(p)
        else:
            self._open_single(p)

    def _open_single(self, file: Path) -> None:
        f = _SafetensorsFile(file)
        self._files.append(f)
        self._where = {name: f for name in f.entries}

    def _open_sharded(self, index: Path) -> None:
        def fail(problem: str) -> SourceError:
            return SourceError(f"{index}: {problem}. {_REDOWNLOAD}")

        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except OSError as e:
            raise SourceError(f"{index}: cannot read the shard index ({e.strerror or e}). Check its permissions.") from e
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise fail(f"the shard index is not valid JSON ({e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise fail("the shard index has no 'weight_map' object of tensor name -> shard file")
        if not weight_map:
            raise fail("the shard index's 'weight_map' lists no tensors")

        shard_names = sorted(set(weight_map.values()))
        bad = [s for s in shard_names if Path(s).name != s]
        if bad:
            raise fail(f"shard names {_listing(bad)} are not plain file names in {index.parent}")
        missing = [s for s in shard_names if not (index.parent / s).is_file()]
        if missing:
            raise fail(
                f"it names {len(missing)} shard file(s) missing from {index.parent}: {_listing(missing)} "
                f"({len(shard_names)} shards in all); download the missing shards"
            )
        shards = {}
        for s in shard_names:
            shards[s] = _SafetensorsFile(index.parent / s)
            self._files.append(shards[s])

        for s, shard in shards.items():
            listed = {n for n, f in weight_map.items() if f == s}
            absent = listed - shard.entries.keys()
            if absent:
                raise fail(
                    f"it places {len(absent)} tensor(s) in {s} that the shard does not hold: {_listing(absent)}; "
                    "the index and the shards come from different versions"
                )
            extra = shard.entries.keys() - listed
            if extra:
                raise fail(
                    f"shard {s} holds {len(extra)} tensor(s) the index does not list: {_listing(extra)}; "
                    "the index and the shards come from different versions"
                )
        self._where = {name: shards[s] for name, s in weight_map.items()}

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, by name, without touching the data."""
        return {n: TensorInfo(n, f.entries[n].shape, f.entries[n].dtype) for n, f in self._where.items()}

    def metadata(self) -> dict[str, object]:
        """The ``__metadata__`` strings of the file(s) (e.g. ``{"format": "pt"}``)."""
        out: dict[str, object] = {}
        for f in self._files:
            out.update(f.metadata)
        return out

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A float32 copy of tensor ``name``, or of rows ``[start, stop)`` of its first axis."""
        f = self._where.get(name)
        if f is None:
            raise SourceError(
                f"{self.path}: holds no tensor {name!r} ({len(self._where)} tensors, e.g. "
                f"{_listing(list(self._where)[:3])}). Check the weight-name map for this checkpoint."
            )
        return f.read(name, rows)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.path)!r}, {len(self._where)} tensors in {len(self._files)} file(s))"


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_GGML_MAX_DIMS = 4
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# GGUF metadata value types: id -> (struct format, size)
_GGUF_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
# Plain (non-block) GGML types read with numpy directly; everything else goes to gguf.quants.
_GGML_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclasses.dataclass(frozen=True)
class _GGUFTensor:
    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: reversed ggml ne
    data_shape: tuple[int, ...]  # shape of the stored array (last axis in bytes for block types)
    np_dtype: np.dtype
    offset: int  # absolute byte offset in the file
    nbytes: int


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


class _GGUFTruncated(Exception):
    def __init__(self, what: str, end: int):
        self.what, self.end = what, end


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _GGUFTruncated(what, start + n)
        self.pos = start + n
        return start

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(n, what))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", 8, what)
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])


class GGUFCheckpoint:
    """Tensors and metadata of a GGUF file (llama.cpp format), read lazily.

    ``tensors()`` reports shapes in numpy order (``blk.0.attn_q.weight`` listed by GGUF as
    ne = [640, 1024] is ``(1024, 640)``: 1024 rows of 640) and ggml type names as dtype.
    ``read(name, rows)`` dequantizes only the requested rows with ``gguf.quants.dequantize``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        try:
            import gguf  # the converter extra; imported here so the runtime does not need it
        except ImportError as e:
            raise GemmaEdgeError(
                f"reading {path} needs the gguf package ({e}); install it with pip install 'gemma-edge[convert]'"
            ) from e

        self._gguf = gguf
        self.path = Path(path)
        self._reader: Any = None
        self._metadata: dict[str, object] | None = None
        if not self.path.is_file():
            what = "is a directory, not a GGUF file" if self.path.is_dir() else "no such file"
            raise SourceError(f"{self.path}: {what}. Pass the path of a .gguf file.")
        self._mm, self._size = _map_file(self.path)
        try:
            self._kv_offsets, self._tensors = self._parse()
        except _GGUFTruncated as t:
            self.close()
            raise SourceError(
                f"{self.path}: the GGUF file is truncated: {t.what} needs bytes up to offset {t.end} but the file "
                f"has {self._size} bytes. {_REDOWNLOAD}"
            ) from None
        except BaseException:
            self.close()
            raise

    def _fail(self, problem: str) -> SourceError:
        return SourceError(f"{self.path}: {problem}. {_REDOWNLOAD}")

    def _parse(self) -> tuple[dict[str, tuple[int, int]], dict[str, _GGUFTensor]]:
        cur = _Cursor(self._mm, self._size)
        magic = bytes(self._mm[:4]) if self._mm is not None else b""
        if len(magic) == 4 and magic != _GGUF_MAGIC:
            raise self._fail(f"not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}")
        cur.take(4, "the magic number")
        version = cur.unpack("<I", 4, "the version")
        if version not in _GGUF_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in _GGUF_VERSIONS:
                raise SourceError(
                    f"{self.path}: GGUF file is big-endian; gemma-edge reads little-endian GGUF. "
                    "Convert it with llama.cpp's gguf tools or use the Hugging Face checkpoint."
                )
            raise SourceError(
                f"{self.path}: GGUF version {version} is not supported (supported: {_GGUF_VERSIONS}). "
                "Re-convert the model with a current llama.cpp, or use the Hugging Face checkpoint."
            )
        n_tensors = cur.unpack("<Q", 8, "the tensor count")
        n_kv = cur.unpack("<Q", 8, "the metadata count")
        # Each KV entry takes >= 13 bytes and each tensor entry >= 29, so larger counts are lies.
        if n_kv * 13 > self._size or n_tensors * 29 > self._size:
            raise self._fail(
                f"the header claims {n_kv} metadata entries and {n_tensors} tensors, more than a "
                f"{self._size}-byte file can hold; the header is corrupt"
            )

        kv_offsets: dict[str, tuple[int, int]] = {}
        alignment = 32
        for i in range(n_kv):
            key = self._utf8(cur.string(f"metadata key #{i}"), f"metadata key #{i}")
            if key in kv_offsets:
                raise self._fail(f"metadata key {key!r} appears twice; the header is corrupt")
            vtype = cur.unpack("<I", 4, f"the type of metadata {key!r}")
            kv_offsets[key] = (vtype, cur.pos)
            if key == "general.alignment":
                if vtype != 4:
                    raise self._fail(f"'general.alignment' has value type {vtype}, not uint32; the header is corrupt")
                alignment = cur.unpack("<I", 4, "'general.alignment'")
                if alignment == 0 or alignment & (alignment - 1):
                    raise self._fail(f"'general.alignment' is {alignment}, not a power of two; the header is corrupt")
            else:
                self._skip_value(cur, vtype, key, depth=0)

        infos = []
        for i in range(n_tensors):
            name = self._utf8(cur.string(f"the name of tensor #{i}"), f"the name of tensor #{i}")
            n_dims = cur.unpack("<I", 4, f"the dimensions of tensor {name!r}")
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {_GGML_MAX_DIMS}); the header is corrupt")
            start = cur.take(8 * n_dims, f"the shape of tensor {name!r}")
            ne = struct.unpack_from(f"<{n_dims}Q", self._mm, start)
            raw_type = cur.unpack("<I", 4, f"the type of tensor {name!r}")
            offset = cur.unpack("<Q", 8, f"the data offset of tensor {name!r}")
            infos.append((name, ne, raw_type, offset))
        data_start = -(-cur.pos // alignment) * alignment

        tensors: dict[str, _GGUFTensor] = {}
        for name, ne, raw_type, offset in infos:
            if name in tensors:
                raise self._fail(f"tensor {name!r} appears twice; the header is corrupt")
            tensors[name] = self._tensor(name, ne, raw_type, offset, data_start, alignment)

        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(
                    f"tensor {n1!r} (bytes {b1}..{e1}) overlaps tensor {n0!r} (bytes {b0}..{e0}); "
                    "the header lies about where the data is"
                )
        b, e, n = max(spans, key=lambda s: s[1], default=(0, 0, ""))
        if e > self._size:
            raise _GGUFTruncated(f"the data of tensor {n!r} (bytes {b}..{e})", e)
        return kv_offsets, tensors

    def _tensor(self, name: str, ne: tuple[int, ...], raw_type: int, offset: int, data_start: int, alignment: int) -> _GGUFTensor:
        gguf = self._gguf
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise SourceError(
                f"{self.path}: tensor {name!r} has ggml type {raw_type}, unknown to gguf {_gguf_version()}; "
                "the file is corrupt or needs a newer gguf package (pip install -U gguf)."
            ) from None
        if _too_big(ne):
            raise self._fail(f"tensor {name!r} has dimensions {list(ne)}, larger than any tensor can be; the header is corrupt")
        if ne[0] % block:
            raise self._fail(
                f"tensor {name!r} has rows of {ne[0]} values, not a multiple of the {qtype.name} block of {block}; "
                "the header is corrupt"
            )
        if offset % alignment:
            raise self._fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}; the header is corrupt")
        n_elements = math.prod(ne)
        nbytes = n_elements // block * type_size
        shape = tuple(int(d) for d in reversed(ne))
        plain = _GGML_PLAIN.get(qtype.name)
        if plain is not None:
            data_shape, np_dtype = shape, np.dtype(plain)
        else:
            data_shape, np_dtype = (*shape[:-1], shape[-1] // block * type_size), np.dtype(np.uint8)
        return _GGUFTensor(name, qtype, shape, data_shape, np_dtype, data_start + offset, nbytes)

    def _utf8(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8 ({raw[:40]!r}); the header is corrupt") from None

    def _skip_value(self, cur: _Cursor, vtype: int, key: str, depth: int) -> None:
        what = f"the value of metadata {key!r}"
        if vtype in _GGUF_SCALARS:
            cur.take(_GGUF_SCALARS[vtype][1], what)
        elif vtype == _GGUF_STRING:
            cur.take(cur.unpack("<Q", 8, what), what)
        elif vtype == _GGUF_ARRAY:
            if depth >= 4:
                raise self._fail(f"metadata {key!r} nests arrays more than 4 deep; the header is corrupt")
            sub = cur.unpack("<I", 4, what)
            count = cur.unpack("<Q", 8, what)
            if sub in _GGUF_SCALARS:
                cur.take(count * _GGUF_SCALARS[sub][1], what)
            elif sub in (_GGUF_STRING, _GGUF_ARRAY):
                if count * 8 > cur.size - cur.pos:  # every item is at least a u64 length
                    raise _GGUFTruncated(what, cur.pos + count * 8)
                if sub == _GGUF_STRING:  # the hot loop: 262,144 tokens for Gemma
                    buf, size, pos, unpack = cur.buf, cur.size, cur.pos, struct.Struct("<Q").unpack_from
                    for _ in range(count):
                        if pos + 8 > size:
                            raise _GGUFTruncated(what, pos + 8)
                        pos += 8 + unpack(buf, pos)[0]
                    if pos > size:
                        raise _GGUFTruncated(what, pos)
                    cur.pos = pos
                else:
                    for _ in range(count):
                        self._skip_value(cur, _GGUF_ARRAY, key, depth + 1)
            else:
                raise self._fail(f"metadata {key!r} is an array of unknown value type {sub}; the header is corrupt")
        else:
            raise self._fail(f"metadata {key!r} has unknown value type {vtype}; the header is corrupt")

    def _decode_value(self, cur: _Cursor, vtype: int, key: str) -> object:
        if vtype in _GGUF_SCALARS:
            fmt, n = _GGUF_SCALARS[vtype]
            return cur.unpack(fmt, n, key)
        if vtype == _GGUF_STRING:
            return self._utf8(cur.string(key), f"metadata {key!r}")
        sub = cur.unpack("<I", 4, key)
        count = cur.unpack("<Q", 8, key)
        if sub in _GGUF_SCALARS:
            fmt, n = _GGUF_SCALARS[sub]
            start = cur.take(count * n, key)
            return np.frombuffer(self._mm, dtype=np.dtype(fmt), count=count, offset=start).tolist()
        if sub == _GGUF_STRING:
            buf, unpack, pos, out = self._mm, struct.Struct("<Q").unpack_from, cur.pos, []
            try:
                for _ in range(count):
                    (n,) = unpack(buf, pos)
                    out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8"))
                    pos += 8 + n
            except UnicodeDecodeError:
                raise self._fail(f"item {len(out)} of metadata {key!r} is not valid UTF-8; the file is corrupt") from None
            cur.pos = pos
            return out
        return [self._decode_value(cur, sub, key) for _ in range(count)]

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, by name: numpy-order shape and ggml type name."""
        return {n: TensorInfo(n, t.shape, t.ggml_type.name) for n, t in self._tensors.items()}

    def metadata(self) -> dict[str, object]:
        """All key/value metadata decoded to Python values (arrays as lists).  Decoded once, then cached."""
        if self._metadata is None:
            if self._mm is None:
                raise ValueError(f"{self.path} is closed")
            cur = _Cursor(self._mm, self._size)
            out: dict[str, object] = {}
            for key, (vtype, pos) in self._kv_offsets.items():
                cur.pos = pos
                out[key] = self._decode_value(cur, vtype, key)
            self._metadata = out
        return self._metadata

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A float32 copy of tensor ``name`` (dequantized), or of rows ``[start, stop)`` of its first axis."""
        t = self._tensors.get(name)
        if t is None:
            raise SourceError(
                f"{self.path}: holds no tensor {name!r} ({len(self._tensors)} tensors, e.g. "
                f"{_listing(list(self._tensors)[:3])}). Check the GGUF weight-name map."
            )
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        rng = _row_range(rows, t.shape, name)
        r0, r1 = rng if rng is not None else (0, t.shape[0])
        quantized = t.ggml_type.name not in _GGML_PLAIN
        if r0 == r1 or math.prod(t.shape) == 0:
            return np.zeros((r1 - r0, *t.shape[1:]), np.float32)
        data = np.frombuffer(self._mm, dtype=t.np_dtype, count=math.prod(t.data_shape), offset=t.offset)
        data = data.reshape(t.data_shape)
        # A 1-D block-quantized tensor has no byte-aligned rows: dequantize it all (it is small) and slice.
        part = data if (quantized and len(t.shape) == 1) else data[r0:r1]
        try:
            if quantized:
                out = self._gguf.quants.dequantize(part, t.ggml_type)
                if np.may_share_memory(out, part):
                    out = out.copy()
            else:
                out = part.astype(np.float32)
        except NotImplementedError:
            raise SourceError(
                f"{self.path}: tensor {name!r} is stored as {t.ggml_type.name}, which gguf "
                f"{_gguf_version()} cannot dequantize. Use a GGUF quantized with "
                "Q8_0/Q4_K/Q6_K/... or the Hugging Face checkpoint."
            ) from None
        finally:
            del data, part
        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else 0
        _release(self._mm, t.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        if quantized and len(t.shape) == 1:
            out = out[r0:r1].copy()
        return np.asarray(out, dtype=np.float32).reshape((r1 - r0, *t.shape[1:]))

    @property
    def reader(self) -> Any:
        """A ``gguf.GGUFReader`` over the same file, built on first access.  Costly for big vocabularies
        (~15 s and ~700 MB for Gemma 3's 262k tokens): the methods above do not need it."""
        if self._reader is None:
            try:
                self._reader = self._gguf.GGUFReader(self.path)
            except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
                raise SourceError(f"{self.path}: gguf.GGUFReader cannot read the file ({e}). {_REDOWNLOAD}") from e
        return self._reader

    def close(self) -> None:
        self._reader = None
        _unmap(self._mm)
        self._mm = None

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._tensors)} tensors)"


# --------------------------------------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike[str]) -> SafetensorsCheckpoint | GGUFCheckpoint:
    """Open a checkpoint with the reader its format needs.

    A directory, a ``.safetensors`` file or an ``.index.json`` -> ``SafetensorsCheckpoint``;
    a ``.gguf`` file, or any file starting with the GGUF magic -> ``GGUFCheckpoint``.
    """
    p = Path(path)
    supported = (
        "a Hugging Face checkpoint directory (model.safetensors or model.safetensors.index.json), "
        "a .safetensors file, or a .gguf file"
    )
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory. gemma-edge reads {supported}.")
    if p.is_dir() or p.suffix == ".safetensors" or p.name.endswith(".index.json"):
        return SafetensorsCheckpoint(p)
    if p.suffix == ".gguf":
        return GGUFCheckpoint(p)
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise SourceError(f"{p}: cannot open the file ({e.strerror or e}). Check its permissions.") from e
    if head[:4] == _GGUF_MAGIC:
        return GGUFCheckpoint(p)
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then a JSON object
        return SafetensorsCheckpoint(p)
    raise SourceError(f"{p}: not a checkpoint gemma-edge can read (starts with {head[:8]!r}). It reads {supported}.")
