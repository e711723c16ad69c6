"""GGUF checkpoints (llama.cpp's format): the reader, the config from ``<arch>.*`` metadata, the
tensor-name table, the tokenizer (rebuilt by ``gguf_tokenizer``), chat template and stop ids.

The file's header is parsed here rather than by ``gguf.GGUFReader``. GGUFReader builds one
numpy view per element of every metadata array; for Gemma's 262,144-token vocabulary that
costs ~15 s and ~700 MB of RSS just to open a 253 MB file. Our parser walks the same header
with ``struct`` in well under a second and keeps only the tensor table;
``GGUFCheckpoint.reader`` still hands out a real GGUFReader (built lazily, on first access)
for code that wants one, and dequantizing goes through ``gguf.quants.dequantize`` exactly as
with GGUFReader's tensor views. GGUF norm weights already hold Gemma's (1 + w)
(llama.cpp's converter adds the 1).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.config import FULL, MAX_LAYERS, SLIDING, GemmaConfig
from ..runtime.errors import GemmaEdgeError, SourceError, UnsupportedModelError
from . import names as namemap
from .checkpoint import (_REDOWNLOAD, Described, TensorInfo, _listing, _map_file, _release, _row_range,
                         _too_big, _unmap, ids)
from .names import NORM, PLE_COLUMNS

FORMAT = "gguf"

# --------------------------------------------------------------------------------------------
# the GGUF reader
# --------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
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
        if len(magic) == 4 and magic != GGUF_MAGIC:
            raise self._fail(f"not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
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
# the tensor-name table: canonical kind <- GGUF name (gguf-py's TENSOR_NAMES)
# --------------------------------------------------------------------------------------------

TENSORS: namemap.Table = {
    "embed": ("token_embd.weight", None),
    "final_norm": ("output_norm.weight", NORM),
    "attn_norm": ("blk.{i}.attn_norm.weight", NORM),
    "q": ("blk.{i}.attn_q.weight", None),
    "k": ("blk.{i}.attn_k.weight", None),
    "v": ("blk.{i}.attn_v.weight", None),
    "o": ("blk.{i}.attn_output.weight", None),
    "q_norm": ("blk.{i}.attn_q_norm.weight", NORM),
    "k_norm": ("blk.{i}.attn_k_norm.weight", NORM),
    "post_attn_norm": ("blk.{i}.post_attention_norm.weight", NORM),
    "ffn_norm": ("blk.{i}.ffn_norm.weight", NORM),
    "gate": ("blk.{i}.ffn_gate.weight", None),
    "up": ("blk.{i}.ffn_up.weight", None),
    "down": ("blk.{i}.ffn_down.weight", None),
    "post_ffn_norm": ("blk.{i}.post_ffw_norm.weight", NORM),
    # Gemma 4
    "ple_embed": ("per_layer_token_embd.weight", PLE_COLUMNS),
    "ple_proj": ("per_layer_model_proj.weight", None),
    "ple_proj_norm": ("per_layer_proj_norm.weight", NORM),
    "ple_gate": ("blk.{i}.inp_gate.weight", None),
    "ple_out": ("blk.{i}.proj.weight", None),
    "ple_norm": ("blk.{i}.post_norm.weight", NORM),
    "layer_scale": ("blk.{i}.layer_output_scale.weight", None),
    # gemma-embedding (EmbeddingGemma): its sentence-transformers Dense layers 2_Dense and 3_Dense
    "dense_0": ("dense_2.weight", None),
    "dense_1": ("dense_3.weight", None),
}
# a tied head; llama.cpp's RoPE factors (Gemma 4's partial rotation, read into the config)
IGNORABLE = frozenset({"output.weight", "rope_freqs.weight"})


# --------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------

GGUF_ARCHITECTURES = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma4": 4, "gemma-embedding": 3}
# Embedding models (llama.cpp: no KV cache, a symmetric sliding window, <arch>.pooling_type)
EMBEDDING_ARCHITECTURES = {"gemma-embedding"}
MEAN_POOLING = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN (gguf.PoolingType.MEAN)


def config_from_gguf(meta: dict, vocab_size: int, rope_freqs=None) -> GemmaConfig:
    """The GemmaConfig of GGUF metadata (``general.architecture`` and ``<arch>.*`` keys).
    ``rope_freqs``: llama.cpp's ``rope_freqs.weight`` factors of a Gemma 4 file, where its global
    layers' partial ("proportional") rotation is stored: factor 1 rotates a pair, 1e30 does not."""
    try:
        return _config_from_gguf(meta, vocab_size, rope_freqs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise UnsupportedModelError(f"GGUF metadata holds a value of the wrong type ({e}); "
                                    "the file is corrupt: re-download it") from None


def _config_from_gguf(meta: dict, vocab_size: int, rope_freqs=None) -> GemmaConfig:
    arch = meta.get("general.architecture")
    family = GGUF_ARCHITECTURES.get(arch)
    if family is None:
        raise UnsupportedModelError(
            f"GGUF general.architecture is {arch!r}; gemma-edge converts "
            f"{sorted(GGUF_ARCHITECTURES)}. Point it at a Gemma GGUF")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return v

    def count(key, default=None, most=1 << 20, least=1):
        v = get(key, default)
        if isinstance(v, list):
            raise TypeError(f"{arch}.{key} is a list, not a number")
        v = int(v)
        if not least <= v <= most:
            raise UnsupportedModelError(f"GGUF {arch}.{key} is {v}, outside {least}..{most}; the file is corrupt: "
                                        "re-download it")
        return v

    def per_layer(key, default=None) -> list[int]:
        """A value that llama.cpp writes as one number, or as a list with one per layer."""
        v = get(key, default)
        values = [int(x) for x in v] if isinstance(v, list) else [int(v)] * n
        if len(values) != n or any(not 1 <= x <= 1 << 20 for x in values):
            raise UnsupportedModelError(f"GGUF {arch}.{key} is {v!r}, not {n} sizes; the file is corrupt")
        return values

    n = count("block_count", most=MAX_LAYERS)  # checked before the per-layer lists are built
    heads = count("attention.head_count")
    d = count("embedding_length")
    window = meta.get(f"{arch}.attention.sliding_window")
    if meta.get(f"{arch}.expert_count"):
        raise UnsupportedModelError(f"this GGUF has mixture-of-experts layers ({arch}.expert_count "
                                    f"{meta[f'{arch}.expert_count']}); gemma-edge converts dense Gemma models")
    extra = {}
    if family == 4:
        pattern = get("attention.sliding_window_pattern")
        if not isinstance(pattern, list) or len(pattern) != n:
            raise UnsupportedModelError(f"GGUF {arch}.attention.sliding_window_pattern is not {n} flags")
        layer_types = [SLIDING if bool(p) else FULL for p in pattern]
        head_dim = count("attention.key_length_swa")
        global_head_dim = count("attention.key_length", head_dim)
        if count("attention.value_length", global_head_dim) != global_head_dim or \
                count("attention.value_length_swa", head_dim) != head_dim:
            raise UnsupportedModelError("GGUF value_length differs from key_length; Gemma 4 has equal K and V sizes")
        kv = per_layer("attention.head_count_kv", heads)
        ffn = per_layer("feed_forward_length")
        sliding_kv = {kv[i] for i in range(n) if layer_types[i] == SLIDING} or {kv[0]}
        global_kv = {kv[i] for i in range(n) if layer_types[i] == FULL} or sliding_kv
        shared = count("attention.shared_kv_layers", 0, most=n - 1, least=0)
        if len(sliding_kv) != 1 or len(global_kv) != 1:
            raise UnsupportedModelError(f"GGUF {arch}.attention.head_count_kv {kv} varies within a layer type")
        base_ffn = min(ffn)
        wide = [f == 2 * base_ffn for f in ffn]
        if any(f not in (base_ffn, 2 * base_ffn) for f in ffn) or (any(wide) and wide != [i >= n - shared for i in range(n)]):
            raise UnsupportedModelError(f"GGUF {arch}.feed_forward_length {ffn}: gemma-edge reads one width, or "
                                        "twice it on exactly the KV-sharing layers (Gemma 4's double-wide MLP)")
        ple = count("embedding_length_per_layer_input", 0, least=0)
        fraction = 1.0
        if rope_freqs is not None:
            f = np.asarray(rope_freqs, np.float64).ravel()
            rotating = int(np.sum(f == 1.0))
            if len(f) != global_head_dim // 2 or not np.all(f[:rotating] == 1.0) or not np.all(f[rotating:] >= 1e29):
                raise UnsupportedModelError("GGUF rope_freqs.weight is not Gemma 4's proportional RoPE (1 for "
                                            "the first pairs, 1e30 for the rest); gemma-edge cannot honour it")
            fraction = rotating / len(f)
        if count("rope.dimension_count", global_head_dim) != global_head_dim:
            raise UnsupportedModelError(f"GGUF {arch}.rope.dimension_count differs from the global head dim")
        extra = dict(global_head_dim=global_head_dim if global_head_dim != head_dim else None,
                     global_kv_heads=global_kv.pop() if global_kv != sliding_kv else None,
                     global_rope_fraction=fraction, kv_shared_layers=shared, ple_dim=ple,
                     ple_vocab=vocab_size if ple else 0, double_wide_mlp=any(wide), v_norm=True, layer_scale=True)
        num_kv, intermediate = sliding_kv.pop(), base_ffn
        rope_local = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
        query_scale = 1.0
    else:
        head_dim = count("attention.key_length", d // heads)
        if family == 1:
            layer_types = [FULL] * n
        elif family == 2:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        else:
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        num_kv, intermediate = count("attention.head_count_kv", heads), count("feed_forward_length")
        # GGUF carries one rope base; Gemma 3's sliding layers use 10k (its HF config).
        rope_local = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)) if family == 3 else None
        query_scale = float(head_dim)
    rope_base = float(get("rope.freq_base", 10000.0))
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if meta.get(f"{arch}.rope.scaling.type", "linear") not in ("linear", "none"):
        raise UnsupportedModelError("only linear RoPE scaling is supported")
    # llama.cpp's defaults for Gemma 2 when the keys are absent
    softcaps = {"attn": 50.0, "final": 30.0} if family == 2 else {}
    return GemmaConfig(
        family=family,
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=intermediate,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        sliding_window=int(window) if window and family >= 2 else (4096 if family == 2 else None),
        rope_base=rope_base,
        rope_local_base=rope_base if rope_local is None else rope_local,
        rope_scaling_factor=factor,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        query_pre_attn_scalar=query_scale,
        attn_softcap=_optional(meta.get(f"{arch}.attn_logit_softcapping", softcaps.get("attn"))),
        final_softcap=_optional(meta.get(f"{arch}.final_logit_softcapping", softcaps.get("final"))),
        max_position=int(get("context_length", 8192)),
        bidirectional=arch in EMBEDDING_ARCHITECTURES and not meta.get(f"{arch}.attention.causal", False),
        **extra,
    )


