"""The LiteRT-LM contract: every signature, tensor and weight name, and its shape, lives here.

The converter builds the graph from these names, the writer and the quantization recipes
parse them, and the runtime binds them; nothing else formats or parses them.

Signatures (LiteRT-LM runs the first two; the others are gemma-edge's own, ignored there):
    prefill_<T>   tokens [1, T], input_pos [T], KV caches      -> KV caches
    decode        tokens [1, 1], input_pos [1], KV caches      -> KV caches, logits [1, 1, V]
    score_<T>     as prefill_<T>                               -> KV caches, logits [1, T, V]
    decode_s<S'>  as decode, for positions below S' < S: global layers attend to slots 0..S'-1
                  only, so a long-context file decodes a short chat as fast as a short one
                  (and sliding layers too when S' is within their window)
    decode_hot    as decode, plus extra_ids [E]; logits [1, 1, H + E]: of the split embedding's
                  hot rows only (``hot_ids``), then of the E tokens ``extra_ids`` names (the
                  runtime passes the context's recent tokens outside those rows). A speculative
                  draft's step, whose LM head is most of its cost (files converted ``--for-draft``)
    decode_hot_s<S'> as decode_hot, for positions below S': one beside each decode_s<S'> of a
                  file converted ``--for-draft`` (metadata ``decode_hot_spans``), so a long-context
                  draft's step reads only what decode_s<S'> reads
(LiteRT-LM takes every signature whose name starts with ``prefill`` as a prefill runner and
``decode`` by its exact name, so no other signature may start with ``prefill``.)
KV caches: ``kv_cache_k_<i>`` / ``kv_cache_v_<i>``, float32 [1, K, S, H], one pair for every
layer i that owns a cache (``kv_layers``), bound as both input and output (updated in place).
With ``cfg.kv_ring`` = R (``ring_length``; Gemma 3 files), a sliding layer's cache is a ring
of ``ring_slots`` = 2R - W slots instead of S: a chunk starting at position p is written at
slots p % R .. p % R + T - 1 (never past the end, since T <= R - W + 1), and ``kv_cache_k_ring_pos``
(float32 [1, 1, 2R - W, 1], ``RING_POS``, bound the same way) holds 1 + the position each slot
holds, 0 for none. A slot holding position x has x % R == slot % R, so each position has two
candidate slots; writing one empties the other, and a sliding layer attends to the slots whose
position is inside its window.

An embedding model (EmbeddingGemma) has only cache-free signatures, one per chunk length T:
    embed_<T>     tokens [1, T], input_pos [T], segments [T]  -> embeddings [1, G, E]
A chunk packs up to G = ``embed_slots(T)`` texts: ``segments`` numbers each token's text
(0 .. G-1; -1 for padding), ``input_pos`` its position within that text; a token attends only
to the tokens of its own text. Row g of ``embeddings`` is text g's vector: its tokens' mean,
through the Dense layers (E = ``cfg.embedding_dim``), not yet normalised; rows of absent texts
are 0. Weights add ``dense_<k>`` [out, in] for each Dense layer.

Weights: canonical names ``embed``, ``final_norm`` and ``l<i>_<kind>`` (``l3_q``, ``l0_down``),
[out, in] for linear layers; norm weights hold the (1 + w) scale.
"""

from __future__ import annotations

import re

from .config import GemmaConfig

DECODE = "decode"
PREFILL = "prefill"
SCORE = "score"
EMBED = "embed"
TOKENS = "tokens"
INPUT_POS = "input_pos"
EXTRA_IDS = "extra_ids"  # decode_hot's tokens besides the hot rows
HOT_EXTRA = 32  # how many: E
SEGMENTS = "segments"
LOGITS = "logits"
EMBEDDINGS = "embeddings"
KV_PREFIX = "kv_cache_"
RING_POS = "kv_cache_k_ring_pos"  # a ring file's slot positions (see the module docstring)
EMBED_TOKENS_PER_SLOT = 8  # embed_<T> holds a text per 8 tokens of T (a text is at least <bos> <eos>)

