"""Checkpoints: what every format's reader shares, and ``Source``, a checkpoint with its config,
tokenizer, chat template and weight-name map, whatever its format.

Each format owns its own knowledge in one module: ``hf_checkpoint`` (Hugging Face
safetensors: config.json, tokenizer.model, tokenizer_config.json, generation_config.json,
its name table) and ``gguf_checkpoint`` (GGUF: its metadata keys, the tokenizer rebuilt by
``gguf_tokenizer``, its name table). Both readers are lazy and memory-mapped:

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

"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..runtime import contract
from ..runtime.config import GemmaConfig
from ..runtime.errors import SourceError, TokenizerError
from ..runtime.fileio import sha256_files
from ..runtime.tokenizer import Tokenizer
from . import names as namemap

__all__ = ["Checkpoint", "Described", "Source", "TensorInfo", "open_checkpoint"]

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


# Linux maps the pages around a faulting one too ("fault-around", 64 KB by default), so a read of
# one 4 KB row leaves up to 64 KB mapped: released in windows of this size, scattered row reads
# (the embedding rows of calibration tokens, calibration's sampled rows) stay out of RSS too
_RELEASE_WINDOW = max(64 << 10, mmap.PAGESIZE)


def _release(mm: mmap.mmap | None, offset: int, nbytes: int) -> None:
    """Drop the mapped pages just read: file-backed pages count in RSS until released, so
    a whole streamed checkpoint would otherwise show up as resident (4.8 GB for Gemma 2B).
    The window is widened to whole ``_RELEASE_WINDOW``s: the neighbours are clean pages of the
    same file, still in the page cache, so a later read of them costs a minor fault at most."""
    if mm is None or nbytes <= 0 or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % _RELEASE_WINDOW
    end = min(len(mm), -(-(offset + nbytes) // _RELEASE_WINDOW) * _RELEASE_WINDOW)
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
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




# --------------------------------------------------------------------------------------------
# what a format's module says of a checkpoint, and the Source built on it


@dataclasses.dataclass(frozen=True)
class Described:
    """What a checkpoint format's module reads besides the tensors (``describe(path, ckpt)``)."""

    config: GemmaConfig
    tokenizer_model: bytes  # a serialized SentencePiece model
    names: dict  # canonical -> (source tensor, transform), checked: nothing missing or left over
    norm_offset: float  # the file stores offset + w for a norm weight w (see names.norm_scale)
    chat_template: str | None = None  # the checkpoint's own jinja template
    declared_stop_ids: tuple[int, ...] = ()  # end-of-generation ids the checkpoint declares
    files: tuple[Path, ...] = ()  # every file the conversion reads (never an output)
    notes: tuple[str, ...] = ()  # one line each for the user (e.g. vision towers skipped)
    embedding: Any = None  # an embedding model's modelfile.EmbeddingMeta (its chunk lengths left to the converter)
    add_eos: bool = False  # the tokenizer ends a text with <eos> (EmbeddingGemma's does)


class Source:
    """A checkpoint with its config, tokenizer and name map: canonical weights by row range."""

    def __init__(self, path: str, lora: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{path}: no such file or directory. Give a Hugging Face checkpoint "
                              "directory (config.json, *.safetensors, tokenizer.model) or a .gguf file")
        self.ckpt = open_checkpoint(str(self.path))
        try:
            self._open(lora)
        except BaseException:
            self.ckpt.close()
            raise

    def _open(self, lora):
        from . import gguf_checkpoint, hf_checkpoint

        fmt = gguf_checkpoint if isinstance(self.ckpt, gguf_checkpoint.GGUFCheckpoint) else hf_checkpoint
        self.format = fmt.FORMAT
        d = fmt.describe(self.path, self.ckpt)
        self.config = d.config
        self.tokenizer_model = d.tokenizer_model
        self.chat_template_jinja = d.chat_template
        self.declared_stop_ids = list(d.declared_stop_ids)
        self.map = d.names
        self.notes = list(d.notes)
        self.embedding = d.embedding
        self.add_eos = d.add_eos
        self._files = list(d.files)
        self._norm_offset = d.norm_offset
        self._chunk = (None, None)  # the last rows read of a packed table that several weights slice
        self._infos = self.ckpt.tensors()
        self.tokenizer = Tokenizer(self.tokenizer_model)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise TokenizerError(
                f"the tokenizer has {self.tokenizer.vocab_size} pieces but the model's embedding has "
                f"{self.config.vocab_size} rows; the tokenizer belongs to another model")
        self.lora = None  # what was merged, for the file's metadata
        if lora is not None:
            from .lora import open_with_lora

            # every weight is read through self.ckpt, so wrapping it merges the adapter
            self.ckpt = open_with_lora(self.ckpt, lora)
            self.lora = self.ckpt.describe()
            self._files += self.ckpt.files()

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        bad = []
        for canon, want in shapes.items():
            src, transform = self.map[canon]
            if transform == namemap.PLE_COLUMNS:  # every layer's table side by side
                want = (want[0], want[1] * self.config.num_layers)
            got = tuple(self._infos[src].shape)
            if got != want:
                bad.append(f"{src} is {got}, expected {want}")
        if bad:
            raise SourceError(f"{self.path}: tensor shapes disagree with the config: " + "; ".join(bad[:5]) +
                              ". The checkpoint and its config.json come from different models")

    def read_rows(self, canon: str, r0: int, r1: int) -> np.ndarray:
        src, transform = self.map[canon]
        info = self._infos[src]
        if transform == namemap.PLE_COLUMNS:  # the writer reads every layer's slice of one chunk in turn
            if self._chunk[0] != (src, r0, r1):
                self._chunk = ((src, r0, r1), None)  # the old chunk goes before the new one is read
                self._chunk = ((src, r0, r1), self.ckpt.read(src, rows=(r0, r1)))
            P = self.config.ple_dim
            layer = contract.parse_weight_name(canon)[0]
            return np.ascontiguousarray(self._chunk[1][:, layer * P:(layer + 1) * P])
        if len(info.shape) == 1:
            w = self.ckpt.read(src)[None, :]
        else:
            w = self.ckpt.read(src, rows=(r0, r1))
        if transform == namemap.NORM:
            w = namemap.norm_scale(w, self._norm_offset)
        return w

    def files(self) -> list[Path]:
        """Every file the conversion reads: an output must be none of them."""
        return list(self._files)

    def sha256(self) -> str:
        return sha256_files([f for f in self._files if f.is_file()])

    def close(self):
        self._chunk = (None, None)
        self.ckpt.close()


def open_checkpoint(path: str | os.PathLike[str]):
    """Open a checkpoint with the reader its format needs.

    A directory, a ``.safetensors`` file or an ``.index.json`` -> ``SafetensorsCheckpoint``;
    a ``.gguf`` file, or any file starting with the GGUF magic -> ``GGUFCheckpoint``.
    """
    from .gguf_checkpoint import GGUF_MAGIC, GGUFCheckpoint
    from .hf_checkpoint import SafetensorsCheckpoint

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
    if head[:4] == GGUF_MAGIC:
        return GGUFCheckpoint(p)
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then a JSON object
        return SafetensorsCheckpoint(p)
    raise SourceError(f"{p}: not a checkpoint gemma-edge can read (starts with {head[:8]!r}). It reads {supported}.")


def ids(*values) -> list[int]:
    """Token ids from config values that may be an int, a list of ints, or missing."""
    out = []
    for v in values:
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, int) and not isinstance(t, bool) and t >= 0 and t not in out:
                out.append(t)
    return out
