"""Is this machine's speed steady right now? One decode step of each model, timed over and over.

Each model is loaded once and its cache prefilled with a short prompt; then, for ``--seconds``,
the script alternates between the models, timing ``--calls`` decodes of the same position on
each in turn (so every model sees the same moments of the machine). It prints, per window of
``--window`` seconds, the median milliseconds of a decode of each model, then each model's
fastest and slowest window and their ratio, and how the models' window medians move together
(the correlation of their logs): a memory-bound file (fp32 reads about 1 GB a token on the 270M)
slowing while an int8 or int4 file of the same model slows less, window by window, is the host's
memory bandwidth changing, not the runtime.

    python benchmarks/host_drift.py MODEL.tflite [MODEL2.tflite ...] [--seconds 120] [--window 10]
        [--calls 5] [--threads N]

The benchmarks in this folder compare runs back to back for this reason; this script says how
much the machine moved while they ran.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL.tflite")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per printed window")
    ap.add_argument("--calls", type=int, default=5, help="decodes of one model before switching to the next")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.seconds <= 0 or args.window <= 0 or args.calls < 1:
        ap.error("--seconds and --window must be positive, --calls at least 1")
    for p in args.models:
        if not os.path.isfile(p):
            ap.error(f"{p}: no such file")

    import gemma_edge
    from gemma_edge.runtime.errors import GemmaEdgeError

    try:
        models = [gemma_edge.load(p, threads=args.threads) for p in args.models]
        ids = models[0].tokenizer.encode("The history of the Roman Empire began with")
        for m in models:
            m._require_generative()  # an embedding model has no decode
            m._prefill(ids + [ids[-1]])  # the cache holds ids; each timed decode writes position len(ids) again
    except GemmaEdgeError as e:
        ap.error(str(e))
    names = [os.path.basename(p) for p in args.models]
    pos, token = len(ids), ids[-1]
    for m in models:  # first calls build buffers and fault pages in
        for _ in range(3):
            m.backend.decode(token, pos)

    windows = []  # per window: per model, the decode times in it
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    while (now := time.perf_counter()) - start < args.seconds:
        w = int((now - start) // args.window)
        while len(windows) <= w:
            windows.append([[] for _ in models])
        for i, m in enumerate(models):
            for _ in range(args.calls):
                t0 = time.perf_counter()
                m.backend.decode(token, pos)
                windows[w][i].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    windows = [w for w in windows if all(w)]
    med = [[statistics.median(w[i]) * 1e3 for w in windows] for i in range(len(models))]

    print(f"decode at position {pos}, {args.calls} calls per model in turn, {len(windows)} windows of "
          f"{args.window:g} s; load average {load_before:.2f} before, {load_after:.2f} after ({os.cpu_count()} cores)")
    print("window  " + "  ".join(f"{n[:28]:>28}" for n in names) + "   (median ms of a decode)")
    for k in range(len(windows)):
        print(f"{k * args.window:>5.0f}s  " + "  ".join(f"{med[i][k]:>28.2f}" for i in range(len(models))))
    for i, n in enumerate(names):
        lo, hi = min(med[i]), max(med[i])
        print(f"{n}: fastest window {lo:.2f} ms, slowest {hi:.2f} ms ({hi / lo:.2f}x); "
              f"median {statistics.median(med[i]):.2f} ms")
    if len(models) > 1 and len(windows) > 2:
        logs = [[math.log(x) for x in row] for row in med]
        for i in range(1, len(models)):
            r = statistics.correlation(logs[0], logs[i]) if len(set(logs[0])) > 1 and len(set(logs[i])) > 1 else float("nan")
            spread = [max(row) - min(row) for row in (logs[0], logs[i])]
            print(f"{names[0]} and {names[i]}: correlation of their windows {r:.2f}; "
                  f"spread of the log medians {spread[0]:.2f} against {spread[1]:.2f}")


if __name__ == "__main__":
    main()
