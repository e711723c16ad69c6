"""The one Gemma config: a frozen dataclass built from checkpoint metadata.

Gemma 1, 2 and 3 differ only in the fields below; the model code switches on them,
it is never copied per family. The config travels inside every converted file
(``to_dict`` / ``from_dict``), so the runtime needs nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from .errors import UnsupportedModelError

SLIDING = "sliding_attention"
FULL = "full_attention"

# HF `model_type` -> Gemma family. Anything else is refused with this list.
HF_MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}
GGUF_ARCHITECTURES = {"gemma": 1, "gemma2": 2, "gemma3": 3}
MAX_LAYERS = 1024  # Gemma's largest has 62; a larger count is a corrupt header (and per-layer tables would not fit)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")

# HF config keys that do not change the forward pass of a causal LM at inference.
_HF_IGNORED = {
    "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "initializer_range", "use_cache", "attention_dropout",
    "transformers_version", "_name_or_path", "model_type", "output_attentions",
    "hidden_act", "hidden_activation", "attention_bias", "tie_word_embeddings",
    "pad_token_id", "eos_token_id", "bos_token_id", "cache_implementation",
    "use_bidirectional_attention", "_sliding_window_pattern", "sliding_window_pattern",
    "layer_types", "rope_parameters", "rope_theta", "rope_local_base_freq", "rope_scaling",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "query_pre_attn_scalar", "sliding_window", "final_logit_softcapping",
    "attn_logit_softcapping", "final_logit_soft_cap", "attn_logit_soft_cap",
    "text_config", "vision_config", "boi_token_index", "eoi_token_index", "image_token_index",
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


@dataclass(frozen=True)
class GemmaConfig:
    family: int                      # 1, 2 or 3
    vocab_size: int
    hidden_size: int                 # d_model
    intermediate_size: int           # FFN hidden
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]     # per layer: SLIDING or FULL
    sliding_window: int | None = None
    rope_base: float = 10000.0       # global (full-attention) layers
    rope_local_base: float = 10000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions (Gemma 3 4B+)
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    max_position: int = 8192

    def __post_init__(self):
        for name in _SIZES:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnsupportedModelError(f"config {name} is {v!r}, not a positive integer; the config is corrupt")
        if self.num_layers > MAX_LAYERS:
            raise UnsupportedModelError(f"config has {self.num_layers} layers, more than the {MAX_LAYERS} any "
                                        "Gemma could have; the config is corrupt")
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(
                f"config lists {len(self.layer_types)} layer types for {self.num_layers} layers; "
                "the checkpoint's config.json is inconsistent")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        if any(t == SLIDING for t in self.layer_types) and not self.sliding_window:
            raise UnsupportedModelError("sliding-window layers without a sliding_window size")

    # ---- derived facts -------------------------------------------------------
    @property
    def has_post_norms(self) -> bool:
        """Gemma 2/3: post-attention and post-FFN norms around each block."""
        return self.family >= 2

    @property
    def has_qk_norm(self) -> bool:
        return self.family >= 3

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

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        return self.vocab_size * d + self.num_layers * (attn + 3 * d * f)

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
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
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "GemmaConfig":
        """Build from a Hugging Face ``config.json`` dict (old and new transformers formats)."""
        try:
            return cls._from_hf_config(hf)
        except KeyError as e:
            raise UnsupportedModelError(
                f"config.json lacks {e}; it is incomplete. Re-download the checkpoint's config.json") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise UnsupportedModelError(f"config.json holds a value of the wrong type ({e}); "
                                        "re-download the checkpoint's config.json") from None

    @classmethod
    def _from_hf_config(cls, hf: dict) -> "GemmaConfig":
        if not isinstance(hf, dict):
            raise TypeError(f"expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text part
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        family = HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"config.json has model_type {model_type!r}; gemma-edge converts "
                f"{sorted(HF_MODEL_TYPES)} (Gemma 1, Gemma 2, Gemma 3 text). "
                "Point it at a Gemma checkpoint")
        unknown = sorted(k for k in hf if k not in _HF_IGNORED)
        if unknown:
            warnings.warn(f"config.json keys not used by gemma-edge: {unknown}", stacklevel=2)
        n = hf["num_hidden_layers"]
        if isinstance(n, int) and not 1 <= n <= MAX_LAYERS:  # other types: the TypeError below
            raise UnsupportedModelError(f"config.json num_hidden_layers is {n!r}; a Gemma has 1 to {MAX_LAYERS} "
                                        "layers. Re-download the checkpoint's config.json")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise UnsupportedModelError(
                f"config.json activation {act!r} is not Gemma's GeGLU (gelu_pytorch_tanh)")
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
        rope = hf.get("rope_parameters") or {}
        if FULL in rope or SLIDING in rope:  # transformers >= 5: per layer type
            full, local = rope.get(FULL, {}), rope.get(SLIDING, {})
        else:
            full = {**(hf.get("rope_scaling") or {}), **rope}
            local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        rope_base = float(full.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_local = float(local.get("rope_theta", hf.get("rope_local_base_freq", rope_base)))
        factor = 1.0
        rope_type = full.get("rope_type", full.get("type", "default"))
        if rope_type == "linear":
            factor = float(full.get("factor", 1.0))
        elif rope_type not in ("default", None):
            raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (default, linear)")
        if family == 1:
            rope_local = rope_base
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            layer_types=tuple(layer_types),
            sliding_window=window if family >= 2 else None,
            rope_base=rope_base,
            rope_local_base=rope_local,
            rope_scaling_factor=factor,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or hf.get("head_dim") or 256),
            attn_softcap=hf.get("attn_logit_softcapping") if family == 2 else None,
            final_softcap=hf.get("final_logit_softcapping") if family == 2 else None,
            max_position=hf.get("max_position_embeddings", 8192),
        )

    @classmethod
    def from_gguf(cls, meta: dict, vocab_size: int) -> "GemmaConfig":
        """Build from GGUF metadata (``general.architecture`` and ``<arch>.*`` keys)."""
        try:
            return cls._from_gguf(meta, vocab_size)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise UnsupportedModelError(f"GGUF metadata holds a value of the wrong type ({e}); "
                                        "the file is corrupt: re-download it") from None

    @classmethod
    def _from_gguf(cls, meta: dict, vocab_size: int) -> "GemmaConfig":
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

        def count(key, default=None, most=1 << 20):
            v = int(get(key, default))
            if not 1 <= v <= most:
                raise UnsupportedModelError(f"GGUF {arch}.{key} is {v}, outside 1..{most}; the file is corrupt: "
                                            "re-download it")
            return v

        n = count("block_count", most=MAX_LAYERS)  # checked before the per-layer lists are built
        heads = count("attention.head_count")
        d = count("embedding_length")
        head_dim = count("attention.key_length", d // heads)
        window = meta.get(f"{arch}.attention.sliding_window")
        if family == 1:
            layer_types = [FULL] * n
        elif family == 2:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        else:
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        rope_base = float(get("rope.freq_base", 10000.0))
        # GGUF carries one rope base; Gemma 3's sliding layers use 10k (its HF config).
        rope_local = 10000.0 if family == 3 else rope_base
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        if meta.get(f"{arch}.rope.scaling.type", "linear") not in ("linear", "none"):
            raise UnsupportedModelError("only linear RoPE scaling is supported")
        return cls(
            family=family,
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=count("feed_forward_length"),
            num_layers=n,
            num_heads=heads,
            num_kv_heads=count("attention.head_count_kv", heads),
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=int(window) if window and family >= 2 else (4096 if family == 2 else None),
            rope_base=rope_base,
            rope_local_base=rope_local,
            rope_scaling_factor=factor,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            query_pre_attn_scalar=float(head_dim),
            attn_softcap=float(meta.get(f"{arch}.attn_logit_softcapping", 50.0)) if family == 2 else None,
            final_softcap=float(meta.get(f"{arch}.final_logit_softcapping", 30.0)) if family == 2 else None,
            max_position=int(get("context_length", 8192)),
        )
