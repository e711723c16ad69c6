"""The gemma-edge file format: its metadata keys, a typed record of what a file holds, and
the code that writes and reads them. Nothing else formats or parses the metadata.

A gemma-edge file is a LiteRT flatbuffer (graph and weights, ``runtime/contract.py``) whose
TFLite metadata entries describe it:

    gemma_edge.config      JSON: FileMeta (config, quantization, context, signatures' chunk
                           lengths, tokenizer ids, chat template, source; for an embedding
                           model its pooling, vector sizes and task prompts)
    gemma_edge.tokenizer_buffer
                           4 bytes (uint32 LE): the index of the buffer that holds the
                           serialized SentencePiece model (format 3). LiteRT reads and copies
                           every metadata entry at load (10 MB of resident memory for Gemma's
                           5 MB tokenizer), so the tokenizer is a buffer of its own that nothing
                           in the graph names, read by gemma-edge only when it needs it
    gemma_edge.tokenizer   format 2: the serialized SentencePiece model itself
    gemma_edge.checksums   fixed-size: the header's length and sha256 (LiteRT parses the graph
                           without verifying it; a flipped bit there can crash it), the sha256
                           of the config and (format 2) tokenizer entries, and the sha256 of the
                           weights (every other buffer after the header, in file order: in
                           format 3 the tokenizer's is the last of them)

``read_info`` parses only the header and the metadata (from a memory map), checks the header
and metadata digests (cheap: the header is a few hundred KB, the metadata a few MB) and
returns a ``ModelInfo`` (a format 3 file's tokenizer is read when first asked for; a loaded
model drops a format 2 file's: ``release_tokenizer``);
``verify_weights`` reads every weight byte against its digest (what
``gemma-edge info --verify`` runs, and the first load of a file on a machine, when XNNPACK
packs the weights anyway). Files of format 1 carry only the header digest
(``gemma_edge.header_sha256``).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property

from . import fileio
from .config import GemmaConfig, are_ranges
from .errors import GemmaEdgeError, ModelFileError

FORMAT = "gemma-edge"
# 2: gemma_edge.checksums covers metadata and weights, not only the header; 3: the tokenizer is a
# buffer outside the metadata (an earlier version then finds the checksums intact and says "upgrade")
FORMAT_VERSION = 3
CONFIG_KEY = "gemma_edge.config"
TOKENIZER_KEY = "gemma_edge.tokenizer"
TOKENIZER_BUFFER_KEY = "gemma_edge.tokenizer_buffer"
# entries a writer stores as a buffer of their own, and the (inline, 4-byte) entry naming its index
APART = {TOKENIZER_KEY: TOKENIZER_BUFFER_KEY}
CHECKSUMS_KEY = "gemma_edge.checksums"
HEADER_CHECKSUM_KEY = "gemma_edge.header_sha256"  # format 1: header length (uint64 LE) + sha256
_DIGEST = 32
CHECKSUMS_BYTES = 8 + 3 * _DIGEST  # header length, sha256 of header, of metadata, of weights


# ---- the typed record ----------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerMeta:
    """Special ids of the embedded SentencePiece model, and when generation stops."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    start_of_turn_id: int | None = None
    end_of_turn_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # generation stops on any of these
    declared_stop_ids: tuple[int, ...] = ()  # what the checkpoint itself declared (a subset)
    add_bos: bool = True  # a prompt starts with <bos>
    kind: str = "sentencepiece"
    add_eos: bool = False  # an embedding model's text ends with <eos> (EmbeddingGemma's tokenizer adds it)
    # The ids parse_special cuts out of text (CONTROL pieces and UNKNOWN) as config.to_ranges
    # spells them, so a load need not test all 262k pieces (20-30 ms); () in older files: it does.
    special_ranges: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChatTemplate:
    kind: str = "gemma"  # the built-in format (runtime/chat.py) used without a usable jinja template
    jinja: str | None = None  # the checkpoint's own template (rendered in a sandbox)


