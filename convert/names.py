"""Weight-name maps as data: each checkpoint format has a table ``canonical kind <- source
name (+ transform)`` (``hf_checkpoint.TENSORS``, ``gguf_checkpoint.TENSORS``); this module
joins a table with the canonical weights a config has (``contract.weight_shapes``).

After mapping, any canonical tensor without a source, or any source tensor left over, is an
error that lists them (``WeightMapError``); nothing is silently dropped.
"""

from __future__ import annotations

import numpy as np

from ..runtime import contract
from ..runtime.config import GemmaConfig
from ..runtime.errors import WeightMapError

# transforms
NORM = "norm"  # a Gemma RMSNorm weight: the file stores its multiplier, see norm_scale()
PLE_COLUMNS = "ple_columns"  # layer i's columns [i * P, (i + 1) * P) of the packed per-layer embedding table

Table = dict[str, tuple[str, str | None]]  # canonical kind -> (source pattern with "{i}", transform)


def norm_scale(w: np.ndarray, offset: float) -> np.ndarray:
    """The one place Gemma's (1 + w) norm shift lives: the multiplier a file stores for a
    checkpoint's RMSNorm weight ``w`` is ``offset + w``.

    Hugging Face and gemma_pytorch store Gemma 1-3's ``w`` and apply ``x * (1 + w)``
    (offset 1); Gemma 4 applies ``x * w`` (offset 0, ``GemmaConfig.hf_norm_offset``);
    llama.cpp's converter bakes the +1 into GGUF files (offset 0 for every family).
    """
    w = np.asarray(w, dtype=np.float32)
    return w + np.float32(offset) if offset else w


def source_names(table: Table, cfg: GemmaConfig, prefix: str = "", extra=None) -> dict[str, tuple[str, str | None]]:
    """canonical weight -> (source name, transform) for every weight ``cfg`` has. A kind the
    table lacks is a WeightMapError naming it (the format cannot hold such a model).
    ``extra``: canonical -> (source name, transform) of weights outside the table, taken as
    they are (a sentence-transformers checkpoint's Dense layers, named by its modules.json)."""
    out = {}
    for canon in contract.weight_shapes(cfg):
        if extra and canon in extra:
            out[canon] = extra[canon]
            continue
        layer, kind = contract.parse_weight_name(canon)
        if kind not in table:
            raise WeightMapError(f"this checkpoint format has no tensor for {kind!r} weights, which this "
                                 f"Gemma {cfg.family} config needs")
        src, transform = table[kind]
        out[canon] = (prefix + src.format(i=layer), transform)
    return out


def build_map(table: Table, cfg: GemmaConfig, names, ignorable=frozenset(), prefix: str = "",
              skipped=frozenset(), extra=None) -> dict[str, tuple[str, str | None]]:
    """canonical -> (source name, transform). Raises WeightMapError on missing/left-over tensors.

    ``ignorable`` names may be present and are not used (a tied LM head); ``skipped`` names
    are left out on purpose (a multimodal checkpoint's towers: the caller says so); ``extra``
    as in ``source_names``."""
    mapping = source_names(table, cfg, prefix, extra)
    names = set(names)
    missing = sorted(src for src, _ in mapping.values() if src not in names)
    used = {src for src, _ in mapping.values()}
    leftover = sorted(n for n in names - used - set(skipped) if n not in ignorable)
    if missing or leftover:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing: {_short(missing)}")
        if leftover:
            parts.append(f"{len(leftover)} tensor(s) not used by a Gemma {cfg.family} model of "
                         f"{cfg.num_layers} layers: {_short(leftover)}")
        raise WeightMapError(
            "the checkpoint does not match its config: " + "; ".join(parts) +
            ". The checkpoint is incomplete or belongs to another model; re-download or re-export it")
    return mapping


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
