"""What the sliding layers' window SLICE costs a decode step, against a ring-buffer cache.

gemma-edge's files keep every layer's cache at the full context length, a layout LiteRT-LM also
runs. A sliding layer's decode writes its key and value (DYNAMIC_UPDATE_SLICE), then attends
over the last ``--window`` slots only: a SLICE whose start depends on the position. XNNPACK
takes only slices with constant starts, so LiteRT runs that one outside XNNPACK: it copies the
window of both caches into tensors of its own arena at every step (``perf``: ``slice::Eval``'s
memmove), and each one splits the XNNPACK graph into another partition. On the 270M (15 sliding
layers) that arena is the 15 MB a first decode makes resident (``runtime_memory.py``'s decode
stage), on a Gemma 3 1B (22) 23 MB.

This probe builds ``--layers`` such layers in a chain (each layer's output is the next one's
query), once as shipped (caches of ``--slots`` slots and the window SLICE) and once with ring
caches of ``--window`` slots, written at ``pos % window`` and attended whole, which XNNPACK
runs without a copy. Both hold the same keys and values, and attention over a window does
not depend on the order of its slots, so both must give the same output (checked). Converted
with TensorFlow Lite and run through LiteRT's CompiledModel with the caches updated in place,
as the runtime runs them, alternating. Prints the median time of a call of each, their ratio,
and the anonymous memory each one's first call makes resident. Needs TensorFlow (the convert
extra).

    python benchmarks/sliding_window_slice.py [--layers 15] [--slots 2048] [--window 512]
        [--head-dim 256] [--heads 4] [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time

import numpy as np


def build(layout: str, layers: int, slots: int, window: int, head_dim: int, heads: int, path: str) -> None:
    """``layout``: "shipped" (caches [1, 1, slots, H], the window sliced out at pos - window + 1)
    or "ring" (caches [1, 1, window, H], written at pos % window, read whole)."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    n = window if layout == "ring" else slots
    spec = ([tf.TensorSpec([1, 1, n, head_dim], tf.float32) for _ in range(2 * layers)]
            + [tf.TensorSpec([1, heads, head_dim], tf.float32), tf.TensorSpec([1], tf.int32)])

    @tf.function(input_signature=spec)
    def step(*args):
        caches, q, pos = list(args[:-2]), args[-2], args[-1]
        p = pos[0]
        out = {}
        for i in range(layers):
            k, v = caches[2 * i], caches[2 * i + 1]
            new = tf.reshape(q[:, :1, :], [1, 1, 1, head_dim])  # this token's key and value
            at = tf.stack([0, 0, p % window if layout == "ring" else p, 0])
            k, v = xla.dynamic_update_slice(k, new, at), xla.dynamic_update_slice(v, new, at)
            out[f"c{2 * i:03d}"], out[f"c{2 * i + 1:03d}"] = k, v  # sorted, as the converter orders outputs
            if layout == "masked":  # every slot, those outside the window masked out
                slot = tf.range(n)[None, None, None, :]
                outside = tf.logical_or(slot > p, slot <= p - window)
            if layout == "shipped":  # the last `window` slots up to pos
                start = tf.stack([0, 0, tf.maximum(p - window + 1, 0), 0])
                k = tf.slice(k, start, [1, 1, window, head_dim])
                v = tf.slice(v, start, [1, 1, window, head_dim])
            scores = tf.matmul(q[None], k, transpose_b=True) / 16.0  # [1, 1, heads, W]
            if layout == "masked":
                scores = tf.where(outside, tf.constant(-1e30, tf.float32), scores)
            weights = tf.nn.softmax(scores, axis=-1)
            q = tf.reshape(tf.matmul(weights, v), [1, heads, head_dim])  # the next layer's query
        out["out"] = q
        return out

    conv = tf.lite.TFLiteConverter.from_concrete_functions([step.get_concrete_function()], step)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with open(path, "wb") as f:
        f.write(conv.convert())


def anon_mb() -> float:
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