@dataclass(frozen=True)
class Quantization:
    name: str  # the preset or the recipe spelled out (quantize/schemes.recipe_name)
    description: str = ""
    recipe: dict = field(default_factory=dict)  # kind -> scheme
    tensors: dict = field(default_factory=dict)  # canonical weight -> scheme
    scheme: dict = field(default_factory=dict)  # the scheme table's row when one scheme covers all


@dataclass(frozen=True)
class SourceMeta:
    name: str = ""
    format: str = ""  # "safetensors" or "gguf"
    sha256: str = ""  # of the checkpoint's files (fileio.sha256_files)
    lora: dict | None = None  # the adapter merged in (convert/lora.py describe())


@dataclass(frozen=True)
class EmbeddingMeta:
    """An embedding model (EmbeddingGemma, from a sentence-transformers layout): how a text
    becomes a vector. The graph computes the pooled vector through the Dense layers; the
    runtime normalises it and truncates it (Matryoshka)."""

    lengths: tuple[int, ...]  # chunk lengths T of the embed_<T> signatures
    dim: int  # the vector's full size
    pooling: str = "mean"  # over a text's tokens, prompt, <bos> and <eos> included
    normalize: bool = True  # vectors are scaled to unit length (sentence-transformers' Normalize)
    matryoshka_dims: tuple[int, ...] = ()  # smaller sizes the model was trained to be truncated to
    prompts: dict = field(default_factory=dict)  # task name -> the prompt put before a text
    default_task: str | None = None  # the task whose prompt is used when none is named
    max_tokens: int = 0  # the checkpoint's own limit (sentence-transformers' max_seq_length); 0: none


@dataclass(frozen=True)
class FileMeta:
    """What a gemma-edge file holds besides its graph, weights and tokenizer bytes."""

    config: GemmaConfig
    context_length: int
    prefill_lengths: tuple[int, ...]
    score_lengths: tuple[int, ...] = ()
    decode_spans: tuple[int, ...] = ()  # decode_s<S'> signatures (contract.decode_spans); older files have none
    decode_hot: bool = False  # a decode_hot signature (a file converted --for-draft)
    decode_hot_spans: tuple[int, ...] = ()  # decode_hot_s<S'> beside decode_s<S'>; earlier --for-draft files have none
    quantization: Quantization = Quantization("fp32")
    tokenizer: TokenizerMeta = TokenizerMeta()
    chat_template: ChatTemplate = ChatTemplate()
    source: SourceMeta = SourceMeta()
    gemma_edge_version: str = ""
    format_version: int = FORMAT_VERSION
    embedding: EmbeddingMeta | None = None  # an embedding model's (embed_<T> signatures, no decode)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        d["quantization"]["scheme"] = {**self.quantization.scheme, "name": self.quantization.name,
                                       "description": self.quantization.description}
        del d["quantization"]["name"], d["quantization"]["description"]
        if not self.decode_hot:  # as files without it have always been written
            del d["decode_hot"]
        if not self.decode_hot_spans:
            del d["decode_hot_spans"]
        return {"format": FORMAT, **d,
                "kv_cache": {"layout": "[1, num_kv_heads, context_length, head_dim]", "dtype": "float32"}}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_dict(cls, d: dict) -> "FileMeta":
        """Raises ValueError, KeyError or TypeError for what is missing or mistyped
        (``read_info`` turns them into one ModelFileError naming the file)."""
        if not isinstance(d, dict):
            raise ValueError(f"it is a JSON {type(d).__name__}, not an object")
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}")
        q = _obj(d, "quantization")
        scheme = _obj(q, "scheme")
        tok = _obj(d, "tokenizer")
        tpl = _obj(d, "chat_template", {})
        src = _obj(d, "source", {})
        emb = _obj(d, "embedding", None)
        return cls(
            config=GemmaConfig.from_dict(_obj(d, "config")),
            context_length=_count(d["context_length"], "context_length"),
            prefill_lengths=tuple(_count(t, "prefill_lengths") for t in _list(d, "prefill_lengths")),
            score_lengths=tuple(_count(t, "score_lengths") for t in _list(d, "score_lengths", [])),
            decode_spans=tuple(_count(t, "decode_spans") for t in _list(d, "decode_spans", [])),
            decode_hot=_bool(d, "decode_hot", False),
            decode_hot_spans=tuple(_count(t, "decode_hot_spans") for t in _list(d, "decode_hot_spans", [])),
            quantization=Quantization(
                name=_str(scheme, "name"), description=_str(scheme, "description", ""),
                recipe=_obj(q, "recipe", {}), tensors=_obj(q, "tensors", {}),
                scheme={k: v for k, v in scheme.items() if k not in ("name", "description")}),
            tokenizer=TokenizerMeta(
                bos_id=_id(tok, "bos_id", required=True), eos_id=_id(tok, "eos_id"), pad_id=_id(tok, "pad_id"),
                start_of_turn_id=_id(tok, "start_of_turn_id"), end_of_turn_id=_id(tok, "end_of_turn_id"),
                stop_token_ids=_ids(tok, "stop_token_ids"), declared_stop_ids=_ids(tok, "declared_stop_ids"),
                add_bos=_bool(tok, "add_bos", True), kind=_str(tok, "kind", "sentencepiece"),
                add_eos=_bool(tok, "add_eos", False), special_ranges=_ranges(tok, "special_ranges")),
            chat_template=ChatTemplate(kind=_str(tpl, "kind", "gemma"), jinja=_str(tpl, "jinja", None)),
            source=SourceMeta(name=_str(src, "name", ""), format=_str(src, "format", ""),
                              sha256=_str(src, "sha256", ""), lora=_obj(src, "lora", None)),
            gemma_edge_version=_str(d, "gemma_edge_version", ""),
            format_version=_count(d.get("format_version", 1), "format_version"),
            embedding=None if emb is None else _embedding(emb),
        )