def _optional(v) -> float | None:
    return None if v is None else float(v)


# --------------------------------------------------------------------------------------------
# everything else a converter needs
# --------------------------------------------------------------------------------------------

def describe(path: Path, ckpt: "GGUFCheckpoint") -> Described:
    meta = ckpt.metadata()
    infos = ckpt.tensors()
    emb = infos.get(TENSORS["embed"][0])
    if emb is None:
        raise SourceError(f"{path}: GGUF has no token_embd.weight; it is not a Gemma model file")
    freqs = ckpt.read("rope_freqs.weight") if meta.get("general.architecture") == "gemma4" and \
        "rope_freqs.weight" in infos else None
    cfg = config_from_gguf(meta, vocab_size=emb.shape[0], rope_freqs=freqs)
    own = [i for i in range(cfg.num_layers) if cfg.kv_source(i) == i and not cfg.is_sliding(i)]
    if cfg.family >= 4 and own and all(TENSORS["v"][0].format(i=i) not in infos for i in own):
        # llama.cpp writes no attn_v for Gemma 4's attention_k_eq_v (V is the K projection) and no key says so
        cfg = dataclasses.replace(cfg, k_eq_v=True)
    embedding, notes = None, ()
    if meta.get("general.architecture") in EMBEDDING_ARCHITECTURES:
        cfg, embedding, notes = _embedding_head(path, meta, infos, cfg)
    from .gguf_tokenizer import sentencepiece_from_gguf

    return Described(
        config=cfg, tokenizer_model=sentencepiece_from_gguf(ckpt),
        names=namemap.build_map(TENSORS, cfg, infos, IGNORABLE), norm_offset=0.0,
        chat_template=meta.get("tokenizer.chat_template") if isinstance(meta.get("tokenizer.chat_template"), str) else None,
        declared_stop_ids=tuple(ids(meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))),
        files=(Path(path),), notes=notes, embedding=embedding,
        add_eos=embedding is not None and meta.get("tokenizer.ggml.add_eos_token") is True)


