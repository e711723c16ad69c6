"""Convert a Gemma-2B-shaped synthetic checkpoint and measure the converter's peak memory.

    python benchmarks/convert_memory.py [--work-dir DIR] [--quant int8[,int4,...]]
        [--keep] [--reuse-checkpoint] [--timeline] [--json [PATH]]

1. Writes a synthetic Hugging Face checkpoint with the real Gemma 2B (v1) names and
   shapes (2.51B parameters, ~5 GB of bf16 in ~2 GB shards plus
   model.safetensors.index.json, config.json and a tiny SentencePiece tokenizer.model).
   The safetensors files are written by hand, each tensor generated in row chunks and
   appended, so this process stays small (its peak RSS is printed).
2. Converts it with ``gemma_edge.convert.pipeline.convert`` in a child process, so the
   converter's peak RSS is measured alone: ``wait4`` rusage of that child,
   ``getrusage(RUSAGE_CHILDREN)`` and the ``ConvertResult.peak_rss_mb`` the child reports
   (ru_maxrss survives fork + exec, so this process's own peak, ~100 MB, is a floor).
   /proc/<pid>/status is sampled while it runs (VmRSS = RssAnon + RssFile + RssShmem):
   the per-stage peaks are always printed, ``--timeline`` prints the samples too.
3. Loads the result TensorFlow-free in another child (read_info, make_backend,
   run_prefill, decode) and times load and decode (median ms/token).
4. Prints a summary against the target (converter peak RSS < 1.5 GB) and removes the
   big files unless ``--keep`` (``--reuse-checkpoint`` keeps the checkpoint).

Note: the checkpoint is read through mmap, so pages of it that the converter touched
count in its RSS as RssFile (clean, reclaimable page cache) until the map is closed;
RssAnon is the converter's own memory. Both are shown.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TARGET_PEAK_MB = 1500.0  # converter peak RSS target ("< 1.5 GB")
MB = 1 << 20

# Gemma 2B (v1) as published (google/gemma-2b config.json).
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 256000,
}
CHECKPOINT_VERSION = 1  # bump when the synthetic layout changes (invalidates --reuse-checkpoint)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def self_rss_mb() -> float:
    """Current VmRSS of this process in MB."""
    st = proc_status(os.getpid())
    return st.get("VmRSS", 0.0)


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / RssShmem / VmHWM of a process in MB ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0]) / 1024  # kB -> MB
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (via /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} MB"


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n / (1 << 30):.2f} GiB)"


# --------------------------------------------------------------------------------------------
# 1. streamed synthetic checkpoint
# --------------------------------------------------------------------------------------------

def gemma_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    out.append(("model.norm.weight", (d,)))
    return out


def plan_shards(tensors, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even (no NaNs here)."""
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> 16) & 1)  # in place: x is a scratch chunk
    return (u >> 16).astype(np.uint16)


CHUNK_ELEMS = 4 << 20  # float32 elements generated at a time (16 MB)


def write_tensor_data(f, rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> None:
    if len(shape) == 1:
        w = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1))
        f.write(memoryview(to_bf16(w)).cast("B"))
        return
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
        w *= np.float32(0.02)
        f.write(memoryview(to_bf16(w)).cast("B"))


def write_safetensors(path: Path, tensors, rng: np.random.Generator, progress=None) -> int:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb", buffering=8 << 20) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            write_tensor_data(f, rng, name, shape)
            if progress:
                progress(name)
    os.replace(tmp, path)
    return 8 + len(raw) + off


def make_tokenizer(seed: int) -> bytes:
    import sentencepiece as spm

    rnd = random.Random(seed)
    words = ("the cat sat on a mat and dog ran to park big small red blue house tree bird "
             "sings today gemma edge model runs fast on every phone").split()
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    return buf.getvalue()


def checkpoint_stamp(cfg: dict, seed: int, shard_bytes: int) -> dict:
    return {"version": CHECKPOINT_VERSION, "config": cfg, "seed": seed, "shard_bytes": shard_bytes}