def _embedding(d: dict) -> EmbeddingMeta:
    prompts = _obj(d, "prompts", {})
    if not all(isinstance(v, str) for v in prompts.values()):
        raise TypeError("embedding prompts are not all strings")
    default = _str(d, "default_task", None)
    if default is not None and default not in prompts:
        raise ValueError(f"embedding default_task {default!r} is not one of the prompts {sorted(prompts)}")
    pooling = _str(d, "pooling", "mean")
    if pooling != "mean":
        raise ValueError(f"embedding pooling {pooling!r} is not 'mean'")
    limit = d.get("max_tokens")  # absent, null or 0: no limit of the checkpoint's own (not false, not 0.0)
    return EmbeddingMeta(
        lengths=tuple(_count(t, "embedding lengths") for t in _list(d, "lengths")),
        dim=_count(d["dim"], "embedding dim"), pooling=pooling, normalize=_bool(d, "normalize", True),
        matryoshka_dims=tuple(_count(t, "matryoshka_dims") for t in _list(d, "matryoshka_dims", [])),
        prompts=dict(prompts), default_task=default,
        max_tokens=0 if limit is None or (type(limit) is int and limit == 0) else _count(limit, "embedding max_tokens"))


def _obj(d: dict, key: str, default=KeyError):
    v = d.get(key, default)
    if v is KeyError:
        raise KeyError(key)
    if v is not default and not isinstance(v, dict):
        raise TypeError(f"{key} is {type(v).__name__}, not an object")
    return v


def _list(d: dict, key: str, default=KeyError) -> list:
    v = d.get(key, default)
    if v is KeyError:
        raise KeyError(key)
    if not isinstance(v, list):
        raise TypeError(f"{key} is {type(v).__name__}, not a list")
    return v


