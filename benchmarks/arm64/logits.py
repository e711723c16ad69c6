"""One model file, one CPU: teacher-forced logits and greedy tokens, saved for compare.py.

Run by ``benchmarks/arm64_check.sh`` on x86 (the reference) and inside the arm64 root under
qemu-user. It uses the installed gemma_edge, on the backend ``cpu_features.plan()`` picks
for this CPU (what the backend hook does), unless ``--backend`` says otherwise.

    python logits.py MODEL.tflite OUT.npz [--tokens 32] [--greedy 8] [--threads 2] [--backend plan]

OUT.npz holds ``ids`` (the prompt), ``logits`` [T, V] float32 (position i's logits, which
predict ids[i + 1], from one ``score_<T>`` call), ``greedy`` (the tokens generated after
the first half of the prompt, temperature 0) and ``meta`` (a JSON string: backend, plan,
LiteRT version, CPU, timings).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata

import numpy as np

import gemma_edge
from gemma_edge.runtime import cpu_features

# Short English text: emulation is slow, so only its first --tokens tokens are used.
PROMPT = ("The history of the Raspberry Pi began in 2006, when a group of engineers at the University of "
          "Cambridge noticed that fewer students were applying to study computer science, and those who "
          "did had less experience with programming than students a decade earlier.")


def litert_version() -> str:
    for dist in ("ai-edge-litert", "ai-edge-litert-nightly", "tflite-runtime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=32, help="teacher-forced positions (one score_<T> call)")
    ap.add_argument("--greedy", type=int, default=8, help="greedy tokens after the first half of the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="plan", help="plan (cpu_features.plan()), auto, compiled or interpreter")
    a = ap.parse_args()

    info = cpu_features.detect()
    plan = cpu_features.plan(info)
    kind = plan.check().kind if a.backend == "plan" else a.backend
    t0 = time.perf_counter()
    model = gemma_edge.load(a.model, threads=a.threads, backend=kind)
    load_s = time.perf_counter() - t0

    ids = model.encode(PROMPT)[:a.tokens]
    T = len(ids)
    if T not in model.info.score_lengths:
        raise SystemExit(f"{a.model} has score lengths {model.info.score_lengths}, not {T}: "
                         f"convert with --score-length {T}")
    t0 = time.perf_counter()
    logits = model.backend.score(np.asarray([ids], np.int32), np.arange(T, dtype=np.int32))  # [T, V]
    model.reset()  # score_<T> wrote the cache behind the Model's back
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    r = model.generate(ids[:T // 2], max_tokens=a.greedy, temperature=0, stop_tokens=False)
    greedy_s = time.perf_counter() - t0

    meta = {"backend": model.backend.name, "kind": kind, "plan": plan.kind, "plan_note": plan.note,
            "litert": litert_version(), "machine": platform.machine(), "cpu": info.describe(),
            "load_s": round(load_s, 2), "score_s": round(score_s, 2), "greedy_s": round(greedy_s, 2),
            "greedy_text": r.text}
    np.savez(a.out, ids=np.asarray(ids, np.int32), logits=np.asarray(logits, np.float32),
             greedy=np.asarray(r.tokens, np.int32), meta=json.dumps(meta))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
