"""How close LiteRT's int8 FULLY_CONNECTED kernel gets to memory bandwidth at decode (M=1).

    python benchmarks/fc_kernel_bandwidth.py [--layers 8] [--threads 1,2] [--work-dir DIR]

Builds a model of ``--layers`` FC layers [16384, 2048] (Gemma 2B's FFN shape; 268 MB of
int8, far past the caches) with TensorFlow's dynamic-range int8 quantization, runs it
with a one-row input through the CompiledModel API (XNNPACK, weight cache) and prints
the weight bytes streamed per second next to numpy's read bandwidth (``np.max`` over a
1 GiB array split across the same threads). The ratio is the most a decode step made of
FC layers can reach against the bandwidth ceiling that ``convert_memory.py`` reports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

K, N = 2048, 16384


def build(path: Path, layers: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    ws = [tf.constant(np.random.default_rng(i).standard_normal((N, K)).astype(np.float32) * 0.02)
          for i in range(layers)]

    @tf.function(input_signature=[tf.TensorSpec([1, K], tf.float32)])
    def f(x):
        y = 0.0
        for w in ws:  # independent FCs; their sums keep every one alive
            y = y + tf.reduce_sum(tf.matmul(x, w, transpose_b=True))
        return y

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, dynamic-range kernels
    path.write_bytes(conv.convert())


def fc_seconds(path: Path, threads: int, cache: str, calls: int = 20) -> float:
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    opts = Options(HardwareAccelerator.CPU,
                   cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=cache))
    m = CompiledModel.from_file(str(path), options=opts)
    inp, out = m.create_input_buffers(0), m.create_output_buffers(0)
    inp[0].write(np.ones((1, K), np.float32))
    for _ in range(3):
        m.run_by_index(0, inp, out)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        m.run_by_index(0, inp, out)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(threads: int, mib: int = 1024, reps: int = 7) -> float:
    a = np.ones(mib << 18, np.int32)  # 4 bytes each
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as d:
        path = Path(d) / "fc_int8.tflite"
        build(path, args.layers)
        weights = args.layers * N * K  # int8 bytes read per call
        for t in (int(x) for x in args.threads.split(",")):
            s = fc_seconds(path, t, str(Path(d) / f"cache{t}"))
            bw = read_bandwidth(t)
            print(f"{t} thread(s): {args.layers} x FC [{N}, {K}] int8 in {s * 1e3:.1f} ms = "
                  f"{weights / s / 1e9:.1f} GB/s of weights; numpy read {bw / 1e9:.1f} GB/s; "
                  f"kernel / read bandwidth {weights / s / bw:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
