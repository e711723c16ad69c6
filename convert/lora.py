"""Merge a Hugging Face PEFT LoRA adapter into a checkpoint's weights while they stream.

    base = open_checkpoint("gemma-3-270m/")
    with open_with_lora(base, "my-adapter/") as ckpt:     # adapter_config.json + adapter_model.safetensors
        w = ckpt.read("model.layers.0.self_attn.q_proj.weight", rows=(0, 256))  # merged rows, float32

LoRA adapts a linear weight ``W [out, in]`` to ``W + s * B @ A`` with ``A [r, in]``,
``B [out, r]`` and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``;
``rank_pattern`` / ``alpha_pattern`` override r and alpha per module, matched as peft does).
Rows ``[r0, r1)`` of the merged weight are ``W[r0:r1] + s * B[r0:r1] @ A``: one
``[r1 - r0, in]`` product per block, so the full delta of a big matrix never exists and
``LoraCheckpoint`` streams exactly like the checkpoint it wraps.  The sum is float32 (peft
merges in the base dtype, bf16 for most checkpoints; float32 stays closer to the unmerged
model).  Tensors the adapter does not touch pass through unchanged.

The adapter is read with our own safetensors parser (no pickle, no torch).  Everything is
checked when the adapter is opened, before any weight is written: the files, the config,
that every adapted module exists in the base (HF names with or without Gemma 3's
``language_model`` prefixes, or the GGUF name of the same weight) and every shape.

Refused, with a typed error saying why and what to do (``UnsupportedModelError``):

* DoRA (``use_dora``): the merged weight is rescaled column-wise by norms over *all* rows,
  which a row-streaming merge cannot compute; and the other LoRA variants peft knows
  (aLoRA, VeLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA, QA-LoRA), which do not merge as plain LoRA.
* LoRA on ``embed_tokens`` or ``lm_head``: Gemma ties the output head to the embedding and
  the converted file holds one shared matrix, so merging either would change both ends,
  which is not the model the adapter was trained as.
* Full weights in the adapter (``modules_to_save``, ``bias="all"``/``"lora_only"`` biases,
  ``lora_bias``, trainable tokens, saved embedding layers) and ``layer_replication``.
* Adapters whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ,
  LoRA-GA) unless saved with ``path_initial_model_for_weight_conversion``.
* Any ``adapter_config.json`` key this module does not know, when it is set.

``fan_in_fan_out`` is handled as peft handles it: every Gemma target is an ``nn.Linear``,
for which peft forces the flag to False (and warns), so A and B are stored in the Linear
layout either way; the shape checks catch anything else.  ``base_model_name_or_path`` is
not enforced: a local base is usually named differently from the hub id the adapter records.
Over a quantized GGUF base the delta is added to the dequantized rows (as llama.cpp's
``--lora`` does), so the result is only as close to the trained model as that base is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import SourceError, UnsupportedModelError, WeightMapError
from ..runtime.fileio import sha256_files
from .checkpoint import Checkpoint, TensorInfo
from .hf_checkpoint import SafetensorsCheckpoint

__all__ = ["LoraCheckpoint", "LoraModule", "open_with_lora"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAME = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."  # peft's LoraModel wraps the transformers model as base_model.model
# Where a decoder's modules live: Gemma 1/2/3 text ("model."), Gemma 3 multimodal in
# transformers >= 4.52 ("model.language_model.") and before ("language_model.model.").
_MODEL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_READABLE = ("F32", "F16", "BF16")
_MAX_LISTED = 8

_TIED = ("Gemma ties its output head to the token embedding and the converted file holds one shared "
         "matrix, so merging a LoRA on {what} would change both the embedding and the output head, which "
         "is not the model the adapter was trained as")
_MERGE_WITH_PEFT = ("merge it with peft instead (PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()"
                    ".save_pretrained(DIR), copy tokenizer.model into DIR) and convert DIR")

# adapter_config.json keys (peft 0.21 LoraConfig and PeftConfig) that do not change how the saved
# A and B merge: bookkeeping, which modules got LoRA (the weights file says that), training-only
# settings, and init options whose result is already in the saved weights.
_IGNORED_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "bias", "modules_to_save", "init_lora_weights", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "lora_dropout", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config",
    "ensure_weight_tying", "target_modules_to_tie",
})
# Keys that select something a plain merge cannot reproduce, when set: key -> why.
_REFUSED_KEYS = {
    "use_dora": "DoRA rescales every column of the merged weight by its norm over all rows, which a "
                "row-streaming merge cannot compute",
    "alora_invocation_tokens": "an activated LoRA (aLoRA) only applies after its invocation tokens; "
                               "merged into the weights it would apply everywhere",
    "velora_config": "VeLoRA is a LoRA variant that does not merge as W + s * B @ A",
    "monteclora_config": "MonteCLoRA is a LoRA variant that does not merge as W + s * B @ A",
    "use_bdlora": "BD-LoRA is a LoRA variant that does not merge as W + s * B @ A",
    "arrow_config": "Arrow routes between several LoRA experts per token; it has no single merged weight",
    "kasa_config": "KaSA is a LoRA variant that does not merge as W + s * B @ A",
    "use_qalora": "QA-LoRA is a LoRA variant for quantized bases that does not merge as W + s * B @ A",
    "lora_bias": "lora_bias adds a bias to lora_B, and Gemma's linear layers have no bias to merge it into",
    "layer_replication": "layer_replication changes the number of layers of the base model",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens replace rows of the (tied) embedding",
}
# init_lora_weights values whose initialisation rewrote the base weights (prefixes, as peft matches them).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_REFUSED_TENSORS = [
    # (pattern, what it is, why it cannot be merged)
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "a DoRA magnitude vector",
     _REFUSED_KEYS["use_dora"]),
    (re.compile(r"\.lora_embedding_[AB](\.[^.]+)?$"), "an embedding LoRA", _TIED.format(what="embed_tokens")),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "a lora_bias", _REFUSED_KEYS["lora_bias"]),
    (re.compile(r"\.token_adapter\."), "trainable tokens", _REFUSED_KEYS["trainable_token_indices"]),
]


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ``target`` (a base tensor) gets ``scale * B @ A``."""

    module: str  # the module path as the adapter names it, e.g. "model.layers.0.self_attn.q_proj"
    target: str  # the base checkpoint's tensor, e.g. "model.layers.0.self_attn.q_proj.weight"
    a_key: str  # lora_A in adapter_model.safetensors: [rank, in]
    b_key: str  # lora_B: [out, rank]
    rank: int
    alpha: float
    scale: float


