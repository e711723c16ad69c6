"""Where the runtime's memory goes, and what the XNNPACK weight cache saves.

Each case runs in a fresh child process and prints RSS (anonymous and file-backed, from
/proc/self/status) after each stage: imports, metadata, tokenizer, backend, a prefill,
a decode. Cases: no weight cache; weight cache, first load (packs and writes it);
weight cache, second load (maps it). Median of --runs for load time.

    python benchmarks/runtime_memory.py MODEL.tflite [--runs 3] [--prompt-tokens 600]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, re, sys, time
def st():
    s = open('/proc/self/status').read()
    return {k: int(re.search(k + r':\s+(\d+)', s).group(1)) // 1024 for k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')}
path, weight_cache, n = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3])
out = {'start': st()}
import numpy, sentencepiece
out['imports'] = st()
from gemma_edge.runtime.modelfile import read_info
from gemma_edge.runtime.tokenizer import Tokenizer
from gemma_edge.runtime.backend import make_backend, run_prefill
info = read_info(path); out['metadata'] = st()
tok = Tokenizer(info.tokenizer_model); out['tokenizer'] = st()
t = time.perf_counter()
b = make_backend(info, weight_cache=weight_cache)
load = time.perf_counter() - t
out['backend'] = st()
n = min(n, info.context_length - 2)
run_prefill(b, [2] + list(range(1000, 1000 + n - 1)), 0); out[f'prefill {n}'] = st()
b.decode(5, n); out['decode'] = st()
print(json.dumps({'load_s': load, 'stages': out}))
"""


def run_case(model: str, weight_cache: bool, n: int, cache_dir: str) -> dict:
    env = {**os.environ, "GEMMA_EDGE_CACHE": cache_dir}
    p = subprocess.run([sys.executable, "-c", CHILD, model, "1" if weight_cache else "0", str(n)],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    args = ap.parse_args()
    size_mb = os.path.getsize(args.model) / 1e6
    with tempfile.TemporaryDirectory(prefix="gemma-edge-wcache-") as cache:
        cases = {}
        cases["no weight cache"] = [run_case(args.model, False, args.prompt_tokens, cache) for _ in range(args.runs)]
        cases["weight cache, first load"] = [run_case(args.model, True, args.prompt_tokens, cache)]
        cases["weight cache, later loads"] = [run_case(args.model, True, args.prompt_tokens, cache)
                                              for _ in range(args.runs)]
    print(f"{args.model}: {size_mb:.0f} MB")
    for name, runs in cases.items():
        last = runs[-1]["stages"]
        peak = last["decode"]["VmHWM"]
        print(f"\n{name}: load {statistics.median(r['load_s'] for r in runs):.2f} s (median of {len(runs)}), "
              f"peak RSS {peak} MB = {peak / size_mb:.2f}x the file")
        print(f"  {'stage':<14}{'RSS':>7}{'anon':>7}{'file':>7}  MB")
        for stage, m in last.items():
            print(f"  {stage:<14}{m['VmRSS']:>7}{m['RssAnon']:>7}{m['RssFile']:>7}")


if __name__ == "__main__":
    main()
