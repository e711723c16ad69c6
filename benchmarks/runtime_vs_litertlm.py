"""gemma-edge vs LiteRT-LM on the same model file, alternating rounds in one script.

The gemma-edge .tflite is packed into a .litertlm (``gemma_edge.runtime.litertlm.pack``) in a
temporary folder, so both runtimes execute the very same graph and weights. Each round runs,
in fresh child processes, LiteRT-LM's own benchmark (``litert_lm.Benchmark``, what
``litert-lm benchmark`` calls) and gemma-edge's ``Model.benchmark``; each child does one
warm-up run and reports the second. Both get the same thread count and a warm XNNPACK
weight cache (LiteRT-LM's ``cache_dir``, gemma-edge's ``GEMMA_EDGE_CACHE``) in the
temporary folder. Prints the medians of prefill and decode tokens/s over the rounds, the
ratios gemma-edge / LiteRT-LM of those medians, and the median of the per-round ratios (the
two runs of a round are back to back, so that one suffers less from load drifting on a
shared machine).

LiteRT-LM's benchmark prefills its prompt ("How are you") padded with token 0 to -p tokens;
gemma-edge's prefills -p random ordinary tokens: the same work for a dense model. The two
prefill figures are not timed alike: LiteRT-LM's covers the prefill calls alone, gemma-edge's
runs to the first generated token (prefill plus one decode step), which lowers it by about
one decode step's share; time to first token (TTFT) is the closer comparison.

    python benchmarks/runtime_vs_litertlm.py MODEL.tflite [--rounds 3] [-p 128] [-n 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

LITERT_LM_CHILD = r"""
import json, sys
import litert_lm
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
path, cache = sys.argv[1], sys.argv[6]
p, n, threads, context = (int(a) for a in sys.argv[2:6])
b = litert_lm.Benchmark(path, backend=litert_lm.Backend.CPU(thread_count=threads), prefill_tokens=p,
                        decode_tokens=n, max_num_tokens=context, cache_dir=cache)
b.run()  # warm-up: the first run packs XNNPACK weights into the cache
r = b.run()
print(json.dumps({"prefill_tps": r.last_prefill_tokens_per_second, "decode_tps": r.last_decode_tokens_per_second,
                  "prefill_tokens": r.last_prefill_token_count, "decode_tokens": r.last_decode_token_count,
                  "load_s": r.init_time_in_second, "ttft_s": r.time_to_first_token_in_second}))
"""

GEMMA_EDGE_CHILD = r"""
import json, sys
import gemma_edge
path = sys.argv[1]
p, n, threads = (int(a) for a in sys.argv[2:5])
m = gemma_edge.load(path, threads=threads)
m.benchmark(p, n, runs=1)  # warm-up, as LiteRT-LM's
r = m.benchmark(p, n, runs=1)
print(json.dumps({"prefill_tps": r["prefill_tps"]["median"], "decode_tps": r["decode_tps"]["median"],
                  "prefill_tokens": r["prompt_tokens"], "decode_tokens": r["gen_tokens"],
                  "load_s": r["load_s"], "ttft_s": r["ttft_s"]["median"], "backend": r["backend"]}))
"""


def child(code: str, *args, env=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"a benchmark child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a gemma-edge .tflite (gemma-convert output)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one run of each runtime per round)")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4),
                    help="CPU threads for both runtimes (default: gemma-edge's default, cores up to 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gemma_edge.runtime.litertlm import pack
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(args.model)
    if args.prompt_tokens + args.gen_tokens > info.context_length:
        sys.exit(f"-p {args.prompt_tokens} + -n {args.gen_tokens} exceeds the file's context {info.context_length}")
    with tempfile.TemporaryDirectory(prefix="gemma-edge-vs-litertlm-") as work:
        packed = pack(args.model, os.path.join(work, "model.litertlm"))
        lm_cache = os.path.join(work, "litert-lm-cache")
        os.makedirs(lm_cache)
        env = {**os.environ, "GEMMA_EDGE_CACHE": os.path.join(work, "gemma-edge-cache")}
        ours, theirs = [], []
        for i in range(args.rounds):  # alternate, so drift on a noisy machine hits both alike
            theirs.append(child(LITERT_LM_CHILD, packed, args.prompt_tokens, args.gen_tokens, args.threads,
                                info.context_length, lm_cache))
            ours.append(child(GEMMA_EDGE_CHILD, args.model, args.prompt_tokens, args.gen_tokens, args.threads,
                              env=env))
            print(f"round {i + 1}: gemma-edge prefill {ours[-1]['prefill_tps']:.1f} decode "
                  f"{ours[-1]['decode_tps']:.1f} | LiteRT-LM prefill {theirs[-1]['prefill_tps']:.1f} decode "
                  f"{theirs[-1]['decode_tps']:.1f} tok/s", file=sys.stderr)

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    keys = ("prefill_tps", "decode_tps", "load_s", "ttft_s")
    summary = {
        "model": args.model, "quant": info.quant, "context": info.context_length, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
        "gemma_edge": {k: med(ours, k) for k in keys}, "litert_lm": {k: med(theirs, k) for k in keys},
        "litert_lm_tokens": {"prefill": theirs[-1]["prefill_tokens"], "decode": theirs[-1]["decode_tokens"]},
        "gemma_edge_backend": ours[-1]["backend"],
        "gemma_edge_rounds": ours, "litert_lm_rounds": theirs,
    }
    g, t = summary["gemma_edge"], summary["litert_lm"]
    summary["decode_ratio"] = g["decode_tps"] / t["decode_tps"]
    summary["prefill_ratio"] = g["prefill_tps"] / t["prefill_tps"]
    # the same ratio within each round, whose two runs ran back to back: less exposed to
    # load that drifts between rounds on a shared machine
    summary["decode_ratio_paired"] = statistics.median(o["decode_tps"] / r["decode_tps"] for o, r in zip(ours, theirs))
    summary["prefill_ratio_paired"] = statistics.median(o["prefill_tps"] / r["prefill_tps"]
                                                        for o, r in zip(ours, theirs))
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{os.path.basename(args.model)} ({info.quant}, context {info.context_length}), {args.threads} threads, "
          f"p={args.prompt_tokens} n={args.gen_tokens}, medians of {args.rounds} alternating rounds")
    print(f"{'':12}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>9}{'load s':>8}")
    for name, r in (("gemma-edge", g), ("LiteRT-LM", t)):
        print(f"{name:12}{r['prefill_tps']:>15.1f}{r['decode_tps']:>14.1f}{r['ttft_s'] * 1000:>9.0f}{r['load_s']:>8.2f}")
    print(f"ratios (gemma-edge / LiteRT-LM): prefill {summary['prefill_ratio']:.2f}, decode "
          f"{summary['decode_ratio']:.2f}; "
          f"median of per-round ratios: prefill {summary['prefill_ratio_paired']:.2f}, decode "
          f"{summary['decode_ratio_paired']:.2f}")
    print("(gemma-edge's prefill tok/s runs to the first generated token, one decode step more than "
          "LiteRT-LM's: TTFT is the closer prefill comparison)")


if __name__ == "__main__":
    main()
