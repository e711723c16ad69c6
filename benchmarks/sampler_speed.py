"""Median time per call of each sampler over 262144 logits (Gemma 3's vocabulary).

    python benchmarks/sampler_speed.py [--vocab 262144] [--repeat 200]

Three logit rows: "peaked" looks like a language model's (a few hundred tokens far
above a Gaussian floor, so the nucleus is small), "flat" is a plain Gaussian
(the nucleus of top-p 0.9 holds tens of thousands of tokens, the worst case for a
sampler that only sorts candidates), and "draft" is the peaked row as a speculative
draft converted --for-draft gives it: -inf outside 17440 tokens. The baselines sort
the whole vocabulary: ``np.sort`` alone, and a textbook top-p sampler built on
``np.argsort``; and "argpartition top_k=64" is the top-k selection the sampler used
before its threshold pass (one ``np.argpartition`` over the whole row).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gemma_edge.runtime.sampling import apply_repetition_penalty, make_sampler


def median_ms(fn, x, repeat: int) -> float:
    for _ in range(3):
        fn(x)  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def full_sort_top_p(top_p: float, seed: int = 0):
    """The usual implementation: softmax, argsort everything, cumsum, cut, draw."""
    rng = np.random.default_rng(seed)

    def sample(x):
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p)
        c = np.cumsum(p[order])
        n = int(np.searchsorted(c, top_p)) + 1
        q = p[order[:n]]
        return int(order[rng.choice(n, p=q / q.sum())])

    return sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    flat = rng.normal(0.0, 1.0, args.vocab).astype(np.float32)
    peaked = rng.normal(0.0, 2.0, args.vocab).astype(np.float32)
    peaked[rng.choice(args.vocab, 300, replace=False)] += rng.uniform(8.0, 20.0, 300).astype(np.float32)
    history = rng.integers(0, args.vocab, 64)
    draft = np.full(args.vocab, -np.inf, np.float32)
    live = rng.choice(args.vocab, min(17440, args.vocab), replace=False)
    draft[live] = peaked[live]
    rows = {"peaked": peaked, "flat": flat, "draft": draft}

    cases = [
        ("baseline: np.sort(logits)", np.sort),
        ("baseline: argsort top_p=0.9 sampler", full_sort_top_p(0.9)),
        ("greedy (temperature=0)", make_sampler(0.0)),
        ("temperature=0.8", make_sampler(0.8, seed=0)),
        ("baseline: argpartition top_k=64", lambda x: np.argpartition(x, x.size - 64)[x.size - 64:]),
        ("top_k=40", make_sampler(0.8, top_k=40, seed=0)),
        ("top_p=0.9", make_sampler(0.8, top_p=0.9, seed=0)),
        ("min_p=0.05", make_sampler(0.8, min_p=0.05, seed=0)),
        ("top_k=64 top_p=0.95 min_p=0.05", make_sampler(0.8, top_k=64, top_p=0.95, min_p=0.05, seed=0)),
        ("top_k=64 top_p=0.95 (run's default)", make_sampler(0.8, top_k=64, top_p=0.95, seed=0)),
        ("repetition penalty (64 ids)", lambda x: apply_repetition_penalty(x, history, 1.1)),
    ]
    print(f"vocab {args.vocab}, median of {args.repeat} calls, ms per call")
    print(f"{'sampler':<36} " + " ".join(f"{r:>9}" for r in rows))
    for name, fn in cases:
        print(f"{name:<36} " + " ".join(f"{median_ms(fn, x, args.repeat):9.3f}" for x in rows.values()))


if __name__ == "__main__":
    main()
