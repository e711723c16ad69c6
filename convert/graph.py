"""The Gemma forward pass as a TensorFlow graph, and its conversion to a weightless template.

One config-driven implementation for Gemma 1, 2, 3 and 4 (per-layer embeddings, KV sharing,
per-layer head dims, proportional RoPE, V norm, layer scales). Every weight is a named graph
*input* (``tf.TensorSpec([out, in])``), so the template ``.tflite`` is a few hundred KB
whatever the model size; ``tflite_writer.apply_surgery`` later turns those inputs into
(quantized) constants written by a streaming writer. Signatures, tensor and weight names
follow LiteRT-LM's contract (``runtime/contract.py``): ``prefill_<T>`` (KV caches only),
``decode`` (``logits [1, 1, V]`` as well), and ``score_<T>`` (a prefill chunk that also
returns ``logits [1, T, V]`` for every position, so perplexity runs T tokens a call). An
embedding model's ``embed_<T>`` runs the same layers without a cache (``caches=None``): the
chunk attends to itself, text by text, and its tail pools each text into one vector.

Shapes: T tokens in the chunk, S context length, D d_model, N query heads,
K KV heads, G = N / K, H head_dim, F FFN hidden, V vocab.
"""

from __future__ import annotations

import os

import numpy as np

from ..runtime import contract as C
from ..runtime.config import GemmaConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402
from tensorflow.compiler.tf2xla.python import xla  # noqa: E402  (DYNAMIC_UPDATE_SLICE)

MASK_VALUE = -1e30  # additive mask; every real query sees at least its own key


def _rms_norm(x, scale, eps):
    """Gemma RMSNorm in fp32 over the last axis; ``scale`` is the multiplier as stored in the file
    (Gemma 1-3's (1 + w) already added), or None for Gemma 4's V norm, which has none."""
    y = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def _linear(x, w):
    """[T, in] x [out, in]^T -> [T, out]; lowers to FULLY_CONNECTED on the [out, in] weight."""
    return tf.matmul(x, w, transpose_b=True)


def _rows(w: dict, name: str, ids):
    """Rows ``ids`` of table ``name``, times their scales when the file keeps those as a tensor
    (``contract.row_scales_name``; a GATHER of T floats, the lookup itself reading the stored values)."""
    rows = tf.gather(w[name], ids)
    scales = w.get(C.row_scales_name(name))
    return rows if scales is None else rows * tf.gather(scales, ids)[:, None]


def _head(w: dict, name: str, h):
    """[T, D] x table ``name`` -> [T, rows], times the rows' scales when kept as a tensor."""
    out = _linear(h, w[name])
    scales = w.get(C.row_scales_name(name))
    return out if scales is None else out * scales


def _lookup(cfg: GemmaConfig, w: dict, ids):
    """The embedding rows of ``ids`` [T]. A split embedding (``cfg.embed_hot``) looks each id up in
    both tables, at its row in each (clamped into range: the other table's row is not used), and
    keeps the row of the table that holds it: two EMBEDDING_LOOKUPs of T rows and a select, so
    each table keeps its own scheme."""
    if not cfg.embed_hot:
        return _rows(w, C.EMBED, ids)
    H = cfg.embed_hot_rows
    hot_row, below, is_hot, at = tf.zeros_like(ids), tf.zeros_like(ids), tf.zeros_like(ids, dtype=tf.bool), 0
    for a, b in C.embed_segments(C.EMBED_HOT, cfg):
        inside = (ids >= a) & (ids < b)
        is_hot = is_hot | inside
        hot_row = tf.where(inside, ids - a + at, hot_row)
        below = below + tf.clip_by_value(ids - a, 0, b - a)  # hot rows before the id: a cold id's offset
        at += b - a
    hot = _rows(w, C.EMBED_HOT, hot_row)
    cold = _rows(w, C.EMBED_COLD, tf.clip_by_value(ids - below, 0, cfg.vocab_size - H - 1))
    return tf.where(is_hot[:, None], hot, cold)


