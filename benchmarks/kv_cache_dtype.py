"""Would a float16 KV cache make long-context decode faster? One global layer's decode attention
over a long cache, with the cache stored as float32 (as gemma-edge's files do) and as float16.

Past a few thousand tokens a decode step of the 270M reads more K/V than weights, and llama.cpp,
whose cache is float16, decodes faster there (README, Long contexts). This probe builds the part
that grows: write one key and value into caches of --slots slots (DYNAMIC_UPDATE_SLICE), then
attend one token's query heads over all of them (two BATCH_MATMUL and a softmax), as a graph
of its own, converted with TensorFlow Lite and run through LiteRT's CompiledModel with the caches
updated in place, as the runtime runs them. float16 storage needs a CAST to float32 before the
batch matmuls, which run in float32 on the CPU. Prints the median time of a call for each and
each one's ratio to the graph as shipped, and how far each one's output is from the shipped
graph's. Three more rows try the float32 caches as the left operand of the batch matmuls,
which XNNPACK reads without packing them (``build``'s layouts; `perf` shows the packing of the
right operand taking more of a call than the multiply itself). Needs TensorFlow (the convert
extra).

    python benchmarks/kv_cache_dtype.py [--slots 32768] [--head-dim 256] [--heads 4] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def build(dtype, slots: int, head_dim: int, heads: int, path: str, layout: str = "shipped") -> None:
    """``layout``: "shipped", the runtime's graph (the caches [1, 1, S, H] are the right operand
    of both batch matmuls, which XNNPACK packs at every call); "keys-left", the scores computed
    as keys x query (the key cache the left operand, read as it is; the small result transposed);
    "both-left", that and the value cache stored transposed, [1, 1, H, S], so the output is
    values x weights with the value cache on the left too; "adj-x", keys on the left and the
    value cache as stored, transposed by the batch matmul (adj_x)."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    v_shape = [1, 1, head_dim, slots] if layout == "both-left" else [1, 1, slots, head_dim]
    spec = [tf.TensorSpec([1, 1, slots, head_dim], dtype), tf.TensorSpec(v_shape, dtype),
            tf.TensorSpec([1, heads, head_dim], tf.float32), tf.TensorSpec([1], tf.int32)]

    @tf.function(input_signature=spec)
    def step(k_cache, v_cache, q, pos):
        new = tf.reshape(tf.cast(q[:, :1, :], dtype), [1, 1, 1, head_dim])  # this token's key and value
        at = tf.stack([0, 0, pos[0], 0])
        k_cache = xla.dynamic_update_slice(k_cache, new, at)
        if layout == "both-left":
            v_cache = xla.dynamic_update_slice(v_cache, tf.reshape(new, [1, 1, head_dim, 1]), tf.stack([0, 0, 0, pos[0]]))
        else:
            v_cache = xla.dynamic_update_slice(v_cache, new, at)
        keys, values = k_cache, v_cache
        if dtype != tf.float32:
            keys, values = tf.cast(keys, tf.float32), tf.cast(values, tf.float32)
        if layout in ("shipped",):
            scores = tf.matmul(q[None], keys, transpose_b=True)  # [1, 1, heads, slots]
        else:
            scores = tf.transpose(tf.matmul(keys, q[None], transpose_b=True), [0, 1, 3, 2])  # [1, 1, heads, slots]
        weights = tf.nn.softmax(scores, axis=-1)
        if layout == "both-left":
            out = tf.transpose(tf.matmul(values, weights, transpose_b=True), [0, 1, 3, 2])  # [1, 1, heads, head_dim]
        elif layout == "adj-x":
            out = tf.transpose(tf.matmul(values, weights, transpose_a=True, transpose_b=True), [0, 1, 3, 2])
        else:
            out = tf.matmul(weights, values)  # [1, 1, heads, head_dim]
        return {"k_cache": k_cache, "v_cache": v_cache, "out": out}

    conv = tf.lite.TFLiteConverter.from_concrete_functions([step.get_concrete_function()], step)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with open(path, "wb") as f:
        f.write(conv.convert())


def time_calls(path: str, np_dtype, slots: int, head_dim: int, heads: int, calls: int, threads: int,
               layout: str = "shipped") -> tuple[float, np.ndarray]:
    """(median seconds a call, the last call's output): every layout gets the same caches."""
    from gemma_edge.runtime import litert

    model = litert.compile_file(path, threads, "")
    sig = next(iter(model.get_signature_list()))
    outs = model.get_output_tensor_details(sig)
    out_name = next(n for n, d in outs.items() if d["shape"][2] == heads)
    k_name = next(n for n, d in outs.items() if d["shape"][2:] == [slots, head_dim])  # the converter names
    v_name = next(n for n, d in outs.items() if n not in (out_name, k_name))           # outputs Identity_<i>
    k, v = model.create_input_buffer_by_name(sig, "k_cache"), model.create_input_buffer_by_name(sig, "v_cache")
    q, pos = model.create_input_buffer_by_name(sig, "q"), model.create_input_buffer_by_name(sig, "pos")
    out = model.create_output_buffer_by_name(sig, out_name)
    rng = np.random.default_rng(0)
    k.write(rng.random((1, 1, slots, head_dim)).astype(np_dtype))
    values = rng.random((1, 1, slots, head_dim)).astype(np_dtype)
    v.write(np.ascontiguousarray(values.transpose(0, 1, 3, 2)) if layout == "both-left" else values)
    q.write(rng.random((1, heads, head_dim)).astype(np.float32))
    times = []
    for i in range(calls):
        pos.write(np.array([i % slots], np.int32))
        t = time.perf_counter()
        model.run_by_name(sig, {"k_cache": k, "v_cache": v, "q": q, "pos": pos}, {k_name: k, v_name: v, out_name: out})
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), out.read(heads * head_dim, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=32768, help="cache length (Gemma 3's maximum context)")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4, help="query heads sharing the one KV head (the 270M: 4)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    args = ap.parse_args()
    import tensorflow as tf

    cases = (("float32, as shipped", tf.float32, np.float32, "shipped"),
             ("float16 + CAST", tf.float16, np.float16, "shipped"),
             ("float32, keys on the left", tf.float32, np.float32, "keys-left"),
             ("float32, keys and values on the left", tf.float32, np.float32, "both-left"),
             ("float32, keys left, values transposed", tf.float32, np.float32, "adj-x"))
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for i, (name, tf_dtype, np_dtype, layout) in enumerate(cases):
            path = os.path.join(d, f"{i}.tflite")
            build(tf_dtype, args.slots, args.head_dim, args.heads, path, layout)
            seconds, out = time_calls(path, np_dtype, args.slots, args.head_dim, args.heads, args.calls, args.threads,
                                      layout)
            results[name] = (seconds, 2 * args.slots * args.head_dim * np.dtype(np_dtype).itemsize / 2**20, out)
    print(f"one global layer's decode attention over {args.slots} slots, head_dim {args.head_dim}, "
          f"{args.heads} query heads, {args.threads} threads; median of {args.calls - 1} calls")
    base, _, want = results[cases[0][0]]
    for name, (s, mb, out) in results.items():
        err = float(np.max(np.abs(out - want)) / np.max(np.abs(want)))  # float16 rounds the caches
        print(f"  {name:<38} {s * 1000:6.2f} ms a call  {s / base:5.2f}x  (K and V: {mb:.0f} MB; "
              f"output off by {err:.1e} of the shipped graph's)")


if __name__ == "__main__":
    main()