def write_checkpoint(ckpt: Path, cfg: dict, seed: int, shard_bytes: int, cold: bool) -> dict:
    """Write the sharded checkpoint; returns figures about the writer."""
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    t0 = time.time()
    rng = np.random.default_rng(seed)
    shards = plan_shards(gemma_tensors(cfg), shard_bytes)
    n = len(shards)
    total_params = sum(math.prod(s) for sh in shards for _, s in sh)
    weight_map, sizes, written = {}, [], 0
    peak_sample = self_rss_mb()
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"

        def progress(name, _k=k):
            nonlocal peak_sample, written
            peak_sample = max(peak_sample, self_rss_mb())

        size = write_safetensors(ckpt / fname, tensors, rng, progress)
        sizes.append(size)
        written += size
        for name, _ in tensors:
            weight_map[name] = fname
        print(f"  wrote {fname}: {len(tensors)} tensors, {fmt_bytes(size)}, "
              f"{time.time() - t0:.0f} s, writer RSS now {fmt_mb(self_rss_mb())}", flush=True)
    data_bytes = 2 * total_params
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}, indent=2))
    (ckpt / "config.json").write_text(json.dumps({**cfg, "transformers_version": "4.38.0"}, indent=2))
    (ckpt / "tokenizer.model").write_bytes(make_tokenizer(seed))
    if cold:
        drop_cache(ckpt)
    (ckpt / ".complete.json").write_text(json.dumps(checkpoint_stamp(cfg, seed, shard_bytes)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": time.time() - t0, "shards": n, "bytes": written, "params": total_params,
            "writer_peak_rss_mb": peak, "writer_rss_sampled_max_mb": peak_sample}


def drop_cache(ckpt: Path) -> None:
    """Evict the checkpoint's pages from the page cache (so the converter reads it cold)."""
    for p in ckpt.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def checkpoint_is_complete(ckpt: Path, cfg: dict, seed: int, shard_bytes: int) -> bool:
    stamp = ckpt / ".complete.json"
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == json.loads(json.dumps(checkpoint_stamp(cfg, seed, shard_bytes)))
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# child processes (this file run with --child-convert / --child-load)
# --------------------------------------------------------------------------------------------

def _mark(stage: str) -> None:
    print(f"@@STAGE {time.monotonic():.3f} {stage}", flush=True)


def _result(obj: dict) -> None:
    print("@@RESULT " + json.dumps(obj), flush=True)


def child_convert(spec: dict) -> None:
    _mark("python start + import gemma_edge")
    import importlib.util

    import gemma_edge.convert.pipeline as P
    from gemma_edge.convert import tflite_writer

    # Stage markers: wrap the pipeline's steps (in this process only; no file is changed).
    # Wrap only what exists, and import TensorFlow only if the pipeline itself would.
    def wrap(obj, attr, stage):
        orig = getattr(obj, attr, None)
        if orig is None:
            return

        def f(*a, **k):
            _mark(stage)
            return orig(*a, **k)

        setattr(obj, attr, f)

    if importlib.util.find_spec("gemma_edge.convert.template") is not None:
        from gemma_edge.convert import template  # TF-free: the template is built in grandchildren
        wrap(template, "build_template", "build template (TF in child processes)")
    else:  # older pipeline: TensorFlow in this process, as convert() would import it anyway
        _mark("import tensorflow")
        from gemma_edge.convert import graph
        wrap(graph, "build_template", "build template (TF trace + TFLite convert)")
    wrap(P.Source, "__init__", "open checkpoint (headers, config, tokenizer)")
    wrap(P.Source, "sha256", "sha256 of the source files")
    wrap(tflite_writer, "write_model", "surgery + layout")
    wrap(tflite_writer.os, "fsync", "metadata, header, fsync")
    read_rows, last = P.Source.read_rows, [None]

    def read_rows_marked(self, canon, r0, r1):
        m = re.match(r"l(\d+)_", canon)
        group = f"layer {int(m.group(1)):2d}" if m else canon
        if group != last[0]:
            last[0] = group
            _mark(f"write {group}")
        return read_rows(self, canon, r0, r1)

    P.Source.read_rows = read_rows_marked
    t0 = time.time()
    r = P.convert(spec["source"], spec["output"], quant=spec["quant"], max_context=spec["max_context"],
                  prefill_lengths=tuple(spec["prefill_lengths"]), force=True, progress=spec["progress"])
    _mark("done")
    _result({"path": r.path, "file_size": r.file_size, "seconds": r.seconds, "wall_in_child": time.time() - t0,
             "peak_rss_mb": r.peak_rss_mb, "quant": r.quant, "context_length": r.context_length,
             "prefill_lengths": list(r.prefill_lengths), "num_layers": r.config.num_layers,
             "vocab_size": r.config.vocab_size, "tensorflow_in_converter_process": "tensorflow" in sys.modules})


def child_load(spec: dict) -> None:
    _mark("python start + import runtime")
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    tf_loaded = "tensorflow" in sys.modules
    _mark("read_info + make_backend")
    t0 = time.perf_counter()
    info = read_info(spec["path"])
    b = make_backend(info, threads=spec.get("threads"))
    load_s = time.perf_counter() - t0
    _mark("prefill [2, 10, 11]")
    t0 = time.perf_counter()
    run_prefill(b, [2, 10, 11], 0)
    prefill_s = time.perf_counter() - t0
    _mark("first decode")
    t0 = time.perf_counter()
    logits = np.array(b.decode(12, 3), dtype=np.float32).reshape(-1)
    first_decode_s = time.perf_counter() - t0
    _mark("timed decodes")
    times, finite = [], bool(np.isfinite(logits).all())
    tok = int(np.argmax(logits))
    for i in range(spec["decode_steps"]):
        t0 = time.perf_counter()
        out = np.array(b.decode(tok % info.config.vocab_size, 4 + i), dtype=np.float32).reshape(-1)
        times.append(time.perf_counter() - t0)
        finite = finite and bool(np.isfinite(out).all())
        tok = int(np.argmax(out))
    _mark("done")
    _result({"backend": type(b).__name__, "threads": getattr(b, "threads", None), "load_s": load_s,
             "prefill_s": prefill_s, "first_decode_ms": 1e3 * first_decode_s,
             "decode_ms_median": 1e3 * statistics.median(times) if times else None,
             "decode_ms_all": [round(1e3 * t, 1) for t in times],
             "logits_shape": list(logits.shape), "logits_finite": finite,
             "logits_argmax": int(np.argmax(logits)), "logits_std": float(np.std(logits)),
             "tensorflow_imported": tf_loaded or "tensorflow" in sys.modules})


# --------------------------------------------------------------------------------------------
# running and watching a child
# --------------------------------------------------------------------------------------------

def run_child(mode: str, spec: dict, interval: float, verbose: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, os.path.abspath(__file__), f"--child-{mode}", json.dumps(spec)]
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss survives fork + exec
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                            text=True, env=env)
    err_tail: list[str] = []  # the last lines of a quiet child's stderr, shown if it fails
    marks: list[tuple[float, str]] = [(t_start, "spawn")]
    samples: list[tuple[float, dict]] = []
    result: dict = {}
    done = threading.Event()

    def reader():
        for line in proc.stdout:
            if line.startswith("@@STAGE "):
                _, t, name = line.rstrip("\n").split(" ", 2)
                marks.append((float(t), name))
            elif line.startswith("@@RESULT "):
                result.update(json.loads(line[len("@@RESULT "):]))
            elif verbose:
                sys.stdout.write("    | " + line)

    def sampler():
        while not done.is_set():
            st = proc_status(proc.pid)
            if st.get("VmRSS"):
                kids = [proc_status(k).get("VmRSS", 0.0) for k in descendants(proc.pid)]
                st["Desc"] = sum(kids)  # VmRSS of the child's own children (e.g. TF template builders)
                st["Tree"] = st["VmRSS"] + st["Desc"]
                samples.append((time.monotonic(), st))
            done.wait(interval)

    def err_reader():
        for line in proc.stderr:
            err_tail.append(line)
            del err_tail[:-20]

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=sampler, daemon=True)]
    if not verbose:
        threads.append(threading.Thread(target=err_reader, daemon=True))
    for t in threads:
        t.start()
    _, status, ru = os.wait4(proc.pid, 0)
    t_end = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for t in threads:
        t.join(timeout=5)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"mode": mode, "returncode": proc.returncode, "maxrss_floor_mb": floor, "wall_s": t_end - t_start, "t_start": t_start,
            "t_end": t_end, "wait4_maxrss_mb": ru.ru_maxrss / 1024,
            "rusage_children_maxrss_mb": children.ru_maxrss / 1024,
            "last_hwm_mb": max((s.get("VmHWM", 0.0) for _, s in samples), default=None),
            "marks": marks, "samples": samples, "result": result, "stderr_tail": "".join(err_tail)}