def _lm_head(cfg: GemmaConfig, w: dict, h):
    """[T, D] -> logits [T, V] on the tied embedding; a split one is two FULLY_CONNECTED whose
    columns are put back in vocabulary order (slices and a concatenation)."""
    if not cfg.embed_hot:
        return _head(w, C.EMBED, h)
    z = {name: _head(w, name, h) for name in (C.EMBED_HOT, C.EMBED_COLD)}
    segments = sorted((a, b, name) for name in z for a, b in C.embed_segments(name, cfg))
    parts, at = [], {name: 0 for name in z}
    for a, b, name in segments:
        n, t = b - a, z[name]
        parts.append(t if n == t.shape[-1] else t[:, at[name]:at[name] + n])
        at[name] += n
    return tf.concat(parts, axis=-1)


def _rope(x, cos, sin):
    """Half-split RoPE: pairs (j, j + H/2). x: [T, n, H]; cos, sin: [T, 1, H/2]."""
    x1, x2 = tf.split(x, 2, axis=-1)
    return tf.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _inv_freq(cfg: GemmaConfig, layer: int) -> np.ndarray:
    """[H/2] rotary frequencies of a layer: base^(-2j/H) / scale for the first fraction*H/2 pairs,
    0 (no rotation) for the rest (Gemma 4's "proportional" RoPE on global layers)."""
    h = cfg.head_dim_for(layer)
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = 1.0 / (np.float32(cfg.rope_base_for(layer)) ** exponent)
    inv = (inv / np.float32(cfg.rope_scale_for(layer))).astype(np.float32)
    inv[int(cfg.rope_fraction_for(layer) * h // 2):] = 0.0
    return inv


def _gelu(x):
    return tf.nn.gelu(x, approximate=True)


def forward(cfg: GemmaConfig, w: dict, tokens, input_pos, caches: dict | None, logits: str, span: int | None = None,
            segments=None, extra_ids=None):
    """One chunk of T tokens written at slots input_pos[0] .. input_pos[0]+T-1 of every cache.

    tokens [1, T] int32, input_pos [T] int32 (real tokens are consecutive; padding
    slots carry position 0 and are overwritten later), caches name -> [1, K, S, H] for the
    layers that own one (``contract.kv_layers``; the others read ``cfg.kv_source(layer)``'s),
    a ring file's sliding layers' [1, K, 2R - W, H] and its ``RING_POS`` (``_ring_mask``).
    ``span`` (< S) makes global layers attend only to slots 0 .. span-1 (``decode_s<span>``,
    for positions below it). Returns the updated caches, and ``logits``: of the last token
    [1, 1, V] (LAST_LOGITS), of every token [1, T, V] (ALL_LOGITS), of the last token over the
    hot table's rows and the E tokens of ``extra_ids`` [1, 1, H + E] (HOT_LOGITS, ``decode_hot``;
    needs ``cfg.embed_hot``), or none.

    ``caches=None`` (an embedding model): no cache; ``segments`` [T] int32 numbers each token's
    text and ``input_pos`` is its position in that text (``_chunk_masks``); returns
    ``embeddings`` [1, G, E] (POOLED, ``_pool``).
    """
    T = tokens.shape[1]
    # the context: a global layer's cache (a ring file's sliding caches are shorter)
    S = T if caches is None else max(c.shape[2] for n, c in caches.items() if n != C.RING_POS)
    N, L = cfg.num_heads, cfg.num_layers
    eps = cfg.rms_norm_eps
    ids = tokens[0]
    G_SPAN = span or S  # slots a global layer attends to
    # A span within the window (decode_s<span> with span <= W, for positions below it): a sliding
    # layer's window then holds every slot 0 .. pos, so it reads slots 0 .. span-1 like a global
    # layer, through a SLICE of constant start that XNNPACK runs in place, not a SLICE from
    # pos - W + 1 (which LiteRT runs outside XNNPACK as a copy; benchmarks/sliding_window_slice.py).
    windowless = span is not None and bool(cfg.sliding_window) and span <= cfg.sliding_window

    x = _lookup(cfg, w, ids) * np.float32(cfg.embed_scale)  # [T, D]

    if cfg.ple_dim:  # per-layer embeddings: a row of each layer's table plus a projection of x
        P = cfg.ple_dim
        proj = _linear(x, w[C.PLE_PROJ]) * np.float32(cfg.hidden_size ** -0.5)  # [T, L*P]
        proj = tf.unstack(_rms_norm(tf.reshape(proj, [T, L, P]), w[C.PLE_PROJ_NORM], eps), axis=1)  # L x [T, P]
        ple = [(proj[i] + _rows(w, C.weight_name(i, "ple_embed"), ids) * np.float32(P ** 0.5))
               * np.float32(2 ** -0.5) for i in range(L)]  # L x [T, P]

    # A ring file (cfg.kv_ring, contract.ring_slots): sliding layers write at position % R and
    # attend to every slot of their ring, masked by the position each slot holds (no SLICE).
    ring = caches is not None and bool(cfg.kv_ring)
    pos = tf.cast(input_pos, tf.float32)[:, None]  # [T, 1]
    q_pos = input_pos[:, None]  # [T, 1]
    new_caches = {}
    if caches is None:  # an embedding chunk: every layer attends to all T keys of the chunk, masked
        masks, win, w_begin = _chunk_masks(cfg, input_pos, segments), T, None  # [T, T] each
    else:
        k_pos = tf.range(G_SPAN, dtype=tf.int32)[None, :]  # [1, G_SPAN]
        masks = {False: tf.where(k_pos <= q_pos, 0.0, MASK_VALUE)}  # [T, G_SPAN], keyed by "is sliding"
        # A sliding layer reads only the W + T - 1 slots a chunk can see, from `w0`: a SLICE (a
        # memcpy of contiguous rows) of its cache, so its cost does not grow with the context S.
        # Keys outside the window get exactly zero weight either way: this changes speed, not results.
        W = cfg.sliding_window or S
        win = min(W + T - 1, S)
        w_begin = None
        if ring:
            masks[True], new_caches[C.RING_POS] = _ring_mask(cfg, input_pos, caches[C.RING_POS])
        elif cfg.sliding_window and not windowless and any(cfg.is_sliding(i) for i in range(L)):
            w0 = tf.clip_by_value(input_pos[0] - W + 1, 0, S - win)  # first slot of the window
            w_pos = w0 + tf.range(win, dtype=tf.int32)[None, :]  # [1, win]
            w_visible = tf.logical_and(w_pos <= q_pos, q_pos - w_pos < W)  # [T, win]
            masks[True] = tf.where(w_visible, 0.0, MASK_VALUE)  # [T, win]
            w_begin = tf.stack([0, 0, w0, 0])
    rope_tables = {}  # inv_freq bytes -> (cos, sin), computed once per distinct table
    start = tf.stack([0, 0, input_pos[0], 0])
    ring_start = tf.stack([0, 0, tf.math.floormod(input_pos[0], cfg.kv_ring), 0]) if ring else None

    for i in range(L):
        def wt(kind):
            return w[C.weight_name(i, kind)]

        H, K = cfg.head_dim_for(i), cfg.kv_heads_for(i)
        G = N // K
        inv = _inv_freq(cfg, i)
        if inv.tobytes() not in rope_tables:
            ang = pos * tf.constant(inv[None, :])  # [T, H/2]
            rope_tables[inv.tobytes()] = (tf.cos(ang)[:, None, :], tf.sin(ang)[:, None, :])
        cos, sin = rope_tables[inv.tobytes()]

        # ---- attention ----
        h = _rms_norm(x, wt("attn_norm"), eps)  # [T, D]
        q = tf.reshape(_linear(h, wt("q")), [T, N, H])  # [T, N, H]
        if cfg.has_qk_norm:
            q = _rms_norm(q, wt("q_norm"), eps)
        q = _rope(q, cos, sin)
        if cfg.query_scale != 1.0:
            q = q * np.float32(cfg.query_scale)
        src = cfg.kv_source(i)
        if src == i:  # this layer computes (and caches) its own keys and values
            k = tf.reshape(_linear(h, wt("k")), [T, K, H])  # [T, K, H]
            v = tf.reshape(_linear(h, wt("v")), [T, K, H]) if cfg.has_v_proj(i) else k  # [T, K, H]
            if cfg.has_qk_norm:
                k = _rms_norm(k, wt("k_norm"), eps)
            if cfg.v_norm:
                v = _rms_norm(v, None, eps)
            k = _rope(k, cos, sin)
            kn, vn = C.kv_name("k", i), C.kv_name("v", i)
            if caches is None:  # the chunk's own keys and values, [1, K, T, H]
                new_caches[kn], new_caches[vn] = tf.transpose(k, [1, 0, 2])[None], tf.transpose(v, [1, 0, 2])[None]
            else:
                at = ring_start if ring and cfg.is_sliding(i) else start
                new_caches[kn] = xla.dynamic_update_slice(caches[kn], tf.transpose(k, [1, 0, 2])[None], at)  # [1, K, S, H]
                new_caches[vn] = xla.dynamic_update_slice(caches[vn], tf.transpose(v, [1, 0, 2])[None], at)  # [1, K, S, H]
        kc, vc = new_caches[C.kv_name("k", src)], new_caches[C.kv_name("v", src)]

        # query head n uses KV head n // G: group the G query heads of each KV head.
        # The caches are used whole, as rank-4 BATCH_MATMUL operands: a slice such as
        # kc[0] becomes a STRIDED_SLICE that copies the cache element by element
        # (~3 ms per layer at S=2048, measured), more than all the weights cost.
        qg = tf.reshape(tf.transpose(tf.reshape(q, [T, K, G, H]), [1, 2, 0, 3]), [1, K, G * T, H])
        # the slots this layer attends to: its window (sliding), or 0 .. G_SPAN-1 (global)
        sliding = cfg.is_sliding(i) and not windowless
        n_keys, begin = (win, w_begin) if sliding else (G_SPAN, [0, 0, 0, 0])
        if sliding and ring:  # the whole ring, in place
            n_keys = kc.shape[2]
        keys, values = kc, vc
        if n_keys < kc.shape[2]:
            keys = tf.slice(kc, begin, [1, K, n_keys, H])  # [1, K, n_keys, H]
            values = tf.slice(vc, begin, [1, K, n_keys, H])
        s = tf.matmul(qg, keys, transpose_b=True)  # [1, K, G*T, n_keys]
        if cfg.attn_softcap:
            s = tf.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
        s = tf.reshape(s, [K, G, T, n_keys]) + masks[sliding]  # [K, G, T, n_keys]
        a = tf.nn.softmax(s, axis=-1)
        o = tf.matmul(tf.reshape(a, [1, K, G * T, n_keys]), values)  # [1, K, G*T, H]
        o = tf.reshape(tf.transpose(tf.reshape(o, [K, G, T, H]), [2, 0, 1, 3]), [T, N * H])
        o = _linear(o, wt("o"))  # [T, D]
        if cfg.has_post_norms:
            o = _rms_norm(o, wt("post_attn_norm"), eps)
        x = x + o

        # ---- GeGLU feed-forward ----
        h = _rms_norm(x, wt("ffn_norm"), eps)  # [T, D]
        m = _gelu(_linear(h, wt("gate"))) * _linear(h, wt("up"))  # [T, F]
        m = _linear(m, wt("down"))  # [T, D]
        if cfg.has_post_norms:
            m = _rms_norm(m, wt("post_ffn_norm"), eps)
        x = x + m

        # ---- per-layer input, then the layer's scale ----
        if cfg.ple_dim:
            g = _gelu(_linear(x, wt("ple_gate"))) * ple[i]  # [T, P]
            x = x + _rms_norm(_linear(g, wt("ple_out")), wt("ple_norm"), eps)  # [T, D]
        if cfg.layer_scale:
            x = x * wt("layer_scale")

    if logits == C.POOLED:
        return {C.EMBEDDINGS: _pool(cfg, w, _rms_norm(x, w[C.FINAL_NORM], eps), segments)}
    out = dict(new_caches)
    if logits != C.NO_LOGITS:
        h = _rms_norm(x if logits == C.ALL_LOGITS else x[-1:], w[C.FINAL_NORM], eps)  # [1 or T, D]
        if logits == C.HOT_LOGITS:  # [1, H + E]: the hot table's rows, then the rows of extra_ids (a draft's step)
            z = tf.concat([_head(w, C.EMBED_HOT, h), tf.matmul(h, _lookup(cfg, w, extra_ids), transpose_b=True)], -1)
        else:
            z = _lm_head(cfg, w, h)  # [1 or T, V]
        if cfg.final_softcap:
            z = tf.tanh(z / cfg.final_softcap) * cfg.final_softcap
        out[C.LOGITS] = tf.reshape(z, [1, -1, z.shape[-1]])
    return out


def _ring_mask(cfg: GemmaConfig, input_pos, ring_pos):
    """A ring file's sliding-layer mask [T, P] and its updated slot positions [1, 1, P, 1].

    The chunk goes to slots a .. a + T - 1, a = input_pos[0] % R; a slot gets 1 + its token's
    position, or 0 for padding (a token whose position is not input_pos[0] + its index: LiteRT-LM
    and gemma-edge pad a chunk with position 0). The other slot of each position written (x % R
    and x % R + R) is emptied, so after a rewind no position is held twice. A query at q sees a
    slot holding x when q - W < x <= q and x % R == slot % R (true of every value the graph
    writes, and rarely of anything else in a buffer a runtime did not clear)."""
    R, W = cfg.kv_ring, cfg.sliding_window
    T = input_pos.shape[0]
    P = ring_pos.shape[2]
    p0 = input_pos[0]
    a = tf.math.floormod(p0, R)
    slot = tf.range(P, dtype=tf.int32)  # [P]
    rel = slot - a  # the chunk's token at this slot, if 0 <= rel < T
    in_chunk = tf.logical_and(rel >= 0, rel < T)
    real = tf.logical_and(in_chunk, tf.equal(tf.gather(input_pos, tf.clip_by_value(rel, 0, T - 1)), p0 + rel))
    twin = tf.logical_and(tf.logical_not(in_chunk), tf.math.floormod(slot - a, R) < T)  # same positions' other slots
    old = tf.cast(tf.reshape(ring_pos, [P]), tf.int32)
    tag = tf.where(real, p0 + rel + 1, tf.where(tf.logical_or(in_chunk, twin), 0, old))  # [P]
    x = tag - 1  # each slot's position (-1: none)
    q = input_pos[:, None]  # [T, 1]
    visible = tf.logical_and(tf.logical_and(x[None, :] >= 0, x[None, :] <= q), q - x[None, :] < W)
    visible = tf.logical_and(visible, tf.equal(tf.math.floormod(x - slot, R), 0)[None, :])  # [T, P]
    return tf.where(visible, 0.0, MASK_VALUE), tf.reshape(tf.cast(tag, tf.float32), [1, 1, P, 1])


def _chunk_masks(cfg: GemmaConfig, input_pos, segments) -> dict:
    """Additive masks [T, T] of a chunk without a cache, keyed by "is sliding": a token sees
    the tokens of its own text (``segments``), causally or, for a bidirectional model, both
    ways. A bidirectional sliding layer sees keys at most sliding_window // 2 positions away
    on either side: transformers' Gemma 3 (``use_bidirectional_attention``: |i - j| <
    sliding_window // 2 + 1) and llama.cpp's symmetric window (|i - j| <= n_swa / 2) agree."""
    d = input_pos[:, None] - input_pos[None, :]  # [T, T] query position - key position
    see = tf.equal(segments[:, None], segments[None, :])  # [T, T]
    if not cfg.bidirectional:
        see = tf.logical_and(see, d >= 0)
    masks = {False: tf.where(see, 0.0, MASK_VALUE)}
    if cfg.sliding_window:
        r = cfg.sliding_window // 2
        near = tf.logical_and(d <= r, d >= -r) if cfg.bidirectional else d < cfg.sliding_window
        masks[True] = tf.where(tf.logical_and(see, near), 0.0, MASK_VALUE)
    return masks


def _pool(cfg: GemmaConfig, w: dict, x, segments):
    """[1, G, E]: each text's mean over its tokens (prompt and <bos>/<eos> included, as
    sentence-transformers' mean pooling), through the Dense layers (no bias or activation)."""
    G = C.embed_slots(x.shape[0])
    member = tf.cast(tf.equal(tf.range(G, dtype=tf.int32)[:, None], segments[None, :]), tf.float32)  # [G, T]
    count = tf.reduce_sum(member, axis=1, keepdims=True)  # [G, 1]
    e = tf.matmul(member, x) / tf.maximum(count, 1.0)  # [G, D]
    for k in range(len(cfg.dense_dims)):
        e = _linear(e, w[C.dense_name(k)])  # [G, E]
    return e[None]  # [1, G, E]


def _signature_fn(cfg: GemmaConfig, name: str, context: int, row_scaled=()):
    T, logits, span = C.parse_signature(name)
    shapes = C.weight_shapes(cfg)
    shapes |= {C.row_scales_name(n): shapes[n][:1] for n in row_scaled}
    kv = {} if logits == C.POOLED else C.kv_shapes(cfg, context)
    specs = [tf.TensorSpec([1, T], tf.int32, name=C.TOKENS), tf.TensorSpec([T], tf.int32, name=C.INPUT_POS)]
    extra = {C.SEGMENTS: [T]} if logits == C.POOLED else {C.EXTRA_IDS: [C.HOT_EXTRA]} if logits == C.HOT_LOGITS else {}
    specs += [tf.TensorSpec(s, tf.int32, name=n) for n, s in extra.items()]
    specs += [tf.TensorSpec(s, tf.float32, name=n) for n, s in kv.items()]
    specs += [tf.TensorSpec(s, tf.float32, name=n) for n, s in shapes.items()]
    names = [C.TOKENS, C.INPUT_POS, *extra, *kv, *shapes]

    def fn(*args):
        a = dict(zip(names, args))
        caches = {n: a[n] for n in kv} if kv else None
        return forward(cfg, {n: a[n] for n in shapes}, a[C.TOKENS], a[C.INPUT_POS], caches, logits, span,
                       a.get(C.SEGMENTS), a.get(C.EXTRA_IDS))

    fn.__name__ = name  # the signature key
    return tf.function(fn, input_signature=specs, autograph=False)


def build_template(cfg: GemmaConfig, context: int, signatures: list[str], row_scaled=()) -> bytes:
    """Convert the graph (weights as inputs) to a template .tflite: one subgraph per signature.
    ``row_scaled``: vocabulary tables whose per-row scales are an input of their own
    (``contract.vocab_tables``)."""
    module = tf.Module()
    fns = []
    for name in signatures:
        setattr(module, name, _signature_fn(cfg, name, context, row_scaled))
        fns.append(getattr(module, name).get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions(fns, module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


if __name__ == "__main__":  # one signature per child process: see template.py
    import json
    import sys

    cfg_json, context, signature, out_path, row_scaled = sys.argv[1:6]
    cfg = GemmaConfig.from_dict(json.loads(cfg_json))
    data = build_template(cfg, int(context), [signature], json.loads(row_scaled))
    with open(out_path, "wb") as f:
        f.write(data)
