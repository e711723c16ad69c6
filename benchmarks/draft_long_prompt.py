"""Speculative decoding after a long prompt: a draft that reads the whole context against one that
reads only the latest ``DRAFT_KEEP`` tokens (512: what gemma-edge does now), and the model alone.

A draft catches up with the context before its first round, so a long prompt costs it a prefill
of the whole prompt (at the draft's prefill speed, after the model's own), and a draft with a
shorter context than the model's (a 2048-token draft for an 8192-token model) stops drafting
where the context outgrows it. Now a draft that would have to prefill more than ``DRAFT_KEEP``
tokens, or would run past its context, starts over on the latest ``DRAFT_KEEP`` tokens
(``speculative.Speculator._draft_base``); ``DRAFT_KEEP = None`` is the previous behaviour.

The prompt is the first ``--prompt-tokens`` tokens of this repository's README (plain text, as
a document pasted into a chat would be). Each round generates ``-n`` tokens greedily with each
arm, in an order that alternates by round, on one loaded model and draft (each run prefills the
prompt afresh in both). Printed per arm: decode tokens/s (the generation's, which includes the
draft's catch-up), its median ratio to the model alone in the same rounds, rounds, tokens
decoded without the draft, acceptance, and whether every arm wrote the model's own tokens.

    python benchmarks/draft_long_prompt.py MODEL.tflite DRAFT.tflite [--prompt-tokens 1900] [-n 256]
        [--rounds 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
ARMS = ("alone", "whole context", "latest tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL.tflite")
    ap.add_argument("draft", metavar="DRAFT.tflite")
    ap.add_argument("--prompt-tokens", type=int, default=1900)
    ap.add_argument("-n", "--gen-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.rounds < 1:
        ap.error("--prompt-tokens and --rounds must be at least 1, -n at least 2")
    for p in (args.model, args.draft):
        if not os.path.isfile(p):
            ap.error(f"{p}: no such file")

    import gemma_edge
    from gemma_edge.runtime import speculative
    from gemma_edge.runtime.errors import GemmaEdgeError

    try:
        m = gemma_edge.load(args.model, threads=args.threads)
        d = gemma_edge.load(args.draft, threads=args.threads)
        with open(README, encoding="utf-8") as f:
            ids = m.tokenizer.encode(f.read())[:args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            ap.error(f"the README has only {len(ids)} tokens; ask for fewer with --prompt-tokens")
        if len(ids) + args.gen_tokens > m.context_length:
            ap.error(f"{args.prompt_tokens} + {args.gen_tokens} tokens do not fit the model's context of "
                     f"{m.context_length}; convert it with a longer --max-context or ask for fewer tokens")
        m.set_draft(d)
        m.set_draft(None)
    except GemmaEdgeError as e:
        ap.error(str(e))

    keep = speculative.DRAFT_KEEP
    rows = {a: [] for a in ARMS}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms both models up and is dropped
            order = ARMS if rnd % 2 == 0 else ARMS[::-1]
            for arm in order:
                m.set_draft(None if arm == "alone" else d)
                speculative.DRAFT_KEEP = None if arm == "whole context" else keep
                m.reset()
                d.reset()
                r = m.generate(ids, max_tokens=args.gen_tokens, temperature=0.0, stop_tokens=False)
                st = m.speculator.stats.to_dict() if m.speculator is not None else {}
                if rnd:
                    rows[arm].append({"tps": r.generation_tps, "tokens": r.tokens, "stats": st})
    finally:
        speculative.DRAFT_KEEP = keep
        m.set_draft(None)
    load_after = os.getloadavg()[0]

    alone = rows["alone"]
    out = {"model": args.model, "draft": args.draft, "prompt_tokens": len(ids), "gen_tokens": args.gen_tokens,
           "draft_context": d.context_length, "model_context": m.context_length, "draft_keep": keep,
           "load_before": load_before, "load_after": load_after, "seconds": time.time() - t0, "arms": {}}
    for arm in ARMS:
        rs = rows[arm]
        out["arms"][arm] = {
            "decode_tps": statistics.median(r["tps"] for r in rs),
            "ratio": statistics.median(r["tps"] / a["tps"] for r, a in zip(rs, alone)),
            "rounds": statistics.median(r["stats"].get("rounds", 0) for r in rs),
            "plain": statistics.median(r["stats"].get("plain", args.gen_tokens) for r in rs),
            "acceptance": statistics.median(r["stats"].get("acceptance_rate", 0.0) for r in rs),
            "same_tokens": all(r["tokens"] == a["tokens"] for r, a in zip(rs, alone)),
        }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{os.path.basename(args.model)} (context {m.context_length}) with {os.path.basename(args.draft)} "
          f"(context {d.context_length}); a {len(ids)}-token prompt, {args.gen_tokens} greedy tokens, "
          f"{args.rounds} rounds; load average {load_before:.2f} before, {load_after:.2f} after "
          f"({os.cpu_count()} cores)")
    print(f"{'arm':<34} {'decode tok/s':>12} {'ratio':>6} {'rounds':>6} {'alone':>5} {'accept':>7} {'same':>5}")
    for arm in ARMS:
        a = out["arms"][arm]
        name = {"alone": "model alone", "whole context": "draft reads the whole context",
                "latest tokens": f"draft reads the latest {keep}"}[arm]
        print(f"{name:<34} {a['decode_tps']:>12.1f} {a['ratio']:>5.2f}x {a['rounds']:>6.0f} {a['plain']:>5.0f} "
              f"{a['acceptance']:>7.0%} {str(a['same_tokens']):>5}")
    print("ratio: median over rounds of (tok/s) / (tok/s of the model alone in the same round); "
          "alone: tokens decoded without the draft")


if __name__ == "__main__":
    main()
