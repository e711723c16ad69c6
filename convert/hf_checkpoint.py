"""Hugging Face checkpoints: the safetensors reader, ``config.json`` -> GemmaConfig, the
tensor-name table, and the tokenizer, chat template and stop ids beside the weights
(``tokenizer.model``, ``tokenizer_config.json``, ``generation_config.json``).

A checkpoint directory holds ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. The text decoder's tensors sit under ``model.`` (causal LM
checkpoints) or, in a multimodal checkpoint, ``model.language_model.`` (transformers >= 4.52)
or ``language_model.model.`` (before); a multimodal checkpoint's vision and audio towers are
skipped, and the converter says so in one line. HF norm weights hold ``w`` of Gemma's
``(1 + w)`` scale (``names.norm_scale`` adds the 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.config import FULL, MAX_LAYERS, SLIDING, GemmaConfig
from ..runtime.errors import SourceError, TokenizerError, UnsupportedModelError
from . import names as namemap
from . import st_layout
from .checkpoint import (_REDOWNLOAD, Described, TensorInfo, _is_uint, _listing, _map_file,
                         _no_duplicate_keys, _release, _row_range, _too_big, _unmap, ids)
from .names import NORM, PLE_COLUMNS

FORMAT = "safetensors"

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

    def attach(self, file: Path, prefix: str) -> None:
        """Read the tensors of one more safetensors file, each named ``prefix + its name`` (a
        sentence-transformers Dense module's ``linear.weight`` as ``2_Dense/linear.weight``)."""
        f = _SafetensorsFile(file)
        self._files.append(f)
        f.entries = {prefix + n: e for n, e in f.entries.items()}
        clash = sorted(set(f.entries) & set(self._where))
        if clash:
            raise SourceError(f"{file}: its tensors {_listing(clash)} are named as the model's own")
        self._where.update({n: f for n in f.entries})

    def files(self) -> list[Path]:
        """The safetensors file(s) and the shard index, if any."""
        index = [self.path] if self.path.name.endswith(".index.json") else (
            [self.path / _INDEX_NAME] if self.path.is_dir() and not (self.path / _SINGLE_NAME).is_file() else [])
        return index + [f.path for f in self._files]

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
# the tensor-name table: canonical kind <- HF name under the decoder's prefix
# --------------------------------------------------------------------------------------------

TENSORS: namemap.Table = {
    "embed": ("embed_tokens.weight", None),
    "final_norm": ("norm.weight", NORM),
    "attn_norm": ("layers.{i}.input_layernorm.weight", NORM),
    "q": ("layers.{i}.self_attn.q_proj.weight", None),
    "k": ("layers.{i}.self_attn.k_proj.weight", None),
    "v": ("layers.{i}.self_attn.v_proj.weight", None),
    "o": ("layers.{i}.self_attn.o_proj.weight", None),
    "q_norm": ("layers.{i}.self_attn.q_norm.weight", NORM),
    "k_norm": ("layers.{i}.self_attn.k_norm.weight", NORM),
    "post_attn_norm": ("layers.{i}.post_attention_layernorm.weight", NORM),
    "ffn_norm": ("layers.{i}.pre_feedforward_layernorm.weight", NORM),
    "gate": ("layers.{i}.mlp.gate_proj.weight", None),
    "up": ("layers.{i}.mlp.up_proj.weight", None),
    "down": ("layers.{i}.mlp.down_proj.weight", None),
    "post_ffn_norm": ("layers.{i}.post_feedforward_layernorm.weight", NORM),
    # Gemma 4
    "ple_embed": ("embed_tokens_per_layer.weight", PLE_COLUMNS),
    "ple_proj": ("per_layer_model_projection.weight", None),
    "ple_proj_norm": ("per_layer_projection_norm.weight", NORM),
    "ple_gate": ("layers.{i}.per_layer_input_gate.weight", None),
    "ple_out": ("layers.{i}.per_layer_projection.weight", None),
    "ple_norm": ("layers.{i}.post_per_layer_input_norm.weight", NORM),
    "layer_scale": ("layers.{i}.layer_scalar", None),
}
# Naming trap: a model without post-norms (Gemma 1) calls its pre-FFN norm post_attention_layernorm.
TENSORS_WITHOUT_POST_NORMS: namemap.Table = {
    **TENSORS, "ffn_norm": ("layers.{i}.post_attention_layernorm.weight", NORM)}
IGNORABLE = frozenset({"lm_head.weight"})  # Gemma ties the LM head to the embedding
# Where the text decoder lives: causal LM checkpoints, then multimodal ones (transformers >= 4.52, before),
# then a bare model (an embedding checkpoint's Gemma3TextModel).
PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def decoder_prefix(names) -> str:
    """The prefix of the text decoder's tensors (``model.`` ...), found by its embedding."""
    for p in PREFIXES:
        if p + TENSORS["embed"][0] in names:
            return p
    return PREFIXES[0]


def table_for(cfg: GemmaConfig) -> namemap.Table:
    return TENSORS if cfg.has_post_norms else TENSORS_WITHOUT_POST_NORMS


def build_map_for(cfg: GemmaConfig, names, skipped=frozenset(), extra=None) -> dict:
    """canonical -> (HF tensor name, transform), under the decoder prefix the names use."""
    return namemap.build_map(table_for(cfg), cfg, names, IGNORABLE, decoder_prefix(names), skipped, extra)


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

# HF `model_type` -> Gemma family. Anything else is refused with this list. Multimodal
# wrappers ("gemma3", "gemma4") carry the text decoder's config in "text_config".
HF_MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3, "gemma4_text": 4, "gemma4": 4}
# config.json keys that do not change a causal LM's forward pass at inference (bookkeeping,
# training and generation settings, token ids); every other key is read below or refused.
_HF_IGNORED = {
    "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "initializer_range", "use_cache", "attention_dropout",
    "transformers_version", "_name_or_path", "model_type", "output_attentions",
    "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id", "cache_implementation",
    "max_position_embeddings",  # read (the context's upper bound)
    "text_config", "vision_config", "audio_config", "boi_token_index", "eoi_token_index", "image_token_index",
    "mm_tokens_per_image", "tf_legacy_loss", "pruned_heads", "torchscript",
    "tie_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "num_beams", "num_return_sequences", "max_length", "min_length", "do_sample",
    "temperature", "top_k", "top_p", "bad_words_ids", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "early_stopping", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "repetition_penalty",
    "num_beam_groups", "diversity_penalty", "output_scores", "return_dict_in_generate",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "tokenizer_class", "typical_p", "use_return_dict",
    "attn_implementation", "_attn_implementation_autoset", "quantization_config",
}
_GEMMA4_TEXT = ("Gemma 4 text models (E2B, E4B: per-layer embeddings, KV sharing)")
_FAMILIES = "Gemma 1, Gemma 2, Gemma 3 text, Gemma 4 text"


