"""What each signature's first call adds to a loaded model's memory.

LiteRT gives each signature its own working memory when it first runs. For each signature of
``MODEL`` (or those named by ``--signatures``), a fresh child process loads the file (with
its weight cache, as ``gemma_edge.load`` does), makes one call of that signature at
``--position`` (``decode_s<S>`` at a position below S), and prints the anonymous memory
(RssAnon) the call added. Of that, the KV cache pages the call writes (its T tokens' keys and
values in every layer with a cache) are printed apart: what is left is the signature's own
memory. A second call in the same process is measured too: it should add nothing.

    python benchmarks/signature_memory.py MODEL.tflite [--position 600] [--signatures decode,score_4]

On the 270M int8 file this shows which signatures keep their sliding layers' window slices
(30 copies of 512 or more slots): see README, "Long contexts".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
from gemma_edge.runtime import contract as C
from gemma_edge.runtime.backend import make_backend
from gemma_edge.runtime.modelfile import read_info
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) / 1024
path, sig, pos = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = read_info(path)
b = make_backend(info)
T, logits, span = C.parse_signature(sig)
added = []
for call in range(2):
    before = anon()
    tokens, positions = np.full((1, T), 1000, np.int32), np.arange(pos, pos + T, dtype=np.int32)
    if sig.startswith('prefill_'):
        b.prefill_chunk(T, tokens, positions)
    elif sig.startswith('score_'):
        b.score(tokens, positions)
    else:
        b.decode(1000, pos)
    added.append(anon() - before)
print(json.dumps({'added': added}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--position", type=int, default=600, help="where each call writes (default 600)")
    ap.add_argument("--signatures", help="comma-separated (default: every prefill, decode and score signature)")
    args = ap.parse_args()

    from gemma_edge.runtime import contract as C
    from gemma_edge.runtime.errors import GemmaEdgeError
    from gemma_edge.runtime.modelfile import read_info

    try:
        info = read_info(args.model)
    except GemmaEdgeError as e:
        ap.error(str(e))
    names = ([f"prefill_{t}" for t in info.prefill_lengths] + ["decode"]
             + [f"decode_s{s}" for s in info.decode_spans] + [f"score_{t}" for t in info.score_lengths])
    if args.signatures:
        wanted = args.signatures.split(",")
        unknown = [w for w in wanted if w not in names]
        if unknown:
            ap.error(f"{args.model} has no signature {', '.join(unknown)}; it has {', '.join(names)}")
        names = wanted
    cfg = info.config
    kv_bytes = sum(2 * cfg.kv_heads_for(i) * cfg.head_dim_for(i) * 4 for i in range(cfg.num_layers)
                   if cfg.kv_source(i) == i)  # one token's keys and values in every cache, float32
    print(f"{os.path.basename(args.model)}: one call of each signature in a fresh process (after loading "
          f"with the weight cache); anonymous MB it added; a token's keys and values take {kv_bytes / 1024:.0f} KB")
    print(f"  {'signature':<14} {'position':>8} {'first call':>11} {'of it, KV':>10} {'the rest':>9} {'second call':>12}")
    for sig in names:
        T, _, span = C.parse_signature(sig)
        pos = args.position if span is None or args.position + T <= span else max(0, span // 2 - T)
        if pos + T > info.context_length:
            pos = info.context_length - T
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, sig, str(pos)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{sig}: the child failed:\n{out.stderr[-2000:]}")
        first, second = json.loads(out.stdout.strip().splitlines()[-1])["added"]
        kv = T * kv_bytes / 2**20
        print(f"  {sig:<14} {pos:>8} {first:>11.1f} {kv:>10.1f} {first - kv:>9.1f} {second:>12.1f}")


if __name__ == "__main__":
    main()
