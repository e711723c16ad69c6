"""The Gemma forward pass as a TensorFlow graph, and its conversion to a weightless template.

One config-driven implementation for Gemma 1, 2 and 3. Every weight is a named graph
*input* (``tf.TensorSpec([out, in])``), so the template ``.tflite`` is a few hundred KB
whatever the model size; ``surgery.py`` later turns those inputs into (quantized)
constants written by a streaming writer. Signatures follow LiteRT-LM's contract:
``prefill_<T>`` (KV caches only) and ``decode`` (``logits [1, 1, V]`` as well). An extra
``score_<T>`` signature (a prefill chunk that also returns ``logits [1, T, V]`` for every
position) lets perplexity run T tokens a call; LiteRT-LM ignores it.

Shapes: T tokens in the chunk, S context length, D d_model, N query heads,
K KV heads, G = N / K, H head_dim, F FFN hidden, V vocab.
"""

from __future__ import annotations

import os

import numpy as np

from ..runtime.config import GemmaConfig
from .template import kv_shape, weight_shapes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402
from tensorflow.compiler.tf2xla.python import xla  # noqa: E402  (DYNAMIC_UPDATE_SLICE)

MASK_VALUE = -1e30  # additive mask; every real query sees at least its own key


def _rms_norm(x, scale, eps):
    """Gemma RMSNorm in fp32; ``scale`` already holds (1 + w)."""
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + eps) * scale


def _linear(x, w):
    """[T, in] x [out, in]^T -> [T, out]; lowers to FULLY_CONNECTED on the [out, in] weight."""
    return tf.matmul(x, w, transpose_b=True)


def _rope(x, cos, sin):
    """Half-split RoPE. x: [T, n, H]; cos, sin: [T, 1, H/2]."""
    x1, x2 = tf.split(x, 2, axis=-1)
    return tf.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _inv_freq(cfg: GemmaConfig, layer: int) -> np.ndarray:
    h = cfg.head_dim
    exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv = 1.0 / (np.float32(cfg.rope_base_for(layer)) ** exponent)
    return (inv / np.float32(cfg.rope_scale_for(layer))).astype(np.float32)  # [H/2]


LOGITS = ("none", "last", "all")  # prefill, decode, score