def _str(d: dict, key: str, default=KeyError):
    v = d.get(key, default)
    if v is KeyError:
        raise KeyError(key)
    if v is not default and not isinstance(v, str):
        raise TypeError(f"{key} is {type(v).__name__}, not a string")
    return v


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise TypeError(f"{key} is {v!r}, not true or false")
    return v


def _count(v, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{key} holds {v!r}, not a positive integer")
    return v


def _id(d: dict, key: str, required: bool = False) -> int | None:
    v = d[key] if required else d.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"tokenizer {key} is {v!r}, not a token id")
    return v


def _ranges(d: dict, key: str) -> tuple[int, ...]:
    v = d.get(key) or []
    if not isinstance(v, list) or not are_ranges(v, 1 << 31):
        raise ValueError(f"tokenizer {key} is {v!r}, not increasing ranges of token ids")
    return tuple(v)


def _ids(d: dict, key: str) -> tuple[int, ...]:
    v = d.get(key) or []
    if not isinstance(v, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in v):
        raise ValueError(f"tokenizer {key} is {v!r}, not a list of token ids")
    return tuple(v)


# ---- writing -------------------------------------------------------------------------------

def metadata_entries(meta: FileMeta, tokenizer_model: bytes) -> dict[str, bytes]:
    """The entries a writer stores: as TFLite metadata, except those in ``APART`` (a buffer of
    their own, after the weights, its index in an inline entry); the checksums entry is a zeroed
    placeholder of its final size, filled by ``checksums_blob`` once header and weights are written."""
    return {CONFIG_KEY: meta.to_json(), TOKENIZER_KEY: bytes(tokenizer_model), CHECKSUMS_KEY: bytes(CHECKSUMS_BYTES)}


def metadata_digest(entries: dict[str, bytes]) -> bytes:
    parts = []
    for key in (CONFIG_KEY, TOKENIZER_KEY):
        blob = entries.get(key, b"")
        parts += [struct.pack("<Q", len(blob)), blob]
    return fileio.sha256(b"".join(parts)).digest()


def weights_digest(buffer_digests: list[bytes]) -> bytes:
    """One digest of the weights from the sha256 of every weight buffer, in file order."""
    return fileio.sha256(b"".join(buffer_digests)).digest()


def checksums_blob(header: bytes, entries: dict[str, bytes], weight_buffer_digests: list[bytes]) -> bytes:
    """The checksums entry: ``entries`` as ``metadata_entries`` gave them (those stored ``APART``
    count as weights: their digests are among ``weight_buffer_digests``, in file order)."""
    entries = {k: v for k, v in entries.items() if k not in APART}
    return (struct.pack("<Q", len(header)) + fileio.sha256(header).digest() + metadata_digest(entries)
            + weights_digest(weight_buffer_digests))


# ---- reading -------------------------------------------------------------------------------

_DAMAGED = "copy it again or convert the checkpoint again"


def _check_header(path: str, blob: bytes, expected_len: int) -> None:
    if len(blob) != expected_len:
        raise ModelFileError(f"{path}: the checksum entry is damaged; {_DAMAGED}")
    n = struct.unpack_from("<Q", blob)[0]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if n > len(m) or fileio.sha256(m[:n]).digest() != blob[8:8 + _DIGEST]:
            raise ModelFileError(f"{path}: the file is damaged (its graph no longer matches the checksum "
                                 f"written with it); {_DAMAGED}")


def read_metadata(path: str) -> dict[str, bytes]:
    """All TFLite metadata entries of ``path`` as name -> bytes. Raises ModelFileError."""
    return _read(path)[0]


