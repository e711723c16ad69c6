"""Where the runtime's memory goes, and what the XNNPACK weight cache saves.

Each case runs in a fresh child process and prints RSS (anonymous and file-backed, from
/proc/self/status) and PSS (/proc/self/smaps_rollup: each resident page divided by the number
of processes mapping it) after each stage: imports, metadata, tokenizer, backend, a prefill,
a decode; and, from /proc/self/smaps, the resident bytes of the process's mappings of the
model file ("model") and of the weight cache ("cache"). For a file with tables read only
by EMBEDDING_LOOKUP (Gemma 4's per-layer embeddings, about half of an E2B file) it also
prints how much of them is resident ("lookup", page by page from /proc/self/pagemap): a
token reads one row of each, so they should stay almost entirely on disk. Cases: no
weight cache; weight cache, first load (packs and writes it); weight cache, later loads
(maps it); --processes children with the weight cache at once, each measured again once all
have decoded (the weight cache's clean pages are shared, so each one's PSS counts its share).
Then the baseline, Google's LiteRT-LM on the same file packed into a .litertlm,
through the same stages (engine and session, a prefill of as many tokens, a decode), with its
own weight cache: first load, later loads. Median of --runs for load time. The weight caches
are built in a temporary folder beside the model and removed at the end.

    python benchmarks/runtime_memory.py MODEL.tflite [--runs 3] [--prompt-tokens 600] [--skip-no-cache]
                                        [--skip-litert-lm] [--threads N] [--processes 2]

``--skip-no-cache`` leaves out the first case, where every signature packs its own copy of
the weights (several times the file: too much for a multi-GB model on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Both children's memory reading: MiB from /proc/self/status (RSS, its anonymous and file-backed
# parts, the peak) and /proc/self/smaps_rollup (PSS: each page divided by the processes mapping it).
STATUS = r"""
import re
def st():
    s, r = open('/proc/self/status').read(), open('/proc/self/smaps_rollup').read()
    out = {k: int(re.search(k + r':\s+(\d+)', s).group(1)) // 1024 for k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')}
    for k in ('Pss', 'Pss_Anon', 'Pss_File'):  # Pss_Anon and Pss_File: Linux 5.10 and later
        m = re.search('^' + k + r':\s+(\d+)', r, re.M)
        if m:
            out[k] = int(m.group(1)) // 1024
    return out
"""

CHILD = STATUS + r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[4])
path, weight_cache, n = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3])
out = {'start': st()}
import numpy
out['imports'] = st()
from gemma_edge.runtime.modelfile import read_info
from gemma_edge.runtime.tokenizer import Tokenizer
from gemma_edge.runtime.backend import make_backend, run_prefill
from model_reads import decode_reads, snapshot
info = read_info(path); out['metadata'] = st()
reads = decode_reads(path, info)  # its map of the file is closed again
regions = reads['lookup_regions']
maps = {}
from gemma_edge.runtime.weight_cache import keep_vocab, vocab_for
vocab, derived = vocab_for(info)  # as gemma_edge.load does: the compact vocabulary, else SentencePiece
tok = Tokenizer(None if vocab is not None else info.tokenizer_model, model_proto_source=lambda: info.tokenizer_model,
                vocab=vocab)
info.release_tokenizer(); out['tokenizer'] = st()
if derived is not None:
    keep_vocab(info, derived)
    from gemma_edge.runtime.host_memory import trim
    trim()
t = time.perf_counter()
b = make_backend(info, weight_cache=weight_cache)
load = time.perf_counter() - t
out['backend'] = st(); maps['backend'] = snapshot(path, regions)
n = min(n, info.context_length - 2)
run_prefill(b, [2] + list(range(1000, 1000 + n - 1)), 0); out[f'prefill {n}'] = st()
maps[f'prefill {n}'] = snapshot(path, regions)
b.decode(5, n); out['decode'] = st(); maps['decode'] = snapshot(path, regions)
if len(sys.argv) > 5:  # one of several running at once: measure again once all have decoded
    print('decoded', flush=True)
    sys.stdin.readline()
    out[f'{sys.argv[5]} running'] = st()
print(json.dumps({'load_s': load, 'stages': out, 'maps': maps, 'lookup_tables': reads['lookup_tables']}), flush=True)
if len(sys.argv) > 5:
    sys.stdin.read()  # keep the model mapped until every one has measured (the parent closes stdin)
"""

LITERT_LM_CHILD = STATUS + r"""
import json, sys, time
def maps(path, cache):
    rss, now = {'model_map_rss': 0, 'cache_map_rss': 0}, None
    for line in open('/proc/self/smaps'):
        head = line.split()
        if re.match(r'^[0-9a-f]+-[0-9a-f]+$', head[0]):
            name = head[5] if len(head) > 5 else ''
            now = 'model_map_rss' if name == path else 'cache_map_rss' if name.startswith(cache) else None
        elif now and head[0] == 'Rss:':
            rss[now] += int(head[1]) * 1024
    return rss
path, cache, n, threads, context = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out, snap = {'start': st()}, {}
import litert_lm
out['imports'] = st()
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
t = time.perf_counter()
engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(thread_count=threads), max_num_tokens=context,
                          cache_dir=cache)
session = engine.create_session(apply_prompt_template=False, max_output_tokens=context)
load = time.perf_counter() - t
out['engine'] = st(); snap['engine'] = maps(path, cache)
numbers = []
while len(engine.tokenize(' '.join(numbers))) < n - 1:  # numbers: one token per digit, whatever the vocabulary
    numbers.append(str(1000 + len(numbers)))
text = ' '.join(numbers)
tokens = len(engine.tokenize(text)) + 1  # and <bos>
session.run_prefill([text]); out[f'prefill {tokens}'] = st(); snap[f'prefill {tokens}'] = maps(path, cache)
session.run_decode(); out['decode'] = st(); snap['decode'] = maps(path, cache)
print(json.dumps({'load_s': load, 'stages': out, 'maps': snap, 'lookup_tables': 0}))
"""


def run_litert_lm(packed: str, n: int, threads: int, context: int, cache_dir: str) -> dict:
    p = subprocess.run([sys.executable, "-c", LITERT_LM_CHILD, packed, cache_dir, str(n), str(threads), str(context)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the LiteRT-LM child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_case(model: str, weight_cache: bool, n: int, cache_dir: str) -> dict:
    env = {**os.environ, "GEMMA_EDGE_CACHE": cache_dir}
    p = subprocess.run([sys.executable, "-c", CHILD, model, "1" if weight_cache else "0", str(n), HERE],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"the child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_together(model: str, n: int, cache_dir: str, count: int) -> list[dict]:
    """``count`` children with the weight cache at once (as server workers, or apps on one phone).
    Each goes through the stages, says so, and waits; once all have decoded, each reads its
    memory again (stage "<count> running"), when every one maps the weight cache."""
    env = {**os.environ, "GEMMA_EDGE_CACHE": cache_dir}
    with tempfile.TemporaryFile("w+") as errors:
        kids = [subprocess.Popen([sys.executable, "-c", CHILD, model, "1", str(n), HERE, str(count)], text=True,
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
                for _ in range(count)]
        try:
            for k in kids:
                if k.stdout.readline().strip() != "decoded":  # a child that failed closes its stdout
                    k.wait()
                    errors.seek(0)
                    raise SystemExit(f"a child failed (exit {k.returncode}):\n{errors.read()[-3000:]}")
            for k in kids:
                k.stdin.write("go\n")
                k.stdin.flush()
            outs = [k.stdout.readline() for k in kids]  # each measured while all still run
            for k in kids:
                k.stdin.close()
                k.wait()
        finally:
            for k in kids:
                if k.poll() is None:
                    k.kill()
                    k.wait()
        if any(k.returncode for k in kids):
            errors.seek(0)
            raise SystemExit(f"a child failed:\n{errors.read()[-3000:]}")
    return [json.loads(o) for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--skip-no-cache", action="store_true",
                    help="leave out the case without a weight cache (every signature packs its own weights)")
    ap.add_argument("--skip-litert-lm", action="store_true",
                    help="leave out the baseline: Google's LiteRT-LM running the same file (packed into a .litertlm)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4),
                    help="LiteRT-LM's CPU threads (default: gemma-edge's default, cores up to 4)")
    ap.add_argument("--processes", type=int, default=2,
                    help="also run this many processes on the file at once and report each one's PSS, where "
                         "the weight cache's pages are shared (default 2; 1 leaves the case out)")
    args = ap.parse_args()
    size_mib = os.path.getsize(args.model) / 2**20  # the unit of every memory figure here (kB // 1024)
    where = os.path.dirname(os.path.abspath(args.model))  # the cache is about the file's size: beside it
    with tempfile.TemporaryDirectory(prefix="gemma-edge-wcache-", dir=where) as cache:
        cases = {}
        if not args.skip_no_cache:
            cases["no weight cache"] = [run_case(args.model, False, args.prompt_tokens, cache)
                                        for _ in range(args.runs)]
        cases["weight cache, first load"] = [run_case(args.model, True, args.prompt_tokens, cache)]
        cases["weight cache, later loads"] = [run_case(args.model, True, args.prompt_tokens, cache)
                                              for _ in range(args.runs)]
        if args.processes > 1:
            cases[f"weight cache, {args.processes} processes at once"] = run_together(
                args.model, args.prompt_tokens, cache, args.processes)
        if not args.skip_litert_lm:
            from gemma_edge.runtime.litertlm import pack
            from gemma_edge.runtime.modelfile import read_info

            packed = pack(args.model, os.path.join(cache, "model.litertlm"))
            lm_cache = os.path.join(cache, "litert-lm")
            os.makedirs(lm_cache)
            context = read_info(args.model).context_length
            runs = [run_litert_lm(packed, args.prompt_tokens, args.threads, context, lm_cache)
                    for _ in range(args.runs + 1)]
            cases["LiteRT-LM, same file, first load"] = runs[:1]
            cases["LiteRT-LM, same file, later loads"] = runs[1:]
    print(f"{args.model}: {size_mib:.0f} MiB ({os.path.getsize(args.model) / 1e6:.0f} MB); memory in MiB")
    for name, runs in cases.items():
        last = runs[-1]["stages"]
        maps = runs[-1]["maps"]
        lookup = runs[-1]["lookup_tables"]
        peak = last["decode"]["VmHWM"]
        together = [r["stages"][s] for r in runs for s in r["stages"] if s.endswith(" running")]
        print(f"\n{name}: load {statistics.median(r['load_s'] for r in runs):.2f} s (median of {len(runs)}), "
              f"peak RSS {peak} MiB = {peak / size_mib:.2f}x the file"
              + (f"; PSS of each with all running: {', '.join(str(m['Pss']) for m in together)} MiB"
                 f" = {statistics.median(m['Pss'] for m in together) / size_mib:.2f}x the file"
                 if together and all("Pss" in m for m in together) else ""))
        print(f"  {'stage':<16}{'RSS':>7}{'PSS':>7}{'anon':>7}{'file':>7}{'model':>7}{'cache':>7}  MiB"
              + (f"   lookup tables resident ({lookup} tables)" if lookup else ""))
        for stage, m in last.items():
            s = maps.get(stage)
            row = f"  {stage:<16}{m['VmRSS']:>7}{m.get('Pss', '-'):>7}{m['RssAnon']:>7}{m['RssFile']:>7}"
            if s:
                row += f"{s['model_map_rss'] >> 20:>7}{s['cache_map_rss'] >> 20:>7}"
                if lookup and s["regions_resident"] is not None:
                    row += (f"      {s['regions_resident'] / 2**20:,.1f} of {s['regions_bytes'] / 2**20:,.0f} MiB "
                            f"({100 * s['regions_resident'] / max(s['regions_bytes'], 1):.2f}%)")
            print(row)


if __name__ == "__main__":
    main()
