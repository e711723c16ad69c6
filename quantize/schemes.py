"""Quantization schemes as data. CLI choices, file metadata and docs derive from this table.

Every scheme is *dynamic range*: weights are stored quantized, activations stay float and
the LiteRT kernels (FULLY_CONNECTED, EMBEDDING_LOOKUP) quantize them on the fly. Small
tensors (norm scales) always stay fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# TFLite TensorType values (schema.fbs)
TFLITE_FLOAT32 = 0
TFLITE_INT8 = 9
TFLITE_INT4 = 17  # two values a byte, the even element in the low nibble


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    granularity: str         # "none" (float), "channel" (one scale per output row), "block"
    block_size: int | None   # elements per scale along the input axis, for "block"
    symmetric: bool
    tflite_type: int
    description: str

    @property
    def is_float(self) -> bool:
        return self.granularity == "none"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric, narrow range: [-qmax, qmax]

    def row_bytes(self, cols: int) -> int:
        """Bytes one stored row of ``cols`` values takes (without blockwise scales)."""
        return cols * self.bits // 8

    def scale_row_bytes(self, cols: int) -> int:
        """Bytes of one row's blockwise fp16 scales (0 for per-channel and float schemes)."""
        return 2 * (cols // self.block_size) if self.granularity == "block" else 0

    def to_dict(self) -> dict:
        return asdict(self)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", 32, "none", None, True, TFLITE_FLOAT32,
               "float32 weights: the reference, 4 bytes a weight"),
        Scheme("int8", 8, "channel", None, True, TFLITE_INT8,
               "int8 per output channel, symmetric, dynamic range: 1 byte a weight"),
        Scheme("int4", 4, "channel", None, True, TFLITE_INT4,
               "int4 per output channel, symmetric, dynamic range: half a byte a weight"),
        *(Scheme(f"int4-b{b}", 4, "block", b, True, TFLITE_INT4,
                 f"int4 in blocks of {b} inputs with an fp16 scale each, symmetric, dynamic range: "
                 f"{0.5 + 2 / b:.4g} bytes a weight") for b in (32, 64, 128)),
    )
}


