"""Weight-name maps as data: one table per source format, ``canonical <- source (+ transform)``.

Canonical names are those of ``graph.weight_shapes`` (``embed``, ``l3_q``, ...). After
mapping, any canonical tensor without a source, or any source tensor left over, is an
error that lists them (``WeightMapError``); nothing is silently dropped.
"""

from __future__ import annotations

import numpy as np

from ..runtime.config import GemmaConfig
from ..runtime.errors import WeightMapError

# transforms
NORM = "norm"  # a Gemma RMSNorm weight: the stored scale must be (1 + w), see norm_scale()


def norm_scale(w: np.ndarray, shift_baked_in: bool) -> np.ndarray:
    """The one place Gemma's (1 + w) norm shift lives.

    Hugging Face and gemma_pytorch store ``w`` and apply ``x * (1 + w)``; llama.cpp's
    converter bakes the +1 into GGUF files (``shift_baked_in=True``). Converted files
    store ``1 + w`` so the graph multiplies by the scale directly.
    """
    w = np.asarray(w, dtype=np.float32)
    return w if shift_baked_in else w + np.float32(1.0)


# (canonical, source, transform); "{i}" is the layer index. Family-specific rows are
# keyed by the families they apply to.
_HF_COMMON = [
    ("embed", "model.embed_tokens.weight", None),
    ("final_norm", "model.norm.weight", NORM),
    ("l{i}_attn_norm", "model.layers.{i}.input_layernorm.weight", NORM),
    ("l{i}_q", "model.layers.{i}.self_attn.q_proj.weight", None),
    ("l{i}_k", "model.layers.{i}.self_attn.k_proj.weight", None),
    ("l{i}_v", "model.layers.{i}.self_attn.v_proj.weight", None),
    ("l{i}_o", "model.layers.{i}.self_attn.o_proj.weight", None),
    ("l{i}_gate", "model.layers.{i}.mlp.gate_proj.weight", None),
    ("l{i}_up", "model.layers.{i}.mlp.up_proj.weight", None),
    ("l{i}_down", "model.layers.{i}.mlp.down_proj.weight", None),
]
_HF_BY_FAMILY = {
    # Naming trap: `post_attention_layernorm` is the pre-FFN norm in Gemma 1 ...
    1: [("l{i}_ffn_norm", "model.layers.{i}.post_attention_layernorm.weight", NORM)],
    # ... but the post-attention norm in Gemma 2 and 3.
    2: [
        ("l{i}_post_attn_norm", "model.layers.{i}.post_attention_layernorm.weight", NORM),
        ("l{i}_ffn_norm", "model.layers.{i}.pre_feedforward_layernorm.weight", NORM),
        ("l{i}_post_ffn_norm", "model.layers.{i}.post_feedforward_layernorm.weight", NORM),
    ],
}
_HF_BY_FAMILY[3] = _HF_BY_FAMILY[2] + [
    ("l{i}_q_norm", "model.layers.{i}.self_attn.q_norm.weight", NORM),
    ("l{i}_k_norm", "model.layers.{i}.self_attn.k_norm.weight", NORM),
]
# Source tensors that may be present and are deliberately not used.
_HF_IGNORABLE = {"lm_head.weight"}  # Gemma ties the LM head to the embedding

_GGUF_COMMON = [
    ("embed", "token_embd.weight", None),
    ("final_norm", "output_norm.weight", NORM),
    ("l{i}_attn_norm", "blk.{i}.attn_norm.weight", NORM),
    ("l{i}_q", "blk.{i}.attn_q.weight", None),
    ("l{i}_k", "blk.{i}.attn_k.weight", None),
    ("l{i}_v", "blk.{i}.attn_v.weight", None),
    ("l{i}_o", "blk.{i}.attn_output.weight", None),
    ("l{i}_ffn_norm", "blk.{i}.ffn_norm.weight", NORM),
    ("l{i}_gate", "blk.{i}.ffn_gate.weight", None),
    ("l{i}_up", "blk.{i}.ffn_up.weight", None),
    ("l{i}_down", "blk.{i}.ffn_down.weight", None),
]
_GGUF_BY_FAMILY = {
    1: [],
    2: [
        ("l{i}_post_attn_norm", "blk.{i}.post_attention_norm.weight", NORM),
        ("l{i}_post_ffn_norm", "blk.{i}.post_ffw_norm.weight", NORM),
    ],
}
_GGUF_BY_FAMILY[3] = _GGUF_BY_FAMILY[2] + [
    ("l{i}_q_norm", "blk.{i}.attn_q_norm.weight", NORM),
    ("l{i}_k_norm", "blk.{i}.attn_k_norm.weight", NORM),
]
_GGUF_IGNORABLE = {"output.weight", "rope_freqs.weight"}

FORMATS = {
    # format: (common rows, per-family rows, ignorable names, norm shift already baked in)
    "safetensors": (_HF_COMMON, _HF_BY_FAMILY, _HF_IGNORABLE, False),
    "gguf": (_GGUF_COMMON, _GGUF_BY_FAMILY, _GGUF_IGNORABLE, True),
}


def build_map(fmt: str, cfg: GemmaConfig, source_names) -> dict[str, tuple[str, str | None]]:
    """canonical -> (source name, transform). Raises WeightMapError on missing/left-over tensors."""
    common, by_family, ignorable, _ = FORMATS[fmt]
    rows = common + by_family[cfg.family]
    mapping = {}
    for canon, src, transform in rows:
        if "{i}" in canon:
            for i in range(cfg.num_layers):
                mapping[canon.format(i=i)] = (src.format(i=i), transform)
        else:
            mapping[canon] = (src, transform)
    source_names = set(source_names)
    missing = sorted(src for src, _ in mapping.values() if src not in source_names)
    used = {src for src, _ in mapping.values()}
    leftover = sorted(n for n in source_names - used if n not in ignorable)
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


def shift_baked_in(fmt: str) -> bool:
    return FORMATS[fmt][3]


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
