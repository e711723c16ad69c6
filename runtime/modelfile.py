"""Read a gemma-edge .tflite's self-description: the metadata entries in its flatbuffer.

Only the header is parsed (lazily, from a memory map); weights are never touched here.
Everything the runtime needs (config, tokenizer, chat template, special tokens, prefill
lengths, context length) comes from the ``gemma_edge.config`` JSON and the embedded
SentencePiece model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property

from .config import GemmaConfig
from .errors import GemmaEdgeError, ModelFileError

FORMAT = "gemma-edge"
FORMAT_VERSION = 1
CONFIG_KEY = "gemma_edge.config"
TOKENIZER_KEY = "gemma_edge.tokenizer"
# sha256 of the flatbuffer header (graph, tensors, buffer table: everything LiteRT parses
# without verifying; a flipped bit there can crash it): header length (uint64 LE) + digest.
CHECKSUM_KEY = "gemma_edge.header_sha256"
CHECKSUM_BYTES = 8 + 32


def header_checksum(header: bytes) -> bytes:
    """The CHECKSUM_KEY blob for a header of ``len(header)`` bytes."""
    import hashlib

    return struct.pack("<Q", len(header)) + hashlib.sha256(header).digest()


def verify_header(path: str, blob: bytes) -> None:
    """Raise ModelFileError unless the file's header matches its CHECKSUM_KEY blob."""
    if len(blob) != CHECKSUM_BYTES:
        raise ModelFileError(f"{path}: the header checksum entry is damaged; convert the checkpoint again")
    n = struct.unpack_from("<Q", blob)[0]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if n > len(m) or header_checksum(m[:n]) != blob:
            raise ModelFileError(
                f"{path}: the file is damaged (its graph no longer matches the checksum written with it); "
                "copy it again or convert the checkpoint again")


def read_metadata(path: str) -> dict[str, bytes]:
    """All TFLite metadata entries of ``path`` as name -> bytes. Raises ModelFileError."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file. Convert a checkpoint first: gemma-convert SOURCE -o {path}")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m, os.path.getsize(path))
    except GemmaEdgeError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{path}: cannot be read as a .tflite file ({e})") from None


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
        if n > (self.size - vec) // 4:
            raise ModelFileError(f"vector of {n} entries at {vec} runs past the end of the file")
        return [vec + 4 + 4 * i + self.u32(vec + 4 + 4 * i) for i in range(n)]

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


def _parse(buf, size: int) -> dict[str, bytes]:
    if size < 8 or bytes(buf[4:8]) != b"TFL3":
        raise ModelFileError("not a TensorFlow Lite flatbuffer (no TFL3 identifier)")
    fbuf = _FlatBuffer(buf, size)
    root = fbuf.u32(0)
    buffers = fbuf.table_vector(root, 4)  # Model.buffers
    out = {}
    for m in fbuf.table_vector(root, 6):  # Model.metadata
        name = fbuf.string(m, 0)
        if name in out:  # else N entries naming one big buffer copy it N times (a hang)
            raise ModelFileError(f"metadata {name!r} appears twice; the file is corrupt")
        index = fbuf.scalar(m, 1, "<I")
        if index >= len(buffers):
            raise ModelFileError(f"metadata {name!r} points at buffer {index} of {len(buffers)}")
        b = buffers[index]
        offset, n = fbuf.scalar(b, 1, "<Q"), fbuf.scalar(b, 2, "<Q")
        if offset > 1:
            if offset + n > size:
                raise ModelFileError(f"metadata {name!r} lies past the end of the file "
                                     f"({offset + n} > {size} bytes): the file is truncated")
            out[name] = bytes(buf[offset:offset + n])
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
    return out


@dataclass(frozen=True)
class ModelInfo:
    """The parsed self-description of a gemma-edge file."""

    path: str
    meta: dict
    tokenizer_model: bytes

    @cached_property
    def config(self) -> GemmaConfig:
        return GemmaConfig.from_dict(self.meta["config"])

    @property
    def context_length(self) -> int:
        return int(self.meta["context_length"])

    @property
    def prefill_lengths(self) -> list[int]:
        return [int(t) for t in self.meta["prefill_lengths"]]

    @property
    def score_lengths(self) -> list[int]:
        """Chunk lengths of ``score_<T>`` signatures (older files have none)."""
        return [int(t) for t in self.meta.get("score_lengths", [])]

    @property
    def quant(self) -> str:
        return self.meta["quantization"]["scheme"]["name"]

    @property
    def tokens(self) -> dict:
        return self.meta["tokenizer"]


def read_info(path: str) -> ModelInfo:
    entries = read_metadata(path)
    if CONFIG_KEY not in entries:
        raise ModelFileError(
            f"{path} is a .tflite file but not a gemma-edge model (no {CONFIG_KEY} metadata). "
            "Convert the checkpoint with gemma-convert")
    if CHECKSUM_KEY in entries:  # files before it have none
        verify_header(path, entries[CHECKSUM_KEY])
    try:
        meta = json.loads(entries[CONFIG_KEY].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"it is a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(f"{path} uses file format {meta['format_version']}; this gemma-edge reads "
                                 f"up to {FORMAT_VERSION}: upgrade gemma-edge")
        info = ModelInfo(path, meta, entries.get(TOKENIZER_KEY, b""))
        info.config, info.context_length, info.prefill_lengths, info.score_lengths, info.tokens["bos_id"]  # validate now
    except ModelFileError:
        raise
    except GemmaEdgeError as e:  # the config's own checks (UnsupportedModelError)
        raise ModelFileError(f"{path}: the gemma-edge metadata is corrupt ({e}); convert the checkpoint again") from None
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: the gemma-edge metadata is corrupt ({type(e).__name__}: {e}); "
                             "convert the checkpoint again") from None
    if not info.tokenizer_model:
        raise ModelFileError(f"{path}: the embedded tokenizer is missing; convert the checkpoint again")
    return info