class Case:
    """One compiled graph with its caches filled so that the window up to ``pos`` holds the same
    keys and values in either layout."""

    def __init__(self, path: str, layout: str, layers: int, slots: int, window: int, head_dim: int, heads: int,
                 threads: int, pos: int):
        from gemma_edge.runtime import litert

        self.model = m = litert.compile_file(path, threads, "")
        self.sig = sig = next(iter(m.get_signature_list()))
        # inputs args_0 .. args_<2L-1> are the caches (k, v of each layer), then q and pos; outputs
        # Identity, Identity_1 .. are the build's dict in sorted keys: the caches in that order, then "out"
        n = 2 * layers
        out_name = f"Identity_{n}"
        assert list(m.get_output_tensor_details(sig)[out_name]["shape"]) == [1, heads, head_dim]
        rng = np.random.default_rng(0)
        self.caches, self.outputs = {}, {}
        for j in range(n):
            full = rng.random((1, 1, slots, head_dim)).astype(np.float32)
            data = full
            if layout == "ring":  # slot s holds the position p of the window with p % window == s
                data = np.zeros((1, 1, window, head_dim), np.float32)
                for p in range(pos - window + 1, pos + 1):
                    data[0, 0, p % window] = full[0, 0, p]
            buf = m.create_input_buffer_by_name(sig, f"args_{j}")
            buf.write(data)
            self.caches[f"args_{j}"] = buf
            self.outputs["Identity" if j == 0 else f"Identity_{j}"] = buf  # updated in place
        self.q = m.create_input_buffer_by_name(sig, f"args_{n}")
        self.q.write(rng.random((1, heads, head_dim)).astype(np.float32))
        self.pos = m.create_input_buffer_by_name(sig, f"args_{n + 1}")
        self.pos.write(np.array([pos], np.int32))
        self.out = m.create_output_buffer_by_name(sig, out_name)
        self.outputs[out_name] = self.out
        self.inputs = {**self.caches, f"args_{n}": self.q, f"args_{n + 1}": self.pos}
        self.heads, self.head_dim = heads, head_dim
        before = anon_mb()
        self.call()
        self.first_call_mb = anon_mb() - before

    def call(self) -> None:
        self.model.run_by_name(self.sig, self.inputs, self.outputs)

    def output(self) -> np.ndarray:
        return self.out.read(self.heads * self.head_dim, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=15, help="sliding layers (the 270M: 15; Gemma 3 1B: 22)")
    ap.add_argument("--slots", type=int, default=2048, help="the file's context length")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--pos", type=int, default=600, help="the position decoded (the same at every call)")
    ap.add_argument("--calls", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians over all calls")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    args = ap.parse_args()
    if not args.window <= args.pos < args.slots:
        ap.error("--pos must be at least --window (a full window) and below --slots")

    layouts = ("shipped", "ring", "masked")
    with tempfile.TemporaryDirectory() as d:
        cases = {}
        for layout in layouts:
            path = os.path.join(d, f"{layout}.tflite")
            build(layout, args.layers, args.slots, args.window, args.head_dim, args.heads, path)
            cases[layout] = Case(path, layout, args.layers, args.slots, args.window, args.head_dim, args.heads,
                                 args.threads, args.pos)
        # the same position again at every call: each call rewrites the slot it read, so the caches stay as filled
        want = cases["shipped"].output()
        err = max(float(np.max(np.abs(cases[x].output() - want)) / np.max(np.abs(want))) for x in layouts[1:])
        times = {layout: [] for layout in layouts}
        for r in range(args.rounds):
            for layout in (layouts if r % 2 == 0 else layouts[::-1]):
                c = cases[layout]
                for _ in range(args.calls):
                    t = time.perf_counter()
                    c.call()
                    times[layout].append(time.perf_counter() - t)
    med = {layout: statistics.median(ts) for layout, ts in times.items()}
    print(f"{args.layers} sliding layers' decode attention at position {args.pos}: window {args.window}, "
          f"caches of {args.slots} slots as shipped, head_dim {args.head_dim}, {args.heads} query heads, "
          f"{args.threads} threads; median of {args.rounds} x {args.calls} alternating calls")
    for layout, label in (("shipped", "as shipped (window SLICE)"), ("ring", "ring caches (no SLICE)"),
                          ("masked", "every slot, masked")):
        print(f"  {label:<28} {med[layout] * 1000:6.2f} ms a call  {med[layout] / med['shipped']:5.2f}x  "
              f"first call made {cases[layout].first_call_mb:5.1f} MB resident")
    print(f"  outputs agree to {err:.1e} of the largest value")
    if err > 1e-4:
        raise SystemExit("the layouts disagree: the probe is wrong, its timings mean nothing")


if __name__ == "__main__":
    main()