def config_from_hf(hf: dict) -> GemmaConfig:
    """The GemmaConfig of a Hugging Face ``config.json`` dict (old and new transformers formats;
    a multimodal checkpoint's ``text_config``). Every key that changes the forward pass is
    honoured or refused with an UnsupportedModelError; other unknown keys warn."""
    try:
        return _config_from_hf(hf)
    except UnsupportedModelError as e:  # GemmaConfig's own checks: say it in config.json's names
        message = str(e)
        for ours, theirs in _HF_NAMES.items():
            message = message.replace(f"config {ours} ", f"config.json {theirs} ")
        raise UnsupportedModelError(message) from None
    except KeyError as e:
        raise UnsupportedModelError(
            f"config.json lacks {e}; it is incomplete. Re-download the checkpoint's config.json") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise UnsupportedModelError(f"config.json holds a value of the wrong type ({e}); "
                                    "re-download the checkpoint's config.json") from None


def _int(hf: dict, key: str, default=KeyError) -> int:
    v = hf[key] if default is KeyError else hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{key} is {v!r}, not an integer")
    return v


def _number(hf: dict, key: str, default) -> float:
    v = hf.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"{key} is {v!r}, not a number")
    return float(v)


def _refuse(hf: dict, key: str, ok, why: str) -> None:
    """A key whose value gemma-edge cannot honour is an error, never silently dropped."""
    if key in hf and hf[key] not in ok:
        raise UnsupportedModelError(f"config.json sets {key}={hf[key]!r}: {why}")