def _embedding_head(path: Path, meta: dict, infos: dict, cfg: GemmaConfig):
    """(config with the Dense layers' sizes, EmbeddingMeta, notes) of a gemma-embedding GGUF:
    mean pooling (``<arch>.pooling_type``), the Dense layers llama.cpp's converter writes with
    --sentence-transformers-dense-modules (``dense_2``, ``dense_3``), and EmbeddingGemma's
    published task prompts (a GGUF stores none)."""
    from ..runtime import modelfile
    from .st_layout import EMBEDDINGGEMMA_PROMPTS, matryoshka_dims

    arch = meta["general.architecture"]
    pooling = meta.get(f"{arch}.pooling_type", MEAN_POOLING)
    if pooling != MEAN_POOLING:
        raise UnsupportedModelError(f"{path}: {arch}.pooling_type is {pooling!r}; gemma-edge computes mean pooling "
                                    f"({MEAN_POOLING}), as EmbeddingGemma was trained")
    dense = [TENSORS[k][0] for k in ("dense_0", "dense_1")]
    have = [n in infos for n in dense]
    if have == [False, True]:
        raise SourceError(f"{path}: has {dense[1]} but no {dense[0]}; the file is incomplete: re-convert it")
    dims = tuple(infos[n].shape[0] for n, ok in zip(dense, have) if ok)
    notes = [f"{path}: a GGUF stores no task prompts; EmbeddingGemma's published ones were stored "
             f"({', '.join(sorted(EMBEDDINGGEMMA_PROMPTS))})"]
    if not dims:
        notes.append(f"{path}: no Dense layers (llama.cpp's converter wrote them only with "
                     "--sentence-transformers-dense-modules): the vectors are the pooled hidden states, as llama.cpp "
                     "computes them from this file, not EmbeddingGemma's sentence-transformers output")
    cfg = dataclasses.replace(cfg, dense_dims=dims)
    embedding = modelfile.EmbeddingMeta(
        lengths=(), dim=cfg.embedding_dim, matryoshka_dims=matryoshka_dims(cfg.embedding_dim),
        prompts=dict(EMBEDDINGGEMMA_PROMPTS), max_tokens=cfg.max_position)
    return cfg, embedding, tuple(notes)