def _names(items) -> str:
    items = sorted(items)
    more = len(items) - _MAX_LISTED
    return ", ".join(repr(n) for n in items[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def _tail(module: str) -> str:
    """A module path without the prefix saying where the decoder lives: "layers.0.self_attn.q_proj"."""
    for p in _MODEL_PREFIXES:
        if module.startswith(p):
            return module[len(p):]
    return module


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern matching the end of the module path, after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _gguf_tails() -> list[tuple[re.Pattern[str], str]]:
    """(HF module tail regex, GGUF tensor name pattern) for the linear weights, joined on the
    canonical kinds of the two formats' name tables, so a GGUF base is addressed through the
    same tables the converter uses."""
    from . import gguf_checkpoint, hf_checkpoint

    out = []
    for kind, (hf, transform) in hf_checkpoint.TENSORS.items():
        gguf_name, gguf_transform = gguf_checkpoint.TENSORS.get(kind, (None, None))
        if transform is None and gguf_transform is None and gguf_name and hf.endswith(".weight"):
            tail = _tail(hf[: -len(".weight")])
            out.append((re.compile(re.escape(tail).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"), gguf_name))
    return out


class LoraCheckpoint:
    """A checkpoint whose adapted weights read as base + LoRA, row block by row block.

    Implements the ``Checkpoint`` protocol over ``base``; ``close()`` closes the base too.
    ``modules`` lists every adapted weight with its rank and scale.
    """

    def __init__(self, base: Checkpoint, adapter_dir: str | os.PathLike[str]):
        self.base = base
        self.path = base.path
        self.adapter_path, config_path, weights_path = self._locate(Path(adapter_dir))
        self.config = self._read_config(config_path)
        self._check_config(config_path)
        self._adapter = SafetensorsCheckpoint(weights_path)
        self._a_cache: tuple[str, np.ndarray] | None = None
        try:
            self.modules = self._plan(weights_path)
        except BaseException:
            self._adapter.close()
            raise
        self._by_target = {m.target: m for m in self.modules}

    # ----------------------------------------------------------------------------------------
    # opening and checking

    @staticmethod
    def _locate(p: Path) -> tuple[Path, Path, Path]:
        what = (f"Pass the directory a peft model's save_pretrained() wrote, holding {CONFIG_NAME} "
                f"and {WEIGHTS_NAME}")
        if not p.exists():
            raise SourceError(f"{p}: no such LoRA adapter directory. {what}.")
        if p.is_file():
            if p.name not in (CONFIG_NAME, WEIGHTS_NAME):
                raise SourceError(f"{p}: a LoRA adapter is a directory, not a single file. {what}.")
            p = p.parent
        config, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not config.is_file():
            nested = sorted(c.name for c in p.iterdir() if (c / CONFIG_NAME).is_file())
            hint = (f" It holds adapter directories {_names(nested)} (peft saves each named adapter in its own "
                    "folder); pass one of those." if nested else f" {what}.")
            raise SourceError(f"{p}: no {CONFIG_NAME}, so this is not a peft LoRA adapter.{hint}")
        if not weights.is_file():
            if (p / _PICKLE_NAME).is_file():
                raise SourceError(
                    f"{p}: the adapter weights are in {_PICKLE_NAME}, a pickle, which gemma-edge does not load "
                    f"(unpickling can run code). Re-save them as {WEIGHTS_NAME}: load the adapter with peft "
                    "(PeftModel.from_pretrained(base, DIR)) and call save_pretrained(DIR) (safetensors is the "
                    "default).")
            raise SourceError(f"{p}: has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete. "
                              "Copy the weights file from where the adapter was saved.")
        return p, config, weights

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise SourceError(f"{path}: cannot read it ({e.strerror or e}). Check its permissions.") from e
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SourceError(f"{path}: not valid JSON ({e}); re-save the adapter with save_pretrained()") from None
        if not isinstance(cfg, dict):
            raise SourceError(f"{path}: holds a JSON {type(cfg).__name__}, not an object of settings; "
                              "re-save the adapter with save_pretrained()")
        return cfg

    def _check_config(self, path: Path) -> None:
        cfg = self.config
        peft_type = cfg.get("peft_type")
        if not isinstance(peft_type, str):
            raise SourceError(f"{path}: has no 'peft_type'; it is not a peft adapter config. Re-save the "
                              "adapter with peft's save_pretrained()")
        if peft_type.upper() != "LORA":
            raise UnsupportedModelError(
                f"{path}: the adapter is peft_type {peft_type!r}; gemma-edge merges LoRA adapters only, so "
                f"{_MERGE_WITH_PEFT}")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise SourceError(f"{path}: 'r' is {r!r}, not a positive integer rank; the config is corrupt")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise SourceError(f"{path}: 'lora_alpha' is {alpha!r}, not a number; the config is corrupt")
        for key in ("rank_pattern", "alpha_pattern"):
            pat = cfg.get(key) or {}
            if not isinstance(pat, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in pat.values()):
                raise SourceError(f"{path}: {key!r} is {pat!r}, not an object of module pattern -> number; "
                                  "the config is corrupt")
            for pattern in pat:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise SourceError(f"{path}: {key} pattern {pattern!r} is not a valid regular expression "
                                      f"({e}); the config is corrupt") from None

        for key, why in _REFUSED_KEYS.items():
            if cfg.get(key):
                raise UnsupportedModelError(
                    f"{path}: {key} is {cfg[key]!r}: {why}. gemma-edge merges plain LoRA only; retrain without "
                    f"{key}, or {_MERGE_WITH_PEFT}")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise UnsupportedModelError(
                f"{path}: init_lora_weights is {init!r}, an initialisation that rewrote the base weights, so "
                "this adapter does not apply to the original checkpoint. Save it again with peft's "
                "save_pretrained(DIR, path_initial_model_for_weight_conversion=INIT_DIR), which turns it "
                "into a plain LoRA over the original weights, and pass DIR")
        unknown = {k: v for k, v in cfg.items()
                   if k not in _IGNORED_KEYS and k not in _REFUSED_KEYS and v not in (None, False, 0, "", [], {})}
        if unknown:
            raise UnsupportedModelError(
                f"{path}: setting(s) {_names(f'{k}={v!r}' for k, v in unknown.items())} are unknown to "
                f"gemma-edge (the adapter was saved by peft {cfg.get('peft_version', '(version unknown)')}) "
                "and may change how the adapter merges. If they do not (see the peft docs), delete them "
                f"from {CONFIG_NAME}; otherwise {_MERGE_WITH_PEFT}")

    def _plan(self, weights_path: Path) -> list[LoraModule]:
        cfg = self.config
        infos = self._adapter.tensors()
        pairs: dict[str, dict[str, str]] = {}
        adapters, full = set(), []
        for key in infos:
            short = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = _LORA_KEY.match(short)
            if m:
                pairs.setdefault(m["module"], {})[m["which"]] = key
                adapters.add(m["adapter"])
                continue
            for pattern, what, why in _REFUSED_TENSORS:
                if pattern.search(short):
                    raise UnsupportedModelError(
                        f"{weights_path}: tensor {key!r} is {what}: {why}. gemma-edge merges plain LoRA on "
                        f"linear layers only; retrain without it, or {_MERGE_WITH_PEFT}")
            full.append(key)
        tied = sorted(mod for mod in pairs if _tail(mod).split(".")[-1] in ("lm_head", "embed_tokens"))
        if tied:
            raise UnsupportedModelError(
                f"{weights_path}: the adapter has LoRA on {_names(tied)}: {_TIED.format(what='lm_head')}. "
                f"Retrain without lm_head/embed_tokens in target_modules, or {_MERGE_WITH_PEFT}")
        if full:
            bias = cfg.get("bias", "none")
            if bias != "none" and any(k.endswith(".bias") for k in full):
                why = (f"bias={bias!r} trained biases ({_names(k for k in full if k.endswith('.bias'))}), "
                       "and Gemma's linear layers have no bias to merge them into; retrain with bias='none'")
            else:
                source = ("modules_to_save " + repr(cfg["modules_to_save"]) if cfg.get("modules_to_save")
                          else "modules_to_save or save_embedding_layers")
                why = (f"they are whole replacement weights ({source}), not LoRA; "
                       f"gemma-edge merges LoRA only, so {_MERGE_WITH_PEFT}")
            raise UnsupportedModelError(f"{weights_path}: holds {len(full)} full weight tensor(s) "
                                        f"{_names(full)}: {why}")
        if not pairs:
            raise SourceError(f"{weights_path}: holds no LoRA weights (no '*.lora_A.weight' / '*.lora_B.weight' "
                              f"among its {len(infos)} tensors); it is not a LoRA adapter or is empty")
        if len(adapters) > 1:
            raise SourceError(f"{weights_path}: holds weights of several adapters "
                              f"({_names(a or '(unnamed)' for a in adapters)}); save each adapter on its own "
                              "with save_pretrained() and pass one")
        unpaired = sorted(f"{mod} (no lora_{'B' if 'A' in ab else 'A'})" for mod, ab in pairs.items() if len(ab) != 2)
        if unpaired:
            raise SourceError(f"{weights_path}: LoRA weights without their partner: {_names(unpaired)}; "
                              "the file is incomplete. Re-save the adapter with save_pretrained()")

        base_infos = self.base.tensors()
        resolve = self._resolver(base_infos)
        targets = {mod: resolve(mod) for mod in pairs}
        absent = sorted(mod for mod, t in targets.items() if t is None)
        if absent:
            raise WeightMapError(
                f"{weights_path}: the adapter adapts {len(absent)} module(s) the base checkpoint {self.base.path} "
                f"does not have: {_names(absent)}. The adapter was trained on another model (for a Gemma 3 "
                "adapter trained on the multimodal model, these are the vision tower's modules); convert the "
                "base it was trained on, or retrain with target_modules limited to the language model")
        twice: dict[str, list[str]] = {}
        for mod, t in targets.items():
            twice.setdefault(t, []).append(mod)
        clash = {t: mods for t, mods in twice.items() if len(mods) > 1}
        if clash:
            t, mods = next(iter(clash.items()))
            raise SourceError(f"{weights_path}: modules {_names(mods)} all adapt base tensor {t!r}; the adapter "
                              "mixes two naming schemes. Re-save it from one peft model")

        modules, bad = [], []
        use_rslora = bool(cfg.get("use_rslora"))
        for mod in sorted(pairs, key=lambda m: targets[m]):
            a_key, b_key, target = pairs[mod]["A"], pairs[mod]["B"], targets[mod]
            a, b, w = infos[a_key], infos[b_key], base_infos[target]
            for info in (a, b):
                if info.dtype not in _READABLE:
                    raise SourceError(f"{weights_path}: tensor {info.name!r} has dtype {info.dtype}; gemma-edge "
                                      "reads F32, F16 and BF16 adapters. Re-save the adapter in one of those")
            rank = _pattern_value(cfg.get("rank_pattern") or {}, mod, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"])
            if len(w.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 \
                    or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
                bad.append(f"{a_key} is {a.shape} and {b_key} is {b.shape}, but their product must match "
                           f"base {target} of shape {w.shape} (A [r, {w.shape[-1]}], B [{w.shape[0]}, r])")
                continue
            if a.shape[0] != rank:
                raise SourceError(
                    f"{weights_path}: {a_key} has rank {a.shape[0]} but {CONFIG_NAME} gives module {mod!r} "
                    f"r={rank} (r, rank_pattern); the config and the weights come from different adapters. "
                    "Re-save the adapter with save_pretrained()")
            scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            modules.append(LoraModule(mod, target, a_key, b_key, rank, float(alpha), float(scale)))
        if bad:
            raise WeightMapError(f"{weights_path}: {len(bad)} LoRA shape(s) disagree with the base checkpoint "
                                 f"{self.base.path}: " + "; ".join(bad[:4]) + ("; ..." if len(bad) > 4 else "") +
                                 ". The adapter was trained on a model of another size; convert the base it "
                                 "was trained on")
        return modules

    @staticmethod
    def _resolver(base_infos: dict[str, TensorInfo]):
        """module path -> base tensor name (or None): the exact HF name, the same decoder module under
        another prefix (Gemma 3's language_model), or the GGUF name of the same weight."""
        by_tail: dict[str, str | None] = {}
        for name in base_infos:
            if name.endswith(".weight"):
                t = _tail(name[: -len(".weight")])
                by_tail[t] = None if t in by_tail else name  # None: ambiguous, never guessed
        gguf = _gguf_tails()

        def resolve(module: str) -> str | None:
            if module + ".weight" in base_infos:
                return module + ".weight"
            tail = _tail(module)
            if by_tail.get(tail):
                return by_tail[tail]
            for pattern, gguf_name in gguf:
                m = pattern.match(tail)
                if m and gguf_name.format(i=m.groupdict().get("i")) in base_infos:
                    return gguf_name.format(i=m.groupdict().get("i"))
            return None

        return resolve

    # ----------------------------------------------------------------------------------------
    # the Checkpoint protocol

    def tensors(self) -> dict[str, TensorInfo]:
        """The base's tensors; adapted ones read as float32, so their dtype is ``"F32"``."""
        out = dict(self.base.tensors())
        for m in self.modules:
            out[m.target] = dataclasses.replace(out[m.target], dtype="F32")
        return out

    def metadata(self) -> dict[str, object]:
        """The base's metadata (GGUF key/values, safetensors ``__metadata__``), unchanged."""
        return self.base.metadata()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``name`` as float32, with the LoRA delta of those rows added."""
        w = self.base.read(name, rows)  # validates rows
        m = self._by_target.get(name)
        if m is None:
            return w
        r0, r1 = (int(rows[0]), int(rows[1])) if rows is not None else (0, w.shape[0])
        if r0 == r1:
            return w
        b = self._adapter.read(m.b_key, rows=(r0, r1))  # [r1 - r0, rank]
        delta = b @ self._lora_a(m)  # [r1 - r0, in]
        delta *= np.float32(m.scale)
        if not w.flags.writeable:
            w = w.copy()
        w += delta
        return w

    def _lora_a(self, m: LoraModule) -> np.ndarray:
        """A [rank, in]: small, read once per module while its row blocks stream."""
        if self._a_cache is None or self._a_cache[0] != m.a_key:
            self._a_cache = (m.a_key, self._adapter.read(m.a_key))
        return self._a_cache[1]

    def close(self) -> None:
        self._a_cache = None
        self._adapter.close()
        self.base.close()

    # ----------------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The adapter's two files (the base's are the caller's)."""
        return [self.adapter_path / CONFIG_NAME, self.adapter_path / WEIGHTS_NAME]

    def sha256(self) -> str:
        """Of the adapter's two files, for the converted file's provenance."""
        return sha256_files(self.files())

    def describe(self) -> dict[str, object]:
        """What was merged, for the converted file's metadata."""
        cfg = self.config
        return {"name": self.adapter_path.name, "sha256": self.sha256(), "peft_type": "LORA",
                "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
                "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
                "modules": len(self.modules)}

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.base!r} + {str(self.adapter_path)!r}, {len(self.modules)} modules)"


def open_with_lora(base_ckpt: Checkpoint, adapter_dir: str | os.PathLike[str]) -> LoraCheckpoint:
    """``base_ckpt`` with the peft LoRA adapter in ``adapter_dir`` merged on read.

    The result owns ``base_ckpt`` (closing it closes both).  If the adapter is refused, the
    error is raised and ``base_ckpt`` is left open for the caller to close.
    """
    return LoraCheckpoint(base_ckpt, adapter_dir)