def get_scheme(name: str) -> Scheme:
    from ..runtime.errors import QuantizationError

    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantizationError(
            f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


# ---- recipes: a scheme per tensor kind --------------------------------------------------
# Norm scales are never quantized. A recipe gives each kind of weight (named after the
# canonical weight names of the graph) its scheme; roles name groups of kinds.
KINDS = {  # recipe key -> canonical weight suffix
    "embedding": "embed",  # the tied input embedding / LM head
    # its frequent rows (contract.hot_ranges: the tokenizer's most frequent pieces), stored as a table
    # of their own when their scheme differs from the rest's (which keep the "embedding" kind)
    "embedding_hot": "embed_hot",
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    # Gemma 4's per-layer embeddings: each layer's table (read a row per token), the projection
    # of the token embedding, and each layer's gate and output projection
    "ple_embed": "ple_embed", "ple_proj": "ple_proj", "ple_gate": "ple_gate", "ple_out": "ple_out",
    # an embedding model's Dense layers after pooling (EmbeddingGemma's 2_Dense and 3_Dense)
    "dense_0": "dense_0", "dense_1": "dense_1",
}
ROLES = {
    "embedding": ("embedding", "embedding_hot"),
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "ffn": ("ffn_gate", "ffn_up", "ffn_down"),
    "ple": ("ple_embed", "ple_proj", "ple_gate", "ple_out"),
    "dense": ("dense_0", "dense_1"),
}
_BY_SUFFIX = {suffix: kind for kind, suffix in KINDS.items()} | {"embed_cold": "embedding"}

# Presets by role (a kind may override its role, applied after it). Chosen from the
# per-role measurements on the real Gemma 3 270M (README, benchmarks/quant_table.py):
# int4 rounding costs the attention weights the most per byte, then the FFN, then the
# embedding; int8 costs almost nothing in rounding, but the kernels' on-the-fly int8
# activations cost the attention inputs ~1.5% perplexity.
#
# Gemma 4's per-layer embeddings (role "ple") are half of E2B's weights (2.35B of 4.6B), but a
# token reads one row of each layer's table, so their bytes cost file size and disk, not decode
# time: the int4 presets store them in int4 blocks, as Google's own E2B files do. Their quality
# cost is not measured here (no real Gemma 4 weights are reachable from this machine).
#
# An embedding model's Dense layers (EmbeddingGemma: 2 x 768 x 3072, 1.5% of its weights) run once
# per text, not per token: int8 in every preset but fp32 and the all-int4 one.
PRESETS: dict[str, dict[str, str]] = {
    "fp32": {"embedding": "fp32", "attention": "fp32", "ffn": "fp32", "ple": "fp32", "dense": "fp32"},
    "int8": {"embedding": "int8", "attention": "int8", "ffn": "int8", "ple": "int8", "dense": "int8"},
    # int8 with float attention: within 1% of fp32; attention is ~10% of a Gemma's weights
    "int8-attn-fp32": {"embedding": "int8", "attention": "fp32", "ffn": "int8", "ple": "int8", "dense": "int8"},
    # int4 only where the bytes are and it hurts least: the FFN's gate and up (61% of Gemma 2B's
    # body). Its down projection stays int8, as llama.cpp's Q4_K_M keeps it at 6 bits: on the
    # 270M that halves int4's cost (+21% -> +12% perplexity, +6% with --calibrate) for 4% more file.
    "int4": {"embedding": "int8", "attention": "int8", "ffn": "int4-b32", "ffn_down": "int8", "ple": "int4-b32",
             "dense": "int8"},
    # the tied embedding / LM head in int4 blocks, the body int8: smallest and fastest when
    # the embedding dominates (the 270M: 63% of its weights). Its rows of frequent pieces
    # (contract.hot_ranges) stay int8: the LM head's rounding is nearly all of the cost, and most
    # of it is in those rows (270M: +12.1% -> +4.0% perplexity, calibrated +7.7% -> +2.4%, for 2.5%
    # more file; benchmarks/embedding_split.py)
    "int4-emb": {"embedding": "int4-b32", "embedding_hot": "int8", "attention": "int8", "ffn": "int8",
                 "ple": "int4-b32", "dense": "int8"},
    "int4-b32-mixed": {"embedding": "int8", "attention": "int4-b32", "ffn": "int4-b32", "ple": "int4-b32",
                       "dense": "int8"},
    "int4-b32": {"embedding": "int4-b32", "attention": "int4-b32", "ffn": "int4-b32", "ple": "int4-b32",
                 "dense": "int4-b32"},
}


def _expand(pairs: dict[str, str]) -> dict[str, str]:
    """Role- and kind-level pairs -> one scheme per kind (roles first, then kinds)."""
    out = {}
    for key, scheme in sorted(pairs.items(), key=lambda kv: kv[0] in KINDS and kv[0] not in ROLES):
        for kind in ROLES.get(key, (key,)):
            out[kind] = scheme
    return out


def kind_of(name: str) -> str | None:
    """Recipe kind of a canonical weight name (``embed`` -> embedding, ``l3_q`` -> attn_q),
    None for norms."""
    from ..runtime.contract import parse_weight_name

    return _BY_SUFFIX.get(parse_weight_name(name)[1])


def role_of(name: str) -> str | None:
    """Role of a canonical weight name (``embed``, ``l3_q``, ``l0_down``), None for norms."""
    kind = kind_of(name)
    return next((role for role, kinds in ROLES.items() if kind in kinds), None)


def parse_recipe(text: str) -> dict[str, str]:
    """A preset name, or ``key=scheme`` pairs over a base preset given first
    (``int4-b32,embedding=int8,ffn_down=int8``; the base defaults to int8). Keys are roles
    (embedding, attention, ffn) or single kinds (attn_q .. attn_o, ffn_gate .. ffn_down).
    Returns one scheme per kind."""
    from ..runtime.errors import QuantizationError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise QuantizationError("empty quantization recipe; give a preset such as int8")
    base = "int8"
    if "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise QuantizationError(f"unknown quantization preset {parts[0]!r}; choose one of "
                                    f"{', '.join(PRESETS)} or give key=scheme pairs (roles: {', '.join(ROLES)}; "
                                    f"kinds: {', '.join(k for k in KINDS if k not in ROLES)})")
        base = parts.pop(0)
    recipe = _expand(PRESETS[base])
    overrides = {}
    for p in parts:
        key, _, scheme = p.partition("=")
        if "=" not in p or (key not in ROLES and key not in KINDS):
            raise QuantizationError(f"{p!r} is not key=scheme with a key among the roles {', '.join(ROLES)} "
                                    f"or the kinds {', '.join(k for k in KINDS if k not in ROLES)}")
        get_scheme(scheme)  # raises with the list of schemes
        overrides[key] = scheme
    recipe.update(_expand(overrides))
    return recipe


def recipe_name(text: str, present=None) -> str:
    """The preset's name, or the recipe spelled out compactly (a role where its kinds agree).
    ``present``: the kinds the model has; roles it lacks (Gemma 1-3 have no ``ple``) are left out."""
    if text in PRESETS:
        return text
    recipe = parse_recipe(text)
    parts = []
    for role, kinds in ROLES.items():
        if present is not None:
            kinds = tuple(k for k in kinds if k in present)
            if not kinds:
                continue
        schemes = {recipe[k] for k in kinds}
        if len(schemes) == 1:
            parts.append(f"{role}={schemes.pop()}")
        else:
            parts += [f"{k}={recipe[k]}" for k in kinds]
    return ",".join(parts)
