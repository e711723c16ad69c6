"""Activation statistics for calibrated quantization, gathered layer by layer in bounded memory.

``collect(source, ids)`` runs the model in float32 numpy over calibration sequences, one layer
at a time: the hidden states of every calibration token ([N, D]) are all it keeps between
layers, and a layer's weights are read from the checkpoint (``Source.read_rows``, the same
canonical weights the writer quantizes), used and dropped. For every linear layer's input it
records, per input channel, the mean of x^2 (llama.cpp's importance matrix) and the max |x|
(SmoothQuant's range). The forward is the one of ``convert/graph.py`` written again in numpy
(Gemma 1-4: norms, q/k norms, GQA, sliding windows, proportional RoPE, soft-caps, KV sharing,
per-layer embeddings, layer scales); ``tests/test_calibrate.py`` checks its logits against
transformers.

Peak memory: weights are read in row chunks of 64 MB, so what is held is the activations of the
calibration tokens (the FFN's [tokens, F] once: 134 MB for Gemma 2B's 16384 on 2048 tokens), the
input samples ``make_plan``'s search keeps (``Calibration.keep``) and the statistics; the tables
(embedding, per-layer embeddings) are read only at the rows of the calibration tokens.
``benchmarks/convert_memory.py --calibrate`` measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..runtime import contract as C
from ..runtime.config import GemmaConfig
from .schemes import ROLES, get_scheme, kind_of


@dataclass
class Stats:
    """Per input channel of one linear layer: sum of x^2, max |x|, and the tokens seen."""

    sum_sq: np.ndarray
    max_abs: np.ndarray
    count: int = 0

    def add(self, x: np.ndarray) -> None:  # x [tokens, in]
        x = np.asarray(x, np.float32)
        self.sum_sq += np.einsum("ti,ti->i", x, x, dtype=np.float64)
        np.maximum(self.max_abs, np.maximum(x.max(axis=0), -x.min(axis=0)), out=self.max_abs)  # no |x| copy
        self.count += len(x)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.sum_sq / max(self.count, 1)


@dataclass
class Calibration:
    """Statistics of the input of every linear weight, by canonical weight name, and a sample of
    up to ``keep`` of its input rows (fp16, tokens evenly spread) for ``make_plan``'s search of
    the migration strength: 256 rows cost 40 MB on the 270M, ~210 MB on Gemma 2B."""

    stats: dict[str, Stats] = field(default_factory=dict)
    tokens: int = 0
    keep: int = 256
    samples: dict[str, np.ndarray] = field(default_factory=dict)

    def record(self, names, x: np.ndarray) -> None:
        """``x`` [tokens, in] feeds each weight of ``names`` (q, k and v share their input)."""
        names = list(names)
        s = next((self.stats[n] for n in names if n in self.stats), None)
        if s is None:
            n = x.shape[-1]
            s = Stats(np.zeros(n, np.float64), np.zeros(n, np.float32))
        s.add(x)
        if self.keep and names:
            rows = np.asarray(x[::max(1, len(x) // self.keep)][:self.keep], np.float16)
            old = self.samples.get(names[0])
            rows = rows if old is None else np.concatenate([old, rows])[-self.keep:]
        for name in names:
            self.stats[name] = s  # weights that share an input share its statistics
            if self.keep:
                self.samples[name] = rows


def _rms(x: np.ndarray, scale, eps: float) -> np.ndarray:
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return y if scale is None else y * scale


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))


def _inv_freq(cfg: GemmaConfig, layer: int) -> np.ndarray:
    h = cfg.head_dim_for(layer)
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = (1.0 / (np.float32(cfg.rope_base_for(layer)) ** exponent) / np.float32(cfg.rope_scale_for(layer)))
    inv = inv.astype(np.float32)
    inv[int(cfg.rope_fraction_for(layer) * h // 2):] = 0.0
    return inv


def _rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x [T, n, H], half-split pairs (j, j + H/2)."""
    ang = pos[:, None].astype(np.float32) * inv[None, :]  # [T, H/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class _Weights:
    """Canonical weights read whole (small) or row-chunked into a product (large), from a
    reader ``read(name, r0, r1) -> float32 [rows, cols]``."""

    def __init__(self, shapes: dict, read):
        self.shapes, self.read = shapes, read

    def full(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rows = shape[0] if len(shape) > 1 else 1
        return self.read(name, 0, rows).reshape(shape)

    def linear(self, x: np.ndarray, name: str, chunk_bytes: int = 64 << 20) -> np.ndarray:
        """x [T, in] @ W[out, in]^T, W read in row chunks: memory one chunk, whatever W's size."""
        out_dim, in_dim = self.shapes[name]
        step = max(1, chunk_bytes // (4 * in_dim))
        parts = [x @ self.read(name, r0, min(out_dim, r0 + step)).T for r0 in range(0, out_dim, step)]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def gated(self, x: np.ndarray, gate: str, up: str, chunk_bytes: int = 64 << 20) -> np.ndarray:
        """gelu(x @ gate^T) * (x @ up^T), a block of output columns at a time: the [T, F] result
        is the only array of its size (whole, GELU's temporaries were five more: 0.7 GB for
        Gemma 2B's FFN on 2048 calibration tokens)."""
        out_dim, in_dim = self.shapes[gate]
        step = max(1, chunk_bytes // (4 * max(in_dim, len(x))))
        m = np.empty((len(x), out_dim), np.float32)
        for r0 in range(0, out_dim, step):
            r1 = min(out_dim, r0 + step)
            m[:, r0:r1] = _gelu(x @ self.read(gate, r0, r1).T)
            m[:, r0:r1] *= x @ self.read(up, r0, r1).T
        return m

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a table (the embedding), read one at a time: the table never is whole."""
        return np.stack([self.read(name, int(i), int(i) + 1)[0] for i in ids])


def forward(cfg: GemmaConfig, read, sequences: list[list[int]], calib: Calibration | None = None,
            logits: bool = False) -> list[np.ndarray] | None:
    """Run ``sequences`` (token ids, each starting with <bos>) through the model, layer by layer.
    ``read(name, r0, r1)`` gives rows of canonical weights (``Source.read_rows``). Records the
    input statistics of every linear weight into ``calib``; returns each sequence's logits
    [len, V] when ``logits`` (the oracle test; the LM head reads the whole embedding)."""
    W = _Weights(C.weight_shapes(cfg), read)
    eps, N, L = cfg.rms_norm_eps, cfg.num_heads, cfg.num_layers
    lengths = [len(s) for s in sequences]
    ids = np.concatenate([np.asarray(s, np.int64) for s in sequences])
    pos = np.concatenate([np.arange(n) for n in lengths])
    uniq, inverse = np.unique(ids, return_inverse=True)
    x = W.rows(C.EMBED, uniq)[inverse] * np.float32(cfg.embed_scale)  # [tokens, D]
    if calib is not None:
        calib.tokens += len(ids)
    ple = None
    if cfg.ple_dim:
        P = cfg.ple_dim
        if calib is not None:
            calib.record([C.PLE_PROJ], x)
        proj = W.linear(x, C.PLE_PROJ) * np.float32(cfg.hidden_size ** -0.5)
        proj = _rms(proj.reshape(len(ids), L, P), W.full(C.PLE_PROJ_NORM), eps)  # [tokens, L, P]
        table = np.stack([W.rows(C.weight_name(i, "ple_embed"), uniq)[inverse] for i in range(L)], axis=1)
        ple = (proj + table * np.float32(P ** 0.5)) * np.float32(2 ** -0.5)
    bounds = np.cumsum([0] + lengths)
    shared_kv: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i in range(L):
        def name(kind):
            return C.weight_name(i, kind)

        def record(kinds, a):
            if calib is not None:
                calib.record([name(k) for k in kinds if name(k) in W.shapes], a)

        H, K = cfg.head_dim_for(i), cfg.kv_heads_for(i)
        G = N // K
        inv = _inv_freq(cfg, i)
        h = _rms(x, W.full(name("attn_norm")), eps)
        record(("q", "k", "v"), h)
        q = W.linear(h, name("q")).reshape(-1, N, H)
        if cfg.has_qk_norm:
            q = _rms(q, W.full(name("q_norm")), eps)
        q = _rope(q, pos, inv) * np.float32(cfg.query_scale)
        src = cfg.kv_source(i)
        if src == i:
            k = W.linear(h, name("k")).reshape(-1, K, H)
            v = W.linear(h, name("v")).reshape(-1, K, H) if cfg.has_v_proj(i) else k
            if cfg.has_qk_norm:
                k = _rms(k, W.full(name("k_norm")), eps)
            if cfg.v_norm:
                v = _rms(v, None, eps)
            k = _rope(k, pos, inv)
            shared_kv[i] = [(k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        o = np.empty((len(ids), N * H), np.float32)
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            ks, vs = shared_kv[src][s]  # [T, K, H]
            T = b - a
            qs = q[a:b].reshape(T, K, G, H)
            scores = np.einsum("tkgh,skh->kgts", qs, ks)  # [K, G, T, T]
            if cfg.attn_softcap:
                scores = np.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
            qi, kj = np.arange(T)[:, None], np.arange(T)[None, :]
            visible = kj <= qi
            if cfg.is_sliding(i) and cfg.sliding_window:
                visible &= qi - kj < cfg.sliding_window
            scores = np.where(visible, scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            o[a:b] = np.einsum("kgts,skh->tkgh", scores, vs).reshape(T, N * H)
        record(("o",), o)
        o = W.linear(o, name("o"))
        if cfg.has_post_norms:
            o = _rms(o, W.full(name("post_attn_norm")), eps)
        x = x + o
        h = _rms(x, W.full(name("ffn_norm")), eps)
        record(("gate", "up"), h)
        m = W.gated(h, name("gate"), name("up"))
        record(("down",), m)
        m = W.linear(m, name("down"))
        if cfg.has_post_norms:
            m = _rms(m, W.full(name("post_ffn_norm")), eps)
        x = x + m
        if ple is not None:
            record(("ple_gate",), x)
            g = _gelu(W.linear(x, name("ple_gate"))) * ple[:, i, :]
            record(("ple_out",), g)
            x = x + _rms(W.linear(g, name("ple_out")), W.full(name("ple_norm")), eps)
        if cfg.layer_scale:
            x = x * W.full(name("layer_scale"))
        for j in [j for j in shared_kv if all(cfg.kv_source(t) != j for t in range(i + 1, L))]:
            del shared_kv[j]  # no later layer reads this cache
    h = _rms(x, W.full(C.FINAL_NORM), eps)
    if calib is not None:
        calib.record([C.EMBED], h)  # the tied embedding is also the LM head, fed by the final norm
    if not logits:
        return None
    z = W.linear(h, C.EMBED)
    if cfg.final_softcap:
        z = np.tanh(z / cfg.final_softcap) * cfg.final_softcap
    return [z[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ---- what calibration changes: values, never the file's layout or kernels ---------------------------

@dataclass
class Plan:
    """How calibrated values differ from the checkpoint's, by canonical weight name:

    * ``col_scale``: a weight's input channels (columns) multiplied by s (SmoothQuant / AWQ
      migration), and the norm that feeds them by 1 / s (a norm weight's elements are its columns);
    * ``row_scale``: a weight's output rows multiplied by r (``up``'s rows by 1 / s when ``down``'s
      columns carry s), so that the model computes the same function in float;
    * ``importance``: per input channel weights of the squared rounding error that the scale
      search of ``quantize_blockwise`` / ``quantize_per_channel`` minimizes (llama.cpp's imatrix).
    """

    col_scale: dict = field(default_factory=dict)
    row_scale: dict = field(default_factory=dict)
    importance: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def apply(self, name: str, w: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of weight ``name`` ([rows, cols]; a norm's one row) as the calibrated file
        stores them, before quantizing."""
        s, r = self.col_scale.get(name), self.row_scale.get(name)
        if s is None and r is None:
            return w
        w = np.array(w, dtype=np.float32)
        if s is not None:
            w *= s[None, :]
        if r is not None:
            w *= r[r0:r1, None]
        return w


# ---- the calibrated recipe, as measured on the real 270M (README, the closing note of issue 13) ----

# Migration strength: s_j = max|x_j|^a / max|W_:j|^(1-a). Swept on the real 270M with statistics on
# text the model wrote itself, against fp32 on two texts (benchmarks/calibrate_alpha.py, the README):
# recipes with int4 attention or FFN do best at a fixed 0.5 (0.25, 0.65 and the search lose
# perplexity on both texts); int8 ones at 0.65 among fixed values (KL 0.0159 -> 0.0142 and
# 0.0142 -> 0.0126; 0.8 loses again), and better still searched per layer input (search_alpha).
SMOOTH_ALPHA = 0.5
SMOOTH_ALPHA_INT8 = 0.65
MIGRATED_KINDS = ROLES["attention"] + ROLES["ffn"]  # the weights make_plan migrates
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _as_kernels_see(x: np.ndarray) -> np.ndarray:
    """``x`` [tokens, in] after the kernels' on-the-fly int8 quantization of activations: per
    token, asymmetric, over the token's range widened to hold 0 (dynamic range quantization)."""
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    zero = np.round(-128.0 - lo / scale)
    return (np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale


def migration_error(x: np.ndarray, weights: list[np.ndarray], schemes: list, s: np.ndarray,
                    exact: list[np.ndarray]) -> float:
    """Squared output error of linear layers ``weights`` ([out, in] each, quantized by ``schemes``)
    on inputs ``x`` [tokens, in] when their input channels carry the migration ``s``: what the
    kernels compute, (x / s) quantized per token times (W * s) quantized, against ``exact``
    (x W^T for each weight)."""
    from .reference import dequantize_rows, quantize_rows

    xq = _as_kernels_see(x / s[None, :])
    err = 0.0
    for w, scheme, y in zip(weights, schemes, exact):
        ws = w * s[None, :]
        wq = ws if scheme.is_float else dequantize_rows(*quantize_rows(ws, scheme), scheme)
        err += float(np.sum((xq @ wq.T - y) ** 2))
    return err


def alpha_for_recipe(recipe: dict[str, str]) -> float:
    """The fixed migration strength for a recipe (kind -> scheme), used where the strength is not
    searched: ``SMOOTH_ALPHA_INT8`` when every migrated weight is int8, ``SMOOTH_ALPHA`` otherwise."""
    return SMOOTH_ALPHA_INT8 if search_alpha(recipe) else SMOOTH_ALPHA


def search_alpha(recipe: dict[str, str]) -> bool:
    """Whether ``--calibrate`` searches each group's strength for this recipe: when every weight it
    migrates (attention and FFN) is int8, whatever the embedding's scheme. Measured on the real
    270M against fp32 on two texts (benchmarks/calibrate_alpha.py, README): ``int8`` +1.6% / +1.1%
    perplexity at alpha 0.65 -> +0.97% / +0.90% searched, ``int4-emb`` (with its embedding in one
    int4 table, before the split) +8.1% / +12.05% at 0.5 -> +7.7% / +12.0%; on the int4 preset
    (int4 FFN) the search lowers KL (0.067 -> 0.062, 0.066 -> 0.060) but not perplexity (+6.1% ->
    +6.9%, +6.7% -> +6.8%), so it keeps the fixed 0.5."""
    return bool(recipe) and all(recipe.get(k, "int8") == "int8" for k in MIGRATED_KINDS)


def make_plan(cfg: GemmaConfig, calib: Calibration, read, alpha: float = SMOOTH_ALPHA, recipe=None,
              grid=ALPHA_GRID, sample_rows: int = 1024) -> Plan:
    """SmoothQuant-style migration of every linear input's per-channel range into the weights,
    folded where the model computes the same function in float: q/k/v into the attention norm,
    gate/up into the FFN norm, down into up's rows, o into v's rows (not for Gemma 4, whose V is
    normalized; not for k_eq_v layers); then the importance (mean x^2 of the migrated inputs) of
    every quantized weight for the scale search. The tied embedding / LM head is not migrated
    (its rows are also the lookup table). ``read`` gives canonical weight rows (for max |W|);
    ``alpha`` is the migration strength (``alpha_for_recipe``).

    With a ``recipe`` (kind -> scheme name) and the input samples ``calib`` kept, each group's
    strength is searched instead, over ``grid``: the one whose ``migration_error`` (activations and
    weights rounded as the file's kernels round them) is least, on up to ``sample_rows`` evenly
    spread output rows of each weight (AWQ's search, with SmoothQuant's formula)."""
    plan = Plan()
    shapes = C.weight_shapes(cfg)

    def col_max(names) -> np.ndarray:
        out = None
        for n in names:
            rows = shapes[n][0]
            m = np.zeros(shapes[n][1], np.float32)
            step = max(1, (64 << 20) // (4 * shapes[n][1]))
            for r0 in range(0, rows, step):
                np.maximum(m, np.abs(read(n, r0, min(rows, r0 + step))).max(axis=0), out=m)
            out = m if out is None else np.maximum(out, m)
        return out

    chosen: list[float] = []

    def factor(consumers, shape=lambda s: s) -> np.ndarray:
        """The migration of a group's input channels; ``shape`` maps the formula's s to the one
        applied (o's is shared per KV head)."""
        x_max = np.maximum(calib.stats[consumers[0]].max_abs.astype(np.float64), 1e-5)
        w_max = np.maximum(col_max(consumers).astype(np.float64), 1e-5)

        def at(a: float) -> np.ndarray:
            s = x_max ** a / w_max ** (1 - a)
            return shape((s / np.exp(np.mean(np.log(s)))).astype(np.float32))  # geometric mean 1: ranges stay put

        sample = calib.samples.get(consumers[0])
        if recipe is None or sample is None:
            return at(alpha)
        x = sample.astype(np.float32)
        schemes = [get_scheme(recipe.get(kind_of(c), "fp32")) for c in consumers]
        weights = []
        for c in consumers:
            rows = shapes[c][0]
            pick = np.linspace(0, rows - 1, min(rows, sample_rows)).astype(np.int64)
            weights.append(read(c, 0, rows) if rows <= sample_rows
                           else np.concatenate([read(c, int(r), int(r) + 1) for r in pick]))
        exact = [x @ w.T for w in weights]
        errors = {a: migration_error(x, weights, schemes, at(a), exact) for a in grid}
        best = min(errors, key=errors.get)
        chosen.append(best)
        return at(best)

    for i in range(cfg.num_layers):
        def n(kind):
            return C.weight_name(i, kind)

        own = cfg.kv_source(i) == i
        qkv = [n("q")] + ([n("k")] + ([n("v")] if cfg.has_v_proj(i) else []) if own else [])
        s = factor(qkv)
        for c in qkv:
            plan.col_scale[c] = s
        plan.col_scale[n("attn_norm")] = 1 / s
        s = factor([n("gate"), n("up")])
        plan.col_scale[n("gate")] = plan.col_scale[n("up")] = s
        plan.col_scale[n("ffn_norm")] = 1 / s
        s = factor([n("down")])
        plan.col_scale[n("down")] = s
        plan.row_scale[n("up")] = 1 / s
        if own and cfg.has_v_proj(i) and not cfg.v_norm and \
                not any(cfg.kv_source(j) == i for j in range(i + 1, cfg.num_layers)):
            # o's inputs are [heads x H]: one factor per head-dim channel of each KV head, shared by
            # the query heads that read it (the V rows are per KV head)
            N, K, H = cfg.num_heads, cfg.kv_heads_for(i), cfg.head_dim_for(i)

            def per_kv_head(s):
                s = s.reshape(K, N // K, H).max(axis=1)  # [K, H]
                s = s / np.exp(np.mean(np.log(s)))
                return np.repeat(s, N // K, axis=0).reshape(-1).astype(np.float32)

            s = factor([n("o")], per_kv_head)
            plan.col_scale[n("o")] = s
            plan.row_scale[n("v")] = (1 / s.reshape(N, H)[::N // K]).reshape(-1).astype(np.float32)
    for name, st in calib.stats.items():
        s = plan.col_scale.get(name)
        plan.importance[name] = (st.mean_sq / (s.astype(np.float64) ** 2 if s is not None else 1.0)).astype(np.float32)
    how = (f"alpha searched per layer input, {min(chosen)}-{max(chosen)}, median {float(np.median(chosen)):.2f}"
           if chosen else f"alpha {alpha}")
    plan.notes.append(f"calibrated on {calib.tokens} tokens: ranges migrated into weights ({how}) at every "
                      "linear input but the LM head, scales searched for the least importance-weighted error")
    return plan


def text_sequences(tokenizer, text: str, length: int = 128, count: int = 16) -> list[list[int]]:
    """Calibration sequences of ``length`` tokens (<bos> first) cut from ``text``."""
    ids = tokenizer.encode(text, add_bos=False)
    seqs = [[tokenizer.bos_id] + ids[k:k + length - 1] for k in range(0, len(ids), length - 1)]
    seqs = [s for s in seqs if len(s) > 16][:count]
    if not seqs:
        from ..runtime.errors import GemmaEdgeError

        raise GemmaEdgeError(f"the calibration text has {len(ids)} tokens; give at least a few hundred")
    return seqs


def generated_sequences(model_path: str, length: int = 128, count: int = 16, seed: int = 0,
                        progress: bool = False, cache_dir: str | None = None) -> list[list[int]]:
    """Calibration sequences the model writes itself, unprompted (temperature 1, no top-k/p), from
    a converted file of its weights: no data set needed, and no evaluation text leaks in.

    The model runs in a child process of its own, so the runtime (the weights it maps, its arenas
    and tokenizer) is never held beside the converter's arrays, and its memory is given back
    before the statistics are gathered. ``cache_dir`` is where that child packs its XNNPACK
    weight cache (a temporary folder deleted with the temporary file, not the user's cache)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from ..runtime.errors import GemmaEdgeError
    from ..runtime.process import child_dies_with_parent

    env = dict(os.environ, **({"GEMMA_EDGE_CACHE": cache_dir} if cache_dir else {}))
    cmd = [sys.executable, "-m", "gemma_edge.quantize.calibrate", model_path, str(length), str(count), str(seed)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count * (length - 1), unit="tok", leave=False,
                   desc="calibration text: the model writes its own (a child process)")
    seqs = []
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env, preexec_fn=child_dies_with_parent)
        try:
            for line in proc.stdout:
                seqs.append(json.loads(line))
                if bar is not None:
                    bar.update(len(seqs[-1]) - 1)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # Ctrl-C or an error here: the child goes too
                proc.kill()
                proc.wait()
            if bar is not None:
                bar.close()
        if rc in (-2, 130):  # Ctrl-C reached the child first
            raise KeyboardInterrupt
        if rc != 0 or len(seqs) != count:
            err.seek(0)
            tail = "\n".join(err.read().strip().splitlines()[-12:])
            raise GemmaEdgeError(f"writing the calibration text failed (the child running {model_path} exited with "
                                 f"{rc} after {len(seqs)} of {count} sequences):\n{tail}\n"
                                 "give --calibrate a text file instead, or report this with the lines above")
    return seqs


def _write_sequences(model_path: str, length: int, count: int, seed: int) -> None:
    """The child of ``generated_sequences``: one JSON list of ids per line, as each is written."""
    import json

    from ..runtime.engine import load

    m = load(model_path)
    bos = m.bos_id
    for k in range(count):
        toks = m.generate([bos], max_tokens=length - 1, temperature=1.0, top_k=0, top_p=1.0, seed=seed + k,
                          stop_tokens=False).tokens
        print(json.dumps([bos] + [int(t) for t in toks]), flush=True)


if __name__ == "__main__":
    import sys

    from ..runtime.errors import GemmaEdgeError

    try:
        _write_sequences(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
    except GemmaEdgeError as e:  # the parent shows the message; a traceback would only hide it
        sys.exit(f"{e}")
