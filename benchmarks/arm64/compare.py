"""Compare an arm64 run of logits.py with the x86 one: one line of the check's table.

    python compare.py X86.npz ARM.npz --cpu cortex-a72 --preset int8
    python compare.py --header                  # the table's header

Columns: the backend that ran (compiled: CompiledModel; interpreter); top-1 agreement of the teacher-forced logits at the
positions where x86's top-1 leads its runner-up by more than 0.5 (elsewhere a tie may
flip on rounding alone), and at all positions; max and mean |logit difference| over every
position and vocabulary entry; the mean negative log-likelihood of the text's next tokens
on x86 and on arm64; greedy tokens equal to x86's before the first difference; the time of
the load, the teacher-forced call and the greedy run under emulation.

Tolerances per precision. fp32 must match: max |d| <= 0.01, every confident top-1 and
every greedy token equal. int8/int4 files are judged statistically, because their kernels
quantize activations on the fly and ARM's and x86's kernels round differently (on x86
alone, the builtin int8 kernels instead of XNNPACK's move the 270M int8 logits by mean 0.52,
max 4.1): at least 90% of the confident top-1s equal and the NLL within 0.05 nats of x86's;
their greedy tokens may part after a near tie. Exit status 1 when a line fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

MARGIN = 0.5
FP32_MAX_D = 0.01
QUANT_TOP1 = 0.9
QUANT_NLL = 0.05
HEADER = (f"{'cpu':<11} {'preset':<9} {'backend':<12} {'top1 m>0.5':>10} {'top1 all':>8} {'max|d|':>7} "
          f"{'mean|d|':>7} {'nll x86':>7} {'nll arm':>7} {'greedy':>6} {'load s':>6} {'tf s':>5} {'gen s':>5}"
          "  ok  litert")


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1] (position i predicts i + 1)."""
    z = logits[:-1].astype(np.float64)  # [T-1, V]
    m = z.max(-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
    return float((lse - z[np.arange(len(z)), ids[1:]]).mean())


def compare(ref: dict, arm: dict) -> dict:
    if not np.array_equal(ref["ids"], arm["ids"]):
        raise SystemExit("the two runs scored different prompts; re-run both")
    x, y = ref["logits"].astype(np.float64), arm["logits"].astype(np.float64)  # [T, V]
    top2 = np.sort(x, axis=-1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > MARGIN  # [T]
    agree = x.argmax(-1) == y.argmax(-1)
    d = np.abs(x - y)
    g_ref, g_arm = list(ref["greedy"]), list(arm["greedy"])
    same = next((i for i, (a, b) in enumerate(zip(g_ref, g_arm)) if a != b), min(len(g_ref), len(g_arm)))
    c = {"sure": int(sure.sum()), "sure_agree": int((agree & sure).sum()), "all": len(agree),
         "all_agree": int(agree.sum()), "max_d": float(d.max()), "mean_d": float(d.mean()),
         "nll_ref": nll(x, ref["ids"]), "nll_arm": nll(y, arm["ids"]), "greedy_same": same, "greedy_n": len(g_ref)}
    return c


def passes(c: dict, fp32: bool) -> bool:
    if fp32:
        return c["max_d"] <= FP32_MAX_D and c["sure_agree"] == c["sure"] and c["greedy_same"] == c["greedy_n"]
    return c["sure_agree"] >= QUANT_TOP1 * c["sure"] and abs(c["nll_arm"] - c["nll_ref"]) <= QUANT_NLL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", nargs="?")
    ap.add_argument("arm", nargs="?")
    ap.add_argument("--cpu")
    ap.add_argument("--preset")
    ap.add_argument("--header", action="store_true", help="print the table's header and exit")
    a = ap.parse_args()
    if a.header:
        print(HEADER)
        return
    if not (a.ref and a.arm and a.cpu and a.preset):
        ap.error("give X86.npz ARM.npz --cpu CPU --preset PRESET (or --header)")
    ref, arm = dict(np.load(a.ref)), dict(np.load(a.arm))
    m = json.loads(str(arm["meta"]))
    c = compare(ref, arm)
    ok = passes(c, fp32=a.preset == "fp32")
    greedy = f"{c['greedy_same']}/{c['greedy_n']}"
    ran = "compiled" if "CompiledModel" in m["backend"] else "interpreter"  # what ran, not what was asked
    print(f"{a.cpu:<11} {a.preset:<9} {ran:<12} {c['sure_agree']:>5}/{c['sure']:<4} "
          f"{c['all_agree']:>4}/{c['all']:<3} {c['max_d']:>7.4f} {c['mean_d']:>7.4f} {c['nll_ref']:>7.4f} "
          f"{c['nll_arm']:>7.4f} {greedy:>6} {m['load_s']:>6.1f} {m['score_s']:>5.1f} {m['greedy_s']:>5.1f}  "
          f"{'yes' if ok else 'NO ':<3} {m['litert']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
