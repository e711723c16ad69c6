"""Start-up: gemma-edge against LiteRT-LM on the same model file, from a fresh process.

The gemma-edge .tflite is packed into a .litertlm in a temporary folder, so both runtimes load
the very same graph and weights. Each round (the order alternates) starts fresh child
processes that import the runtime, load the model and produce the first token of a short
prompt, with ``--threads`` threads:

- ``gemma-edge``: ``import gemma_edge`` and the runtime it loads on first use (numpy,
  SentencePiece), ``gemma_edge.load``, the first streamed token;
- ``LiteRT-LM``: ``import litert_lm``, ``Engine(...)`` and a session, prefill and one decode;
- ``gemma-edge run``: the command a user types (``gemma-edge run MODEL -p ... -n 1``), whole
  process, as wall time from spawn to exit.

Each is timed with a warm XNNPACK weight cache (packed once before the rounds) and cold (an
empty cache folder, so the run packs the weights first). The children report import, load and
first-token times measured inside; the parent adds the whole process's wall time (interpreter
start-up and exit included). Python bytecode is compiled once before the rounds, as pip does
at install (this matters for an editable install under PYTHONDONTWRITEBYTECODE). Prints medians
over the rounds, the ratios gemma-edge / LiteRT-LM, and the load average before and after (the
machine may be shared).

    python benchmarks/startup.py MODEL.tflite [--rounds 5] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "The capital of France is"

GEMMA_EDGE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import gemma_edge
import gemma_edge.runtime.engine  # what gemma_edge.load imports on its first call (numpy, SentencePiece)
t1 = time.perf_counter()
m = gemma_edge.load(sys.argv[1], threads=int(sys.argv[2]))
t2 = time.perf_counter()
next(iter(m.stream_generate(sys.argv[3], max_tokens=1, temperature=0.0)))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "in_process_s": t3 - t0}))
"""

LITERT_LM_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import litert_lm
t1 = time.perf_counter()
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
engine = litert_lm.Engine(sys.argv[1], backend=litert_lm.Backend.CPU(thread_count=int(sys.argv[2])),
                          max_num_tokens=int(sys.argv[4]), cache_dir=sys.argv[5])
session = engine.create_session(apply_prompt_template=False, max_output_tokens=1)
t2 = time.perf_counter()
session.run_prefill([sys.argv[3]])
session.run_decode()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "in_process_s": t3 - t0}))
"""


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its JSON report (if it prints one) plus ``wall_s``, spawn to exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"a benchmark child failed (exit {proc.returncode}): {' '.join(cmd[:3])}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    row = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    row["wall_s"] = wall
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a gemma-edge .tflite (gemma-convert output)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4),
                    help="CPU threads for both runtimes (default: gemma-edge's default, cores up to 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gemma_edge.runtime.litertlm import pack
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(args.model)
    cli = shutil.which("gemma-edge") or sys.exit("the gemma-edge command is not on PATH (pip install -e .)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gemma-edge-startup-") as work:
        packed = pack(args.model, os.path.join(work, "model.litertlm"))
        warm = {"ours": os.path.join(work, "ge-cache"), "theirs": os.path.join(work, "lm-cache")}
        os.makedirs(warm["theirs"])

        # Python bytecode as an installed package has it: pip compiles site-packages at install,
        # but an editable install compiles gemma-edge's sources at every start when
        # PYTHONDONTWRITEBYTECODE is set (25 ms here). The children keep theirs in a folder of
        # their own, written by the first run below.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")

        def ours(cache: str) -> dict:
            return timed([sys.executable, "-c", GEMMA_EDGE_CHILD, args.model, str(args.threads), PROMPT],
                         {**env, "GEMMA_EDGE_CACHE": cache})

        def theirs(cache: str) -> dict:
            return timed([sys.executable, "-c", LITERT_LM_CHILD, packed, str(args.threads), PROMPT,
                          str(info.context_length), cache], env)

        def command(cache: str) -> dict:
            return timed([cli, "run", args.model, "-p", PROMPT, "-n", "1", "-t", "0", "--threads", str(args.threads)],
                         {**env, "GEMMA_EDGE_CACHE": cache})

        def cold(run, n: int) -> dict:
            fresh = os.path.join(work, f"cold-{n}")
            os.makedirs(fresh)
            try:
                return run(fresh)
            finally:
                shutil.rmtree(fresh)

        ours(warm["ours"]), theirs(warm["theirs"]), command(warm["ours"])  # pack both warm caches, compile bytecode
        rows: dict[str, list[dict]] = {k: [] for k in ("gemma-edge", "LiteRT-LM", "gemma-edge run",
                                                       "gemma-edge cold", "LiteRT-LM cold", "gemma-edge run cold")}
        for i in range(args.rounds):
            jobs = [("gemma-edge", lambda: ours(warm["ours"])), ("LiteRT-LM", lambda: theirs(warm["theirs"])),
                    ("gemma-edge run", lambda: command(warm["ours"])),
                    ("gemma-edge cold", lambda: cold(ours, i)), ("LiteRT-LM cold", lambda: cold(theirs, i)),
                    ("gemma-edge run cold", lambda: cold(command, i))]
            for name, job in (jobs if i % 2 == 0 else jobs[::-1]):
                rows[name].append(job())
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f} s" for k, v in rows.items()),
                  file=sys.stderr)
    load_after = os.getloadavg()

    keys = ("import_s", "load_s", "first_token_s", "in_process_s", "wall_s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]} for name, rs in rows.items()}
    ratio = {f"{a} / {b}": {k: med[a][k] / med[b][k] for k in keys}
             for a, b in (("gemma-edge", "LiteRT-LM"), ("gemma-edge cold", "LiteRT-LM cold"))}
    result = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "medians": med, "ratios": ratio,
              "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{os.path.basename(args.model)}, {args.threads} threads, medians of {args.rounds} rounds (seconds)")
    print(f"{'':22}{'import':>8}{'load':>8}{'1st tok':>9}{'in-proc':>9}{'process':>9}")
    for name, m in med.items():
        cells = "".join(f"{m[k]:>{w}.2f}" if k in m else f"{'':>{w}}"
                        for k, w in zip(keys, (8, 8, 9, 9, 9)))
        print(f"{name:22}{cells}")
    for name, r in ratio.items():
        print(f"{name}:".ljust(22) + "".join(f"{r[k]:>{w}.2f}x" for k, w in zip(keys, (7, 7, 8, 8, 8))))
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    main()