DECODE_HOT = "decode_hot"
# What a signature returns besides the caches: nothing, the last token's logits, every token's,
# the last token's over the hot rows and extra_ids only; or, without caches, one vector per text.
NO_LOGITS, LAST_LOGITS, ALL_LOGITS, HOT_LOGITS, POOLED = "none", "last", "all", "hot", "pooled"


def prefill_name(T: int) -> str:
    return f"{PREFILL}_{int(T)}"


def score_name(T: int) -> str:
    return f"{SCORE}_{int(T)}"


def embed_name(T: int) -> str:
    return f"{EMBED}_{int(T)}"


def embed_slots(T: int) -> int:
    """G: how many texts one ``embed_<T>`` call can hold."""
    return max(1, int(T) // EMBED_TOKENS_PER_SLOT)


def decode_span_name(span: int) -> str:
    return f"{DECODE}_s{int(span)}"


def decode_hot_span_name(span: int) -> str:
    return f"{DECODE_HOT}_s{int(span)}"


# Decode signatures for shorter spans: a global layer's attention reads its whole cache at every
# step (the graph's shapes are fixed), which at S = 32k costs more than the 270M's weights. So a
# file with a long context also gets decode_s<S'> for each of these below S, and the runtime uses
# the smallest that holds the position. Each signature costs ~7 MB and ~13 ms at load (measured on
# the 270M), so they grow by 4x from 2048. 512 is there for the sliding layers: at a span within
# their window they read slots 0 .. span-1 like a global layer, which XNNPACK runs in place, instead
# of a window sliced from the position, which LiteRT copies outside XNNPACK at every step (about a
# fifth of a 270M step at context 2048: benchmarks/sliding_window_slice.py, decode_span_512.py).
DECODE_SPANS = (512, 2048, 8192, 32768)


def decode_spans(context: int, cfg: GemmaConfig | None = None) -> tuple[int, ...]:
    """The decode_s<S'> spans a file with this context gets. A ring file (``cfg.kv_ring``) gets
    none within the sliding window: there such a span spares the sliding layers the copy of their
    window out of a full-length cache, which a ring does not make. What it would still do, spare
    the global layers part of their read below it, came to 0-7% of decode on the 270M (about 3%
    over ten alternating rounds) for a signature's 7-11 MB and 10-14 ms of load
    (benchmarks/decode_span_512.py)."""
    inside = cfg.sliding_window if cfg is not None and cfg.kv_ring else 0
    return tuple(s for s in DECODE_SPANS if inside < s < int(context))


def signature_names(prefill_lengths, score_lengths=(), spans=(), embed_lengths=(), decode_hot=False,
                    hot_spans=()) -> list[str]:
    """Every signature of a file, in the order the converter builds them: a causal LM's
    (prefill, decode, score, decode_s<S'>, and decode_hot when ``decode_hot``, then
    decode_hot_s<S'> for each of ``hot_spans``), or an embedding model's (``embed_lengths``:
    embed_<T> only; it has no cache, so no decode either)."""
    if embed_lengths:
        return [embed_name(T) for T in sorted(set(embed_lengths))]
    return ([prefill_name(T) for T in sorted(set(prefill_lengths))] + [DECODE] +
            [score_name(T) for T in sorted(set(score_lengths))] + [decode_span_name(s) for s in sorted(set(spans))] +
            ([DECODE_HOT] if decode_hot else []) + [decode_hot_span_name(s) for s in sorted(set(hot_spans))])


_SIGNATURE = re.compile(rf"({PREFILL}|{SCORE}|{EMBED})_([1-9][0-9]*)")
_SPAN = re.compile(rf"{DECODE}_s([1-9][0-9]*)")
_HOT_SPAN = re.compile(rf"{DECODE_HOT}_s([1-9][0-9]*)")
_OUTPUTS = {PREFILL: NO_LOGITS, SCORE: ALL_LOGITS, EMBED: POOLED}


def parse_signature(name: str) -> tuple[int, str, int | None]:
    """``prefill_32`` -> (32, "none", None), ``score_32`` -> (32, "all", None), ``decode`` ->
    (1, "last", None), ``decode_s2048`` -> (1, "last", 2048), ``decode_hot`` -> (1, "hot", None),
    ``decode_hot_s2048`` -> (1, "hot", 2048), ``embed_64`` -> (64, "pooled", None): tokens per
    call, outputs, span."""
    if name == DECODE:
        return 1, LAST_LOGITS, None
    if name == DECODE_HOT:
        return 1, HOT_LOGITS, None
    m = _SPAN.fullmatch(name)
    if m:
        return 1, LAST_LOGITS, int(m.group(1))
    m = _HOT_SPAN.fullmatch(name)
    if m:
        return 1, HOT_LOGITS, int(m.group(1))
    m = _SIGNATURE.fullmatch(name)
    if not m:
        raise ValueError(f"{name!r} is not a gemma-edge signature (prefill_<T>, decode, score_<T>, decode_s<S>, "
                         "decode_hot, decode_hot_s<S>, embed_<T>)")
    return int(m.group(2)), _OUTPUTS[m.group(1)], None


def embeddings_shape(cfg: GemmaConfig, T: int) -> tuple[int, int, int]:
    """[1, G, E]: the output of ``embed_<T>``."""
    return (1, embed_slots(T), cfg.embedding_dim)


# ---- KV caches ---------------------------------------------------------------------------

def kv_name(kind: str, layer: int) -> str:
    """``kv_name("k", 3)`` -> ``kv_cache_k_3``."""
    if kind not in ("k", "v"):
        raise ValueError(f"a KV cache is 'k' or 'v', not {kind!r}")
    return f"{KV_PREFIX}{kind}_{int(layer)}"


_KV = re.compile(rf"{KV_PREFIX}([kv])_([0-9]+)")


def parse_kv_name(name: str) -> tuple[str, int] | None:
    """``kv_cache_v_12`` -> ("v", 12); None for any other name."""
    m = _KV.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


def kv_layers(cfg: GemmaConfig) -> list[int]:
    """The layers that own a cache; the others read the cache of ``cfg.kv_source(layer)``."""
    return [i for i in range(cfg.num_layers) if cfg.kv_source(i) == i]


def kv_names(cfg: GemmaConfig) -> list[str]:
    """Every cache tensor of a file: k and v of each layer that owns a cache."""
    return [kv_name(c, i) for i in kv_layers(cfg) for c in "kv"]


def kv_shape(cfg: GemmaConfig, layer: int, context: int) -> tuple[int, int, int, int]:
    """[1, K, S, H], or [1, K, ring_slots, H] for a sliding layer of a ring file."""
    slots = ring_slots(cfg) if cfg.kv_ring and cfg.is_sliding(layer) else int(context)
    return (1, cfg.kv_heads_for(layer), slots, cfg.head_dim_for(layer))


def kv_shapes(cfg: GemmaConfig, context: int) -> dict[str, tuple[int, int, int, int]]:
    """Every cache tensor of a file and its shape: each layer's K and V, and a ring file's ``RING_POS``."""
    shapes = {kv_name(c, i): kv_shape(cfg, i, context) for i in kv_layers(cfg) for c in "kv"}
    if cfg.kv_ring:
        shapes[RING_POS] = (1, 1, ring_slots(cfg), 1)
    return shapes


def ring_length(cfg: GemmaConfig, context: int, longest_chunk: int) -> int:
    """R for a file whose longest prefill or score chunk has ``longest_chunk`` tokens: W + T - 1,
    so that a chunk's keys and the window of its first token fit in the ring together; 0 (caches
    of the full context) when the ring would not be shorter, or for a model without sliding
    layers or without a cache (bidirectional)."""
    W = cfg.sliding_window
    if not W or cfg.bidirectional or not any(cfg.is_sliding(i) for i in kv_layers(cfg)):
        return 0
    if cfg.family != 3:
        # LiteRT-LM (0.18.1) takes a gemma4 file's token limit from its sliding caches' length
        # (70 slots: "Input token ids are too long ... 120 >= 70"), where for gemma3 it reads the
        # metadata; Gemma 2 files are not checked under LiteRT-LM. So only Gemma 3 gets rings.
        return 0
    R = W + int(longest_chunk) - 1
    return R if 2 * R - W < int(context) else 0


def ring_slots(cfg: GemmaConfig) -> int:
    """Slots of a ring cache: R for positions modulo R, and R - W more, so that a chunk of up to
    R - W + 1 tokens written from slot p % R stays contiguous."""
    return 2 * cfg.kv_ring - cfg.sliding_window


def ring_rewind_limit(cfg: GemmaConfig) -> int | None:
    """How far below the highest slot written a ring file's cache may be rewound: R - W (the
    slots past it hold positions the ring has overwritten within the window); None without a ring."""
    return cfg.kv_ring - cfg.sliding_window if cfg.kv_ring else None


# ---- weights -----------------------------------------------------------------------------

EMBED = "embed"
# The tied embedding split in two tables (GemmaConfig.embed_hot): the rows of ``hot_ranges``, a
# SentencePiece vocabulary's most frequent pieces, and the others (a scheme each)
EMBED_HOT = "embed_hot"
EMBED_COLD = "embed_cold"
FINAL_NORM = "final_norm"
PLE_PROJ = "ple_proj"  # per-layer embeddings: the projection of the token embedding, [L * P, D]
PLE_PROJ_NORM = "ple_proj_norm"  # and its norm, [P]


def vocab_tables(cfg: GemmaConfig) -> list[str]:
    """The weights with a row per vocabulary entry: the tied embedding (or its two tables) and
    Gemma 4's per-layer tables. A quantized one may keep its per-row scales as a float32 [rows]
    tensor of their own (``row_scales_name``) that the graph applies after the lookup and the LM
    head, its own quantization then being a single scale of 1: LiteRT copies a tensor's
    per-channel parameters into every signature at load (8 bytes a row, 2 MB a signature for
    Gemma's 262144), where a tensor's buffer stays in the file."""
    names = [EMBED_HOT, EMBED_COLD] if cfg.embed_hot_rows else [EMBED]
    return names + ([weight_name(i, "ple_embed") for i in range(cfg.num_layers)] if cfg.ple_dim else [])


def row_scales_name(name: str) -> str:
    """``embed`` -> ``embed_row_scales``: the per-row scales of a vocabulary table (``vocab_tables``)."""
    return f"{name}_row_scales"


def dense_name(k: int) -> str:
    """The k-th Dense layer after pooling (an embedding model's 2_Dense is ``dense_0``)."""
    return f"dense_{int(k)}"


def weight_name(layer: int | None, kind: str) -> str:
    """``weight_name(3, "q")`` -> ``l3_q``; ``weight_name(None, "embed")`` -> ``embed``."""
    return kind if layer is None else f"l{int(layer)}_{kind}"


_LAYER_WEIGHT = re.compile(r"l([0-9]+)_(.+)")


def parse_weight_name(name: str) -> tuple[int | None, str]:
    """``l3_q`` -> (3, "q"); ``embed`` -> (None, "embed")."""
    m = _LAYER_WEIGHT.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


HOT_FIRST = 16384  # at most this many of the first rows, a sixteenth of the vocabulary
HOT_CHARS = 1024  # at most this many rows from the first single printable-ASCII character beyond them


def hot_ranges(vocab_size: int, piece_to_id=None) -> tuple[int, ...]:
    """The rows a split embedding keeps apart, as ranges [a0, b0, a1, b1): a SentencePiece BPE
    vocabulary numbers its merged pieces in merge order, the most frequent first (Gemma 3: the
    first 16384 hold 73-74% of the tokens of English text and Python), and its single characters
    after all merges, the commonest first (Gemma 3: ids 236743.., '.' ',' '"' ')' among them, 12-14%
    of the tokens). So: the first sixteenth of the vocabulary (at most HOT_FIRST rows) and, when
    ``piece_to_id`` (a tokenizer's) finds '▁' or a printable ASCII character beyond those, the
    rows from the first of them on (a sixteenth of the vocabulary, at most HOT_CHARS). Gemma's
    262144: 17408 rows, +5.0 MB at int8 beside int4 blocks. () when the vocabulary is too small
    to split."""
    n = min(HOT_FIRST, vocab_size // 16)
    if not n:
        return ()
    ids = [] if piece_to_id is None else [piece_to_id(p) for p in ["\u2581", *map(chr, range(33, 127))]]
    beyond = [i for i in ids if i is not None and n <= i < vocab_size]
    if not beyond:
        return (0, n)
    a = min(beyond)
    b = min(vocab_size, a + min(HOT_CHARS, vocab_size // 16))
    return (0, b) if a == n else (0, n, a, b)


def embed_segments(name: str, cfg: GemmaConfig) -> list[tuple[int, int]]:
    """The rows [a, b) of ``embed`` that a split embedding's table ``name`` holds, in its order."""
    hot = list(zip(cfg.embed_hot[0::2], cfg.embed_hot[1::2]))
    if name == EMBED_HOT:
        return hot
    cold, at = [], 0
    for a, b in hot + [(cfg.vocab_size, cfg.vocab_size)]:
        if a > at:
            cold.append((at, a))
        at = b
    return cold


def hot_ids(cfg: GemmaConfig) -> list[int]:
    """The token of each of ``decode_hot``'s first H logits: the rows of ``embed_hot``, in its
    order (the HOT_EXTRA logits after them are those of ``extra_ids``' tokens)."""
    return [t for a, b in embed_segments(EMBED_HOT, cfg) for t in range(a, b)]


def source_rows(name: str, cfg: GemmaConfig, r0: int, r1: int) -> tuple[str, list[tuple[int, int]]]:
    """Rows r0..r1 of a file's weight ``name`` as rows of a checkpoint weight: (its name, the row
    ranges in order). A split embedding's tables are rows of ``embed``; any other weight is itself."""
    if name not in (EMBED_HOT, EMBED_COLD):
        return name, [(r0, r1)]
    out, at = [], 0
    for a, b in embed_segments(name, cfg):
        lo, hi = max(r0, at), min(r1, at + b - a)
        if lo < hi:
            out.append((a + lo - at, a + hi - at))
        at += b - a
    return EMBED, out


def weight_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and shapes ([out, in] for linear layers), in file order. Norm
    weights hold the multiplier (Gemma 1-3's 1 + w). The per-layer embedding table is stored
    as one [ple_vocab, P] table per layer (``l<i>_ple_embed``): each lookup then touches one
    row of one table, and no tensor passes the 2**31-byte offsets of LiteRT's lookup kernel.
    With ``cfg.embed_hot`` the tied embedding is two tables, ``embed_hot`` and ``embed_cold``
    (``embed_segments`` says which checkpoint rows each holds)."""
    d, n = cfg.hidden_size, cfg.num_heads
    N = cfg.embed_hot_rows
    shapes = {EMBED_HOT: (N, d), EMBED_COLD: (cfg.vocab_size - N, d)} if N else {EMBED: (cfg.vocab_size, d)}
    if cfg.ple_dim:
        P = cfg.ple_dim
        shapes |= {PLE_PROJ: (cfg.num_layers * P, d), PLE_PROJ_NORM: (P,)}
        shapes |= {weight_name(i, "ple_embed"): (cfg.ple_vocab, P) for i in range(cfg.num_layers)}
    shapes[FINAL_NORM] = (d,)
    for i in range(cfg.num_layers):
        f, h, k = cfg.intermediate_size_for(i), cfg.head_dim_for(i), cfg.kv_heads_for(i)
        own_cache = cfg.kv_source(i) == i
        w = {"attn_norm": (d,), "q": (n * h, d)}
        if own_cache:
            w["k"] = (k * h, d)
            if cfg.has_v_proj(i):
                w["v"] = (k * h, d)
        w["o"] = (d, n * h)
        if cfg.has_qk_norm:
            w["q_norm"] = (h,)
            if own_cache:
                w["k_norm"] = (h,)
        if cfg.has_post_norms:
            w["post_attn_norm"] = (d,)
        w |= {"ffn_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f)}
        if cfg.has_post_norms:
            w["post_ffn_norm"] = (d,)
        if cfg.ple_dim:
            w |= {"ple_gate": (cfg.ple_dim, d), "ple_out": (d, cfg.ple_dim), "ple_norm": (d,)}
        if cfg.layer_scale:
            w["layer_scale"] = (1,)
        shapes |= {weight_name(i, kind): s for kind, s in w.items()}
    shapes |= {dense_name(k): cfg.dense_shape(k) for k in range(len(cfg.dense_dims))}
    return shapes