def stage_of(marks, t: float) -> str:
    name = marks[0][1]
    for tm, n in marks:
        if tm <= t:
            name = n
        else:
            break
    return name


def stage_table(run: dict) -> list[dict]:
    """Per stage: start, duration and the largest sampled VmRSS / RssAnon / RssFile."""
    marks = sorted(run["marks"])
    rows = []
    for i, (t, name) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else run["t_end"]
        inside = [s for ts, s in run["samples"] if t <= ts < t1]
        rows.append({"stage": name, "start_s": t - run["t_start"], "seconds": t1 - t,
                     "max_rss_mb": max((s.get("VmRSS", 0) for s in inside), default=None),
                     "max_anon_mb": max((s.get("RssAnon", 0) for s in inside), default=None),
                     "max_file_mb": max((s.get("RssFile", 0) for s in inside), default=None),
                     "max_desc_mb": max((s.get("Desc", 0) for s in inside), default=None),
                     "max_tree_mb": max((s.get("Tree", 0) for s in inside), default=None)})
    return rows


def print_stages(run: dict, merge_layers: bool = True) -> None:
    rows = stage_table(run)
    if merge_layers:  # one row for "write layer 0..17" instead of 18
        merged, acc = [], None
        for r in rows:
            if r["stage"].startswith("write layer"):
                if acc is None:
                    acc = dict(r, first=r["stage"])
                else:
                    acc["seconds"] += r["seconds"]
                    for k in ("max_rss_mb", "max_anon_mb", "max_file_mb", "max_desc_mb", "max_tree_mb"):
                        acc[k] = max(x for x in (acc[k], r[k]) if x is not None) if (acc[k] or r[k]) else None
                    acc["stage"] = f"{acc['first']} .. {r['stage'][len('write '):]}"
                continue
            if acc is not None:
                merged.append(acc)
                acc = None
            merged.append(r)
        if acc is not None:
            merged.append(acc)
        rows = merged
    print(f"    {'stage':46s} {'start':>7s} {'secs':>7s} {'max VmRSS':>11s} {'RssAnon':>10s} {'RssFile':>10s} "
          f"{'children':>10s} {'tree':>10s}")
    for r in rows:
        print(f"    {r['stage'][:46]:46s} {r['start_s']:7.1f} {r['seconds']:7.1f} {fmt_mb(r['max_rss_mb']):>11s} "
              f"{fmt_mb(r['max_anon_mb']):>10s} {fmt_mb(r['max_file_mb']):>10s} {fmt_mb(r.get('max_desc_mb')):>10s} "
              f"{fmt_mb(r.get('max_tree_mb')):>10s}")


