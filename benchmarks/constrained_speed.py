"""What constrained decoding costs per token: decode tok/s with and without a schema, same run.

    python benchmarks/constrained_speed.py MODEL.tflite [--tokens 128] [--runs 5] [--threads N] [--json]

Each round generates ``--tokens`` tokens from the same prompt (the cache restarts each time, the
first token's prefill excluded) four ways, greedy and sampled, in an order that rotates from
round to round, so the machine's load hits each alike:

* ``free``: no constraint (the baseline);
* ``schema``: a JSON Schema whose array never ends within ``--tokens`` (objects with a bounded
  string, an enum, bounded integers, an optional boolean), mask computed in the worker thread
  while the model decodes (what gemma-edge does);
* ``schema, inline``: the same with the mask computed after the decode call (no overlap);
* ``any text``: a grammar that allows any text (every token but the special ones: the sampler
  then sees the whole masked vocabulary, the worst case for applying a mask, as in a tool
  call's free-text branch);

greedy, and sampled with the CLI's defaults (temperature 0.8, top-k 64, top-p 0.95). Reported,
medians over the runs: decode tok/s and its change against ``free``; the model's own time per
token (the decode calls); the main thread's time per token in the sampler and the constraint's
calls (``Matcher.start`` / ``sample`` / ``consume``, waiting for the mask included), and its excess
over ``free``'s as a share of ``free``'s time per token: the constraint's cost, which the load of
a shared machine does not blur as it blurs tok/s. Also the one-time vocabulary build
(llguidance's trie of the 262k pieces) and llguidance's mask computation alone, per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "team": {"type": "integer", "minimum": 1, "maximum": 40},
        "active": {"type": "boolean"}},
    "required": ["name", "role", "age", "team"], "additionalProperties": False}}
PROMPT = "A list of the users of the system, as JSON:\n"
SAMPLING = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_k=64, top_p=0.95)}


def _generate(model, tokens: int, sampling: dict, seed: int, **constraint) -> tuple[float, int]:
    model.reset()
    last = None
    for last in model.stream_generate(PROMPT, max_tokens=tokens, stop_tokens=False, seed=seed,
                                      **sampling, **constraint):
        pass
    return last.generation_tps, last.generation_tokens


class Timer:
    """Main-thread time per token spent in the constraint's calls (Matcher.start / sample / consume)
    and, without a constraint, in the sampler: what a token costs besides the model itself."""

    def __init__(self):
        from gemma_edge.runtime import constrained, engine

        self.constrained, self.engine = constrained, engine
        self.per_token: dict[str, list[float]] = {}
        self.decode: dict[str, list[float]] = {}
        self.key = None
        self._acc = self._dec = 0.0

    def _wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._acc += time.perf_counter() - t0
        return timed

    def install(self, backend):
        self.backend = backend
        decode = backend.decode

        def timed_decode(*a):
            t0 = time.perf_counter()
            try:
                return decode(*a)
            finally:
                self._dec += time.perf_counter() - t0
        backend.decode = timed_decode
        M = self.constrained.Matcher
        self._saved = (M.start, M.sample, M.consume, self.engine.make_sampler)
        M.start, M.sample, M.consume = self._wrap(M.start), self._wrap(M.sample), self._wrap(M.consume)
        make = self.engine.make_sampler
        self.engine.make_sampler = lambda **kw: self._wrap(make(**kw))

    def uninstall(self):
        del self.backend.decode
        M = self.constrained.Matcher
        M.start, M.sample, M.consume, self.engine.make_sampler = self._saved

    def begin(self, key):
        self.key, self._acc, self._dec = key, 0.0, 0.0

    def end(self, tokens: int):
        self.per_token.setdefault(self.key, []).append(self._acc / tokens)
        self.decode.setdefault(self.key, []).append(self._dec / tokens)


def mask_time_us(model, tokens: list[int]) -> float:
    """Median llguidance mask computation per token along ``tokens`` (no model, no thread)."""
    import llguidance

    from gemma_edge.runtime import constrained

    vocab = constrained.vocabulary(model.tokenizer)
    m = llguidance.LLMatcher(vocab.lltok, constrained.json_schema_grammar(SCHEMA).grammar, log_level=0)
    words = np.zeros(((vocab.size + 31) // 32,), np.int32)
    times = []
    for t in tokens:
        t0 = time.perf_counter()
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(time.perf_counter() - t0)
        if not m.consume_token(t):
            break
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import gemma_edge
    from gemma_edge.runtime import constrained

    model = gemma_edge.load(args.model, threads=args.threads)
    t0 = time.perf_counter()
    constrained.vocabulary(model.tokenizer)
    vocab_s = time.perf_counter() - t0

    inline = constrained.Constraint.matcher

    def matcher_inline(self, stop_ids, overlap=True):
        return inline(self, stop_ids, overlap=False)

    ways = {
        "free": {},
        "schema": {"json_schema": SCHEMA},
        "schema, inline": {"json_schema": SCHEMA, "_inline": True},
        "any text": {"grammar": "start: /(.|\\n)*/"},
    }
    rows: dict[tuple[str, str], list[float]] = {}
    timer = Timer()
    timer.install(model.backend)
    order = list(ways)
    for run in range(args.runs):
        for mode, sampling in SAMPLING.items():
            shift = (run + len(mode)) % len(order)  # each way in each place of the round, in turn
            for way in order[shift:] + order[:shift]:
                kw = ways[way]
                kw = dict(kw)
                if kw.pop("_inline", False):
                    constrained.Constraint.matcher = matcher_inline
                timer.begin((mode, way))
                try:
                    tps, n = _generate(model, args.tokens, sampling, seed=run, **kw)
                finally:
                    constrained.Constraint.matcher = inline
                timer.end(n)
                assert n == args.tokens, (way, n)
                rows.setdefault((mode, way), []).append(tps)
    timer.uninstall()
    model.reset()
    sample_tokens = model.generate(PROMPT, max_tokens=args.tokens, temperature=0, json_schema=SCHEMA).tokens
    mask_us = mask_time_us(model, sample_tokens)

    result = {"model": args.model, "quant": model.info.quant, "threads": model.backend.threads,
              "tokens": args.tokens, "runs": args.runs, "vocabulary_build_s": vocab_s,
              "mask_median_us": mask_us, "decode_tps": {}}
    rows = {(mode, way): rows[(mode, way)] for mode in SAMPLING for way in ways}
    for (mode, way), vals in rows.items():
        med = statistics.median(vals)
        free = statistics.median(rows[(mode, "free")])
        host_ms = 1e3 * statistics.median(timer.per_token[(mode, way)])
        host_free_ms = 1e3 * statistics.median(timer.per_token[(mode, "free")])
        result["decode_tps"][f"{mode}/{way}"] = {
            "median": med, "min": min(vals), "max": max(vals), "cost_vs_free": (free / med) - 1.0,
            "model_ms_per_token": 1e3 * statistics.median(timer.decode[(mode, way)]),  # the decode calls alone
            "host_ms_per_token": host_ms,  # sampler (free) or constraint calls + sampler (the rest)
            "extra_ms_per_token": host_ms - host_free_ms,
            "extra_vs_free_token_time": (host_ms - host_free_ms) / (1e3 / free)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"model {args.model} ({result['quant']}, {result['threads']} threads), {args.tokens} tokens x "
          f"{args.runs} runs; vocabulary built once in {vocab_s:.2f} s; llguidance mask median {mask_us:.0f} us/token")
    print("decode tok/s are medians; 'tok/s cost' compares them; 'model ms' is the decode call's time per "
          "token; 'host ms' the main thread's time per token in the sampler and the constraint's calls (waiting "
          "for the mask included), 'extra' its excess over free's, as a share of free's time per token")
    print(f"{'sampling':9} {'constraint':16} {'decode tok/s':>12} {'min-max':>13} {'tok/s cost':>10} "
          f"{'model ms':>8} {'host ms':>8} {'extra':>8}")
    for (mode, way), vals in rows.items():
        d = result["decode_tps"][f"{mode}/{way}"]
        cost = "" if way == "free" else f"{100 * d['cost_vs_free']:+.1f}%"
        extra = "" if way == "free" else f"{100 * d['extra_vs_free_token_time']:+.1f}%"
        print(f"{mode:9} {way:16} {d['median']:12.1f} {d['min']:6.1f}-{d['max']:<6.1f} {cost:>10} "
              f"{d['model_ms_per_token']:8.2f} {d['host_ms_per_token']:8.2f} {extra:>8}")


if __name__ == "__main__":
    main()