def _read(path: str) -> tuple[dict[str, bytes], list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """``_parse`` of the file at ``path``."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file. Convert a checkpoint first: gemma-convert SOURCE -o {path}")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m, os.path.getsize(path))
    except GemmaEdgeError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{path}: cannot be read as a .tflite file ({e})") from None


_VECTOR_AT_ONCE = 64  # a vector of offsets at least this long is read with numpy, in one go


class _FlatBuffer:
    """Just enough of the flatbuffer wire format to read Model.metadata and Model.buffers,
    with every offset bounds-checked: no dependency on a generated schema module, so the
    metadata reads the same under ai-edge-litert and tflite-runtime."""

    def __init__(self, buf, size: int):
        self.buf, self.size = buf, size

    def u32(self, at: int) -> int:
        if not 0 <= at <= self.size - 4:
            raise ModelFileError(f"offset {at} lies outside the {self.size}-byte file")
        return struct.unpack_from("<I", self.buf, at)[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, or None."""
        vtable = table - struct.unpack_from("<i", self.buf, table)[0] if 0 <= table <= self.size - 4 else -1
        if not 0 <= vtable <= self.size - 4:
            raise ModelFileError(f"table at {table} has a vtable outside the file")
        vsize = struct.unpack_from("<H", self.buf, vtable)[0]
        if 4 + 2 * index + 2 > vsize or vtable + vsize > self.size:
            return None
        rel = struct.unpack_from("<H", self.buf, vtable + 4 + 2 * index)[0]
        return table + rel if rel else None

    def table_vector(self, table: int, index: int) -> list[int]:
        at = self.field(table, index)
        if at is None:
            return []
        vec = at + self.u32(at)
        n = self.u32(vec)
        if n > (self.size - vec - 4) // 4:
            raise ModelFileError(f"vector of {n} entries at {vec} runs past the end of the file")
        if n < _VECTOR_AT_ONCE:
            return [vec + 4 + 4 * i + self.u32(vec + 4 + 4 * i) for i in range(n)]
        import numpy as np  # Model.buffers of the 270M: 13,500 entries, 4 ms one by one

        rel = np.frombuffer(self.buf, "<u4", n, vec + 4)
        try:
            return (np.arange(vec + 4, vec + 4 + 4 * n, 4, dtype=np.int64) + rel).tolist()
        finally:
            del rel  # the caller's mmap closes after this: no view of it may outlive the call

    def string(self, table: int, index: int) -> str:
        at = self.field(table, index)
        if at is None:
            return ""
        s = at + self.u32(at)
        n = self.u32(s)
        if s + 4 + n > self.size:
            raise ModelFileError(f"string at {s} runs past the end of the file")
        return bytes(self.buf[s + 4:s + 4 + n]).decode("utf-8", "replace")

    def scalar(self, table: int, index: int, fmt: str) -> int:
        at = self.field(table, index)
        if at is None:
            return 0
        if at + struct.calcsize(fmt) > self.size:
            raise ModelFileError(f"field at {at} runs past the end of the file")
        return struct.unpack_from(fmt, self.buf, at)[0]


def _parse(buf, size: int) -> tuple[dict[str, bytes], list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """(metadata entries, (offset, size) of every other buffer stored after the header, and of
    each entry stored after the header by name: an ``APART`` one under its own name, not read)."""
    if size < 8 or bytes(buf[4:8]) != b"TFL3":
        raise ModelFileError("not a TensorFlow Lite flatbuffer (no TFL3 identifier)")
    fbuf = _FlatBuffer(buf, size)
    root = fbuf.u32(0)
    buffers = fbuf.table_vector(root, 4)  # Model.buffers
    out, meta_buffers, regions = {}, set(), {}
    for m in fbuf.table_vector(root, 6):  # Model.metadata
        name = fbuf.string(m, 0)
        if name in out:  # else N entries naming one big buffer copy it N times (a hang)
            raise ModelFileError(f"metadata {name!r} appears twice; the file is corrupt")
        index = fbuf.scalar(m, 1, "<I")
        if index >= len(buffers):
            raise ModelFileError(f"metadata {name!r} points at buffer {index} of {len(buffers)}")
        b = buffers[index]
        meta_buffers.add(index)
        offset, n = fbuf.scalar(b, 1, "<Q"), fbuf.scalar(b, 2, "<Q")
        if offset > 1:
            if offset + n > size:
                raise ModelFileError(f"metadata {name!r} lies past the end of the file "
                                     f"({offset + n} > {size} bytes): the file is truncated")
            out[name] = bytes(buf[offset:offset + n])
            regions[name] = (offset, n)
        else:
            at = fbuf.field(b, 0)
            if at is None:
                out[name] = b""
                continue
            vec = at + fbuf.u32(at)
            n = fbuf.u32(vec)
            if vec + 4 + n > size:
                raise ModelFileError(f"metadata {name!r} runs past the end of the file")
            out[name] = bytes(buf[vec + 4:vec + 4 + n])
    for name, pointer in APART.items():
        if pointer in out:
            raw = out.pop(pointer)
            index = struct.unpack("<I", raw)[0] if len(raw) == 4 else len(buffers)
            if index >= len(buffers):
                raise ModelFileError(f"metadata {pointer!r} does not name one of the {len(buffers)} buffers")
            offset, n = fbuf.scalar(buffers[index], 1, "<Q"), fbuf.scalar(buffers[index], 2, "<Q")
            if offset <= 1 or not n or index in meta_buffers:
                raise ModelFileError(f"metadata {pointer!r} names buffer {index}, which holds no {name}")
            regions[name] = (offset, n)  # checked against the file's size with the weights
    stored = _stored_buffers(buf, size, buffers)
    if stored is None:  # an offset out of bounds: reading one by one names it
        stored = [(i, fbuf.scalar(b, 1, "<Q"), fbuf.scalar(b, 2, "<Q")) for i, b in enumerate(buffers)]
    # checked against the file's size by read_info, after the header's checksum
    weights = sorted((offset, n) for i, offset, n in stored if i not in meta_buffers and offset > 1 and n)
    return out, weights, regions


def _stored_buffers(buf, size: int, buffers: list[int]) -> list[tuple[int, int, int]] | None:
    """(index, Buffer.offset, Buffer.size) of every buffer stored after the header (offset > 1,
    size > 0), read for all buffers at once: the 270M has 13,500 buffers, 7-9 ms of its load
    read one by one with ``_FlatBuffer.scalar`` (1 ms so). None if any position lies outside the
    file (the caller then reads them one by one, which names it)."""
    import numpy as np

    if not buffers:
        return []
    data = np.frombuffer(buf, np.uint8, size)
    try:
        def read(at, dtype):  # little-endian values of ``dtype`` at byte positions ``at``
            width = np.dtype(dtype).itemsize
            return np.ascontiguousarray(data[at[:, None] + np.arange(width)]).view("<" + dtype).ravel()

        table = np.asarray(buffers, np.int64)
        if not ((table >= 0) & (table <= size - 4)).all():
            return None
        vtable = table - read(table, "i4").astype(np.int64)
        if not ((vtable >= 0) & (vtable <= size - 4)).all():
            return None
        vsize = read(vtable, "u2").astype(np.int64)
        values = []
        for index in (1, 2):  # Buffer.offset, Buffer.size (uint64; absent or 0: none)
            present = (4 + 2 * index + 2 <= vsize) & (vtable + vsize <= size)
            slot = np.where(present, vtable + 4 + 2 * index, 0)
            rel = np.where(present, read(slot, "u2").astype(np.int64), 0)
            at = np.where(rel > 0, table + rel, 0)
            if not (at <= size - 8).all():
                return None
            values.append(np.where(rel > 0, read(at, "u8"), np.uint64(0)))
        keep = np.flatnonzero((values[0] > 1) & (values[1] > 0))
        return list(zip(keep.tolist(), values[0][keep].tolist(), values[1][keep].tolist()))
    finally:
        del data  # the caller's mmap closes after this: no view of it may outlive the call


@dataclass(frozen=True)
class ModelInfo:
    """The parsed self-description of a gemma-edge file."""

    path: str
    meta: FileMeta
    _tokenizer: bytes | None  # the tokenizer's bytes; None once released, or not read yet (``tokenizer_model``)
    weight_regions: tuple[tuple[int, int], ...] = ()  # (offset, size) of every weight buffer
    checksums: bytes = b""  # the CHECKSUMS_KEY entry (format 2)
    identity: tuple[int, ...] = ()  # file_identity(path) taken before it was read
    tokenizer_region: tuple[int, int] | None = None  # (offset, size) of those bytes in the file

    @property
    def tokenizer_model(self) -> bytes:
        """The serialized SentencePiece model. After ``release_tokenizer`` it is read again from
        the file, which must be the one read (the same ``file_identity``)."""
        if self._tokenizer is not None:
            return self._tokenizer
        offset, size = self.tokenizer_region
        try:
            with open(self.path, "rb") as f:
                same = file_identity(self.path) == self.identity
                data = os.pread(f.fileno(), size, offset) if same else b""
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot read its tokenizer again ({e.strerror or e}); "
                                 "load the model again") from None
        if not same or len(data) != size:
            raise ModelFileError(f"{self.path} has changed since it was loaded; load it again")
        return data

    def release_tokenizer(self) -> None:
        """Forget the tokenizer's bytes (Gemma's are 5 MB, held by every process for nothing once its
        Tokenizer is built); ``tokenizer_model`` then reads them from the file when asked (packing
        for LiteRT-LM, comparing two models' tokenizers). Kept when the file's identity is unknown."""
        if self.tokenizer_region and self.identity:
            object.__setattr__(self, "_tokenizer", None)

    @property
    def config(self) -> GemmaConfig:
        return self.meta.config

    @property
    def context_length(self) -> int:
        return self.meta.context_length

    @property
    def prefill_lengths(self) -> list[int]:
        return list(self.meta.prefill_lengths)

    @property
    def score_lengths(self) -> list[int]:
        """Chunk lengths of ``score_<T>`` signatures (older files have none)."""
        return list(self.meta.score_lengths)

    @property
    def embed_lengths(self) -> list[int]:
        """Chunk lengths of an embedding model's ``embed_<T>`` signatures (none for a causal LM)."""
        return list(self.meta.embedding.lengths) if self.meta.embedding else []

    @property
    def decode_spans(self) -> list[int]:
        """Spans S' of ``decode_s<S'>`` signatures, ascending (older files have none)."""
        return sorted(self.meta.decode_spans)

    @property
    def decode_hot(self) -> bool:
        """Whether the file has ``decode_hot`` (converted ``--for-draft``)."""
        return self.meta.decode_hot

    @property
    def decode_hot_spans(self) -> list[int]:
        """S' of each decode_hot_s<S'> (beside decode_s<S'> in a file converted ``--for-draft``)."""
        return sorted(self.meta.decode_hot_spans)

    @property
    def quant(self) -> str:
        return self.meta.quantization.name

    @cached_property
    def weights_sha256(self) -> bytes | None:
        return self.checksums[8 + 2 * _DIGEST:] if self.checksums else None


def file_identity(path: str) -> tuple[int, ...]:
    """(device, inode, size, mtime, ctime) of ``path``: any write to the file changes it (ctime
    cannot be set back), so bytes checked under one identity are still those bytes under it."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_info(path: str, checked_before=None) -> ModelInfo:
    """Parse and check a file's self-description (header and metadata digests); weights are
    not read. Raises ModelFileError naming the file for anything wrong.

    ``checked_before(path, checksums, identity)``: True when these digests were checked on this
    file under this ``file_identity`` by an earlier load (the weight cache's record says so);
    the header and metadata are then not hashed again (10 MB for the 270M: 6-15 ms here, several
    times that on a core without SHA instructions, as a Raspberry Pi 4's)."""
    try:
        identity = file_identity(path)
    except OSError:
        identity = ()  # _read names what is wrong
    entries, regions, entry_regions = _read(path)
    if CONFIG_KEY not in entries:
        raise ModelFileError(
            f"{path} is a .tflite file but not a gemma-edge model (no {CONFIG_KEY} metadata). "
            "Convert the checkpoint with gemma-convert")
    checksums = entries.get(CHECKSUMS_KEY, b"")
    if checksums:
        if not (identity and checked_before is not None and checked_before(path, checksums, identity)):
            _check_header(path, checksums, CHECKSUMS_BYTES)
            if metadata_digest(entries) != checksums[8 + _DIGEST:8 + 2 * _DIGEST]:
                raise ModelFileError(f"{path}: the file is damaged (its metadata or tokenizer no longer matches "
                                     f"the checksum written with it); {_DAMAGED}")
    elif HEADER_CHECKSUM_KEY in entries:  # format 1
        _check_header(path, entries[HEADER_CHECKSUM_KEY], 8 + _DIGEST)
    try:
        raw = json.loads(entries[CONFIG_KEY].decode("utf-8"))
        if isinstance(raw, dict) and isinstance(raw.get("format_version"), int) and raw["format_version"] > FORMAT_VERSION:
            raise ModelFileError(f"{path} uses file format {raw['format_version']}; this gemma-edge reads "
                                 f"up to {FORMAT_VERSION}: upgrade gemma-edge")
        meta = FileMeta.from_dict(raw)
    except ModelFileError:
        raise
    except GemmaEdgeError as e:  # the config's own checks (UnsupportedModelError)
        raise ModelFileError(f"{path}: the gemma-edge metadata is corrupt ({e}); convert the checkpoint again") from None
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, UnicodeDecodeError,
            RecursionError) as e:
        raise ModelFileError(f"{path}: the gemma-edge metadata is corrupt ({type(e).__name__}: {e}); "
                             "convert the checkpoint again") from None
    size = os.path.getsize(path)
    past = [(o, n) for o, n in regions if o + n > size]
    if past:
        raise ModelFileError(f"{path}: the file is truncated: its weights reach byte {max(o + n for o, n in past)} "
                             f"but it has {size} bytes; {_DAMAGED}")
    region = entry_regions.get(TOKENIZER_KEY)
    tokenizer_model = entries.get(TOKENIZER_KEY)
    if tokenizer_model is None and region and not identity:  # format 3, and no identity to read it again by
        with open(path, "rb") as f:
            tokenizer_model = os.pread(f.fileno(), region[1], region[0])
    if not (tokenizer_model if tokenizer_model is not None else region):
        raise ModelFileError(f"{path}: the embedded tokenizer is missing; convert the checkpoint again")
    return ModelInfo(path, meta, tokenizer_model, tuple(regions), checksums, identity, region)


def verify_weights(info: ModelInfo, progress=None) -> bool | None:
    """Read every weight buffer and compare with the file's weights digest: True if equal,
    None for a file without one (format 1). Raises ModelFileError on a mismatch.
    ``progress(done_bytes, total_bytes)`` is called as it reads."""
    if info.weights_sha256 is None:
        return None
    import hashlib

    total = sum(n for _, n in info.weight_regions)
    done, digests = 0, []
    with open(info.path, "rb") as f:
        for offset, n in info.weight_regions:
            h = hashlib.sha256()  # OpenSSL's, for its speed over gigabytes
            f.seek(offset)
            left = n
            while left:
                chunk = f.read(min(left, 16 << 20))
                if not chunk:
                    raise ModelFileError(f"{info.path}: the file is truncated; {_DAMAGED}")
                h.update(chunk)
                left -= len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            digests.append(h.digest())
    if weights_digest(digests) != info.weights_sha256:
        raise ModelFileError(f"{info.path}: the file is damaged (its weights no longer match the checksum written "
                             f"with them); {_DAMAGED}")
    return True
