"""The one Gemma config: a frozen dataclass built from checkpoint metadata.

Gemma 1, 2 and 3 differ only in the fields below; the model code switches on them,
it is never copied per family. The config travels inside every converted file
(``to_dict`` / ``from_dict``), so the runtime needs nothing else. Each checkpoint format
builds it from its own metadata: ``convert/hf_checkpoint.config_from_hf`` (config.json) and
``convert/gguf_checkpoint.config_from_gguf`` (GGUF keys).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import UnsupportedModelError

SLIDING = "sliding_attention"
FULL = "full_attention"

MAX_LAYERS = 1024  # Gemma's largest has 62; a larger count is a corrupt header (and per-layer tables would not fit)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "max_position")

@dataclass(frozen=True)
class GemmaConfig:
    family: int                      # 1, 2, 3 or 4
    vocab_size: int
    hidden_size: int                 # d_model
    intermediate_size: int           # FFN hidden
    num_layers: int
    num_heads: int
    num_kv_heads: int                # KV heads of sliding layers (and of global ones unless global_kv_heads)
    head_dim: int                    # head dim of sliding layers (and of global ones unless global_head_dim)
    layer_types: tuple[str, ...]     # per layer: SLIDING or FULL
    sliding_window: int | None = None
    rope_base: float = 10000.0       # global (full-attention) layers
    rope_local_base: float = 10000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions (Gemma 3 4B+)
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0  # queries are scaled by its -1/2 power (Gemma 4: 1, no scaling)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    max_position: int = 8192
    # Gemma 4 (E2B/E4B); the defaults leave Gemma 1-3 as they are
    global_head_dim: int | None = None  # head dim of global layers
    global_kv_heads: int | None = None  # KV heads of global layers
    global_rope_fraction: float = 1.0  # share of a global layer's rotary pairs that rotate ("proportional" RoPE)
    kv_shared_layers: int = 0        # the last N layers attend over an earlier layer's cache (kv_source)
    ple_dim: int = 0                 # per-layer embeddings: width per layer (0: none)
    ple_vocab: int = 0               # per-layer embeddings: rows of the table
    k_eq_v: bool = False             # global layers: V is the K projection (no V weights)
    double_wide_mlp: bool = False    # cache-sharing layers have an FFN of 2 * intermediate_size
    v_norm: bool = False             # V goes through an RMSNorm without a scale
    layer_scale: bool = False        # a learned scalar multiplies the residual stream after each layer
    # Embedding models (EmbeddingGemma); the defaults leave a causal LM as it is
    bidirectional: bool = False      # every token attends both ways; a sliding layer sees sliding_window // 2 each way
    dense_dims: tuple[int, ...] = ()  # out features of each Dense layer after mean pooling (sentence-transformers)
    # How a file stores the tied embedding (not the architecture): row ranges [a0, b0, a1, b1, ...)
    # (contract.hot_ranges: the tokenizer's most frequent pieces) stored as one table, the other rows
    # as another, each with its own scheme (contract.EMBED_HOT / EMBED_COLD); () stores one table
    embed_hot: tuple[int, ...] = ()
    # How a file lays out the sliding layers' caches: 0, at full context length (slot = position);
    # or R > sliding_window, as rings of 2R - W slots written at position % R (contract.ring_slots)
    kv_ring: int = 0

    def __post_init__(self):
        for name in _SIZES:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnsupportedModelError(f"config {name} is {v!r}, not a positive integer; the config is corrupt")
        for name in ("global_head_dim", "global_kv_heads", "sliding_window"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UnsupportedModelError(f"config {name} is {v!r}, not a positive integer; the config is corrupt")
        for name in ("kv_shared_layers", "ple_dim", "ple_vocab", "kv_ring"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UnsupportedModelError(f"config {name} is {v!r}, not an integer >= 0; the config is corrupt")
        for name in ("rope_base", "rope_local_base", "rope_scaling_factor", "rms_norm_eps", "query_pre_attn_scalar",
                     "global_rope_fraction", "attn_softcap", "final_softcap"):
            v = getattr(self, name)
            if v is None and name.endswith("softcap"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UnsupportedModelError(f"config {name} is {v!r}, not a finite number > 0; the config is corrupt")
        if not 0 < self.global_rope_fraction <= 1:  # a float: it is finite and > 0 (checked above)
            raise UnsupportedModelError(f"config global_rope_fraction is {self.global_rope_fraction}, not in (0, 1]")
        if self.num_layers > MAX_LAYERS:
            raise UnsupportedModelError(f"config has {self.num_layers} layers, more than the {MAX_LAYERS} any "
                                        "Gemma could have; the config is corrupt")
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(
                f"config lists {len(self.layer_types)} layer types for {self.num_layers} layers; "
                "the checkpoint's config.json is inconsistent")
        bad = sorted({str(t) for t in self.layer_types} - {SLIDING, FULL})
        if bad:
            raise UnsupportedModelError(f"config has layer types {bad}; gemma-edge knows {SLIDING!r} and {FULL!r}")
        for i in range(self.num_layers):
            if self.num_heads % self.kv_heads_for(i):
                raise UnsupportedModelError(
                    f"{self.num_heads} query heads are not a multiple of {self.kv_heads_for(i)} KV heads (layer {i})")
            if self.head_dim_for(i) % 2:
                raise UnsupportedModelError(f"config head_dim {self.head_dim_for(i)} (layer {i}) is odd; RoPE "
                                            "rotates pairs of dimensions")
        if any(t == SLIDING for t in self.layer_types) and not self.sliding_window:
            raise UnsupportedModelError("sliding-window layers without a sliding_window size")
        if self.kv_ring and not (self.sliding_window and self.kv_ring > self.sliding_window):
            raise UnsupportedModelError(f"config kv_ring {self.kv_ring} is not above sliding_window "
                                        f"{self.sliding_window}; the config is corrupt")
        if self.kv_shared_layers >= self.num_layers:
            raise UnsupportedModelError(f"{self.kv_shared_layers} KV-sharing layers of {self.num_layers}: at least "
                                        "the first layer must compute its own cache")
        first = self.first_shared_layer
        for t in set(self.layer_types[first:]):
            if t not in self.layer_types[:first]:
                raise UnsupportedModelError(f"the KV-sharing layers include {t} layers, but no earlier {t} layer "
                                            "computes a cache for them to share")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.dense_dims):
            raise UnsupportedModelError(f"config dense_dims is {list(self.dense_dims)}, not a list of positive "
                                        "integers; the config is corrupt")
        h = self.embed_hot
        if not are_ranges(h, self.vocab_size) or self.embed_hot_rows >= self.vocab_size:
            raise UnsupportedModelError(f"config embed_hot is {list(h)}, not increasing row ranges of a part of the "
                                        f"vocabulary ({self.vocab_size}); the config is corrupt")
        if bool(self.ple_dim) != bool(self.ple_vocab):
            raise UnsupportedModelError(f"per-layer embeddings need both a width and a vocabulary (got "
                                        f"{self.ple_dim} and {self.ple_vocab})")

    # ---- derived facts -------------------------------------------------------
    @property
    def embed_hot_rows(self) -> int:
        """Rows of a split embedding's first table (``embed_hot``'s ranges), 0 for one table."""
        return sum(b - a for a, b in zip(self.embed_hot[0::2], self.embed_hot[1::2]))

    @property
    def has_post_norms(self) -> bool:
        """Gemma 2+: post-attention and post-FFN norms around each block."""
        return self.family >= 2

    @property
    def has_qk_norm(self) -> bool:
        return self.family >= 3

    @property
    def hf_norm_offset(self) -> float:
        """Hugging Face checkpoints store RMSNorm weights w of a (offset + w) scale: Gemma 1-3's
        (1 + w), Gemma 4's plain w. See convert/names.norm_scale."""
        return 0.0 if self.family >= 4 else 1.0

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope_base_for(self, layer: int) -> float:
        return self.rope_local_base if self.is_sliding(layer) else self.rope_base

    def rope_scale_for(self, layer: int) -> float:
        return 1.0 if self.is_sliding(layer) else self.rope_scaling_factor

    def rope_fraction_for(self, layer: int) -> float:
        """Share of the head's rotary pairs that rotate; the rest pass through unchanged."""
        return 1.0 if self.is_sliding(layer) else self.global_rope_fraction

    def head_dim_for(self, layer: int) -> int:
        return self.global_head_dim if self.global_head_dim and not self.is_sliding(layer) else self.head_dim

    def kv_heads_for(self, layer: int) -> int:
        return self.global_kv_heads if self.global_kv_heads and not self.is_sliding(layer) else self.num_kv_heads

    @property
    def embedding_dim(self) -> int:
        """Size of an embedding model's vector: the last Dense layer's outputs, else d_model."""
        return self.dense_dims[-1] if self.dense_dims else self.hidden_size

    def dense_shape(self, k: int) -> tuple[int, int]:
        """[out, in] of the k-th Dense layer after pooling (its input: d_model or the layer before)."""
        return self.dense_dims[k], (self.dense_dims[k - 1] if k else self.hidden_size)

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.kv_shared_layers

    def intermediate_size_for(self, layer: int) -> int:
        wide = self.double_wide_mlp and layer >= self.first_shared_layer
        return 2 * self.intermediate_size if wide else self.intermediate_size

    def kv_source(self, layer: int) -> int:
        """The layer whose KV cache ``layer`` attends over: itself, or for the last
        ``kv_shared_layers`` layers the last earlier layer of the same type that has its own."""
        first = self.first_shared_layer
        if layer < first:
            return layer
        t = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == t)

    def has_v_proj(self, layer: int) -> bool:
        """Whether a layer that computes its own cache has a V projection (k_eq_v global layers: none)."""
        return not (self.k_eq_v and not self.is_sliding(layer))

    @property
    def num_params(self) -> int:
        d, n = self.hidden_size, self.num_heads
        total = self.vocab_size * d + self.ple_vocab * self.num_layers * self.ple_dim
        total += self.num_layers * self.ple_dim * d if self.ple_dim else 0  # the per-layer projection
        for i in range(self.num_layers):
            h, k = self.head_dim_for(i), self.kv_heads_for(i)
            kv = 0 if self.kv_source(i) != i else (2 if self.has_v_proj(i) else 1) * k * h * d
            total += 2 * n * h * d + kv + 3 * d * self.intermediate_size_for(i) + 2 * self.ple_dim * d
        return total + sum(o * i for o, i in map(self.dense_shape, range(len(self.dense_dims))))

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["dense_dims"] = list(self.dense_dims)
        d["embed_hot"] = list(self.embed_hot)
        if not self.embed_hot:  # files with one embedding table stay readable by earlier versions
            del d["embed_hot"]
        if not self.kv_ring:  # likewise files with full-length caches
            del d["kv_ring"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UnsupportedModelError(
                f"model config has unknown keys {unknown}: the file was written by a newer "
                "gemma-edge; upgrade gemma-edge to read it")
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["dense_dims"] = tuple(d.get("dense_dims", ()))
        if isinstance(d.get("embed_hot"), list):
            d["embed_hot"] = tuple(d["embed_hot"])
        return cls(**d)


# ---- id ranges: how a file spells a set of rows or token ids -------------------------------

def are_ranges(r, limit: int) -> bool:
    """``r`` is flattened half-open ranges [a0, b0, a1, b1, ...) of ids in 0..limit-1, increasing
    and apart (a0 < b0 < a1 < b1 ...): what ``to_ranges`` writes."""
    return (len(r) % 2 == 0 and all(type(v) is int for v in r) and all(a < b for a, b in zip(r, r[1:]))
            and (not r or (r[0] >= 0 and r[-1] <= limit)))


def to_ranges(ids) -> tuple[int, ...]:
    """Distinct ids as flattened half-open ranges: {0, 1, 2, 7} -> (0, 3, 7, 8)."""
    out: list[int] = []
    for i in sorted(set(ids)):
        if out and out[-1] == i:
            out[-1] = i + 1
        else:
            out += [i, i + 1]
    return tuple(out)


def from_ranges(r) -> list[int]:
    """The ids of flattened half-open ranges, ascending (``to_ranges`` undone)."""
    return [i for a, b in zip(r[0::2], r[1::2]) for i in range(a, b)]
