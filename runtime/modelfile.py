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
from dataclasses import dataclass
from functools import cached_property

from .config import GemmaConfig
from .errors import GemmaEdgeError, ModelFileError

FORMAT = "gemma-edge"
FORMAT_VERSION = 1
CONFIG_KEY = "gemma_edge.config"
TOKENIZER_KEY = "gemma_edge.tokenizer"


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


def _parse(buf, size: int) -> dict[str, bytes]:
    if size < 8 or bytes(buf[4:8]) != b"TFL3":
        raise ModelFileError("not a TensorFlow Lite flatbuffer (no TFL3 identifier)")
    from ai_edge_litert.schema_py_generated import Model

    try:
        model = Model.GetRootAs(buf, 0)
        out = {}
        for i in range(model.MetadataLength()):
            m = model.Metadata(i)
            name = (m.Name() or b"").decode("utf-8", "replace")
            b = model.Buffers(m.Buffer())
            if b is None:
                raise ModelFileError(f"metadata {name!r} points at a missing buffer")
            if b.Offset() > 1:
                start, n = b.Offset(), b.Size()
                if start + n > size:
                    raise ModelFileError(f"metadata {name!r} lies past the end of the file "
                                         f"({start + n} > {size} bytes): the file is truncated")
                out[name] = bytes(buf[start:start + n])
            else:
                out[name] = b.DataAsNumpy().tobytes() if b.DataLength() else b""
        return out
    except GemmaEdgeError:
        raise
    except Exception as e:  # a corrupt flatbuffer raises anything from struct/index errors
        raise ModelFileError(f"corrupt flatbuffer header ({type(e).__name__}: {e})") from None


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
    try:
        meta = json.loads(entries[CONFIG_KEY].decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(f"{path} uses file format {meta['format_version']}; this gemma-edge reads "
                                 f"up to {FORMAT_VERSION}: upgrade gemma-edge")
        info = ModelInfo(path, meta, entries.get(TOKENIZER_KEY, b""))
        info.config, info.context_length, info.prefill_lengths, info.tokens["bos_id"]  # validate now
    except GemmaEdgeError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: the gemma-edge metadata is corrupt ({type(e).__name__}: {e}); "
                             "convert the checkpoint again") from None
    if not info.tokenizer_model:
        raise ModelFileError(f"{path}: the embedded tokenizer is missing; convert the checkpoint again")
    return info