def forward(cfg: GemmaConfig, w: dict, tokens, input_pos, caches: dict, logits: str):
    """One chunk of T tokens written at slots input_pos[0] .. input_pos[0]+T-1 of every cache.

    tokens [1, T] int32, input_pos [T] int32 (real tokens are consecutive; padding
    slots carry position 0 and are overwritten later), caches name -> [1, K, S, H].
    Returns the updated caches, and ``logits``: of the last token [1, 1, V] ("last"), of
    every token [1, T, V] ("all"), or none.
    """
    T = tokens.shape[1]
    S = caches["kv_cache_k_0"].shape[2]
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    eps = cfg.rms_norm_eps

    x = tf.gather(w["embed"], tokens[0]) * np.float32(cfg.embed_scale)  # [T, D]

    pos = tf.cast(input_pos, tf.float32)[:, None]  # [T, 1]
    q_pos = input_pos[:, None]  # [T, 1]
    k_pos = tf.range(S, dtype=tf.int32)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    masks = {False: tf.where(causal, 0.0, MASK_VALUE)}  # [T, S], keyed by "is sliding"
    if cfg.sliding_window and any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
        in_window = tf.logical_and(causal, q_pos - k_pos < cfg.sliding_window)
        masks[True] = tf.where(in_window, 0.0, MASK_VALUE)
    rope_tables = {}  # inv_freq bytes -> (cos, sin), computed once per distinct base
    # Decode on a sliding layer reads only the window's W slots: a SLICE (a memcpy of
    # contiguous rows) of the cache from `w0`, not all S. Keys outside the window get
    # exactly zero weight either way, so this changes speed, not results.
    W = cfg.sliding_window or S
    window_slice = T == 1 and W < S and True in masks
    if window_slice:
        w0 = tf.clip_by_value(input_pos[0] - W + 1, 0, S - W)  # first slot of the window
        w_pos = w0 + tf.range(W, dtype=tf.int32)[None, :]  # [1, W]
        w_visible = tf.logical_and(w_pos <= q_pos, q_pos - w_pos < W)  # [T=1, W]
        w_mask = tf.where(w_visible, 0.0, MASK_VALUE)  # [1, W]
        w_begin = tf.stack([0, 0, w0, 0])
    start = tf.stack([0, 0, input_pos[0], 0])
    new_caches = {}

    for i in range(cfg.num_layers):
        p = f"l{i}_"
        inv = _inv_freq(cfg, i)
        if inv.tobytes() not in rope_tables:
            ang = pos * tf.constant(inv[None, :])  # [T, H/2]
            rope_tables[inv.tobytes()] = (tf.cos(ang)[:, None, :], tf.sin(ang)[:, None, :])
        cos, sin = rope_tables[inv.tobytes()]

        # ---- attention ----
        h = _rms_norm(x, w[p + "attn_norm"], eps)  # [T, D]
        q = tf.reshape(_linear(h, w[p + "q"]), [T, N, H])  # [T, N, H]
        k = tf.reshape(_linear(h, w[p + "k"]), [T, K, H])  # [T, K, H]
        v = tf.reshape(_linear(h, w[p + "v"]), [T, K, H])  # [T, K, H]
        if cfg.has_qk_norm:
            q = _rms_norm(q, w[p + "q_norm"], eps)
            k = _rms_norm(k, w[p + "k_norm"], eps)
        q = _rope(q, cos, sin) * np.float32(cfg.query_scale)
        k = _rope(k, cos, sin)

        kc = xla.dynamic_update_slice(
            caches[f"kv_cache_k_{i}"], tf.transpose(k, [1, 0, 2])[None], start)  # [1, K, S, H]
        vc = xla.dynamic_update_slice(
            caches[f"kv_cache_v_{i}"], tf.transpose(v, [1, 0, 2])[None], start)  # [1, K, S, H]
        new_caches[f"kv_cache_k_{i}"], new_caches[f"kv_cache_v_{i}"] = kc, vc

        # query head n uses KV head n // G: group the G query heads of each KV head.
        # The caches are used whole, as rank-4 BATCH_MATMUL operands: a slice such as
        # kc[0] becomes a STRIDED_SLICE that copies the cache element by element
        # (~3 ms per layer at S=2048, measured), more than all the weights cost.
        qg = tf.reshape(tf.transpose(tf.reshape(q, [T, K, G, H]), [1, 2, 0, 3]), [1, K, G * T, H])
        keys, values, mask, L = kc, vc, masks[cfg.is_sliding(i)], S
        if window_slice and cfg.is_sliding(i):
            keys = tf.slice(kc, w_begin, [1, K, W, H])  # [1, K, W, H]
            values = tf.slice(vc, w_begin, [1, K, W, H])
            mask, L = w_mask, W
        s = tf.matmul(qg, keys, transpose_b=True)  # [1, K, G*T, L]
        if cfg.attn_softcap:
            s = tf.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
        s = tf.reshape(s, [K, G, T, L]) + mask  # [K, G, T, L]
        a = tf.nn.softmax(s, axis=-1)
        o = tf.matmul(tf.reshape(a, [1, K, G * T, L]), values)  # [1, K, G*T, H]
        o = tf.reshape(tf.transpose(tf.reshape(o, [K, G, T, H]), [2, 0, 1, 3]), [T, N * H])
        o = _linear(o, w[p + "o"])  # [T, D]
        if cfg.has_post_norms:
            o = _rms_norm(o, w[p + "post_attn_norm"], eps)
        x = x + o

        # ---- GeGLU feed-forward ----
        h = _rms_norm(x, w[p + "ffn_norm"], eps)  # [T, D]
        m = tf.nn.gelu(_linear(h, w[p + "gate"]), approximate=True) * _linear(h, w[p + "up"])  # [T, F]
        m = _linear(m, w[p + "down"])  # [T, D]
        if cfg.has_post_norms:
            m = _rms_norm(m, w[p + "post_ffn_norm"], eps)
        x = x + m

    out = dict(new_caches)
    if logits != "none":
        h = _rms_norm(x[-1:] if logits == "last" else x, w["final_norm"], eps)  # [1 or T, D]
        z = _linear(h, w["embed"])  # [1 or T, V]
        if cfg.final_softcap:
            z = tf.tanh(z / cfg.final_softcap) * cfg.final_softcap
        out["logits"] = tf.reshape(z, [1, -1, cfg.vocab_size])
    return out


def _signature_fn(cfg: GemmaConfig, name: str, T: int, context: int, logits: str):
    shapes = weight_shapes(cfg)
    kv_names = [f"kv_cache_{c}_{i}" for i in range(cfg.num_layers) for c in "kv"]
    specs = [tf.TensorSpec([1, T], tf.int32, name="tokens"), tf.TensorSpec([T], tf.int32, name="input_pos")]
    specs += [tf.TensorSpec(kv_shape(cfg, context), tf.float32, name=n) for n in kv_names]
    specs += [tf.TensorSpec(s, tf.float32, name=n) for n, s in shapes.items()]
    names = ["tokens", "input_pos", *kv_names, *shapes]

    def fn(*args):
        a = dict(zip(names, args))
        caches = {n: a[n] for n in kv_names}
        return forward(cfg, {n: a[n] for n in shapes}, a["tokens"], a["input_pos"], caches, logits)

    fn.__name__ = name  # the signature key
    return tf.function(fn, input_signature=specs, autograph=False)


def signature_kind(name: str) -> tuple[int, str]:
    """``prefill_32`` -> (32, "none"), ``score_32`` -> (32, "all"), ``decode`` -> (1, "last")."""
    if name == "decode":
        return 1, "last"
    kind, _, t = name.partition("_")
    return int(t), {"prefill": "none", "score": "all"}[kind]


def build_template(cfg: GemmaConfig, context: int, signatures: list[str]) -> bytes:
    """Convert the graph (weights as inputs) to a template .tflite: one subgraph per signature."""
    module = tf.Module()
    fns = []
    for name in signatures:
        T, logits = signature_kind(name)
        setattr(module, name, _signature_fn(cfg, name, T, context, logits))
        fns.append(getattr(module, name).get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions(fns, module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


if __name__ == "__main__":  # one signature per child process: see template.py
    import json
    import sys

    cfg_json, context, signature, out_path = sys.argv[1:5]
    cfg = GemmaConfig.from_dict(json.loads(cfg_json))
    data = build_template(cfg, int(context), [signature])
    with open(out_path, "wb") as f:
        f.write(data)