def print_timeline(run: dict, step_mb: float = 64.0, every_s: float = 5.0) -> None:
    """Coarse timeline: a row when the stage changes, RSS moves by step_mb, or every every_s."""
    marks = sorted(run["marks"])
    print(f"    {'t (s)':>7s} {'VmRSS':>10s} {'RssAnon':>10s} {'RssFile':>10s} {'children':>10s}  stage")
    last = None
    for i, (ts, s) in enumerate(run["samples"]):
        stage = stage_of(marks, ts)
        rss = s.get("Tree", s.get("VmRSS", 0.0))
        final = i == len(run["samples"]) - 1
        if (last is None or stage != last[1] or abs(rss - last[2]) >= step_mb
                or ts - last[0] >= every_s or final):
            print(f"    {ts - run['t_start']:7.1f} {fmt_mb(rss):>10s} {fmt_mb(s.get('RssAnon')):>10s} "
                  f"{fmt_mb(s.get('RssFile')):>10s} {fmt_mb(s.get('Desc')):>10s}  {stage}")
            last = (ts, stage, rss)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    default_dir = Path(os.environ.get("TMPDIR") or "/tmp") / "gemma-edge-convert-memory"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work-dir", default=str(default_dir), help=f"where the big files go (default {default_dir})")
    ap.add_argument("--quant", default="int8", help="quantization scheme(s), comma separated (default int8)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the converted files")
    ap.add_argument("--reuse-checkpoint", action="store_true",
                    help="reuse a complete checkpoint already in --work-dir (and keep it afterwards)")
    ap.add_argument("--timeline", action="store_true",
                    help="print the sampled RSS timeline of each child (/proc/<pid>/status)")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling period in seconds (default 0.5)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="also write the figures as JSON to PATH (or stdout without PATH)")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--prefill-lengths", default="8,32,128,512")
    ap.add_argument("--decode-steps", type=int, default=5, help="timed decode calls (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the backend's)")
    ap.add_argument("--num-layers", type=int, default=GEMMA_2B["num_hidden_layers"],
                    help="layers of the synthetic model (18 = Gemma 2B; fewer for a quick try)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint from the page cache before converting (fadvise DONTNEED)")
    ap.add_argument("--no-progress", action="store_true", help="no converter progress bar (shown only when stderr is a terminal)")
    ap.add_argument("--quiet-children", action="store_true", help="hide the children's output")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "gemma-2b-synthetic"
    cfg = {**GEMMA_2B, "num_hidden_layers": args.num_layers}
    shard_bytes = int(args.shard_gb * 1e9)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    lengths = [int(x) for x in args.prefill_lengths.split(",") if x.strip()]
    report: dict = {"work_dir": str(work), "target_peak_rss_mb": TARGET_PEAK_MB, "quants": {}}
    params = sum(math.prod(s) for _, s in gemma_tensors(cfg))
    print(f"synthetic Gemma 2B: {params / 1e9:.3f}B parameters, {fmt_bytes(2 * params)} of bf16, "
          f"{cfg['num_hidden_layers']} layers; work dir {work}")

    # 1. checkpoint
    if args.reuse_checkpoint and checkpoint_is_complete(ckpt, cfg, args.seed, shard_bytes):
        print(f"[1] reusing the checkpoint in {ckpt}")
        report["checkpoint"] = {"reused": True, "bytes": sum(p.stat().st_size for p in ckpt.iterdir())}
        if args.cold:
            drop_cache(ckpt)
    else:
        need = 2 * params * 1.02 + sum(params * (1.05 if q.startswith("int8") else 4.1 if q == "fp32" else 0.6)
                                       for q in quants)
        free = shutil.disk_usage(work).free
        if free < need:
            print(f"error: {work} has {fmt_bytes(free)} free; this run needs about {fmt_bytes(int(need))}. "
                  "Use --work-dir on a bigger disk", file=sys.stderr)
            return 2
        print(f"[1] writing the checkpoint to {ckpt} (streamed, bf16, {args.shard_gb:g} GB shards)")
        w = write_checkpoint(ckpt, cfg, args.seed, shard_bytes, args.cold)
        report["checkpoint"] = {"reused": False, **w}
        print(f"    {w['shards']} shards, {fmt_bytes(w['bytes'])} in {w['seconds']:.0f} s "
              f"({w['bytes'] / w['seconds'] / 1e6:.0f} MB/s); writer peak RSS "
              f"{fmt_mb(w['writer_peak_rss_mb'])} (ru_maxrss of this process, incl. numpy + sentencepiece)")

    outputs = []
    try:
        for quant in quants:
            out = work / f"gemma-2b-synthetic-{quant}.tflite"
            outputs.append(out)
            q: dict = {}
            report["quants"][quant] = q
            # 2. convert in a child
            print(f"\n[2] converting ({quant}) in a child process -> {out}")
            spec = {"source": str(ckpt), "output": str(out), "quant": quant, "max_context": args.max_context,
                    "prefill_lengths": lengths,
                    "progress": not args.no_progress and not args.quiet_children and sys.stderr.isatty()}
            run = run_child("convert", spec, args.interval, not args.quiet_children)
            q["convert"] = summarize_run(run)
            if run["returncode"] != 0 or not run["result"]:
                print(f"    converter child failed (exit {run['returncode']})\n" + run["stderr_tail"])
                print_stages(run)
                continue
            r = run["result"]
            print(f"    done in {run['wall_s']:.1f} s wall ({r['seconds']:.1f} s inside convert()); "
                  f"file {fmt_bytes(r['file_size'])}")
            print(f"    peak RSS: wait4 {fmt_mb(run['wait4_maxrss_mb'])}, RUSAGE_CHILDREN "
                  f"{fmt_mb(run['rusage_children_maxrss_mb'])}, ConvertResult.peak_rss_mb "
                  f"{fmt_mb(r['peak_rss_mb'])}\n    (each is the largest single process, the child or one of its "
                  f"children; ru_maxrss is never below this process's {fmt_mb(run['maxrss_floor_mb'])} peak at spawn, "
                  f"as it survives fork + exec); TensorFlow imported in the converter process: "
                  f"{r.get('tensorflow_in_converter_process')}")
            print("    per stage (sampled every %.1f s):" % args.interval)
            print_stages(run)
            if args.timeline:
                print("    timeline:")
                print_timeline(run)
            # 3. load without TensorFlow in another child
            print(f"\n[3] loading {out.name} TensorFlow-free in a child process")
            lspec = {"path": str(out), "decode_steps": args.decode_steps, "threads": args.threads}
            lrun = run_child("load", lspec, args.interval, not args.quiet_children)
            q["load"] = summarize_run(lrun)
            if lrun["returncode"] != 0 or not lrun["result"]:
                print(f"    loader child failed (exit {lrun['returncode']})\n" + lrun["stderr_tail"])
                print_stages(lrun)
                continue
            lr = lrun["result"]
            print(f"    {lr['backend']} ({lr['threads']} threads): load {lr['load_s']:.2f} s, prefill(3) "
                  f"{lr['prefill_s']:.2f} s, first decode {lr['first_decode_ms']:.0f} ms, decode median "
                  f"{lr['decode_ms_median']:.0f} ms/token {lr['decode_ms_all']}")
            print(f"    logits {lr['logits_shape']} finite={lr['logits_finite']} argmax={lr['logits_argmax']} "
                  f"std={lr['logits_std']:.3f}; TensorFlow imported: {lr['tensorflow_imported']}; "
                  f"peak RSS {fmt_mb(lrun['wait4_maxrss_mb'])}")
            print_stages(lrun, merge_layers=False)
            if args.timeline:
                print("    timeline:")
                print_timeline(lrun)
    finally:
        # 4. clean up
        if not args.keep:
            for o in outputs:
                o.unlink(missing_ok=True)
            if not args.reuse_checkpoint:
                shutil.rmtree(ckpt, ignore_errors=True)

    print_summary(report, args)
    if args.json:
        text = json.dumps(report, indent=1, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
            print(f"JSON written to {args.json}")
    ok = all(q.get("ok") for q in report["quants"].values())
    return 0 if ok else 1


def summarize_run(run: dict) -> dict:
    return {"returncode": run["returncode"], "wall_s": run["wall_s"], "maxrss_floor_mb": run["maxrss_floor_mb"], "wait4_maxrss_mb": run["wait4_maxrss_mb"],
            "rusage_children_maxrss_mb": run["rusage_children_maxrss_mb"], "sampled_hwm_mb": run["last_hwm_mb"],
            "result": run["result"], "stages": stage_table(run)}


def print_summary(report: dict, args) -> None:
    ck = report.get("checkpoint", {})
    print("\n=== summary ===")
    rows = []
    if ck and not ck.get("reused"):
        rows.append(("checkpoint write", f"{ck['seconds']:.0f} s, {fmt_bytes(ck['bytes'])}, writer peak "
                     f"{fmt_mb(ck['writer_peak_rss_mb'])}", ""))
    for quant, q in report["quants"].items():
        c, l = q.get("convert", {}), q.get("load", {})
        cr, lr = c.get("result") or {}, l.get("result") or {}
        peak = c.get("wait4_maxrss_mb")
        peak_ok = peak is not None and cr and peak < TARGET_PEAK_MB
        anon = max((s["max_anon_mb"] or 0 for s in c.get("stages", [])), default=None)
        fil = max((s["max_file_mb"] or 0 for s in c.get("stages", [])), default=None)
        tree = max((s.get("max_tree_mb") or 0 for s in c.get("stages", [])), default=None)
        rows += [
            (f"[{quant}] convert wall time", f"{c.get('wall_s', float('nan')):.1f} s"
             + (f" ({cr['seconds']:.1f} s in convert())" if cr else ""), ""),
            (f"[{quant}] converter peak RSS (wait4)", fmt_mb(peak), f"target < {TARGET_PEAK_MB:,.0f} MB: "
             + ("PASS" if peak_ok else "FAIL")),
            (f"[{quant}] ConvertResult.peak_rss_mb", fmt_mb(cr.get("peak_rss_mb")), ""),
            (f"[{quant}] RUSAGE_CHILDREN max", fmt_mb(c.get("rusage_children_maxrss_mb")), ""),
            (f"[{quant}] sampled max RssAnon / RssFile", f"{fmt_mb(anon)} / {fmt_mb(fil)}", "(converter process)"),
            (f"[{quant}] sampled max tree RSS", fmt_mb(tree), "(converter + its children, summed)"),
            (f"[{quant}] TensorFlow in converter process", str(cr.get("tensorflow_in_converter_process", "-")), ""),
            (f"[{quant}] output size", fmt_bytes(cr["file_size"]) if cr else "-", ""),
        ]
        load_ok = bool(lr) and lr.get("logits_finite") and not lr.get("tensorflow_imported")
        if lr:
            rows += [
                (f"[{quant}] load (read_info+backend)", f"{lr['load_s']:.2f} s ({lr['backend']})", ""),
                (f"[{quant}] decode median", f"{lr['decode_ms_median']:.0f} ms/token ({lr['threads']} threads)", ""),
                (f"[{quant}] loader peak RSS", fmt_mb(l.get("wait4_maxrss_mb")), ""),
                (f"[{quant}] logits finite, no TF", f"{lr['logits_finite']}, {not lr['tensorflow_imported']}",
                 "PASS" if load_ok else "FAIL"),
            ]
        else:
            rows.append((f"[{quant}] load", "failed", "FAIL"))
        q["ok"] = bool(peak_ok and load_ok)
    w = max(len(r[0]) for r in rows) if rows else 10
    for name, val, verdict in rows:
        print(f"  {name:{w}s}  {val:40s} {verdict}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child-convert":
        child_convert(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--child-load":
        child_load(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