def _config_from_hf(hf: dict) -> GemmaConfig:
    if not isinstance(hf, dict):
        raise TypeError(f"expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type in ("gemma3", "gemma4") and "text_config" in hf:  # multimodal wrapper: its text decoder
        text = hf["text_config"]
        if not isinstance(text, dict):
            raise TypeError("text_config is not an object")
        hf = {**text, "model_type": model_type + "_text"}
        model_type = hf["model_type"]
    family = HF_MODEL_TYPES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"config.json has model_type {model_type!r}; gemma-edge converts {sorted(HF_MODEL_TYPES)} "
            f"({_FAMILIES}). Point it at a Gemma checkpoint")
    known = set(_HF_IGNORED) | _READ
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        warnings.warn(f"config.json keys not used by gemma-edge: {unknown}", stacklevel=2)
    n = _int(hf, "num_hidden_layers")
    if not 1 <= n <= MAX_LAYERS:
        raise UnsupportedModelError(f"config.json num_hidden_layers is {n!r}; a Gemma has 1 to {MAX_LAYERS} "
                                    "layers. Re-download the checkpoint's config.json")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise UnsupportedModelError(f"config.json activation {act!r} is not Gemma's GeGLU (gelu_pytorch_tanh)")
    _refuse(hf, "attention_bias", (False, None), "Gemma has no attention biases and gemma-edge writes none")
    bidirectional = hf.get("use_bidirectional_attention") or False
    if not isinstance(bidirectional, bool):
        raise TypeError(f"use_bidirectional_attention is {bidirectional!r}, not true or false")
    if bidirectional and family != 3:
        raise UnsupportedModelError(f"config.json sets use_bidirectional_attention for a Gemma {family}: gemma-edge "
                                    "reads bidirectional attention in Gemma 3 embedding models (EmbeddingGemma) only")
    _refuse(hf, "enable_moe_block", (False, None),
            "mixture-of-experts layers (Gemma 4 26B-A4B) are not supported; gemma-edge converts dense "
            f"{_GEMMA4_TEXT}")
    heads = _int(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or _int(hf, "hidden_size") // heads
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if not layer_types:
        if family == 1:
            layer_types = [FULL] * n
        elif family == 2:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        else:
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if family == 1:
        layer_types = [FULL] * n
    layer_types = list(layer_types)
    if family >= 4 and layer_types and layer_types[-1] != FULL:  # as transformers does, with its warning
        warnings.warn("config.json layer_types ends with a sliding layer; Gemma 4's last layer is always "
                      "global, so it is converted as one (as transformers runs it)", stacklevel=2)
        layer_types[-1] = FULL

    # RoPE: per layer type (transformers >= 5), or rope_theta / rope_local_base_freq / rope_scaling
    rope = hf.get("rope_parameters") or {}
    if FULL in rope or SLIDING in rope:
        full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    else:
        full = {**(hf.get("rope_scaling") or {}), **rope}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    rope_base = float(full.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_local = float(local.get("rope_theta", hf.get("rope_local_base_freq", rope_base)))
    factor, fraction = 1.0, 1.0
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type == "linear":
        factor = float(full.get("factor", 1.0))
    elif rope_type == "proportional":  # Gemma 4: the first fraction * head_dim / 2 pairs rotate
        factor = float(full.get("factor", 1.0))
        fraction = float(full.get("partial_rotary_factor", 1.0))
    elif rope_type not in ("default", None):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (default, linear, proportional)")
    if local.get("rope_type", "default") not in ("default", None) or "partial_rotary_factor" in local:
        raise UnsupportedModelError(f"sliding layers' RoPE {local} is not supported (default only)")
    if family == 1:
        rope_local = rope_base

    g = {}
    if family >= 4:
        g = _gemma4_fields(hf, n, layer_types, head_dim)
    elif any(hf.get(k) for k in _GEMMA4_ONLY):
        raise UnsupportedModelError(f"config.json of a Gemma {family} sets Gemma 4 fields "
                                    f"{sorted(k for k in _GEMMA4_ONLY if hf.get(k))}; its model_type is wrong")
    return GemmaConfig(
        family=family,
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=_int(hf, "hidden_size"),
        intermediate_size=_int(hf, "intermediate_size"),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", heads),
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        sliding_window=window if family >= 2 else None,
        rope_base=rope_base,
        rope_local_base=rope_local,
        rope_scaling_factor=factor,
        rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
        # Gemma 4 scales attention scores by 1 (its q/k norms set the scale)
        query_pre_attn_scalar=1.0 if family >= 4 else float(hf.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=_number(hf, "attn_logit_softcapping", None),
        final_softcap=_number(hf, "final_logit_softcapping", None),
        max_position=_int(hf, "max_position_embeddings", 8192),
        global_rope_fraction=fraction,
        bidirectional=bidirectional,
        **g,
    )


# GemmaConfig field -> the config.json key it comes from, for error messages
_HF_NAMES = {
    "max_position": "max_position_embeddings", "rope_base": "rope_theta (of global layers)",
    "rope_local_base": "rope_theta (of sliding layers) / rope_local_base_freq", "rms_norm_eps": "rms_norm_eps",
    "sliding_window": "sliding_window", "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
    "rope_scaling_factor": "rope_scaling factor", "global_rope_fraction": "partial_rotary_factor",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "num_layers": "num_hidden_layers",
    "global_head_dim": "global_head_dim", "global_kv_heads": "num_global_key_value_heads",
    "kv_shared_layers": "num_kv_shared_layers", "ple_dim": "hidden_size_per_layer_input",
    "ple_vocab": "vocab_size_per_layer_input",
}
_GEMMA4_ONLY = ("hidden_size_per_layer_input", "num_kv_shared_layers", "attention_k_eq_v", "use_double_wide_mlp",
                "global_head_dim", "num_global_key_value_heads", "per_layer_config")
_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation", "attention_bias",
    "use_bidirectional_attention", "_sliding_window_pattern", "sliding_window_pattern", "layer_types",
    "rope_parameters", "rope_theta", "rope_local_base_freq", "rope_scaling", "rms_norm_eps",
    "query_pre_attn_scalar", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping",
    "vocab_size_per_layer_input", "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
    *_GEMMA4_ONLY,
}


def _gemma4_fields(hf: dict, n: int, layer_types: list, head_dim: int) -> dict:
    """Gemma 4's fields: per-layer attention shapes, KV sharing, per-layer embeddings, k_eq_v,
    the double-wide MLP. Both config.json forms of the global layers' shapes are read: the hub's
    ``global_head_dim`` / ``num_global_key_value_heads``, and transformers' ``per_layer_config``."""
    k_eq_v = bool(hf.get("attention_k_eq_v") or False)
    global_head_dim = hf.get("global_head_dim")
    global_kv = hf.get("num_global_key_value_heads") if k_eq_v else None  # transformers reads it only then
    per_layer = hf.get("per_layer_config") or {}
    if not isinstance(per_layer, dict):
        raise TypeError("per_layer_config is not an object")
    for key, override in per_layer.items():
        i = int(key)
        if not 0 <= i < n or not isinstance(override, dict) or layer_types[i] != FULL:
            raise UnsupportedModelError(f"config.json per_layer_config overrides layer {key} ({override!r}); "
                                        "gemma-edge reads overrides of global layers' head_dim and "
                                        "num_key_value_heads only")
        extra = sorted(set(override) - {"head_dim", "num_key_value_heads"})
        if extra:
            raise UnsupportedModelError(f"config.json per_layer_config sets {extra} for layer {i}; not supported")
        for field, have in (("head_dim", "global_head_dim"), ("num_key_value_heads", "global_kv")):
            if field in override:
                value = override[field]
                current = global_head_dim if have == "global_head_dim" else global_kv
                if current is not None and current != value and any(str(j) in per_layer for j in range(i)):
                    raise UnsupportedModelError(f"config.json gives global layers different {field}s; not supported")
                if have == "global_head_dim":
                    global_head_dim = value
                else:
                    global_kv = value
    if global_head_dim is None and "per_layer_config" not in hf:
        global_head_dim = 512  # transformers' default when config.json names none
    ple_dim = hf.get("hidden_size_per_layer_input") or 0
    return dict(
        global_head_dim=global_head_dim if global_head_dim != head_dim else None,
        global_kv_heads=global_kv,
        kv_shared_layers=_int(hf, "num_kv_shared_layers", 0),
        ple_dim=ple_dim,
        ple_vocab=_int(hf, "vocab_size_per_layer_input", _int(hf, "vocab_size")) if ple_dim else 0,
        k_eq_v=k_eq_v,
        double_wide_mlp=bool(hf.get("use_double_wide_mlp") or False),
        v_norm=True,
        layer_scale=True,
    )


# --------------------------------------------------------------------------------------------
# everything else a converter needs
# --------------------------------------------------------------------------------------------

def _json(path: Path, what: str) -> dict | None:
    """A JSON file beside the weights, or None if it is absent; a broken one is a SourceError."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"{path}: not valid JSON ({e}); re-download the checkpoint's {what}") from None


def describe(path: Path, ckpt: "SafetensorsCheckpoint") -> Described:
    root = path if path.is_dir() else path.parent
    cfg_path = root / "config.json"
    hf = _json(cfg_path, "config.json")
    if hf is None:
        raise SourceError(f"{root}: no config.json next to the safetensors; a Hugging Face "
                          "checkpoint directory needs config.json, *.safetensors and tokenizer.model")
    cfg = config_from_hf(hf)
    tok_path = root / "tokenizer.model"
    if tok_path.exists():
        tokenizer_model = tok_path.read_bytes()
    elif (root / "tokenizer.json").exists():  # Gemma 4 ships only this: rebuilt as SentencePiece
        from .hf_tokenizer import sentencepiece_from_tokenizer_json

        tok_path = root / "tokenizer.json"
        tokenizer_model = sentencepiece_from_tokenizer_json(tok_path)
    else:
        raise TokenizerError(
            f"{root}: no tokenizer.model or tokenizer.json. gemma-edge embeds the tokenizer in the output "
            "file; copy the original checkpoint's tokenizer files into this directory")
    files = [cfg_path, tok_path, *ckpt.files()]
    declared = [hf.get("eos_token_id")]
    try:  # instruction-tuned checkpoints list <end_of_turn> here, e.g. [1, 106]
        gen = _json(root / "generation_config.json", "generation_config.json")
    except SourceError:
        gen = None
    if isinstance(gen, dict):
        declared.insert(0, gen.get("eos_token_id"))
        files.append(root / "generation_config.json")
    template = None
    try:
        tc = _json(root / "tokenizer_config.json", "tokenizer_config.json")
    except SourceError:
        tc = None
    if isinstance(tc, dict):
        files.append(root / "tokenizer_config.json")
        template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
    if (root / "chat_template.jinja").is_file():  # transformers >= 4.50 saves the template on its own
        files.append(root / "chat_template.jinja")
        try:
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{root / 'chat_template.jinja'}: cannot be read ({e})") from None
    layout, embedding, extra = st_layout.read(root), None, None
    if layout is not None:
        cfg, embedding, extra = _embedding_head(cfg, layout, ckpt, root)
        files += [*layout.files, *(root / d.path / "model.safetensors" for d in layout.dense)]
    elif cfg.bidirectional:
        raise UnsupportedModelError(
            f"{cfg_path} sets use_bidirectional_attention (an embedding model) but {root} has no "
            f"{st_layout.MODULES}: gemma-edge needs the model's sentence-transformers files beside it "
            "(modules.json, 1_Pooling/, 2_Dense/, 3_Dense/, config_sentence_transformers.json); download them too")
    infos = ckpt.tensors()
    prefix = decoder_prefix(infos)
    skipped = {n for n in infos if not n.startswith(prefix) and n not in IGNORABLE} if prefix != PREFIXES[0] else set()
    notes = (f"{path}: a multimodal checkpoint; its text decoder was converted and {len(skipped)} tensors of "
             "its vision/audio towers were skipped",) if skipped else ()
    return Described(
        config=cfg, tokenizer_model=tokenizer_model,
        names=build_map_for(cfg, infos, skipped, extra),
        norm_offset=cfg.hf_norm_offset, chat_template=template, declared_stop_ids=tuple(ids(*declared)),
        files=tuple(files), notes=notes, embedding=embedding,
        add_eos=layout is not None and _adds_eos(tc, root))


def _embedding_head(cfg: GemmaConfig, layout: "st_layout.Layout", ckpt: "SafetensorsCheckpoint", root: Path):
    """(config with the Dense layers' sizes, the file's EmbeddingMeta, the Dense weights' name map)
    of a sentence-transformers checkpoint; its Dense weights are read through ``ckpt``."""
    from ..runtime import contract, modelfile

    if layout.dense and layout.dense[0].in_features != cfg.hidden_size:
        raise SourceError(f"{root / layout.dense[0].path}: takes {layout.dense[0].in_features} features but the "
                          f"model's hidden size is {cfg.hidden_size}; the Dense layers come from another model")
    for d in layout.dense:
        ckpt.attach(root / d.path / "model.safetensors", d.path + "/")
    cfg = dataclasses.replace(cfg, dense_dims=tuple(d.out_features for d in layout.dense))
    embedding = modelfile.EmbeddingMeta(
        lengths=(), dim=cfg.embedding_dim, normalize=layout.normalize,
        matryoshka_dims=st_layout.matryoshka_dims(cfg.embedding_dim), prompts=layout.prompts,
        default_task=layout.default_task, max_tokens=layout.max_seq_length)
    return cfg, embedding, {contract.dense_name(k): (d.tensor, None) for k, d in enumerate(layout.dense)}


def _adds_eos(tokenizer_config: dict | None, root: Path) -> bool:
    """Does the tokenizer end a text with <eos> (EmbeddingGemma's does)? ``add_eos_token`` of
    tokenizer_config.json, else whether tokenizer.json's post-processor appends the eos token
    (transformers >= 5 follows tokenizer.json)."""
    tc = tokenizer_config if isinstance(tokenizer_config, dict) else {}
    if isinstance(tc.get("add_eos_token"), bool):
        return tc["add_eos_token"]
    doc = _json(root / "tokenizer.json", "tokenizer.json")
    post = doc.get("post_processor") if isinstance(doc, dict) else None
    steps = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    eos = tc.get("eos_token", "<eos>")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    for step in steps:
        single = step.get("single") if isinstance(step, dict) and step.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and single:
            last = single[-1].get("SpecialToken") if isinstance(single[-1], dict) else None
            return isinstance(last, dict) and last.get("id") == eos
    return False
