"""A long chat that runs into the context limit and keeps going: is memory flat?

Sends --turns user messages to one ``Conversation`` on MODEL (a converted .tflite; nothing
is converted here). Once the history fills the context, the conversation's policy drops the
oldest whole turns and re-prefills what remains (see ``Conversation`` in runtime/engine.py).
Per turn it prints: the turn number, the prompt tokens fed, the turns dropped so far, the
tokens prefilled (all of the prompt after a drop, only the new turn otherwise), the reply
tokens and how it ended, the seconds taken, and RSS (VmRSS from /proc/self/status). The
summary compares RSS at turn 5 and at the last turn: flat means within --flat-mb.

    gemma-convert gemma-3-270m.gguf -o /tmp/soak/m.tflite --quant int8 --max-context 512
    python benchmarks/chat_soak.py /tmp/soak/m.tflite [--turns 40] [--max-tokens 96]

A small context (512) makes the limit come within a few turns. Sampling is seeded per turn,
so runs repeat.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time

PROMPTS = [
    "Tell me about the history of the bicycle.",
    "Why is the sky blue during the day and red at sunset?",
    "Write a short poem about a lighthouse in winter.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for growing tomatoes on a balcony.",
    "Explain how a refrigerator keeps food cold.",
    "Summarize the plot of a detective story you like.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "How do bees make honey?",
    "Describe the city of Lisbon to someone who has never been there.",
]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a gemma-edge .tflite")
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=96, help="most tokens per reply")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--system", default="You are a helpful assistant. Answer in a few sentences.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flat-mb", type=float, default=5.0, help="RSS growth still counted as flat")
    args = ap.parse_args()
    if args.turns < 5:
        ap.error("--turns must be at least 5 (the summary compares turn 5 with the last)")

    from gemma_edge import load

    m = load(args.model, threads=args.threads)
    conv = m.chat(system=args.system)
    print(f"{args.model}: context {m.context_length} tokens, {m.info.quant}, reply room "
          f"{conv.reply_room(args.max_tokens)} tokens; RSS after load {rss_mb():.1f} MB")
    print(f"{'turn':>4} {'prompt':>6} {'dropped':>7} {'prefill':>7} {'reply':>5} {'end':>6} {'s':>6} {'RSS MB':>8}")
    rss = {}
    for turn in range(1, args.turns + 1):
        t0 = time.perf_counter()
        last, n = None, 0
        for r in conv.send(PROMPTS[(turn - 1) % len(PROMPTS)], max_tokens=args.max_tokens,
                           temperature=args.temperature, top_k=64, top_p=0.95, seed=turn):
            last, n = r, n + 1
        gc.collect()
        rss[turn] = rss_mb()
        print(f"{turn:>4} {last.prompt_tokens:>6} {conv.dropped_turns:>7} {last.prefilled_tokens:>7} {n:>5} "
              f"{last.finish_reason:>6} {time.perf_counter() - t0:>6.2f} {rss[turn]:>8.1f}", flush=True)
    grew = rss[args.turns] - rss[5]
    verdict = "flat" if abs(grew) <= args.flat_mb else "NOT flat"
    print(f"\nRSS turn 5 {rss[5]:.1f} MB, turn {args.turns} {rss[args.turns]:.1f} MB: {grew:+.1f} MB ({verdict}, "
          f"limit {args.flat_mb:g} MB); min {min(rss.values()):.1f}, max {max(rss.values()):.1f} MB over turns "
          f"1-{args.turns}; {conv.dropped_turns} of {len(conv.messages) // 2} turns dropped")
    return 0 if verdict == "flat" else 1


if __name__ == "__main__":
    sys.exit(main())
