"""Convert a synthetic Gemma 2B: converter peak memory, and decode speed against the bandwidth ceiling.

    python benchmarks/convert_memory.py [--work-dir DIR] [--quant RECIPE ...]
        [--bench-prompt 32] [--bench-gen 32] [--bench-runs 3] [--bandwidth-mib 1024]
        [--keep] [--reuse-checkpoint] [--timeline] [--json [PATH]]

    # both int4 presets and a recipe (a recipe's own commas stay inside it):
    python benchmarks/convert_memory.py --quant int4-b32 --quant 'int4-b32,embedding=int8'
    python benchmarks/convert_memory.py --quant int8,int4-b32    # plain presets, comma separated

``--quant`` may be given several times; each value is one recipe
(``gemma_edge.quantize.schemes.parse_recipe``), or several separated by ``;``, or plain
preset names separated by ``,`` (a value containing ``=`` is never split on ``,``).
Default int8. Output files are named ``gemma-2b-synthetic-<recipe>.tflite`` with every
character outside ``[A-Za-z0-9._-]`` replaced by ``_``.

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
3. Loads the result TensorFlow-free in another child with
   ``gemma_edge.runtime.engine.load`` and checks it (prefill, decode, finite logits,
   median ms/token of raw ``backend.decode`` calls), then runs
   ``Model.benchmark(prompt_tokens, gen_tokens, runs)``, the code behind
   ``gemma-edge bench``: decode tok/s median/min/max and prefill tok/s. The synthetic
   tokenizer has only 300 pieces; ``benchmark`` draws its prompt from ids 150..299 of
   them, and the decode reads the full 256000-row LM head regardless. The same child
   counts the bytes one decode step reads (below). The XNNPACK weight cache the load
   writes (~the file's size, under ~/.cache/gemma-edge/xnnpack) is removed again
   unless ``--keep``.
4. Measures memory read bandwidth in a separate small child (so no converter or loader
   RSS figure includes its array): a ``--bandwidth-mib`` int32 array (default 1 GiB,
   over 3x the 300 MiB L3 this VM reports; filled first so it is resident) is reduced
   with ``np.max`` split over T threads (numpy releases the GIL inside the reduction),
   best and median of ``--bandwidth-reps`` passes, for 1 thread and for the runtime's
   thread count T. The T-thread best is the bandwidth used for the ceiling. An
   ``np.copyto`` of one half into the other (read + written bytes per second) is printed
   for reference only. Each figure carries process CPU seconds / wall seconds: well
   below T means the threads did not run in parallel (a busy machine), so the
   bandwidth, and the ceiling, are understated.
5. Prints a summary against the targets: converter peak RSS < 1.5 GB, convert wall time
   < 5 min, decode tok/s >= 85% of the bandwidth ceiling. The exit status is 1 if any
   measured target fails. The big files are removed unless ``--keep``
   (``--reuse-checkpoint`` keeps the checkpoint).

Bytes read per decoded token (the ceiling is bandwidth / these bytes):
* weights: every buffer referenced by a constant tensor of the ``decode`` subgraph,
  each buffer once (the tied embedding is read whole by the LM head and counted once;
  the EMBEDDING_LOOKUP of one row adds nothing), plus per-channel scales kept in the
  header (4 bytes a row) and the few constants stored inline. Blockwise int4 scales are
  tensors over buffers of their own, so they are in the buffer sum.
* KV cache: per layer, K and V of [1, num_kv_heads, S, head_dim] float32. The graph's
  attention is a rank-4 BATCH_MATMUL over the whole cache, so a global layer reads all
  S = context length slots every step whatever the position; a sliding layer (Gemma 2/3)
  reads only its W = sliding_window slots (Gemma 1 2B has none).
Assumptions: XNNPACK repacks the weights into its weight cache and decode reads the
packed copy; for int8 and int4 the packed bytes are about the file's (the int8 2B's
cache file is ~2.5 GB), so the file's bytes stand for them. Activations, the logits
written back and the one-slot KV writes (in place) are ignored as small. MB and GB in
the bandwidth figures are decimal (1e6, 1e9 bytes); RSS figures are MiB, printed "MB".

Note: the checkpoint is read through mmap, so pages of it that the converter touched
count in its RSS as RssFile (clean, reclaimable page cache) until the map is closed;
RssAnon is the converter's own memory. Both are shown. RUSAGE_CHILDREN is the largest
of every child waited for so far, so from the second recipe on it includes the
earlier loaders.
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
TARGET_WALL_S = 300.0  # convert wall time target ("< 5 min")
TARGET_CEILING = 0.85  # decode tok/s at least this fraction of the bandwidth ceiling
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


def parse_quants(values: list[str] | None) -> list[str]:
    """``--quant`` values -> recipes, in order, without repeats.

    A value holds recipes separated by ';'; a part without '=' may also list plain preset
    names separated by ','. A part with '=' is one recipe: 'int4-b32,embedding=int8'.
    """
    out: list[str] = []
    for value in values or ["int8"]:
        for part in value.split(";"):
            items = [part] if "=" in part else part.split(",")
            for q in (x.strip() for x in items):
                if q and q not in out:
                    out.append(q)
    return out


def output_names(quants: list[str]) -> dict[str, str]:
    """A filesystem-safe, distinct file name per recipe ('int4-b32,embedding=int8' ->
    'gemma-2b-synthetic-int4-b32_embedding_int8.tflite')."""
    names: dict[str, str] = {}
    for q in quants:
        stem = "gemma-2b-synthetic-" + re.sub(r"[^A-Za-z0-9._-]+", "_", q).strip("_")
        name, k = stem + ".tflite", 2
        while name in names.values():
            name, k = f"{stem}-{k}.tflite", k + 1
        names[q] = name
    return names


def estimate_output_bytes(cfg: dict, quant: str) -> int:
    """Approximate size of the converted file for ``quant``, from the recipe's scheme per weight
    (raises QuantizationError for a mistyped recipe)."""
    from gemma_edge.quantize import schemes

    recipe = schemes.parse_recipe(quant)
    key_of = getattr(schemes, "kind_of", None) or schemes.role_of  # recipes keyed by kind, or by role
    total = 0.0
    for name, shape in gemma_tensors(cfg):
        m = re.search(r"\.(q|k|v|o|gate|up|down)_proj\.", name)
        canon = "embed" if "embed_tokens" in name else f"l0_{m.group(1)}" if m else None  # None: a norm
        key = key_of(canon) if canon else None
        s = schemes.get_scheme(recipe[key] if key else "fp32")
        per_weight = s.bits / 8 + (2 / s.block_size if s.granularity == "block" else 0.0)
        total += math.prod(shape) * per_weight
    return int(total)


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
# child processes (this file run with --child-convert / --child-load / --child-bandwidth)
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


def decode_read_bytes(path: str, info) -> dict:
    """Bytes one decode step reads: the decode subgraph's weights and the KV cache it attends over.

    Weights: every buffer behind a constant tensor of the ``decode`` signature's subgraph,
    each once (the tied embedding / LM head is one buffer), plus per-channel scales kept
    in the header and constants stored inline. KV: K and V of every layer, float32
    [1, num_kv_heads, L, head_dim] with L = S (the whole cache, as the rank-4 BATCH_MATMUL
    reads it) for global layers and L = min(W, S) for sliding ones (convert/graph.py).
    """
    import mmap

    from ai_edge_litert import schema_py_generated as fb

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model = fb.Model.GetRootAs(m, 0)
        sigs = {}
        for i in range(model.SignatureDefsLength()):
            sd = model.SignatureDefs(i)
            sigs[sd.SignatureKey().decode()] = sd.SubgraphIndex()
        sg = model.Subgraphs(sigs["decode"])
        io = {sg.Inputs(j) for j in range(sg.InputsLength())} | {sg.Outputs(j) for j in range(sg.OutputsLength())}
        seen: set[int] = set()
        external = inline = scales = n_buffers = 0
        for t in range(sg.TensorsLength()):
            tensor = sg.Tensors(t)
            b = tensor.Buffer()
            if t in io or b <= 0 or b in seen:
                continue
            seen.add(b)
            buf = model.Buffers(b)
            if buf.Offset() > 1:  # data after the header (offset 1 is the "no data" marker)
                size = buf.Size()
                external += size
                n_buffers += 1
            else:
                size = buf.DataLength()
                inline += size
            q = tensor.Quantization()
            if size and q is not None:
                scales += 4 * q.ScaleLength()  # per-channel float32 scales, read with the weights
    finally:  # the tables hold no exported views of the map, so it closes cleanly
        m.close()
    cfg, S = info.config, info.context_length
    W = cfg.sliding_window
    lengths = [min(W, S) if W and cfg.is_sliding(i) else S for i in range(cfg.num_layers)]
    kv = sum(2 * cfg.num_kv_heads * L * cfg.head_dim * 4 for L in lengths)
    weights = external + inline + scales
    return {"weights": weights, "weight_buffers_bytes": external, "weight_buffers": n_buffers,
            "inline_bytes": inline, "header_scales_bytes": scales, "kv": kv, "total": weights + kv,
            "file_size": os.path.getsize(path), "context": S, "kv_lengths": sorted(set(lengths)),
            "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}


def child_load(spec: dict) -> None:
    _mark("python start + import runtime")
    from gemma_edge.runtime import engine
    from gemma_edge.runtime.backend import run_prefill

    tf_loaded = "tensorflow" in sys.modules
    _mark("engine.load (read_info + tokenizer + backend)")
    model = engine.load(spec["path"], threads=spec.get("threads"))
    info, b = model.info, model.backend
    load_s = model.load_seconds
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
    bench = None
    if spec["bench_runs"] > 0:
        _mark("Model.benchmark")
        bench = model.benchmark(prompt_tokens=spec["bench_prompt"], gen_tokens=spec["bench_gen"],
                                runs=spec["bench_runs"])
    _mark("count bytes read per token")
    reads = decode_read_bytes(spec["path"], info)
    _mark("done")
    _result({"backend": type(b).__name__, "threads": getattr(b, "threads", None), "load_s": load_s,
             "prefill_s": prefill_s, "first_decode_ms": 1e3 * first_decode_s,
             "decode_ms_median": 1e3 * statistics.median(times) if times else None,
             "decode_ms_all": [round(1e3 * t, 1) for t in times],
             "logits_shape": list(logits.shape), "logits_finite": finite,
             "logits_argmax": int(np.argmax(logits)), "logits_std": float(np.std(logits)),
             "tokenizer_vocab": model.tokenizer.vocab_size, "bench": bench, "read_bytes": reads,
             "weight_cache": getattr(b, "weight_cache", None),
             "tensorflow_imported": tf_loaded or "tensorflow" in sys.modules})


def _in_threads(fn, parts: list, reps: int) -> list[tuple[float, float]]:
    """(wall s, process CPU s) of ``fn(part)`` run on all parts at once, one thread each, reps times."""
    out = []
    for _ in range(reps):
        start = threading.Barrier(len(parts) + 1)

        def work(p):
            start.wait()
            fn(p)

        threads = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        start.wait()
        c0, t0 = time.process_time(), time.perf_counter()
        for t in threads:
            t.join()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def l3_bytes() -> int | None:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "307200K"
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def child_bandwidth(spec: dict) -> None:
    """Memory read bandwidth: np.max over a resident array split across T threads."""
    _mark("allocate + fill")
    n = spec["mib"] << 20
    a = np.empty(n // 4, np.int32)
    a.fill(1)  # every page written: resident, no lazy zero pages in the timed reads
    rss = self_rss_mb()
    half = a.size // 2
    src, dst = a[:half], a[half:2 * half]
    result = {"array_bytes": a.nbytes, "rss_after_fill_mb": rss, "l3_bytes": l3_bytes(), "reps": spec["reps"],
              "read": {}, "copy": {}}

    def figures(runs, nbytes, T):
        walls = sorted(w for w, _ in runs)
        best = min(runs)
        return {"threads": T, "best_gbs": nbytes / walls[0] / 1e9,
                "median_gbs": nbytes / statistics.median(walls) / 1e9,
                "cpu_per_wall": best[1] / best[0], "walls_s": [round(w, 4) for w in walls]}

    for T in spec["threads"]:
        _mark(f"read, {T} thread(s)")
        np.max(a)  # warm up (page tables, TLB)
        result["read"][str(T)] = figures(_in_threads(np.max, np.array_split(a, T), spec["reps"]), a.nbytes, T)
        _mark(f"copy, {T} thread(s)")
        pairs = list(zip(np.array_split(src, T), np.array_split(dst, T)))
        result["copy"][str(T)] = figures(_in_threads(lambda p: np.copyto(p[1], p[0]), pairs, spec["reps"]),
                                         2 * src.nbytes, T)
    _mark("done")
    _result(result)


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
    ap.add_argument("--quant", action="append", metavar="RECIPE",
                    help="quantization recipe; repeat for several, or separate them with ';' (plain presets "
                         "also with ','; a value with '=' is one recipe: 'int4-b32,embedding=int8'). Default int8")
    ap.add_argument("--keep", action="store_true",
                    help="keep the checkpoint, the converted files and their XNNPACK weight caches")
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
    ap.add_argument("--bench-prompt", type=int, default=32, help="Model.benchmark prompt tokens (default 32)")
    ap.add_argument("--bench-gen", type=int, default=32, help="Model.benchmark generated tokens (default 32)")
    ap.add_argument("--bench-runs", type=int, default=3,
                    help="Model.benchmark runs (default 3; 0 skips the benchmark and the ceiling)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024,
                    help="array for the bandwidth measurement, MiB (default 1024; 0 skips it)")
    ap.add_argument("--bandwidth-reps", type=int, default=7, help="timed passes per bandwidth figure (default 7)")
    ap.add_argument("--num-layers", type=int, default=GEMMA_2B["num_hidden_layers"],
                    help="layers of the synthetic model (18 = Gemma 2B; fewer for a quick try)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint from the page cache before converting (fadvise DONTNEED)")
    ap.add_argument("--no-progress", action="store_true", help="no converter progress bar (shown only when stderr is a terminal)")
    ap.add_argument("--quiet-children", action="store_true", help="hide the children's output")
    return ap.parse_args(argv)


def remove_weight_cache(path: Path) -> None:
    """Remove the XNNPACK weight cache the runtime wrote for ``path`` (while ``path`` exists)."""
    from gemma_edge.runtime.backend import weight_cache_path

    if path.exists():
        cache = weight_cache_path(str(path))
        if cache:
            Path(cache).unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    ckpt = work / "gemma-2b-synthetic"
    cfg = {**GEMMA_2B, "num_hidden_layers": args.num_layers}
    shard_bytes = int(args.shard_gb * 1e9)
    quants = parse_quants(args.quant)
    try:  # a mistyped recipe fails now, not after writing a 5 GB checkpoint
        sizes = {q: estimate_output_bytes(cfg, q) for q in quants}
    except Exception as e:  # QuantizationError, with the list of presets / schemes
        print(f"error: --quant: {e}", file=sys.stderr)
        return 2
    names = output_names(quants)
    work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.prefill_lengths.split(",") if x.strip()]
    report: dict = {"work_dir": str(work), "target_peak_rss_mb": TARGET_PEAK_MB, "target_wall_s": TARGET_WALL_S,
                    "target_ceiling_fraction": TARGET_CEILING, "quants": {}}
    params = sum(math.prod(s) for _, s in gemma_tensors(cfg))
    print(f"synthetic Gemma 2B: {params / 1e9:.3f}B parameters, {fmt_bytes(2 * params)} of bf16, "
          f"{cfg['num_hidden_layers']} layers; work dir {work}; recipes: {', '.join(quants)}")

    # 1. checkpoint
    if args.reuse_checkpoint and checkpoint_is_complete(ckpt, cfg, args.seed, shard_bytes):
        print(f"[1] reusing the checkpoint in {ckpt}")
        report["checkpoint"] = {"reused": True, "bytes": sum(p.stat().st_size for p in ckpt.iterdir())}
        if args.cold:
            drop_cache(ckpt)
    else:
        need = 1.02 * (2 * params + sum(sizes.values()))
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
            out = work / names[quant]
            outputs.append(out)
            q: dict = {"file": out.name}
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
            # 3. load without TensorFlow in another child, check, benchmark, count bytes per token
            print(f"\n[3] loading {out.name} TensorFlow-free in a child process")
            lspec = {"path": str(out), "decode_steps": args.decode_steps, "threads": args.threads,
                     "bench_prompt": args.bench_prompt, "bench_gen": args.bench_gen, "bench_runs": args.bench_runs}
            lrun = run_child("load", lspec, args.interval, not args.quiet_children)
            q["load"] = summarize_run(lrun)
            if not args.keep:
                remove_weight_cache(out)
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
            bench = lr.get("bench")
            if bench:
                d, p = bench["decode_tps"], bench["prefill_tps"]
                print(f"    Model.benchmark(prompt_tokens={bench['prompt_tokens']}, gen_tokens={bench['gen_tokens']}, "
                      f"runs={bench['runs']}): decode {d['median']:.2f} tok/s median (min {d['min']:.2f}, max "
                      f"{d['max']:.2f}); prefill {p['median']:.1f} tok/s median; tokenizer {lr['tokenizer_vocab']} pieces")
            rb = lr["read_bytes"]
            print(f"    bytes read per decode step: weights {rb['weights'] / 1e6:,.1f} MB ({rb['weight_buffers']} "
                  f"buffers {rb['weight_buffers_bytes'] / 1e6:,.1f} MB + header scales "
                  f"{rb['header_scales_bytes'] / 1e6:.2f} MB + inline {rb['inline_bytes'] / 1e6:.2f} MB; file "
                  f"{rb['file_size'] / 1e6:,.1f} MB) + KV {rb['kv'] / 1e6:,.1f} MB ({rb['num_layers']} layers x K,V x "
                  f"[1, {rb['num_kv_heads']}, {'/'.join(map(str, rb['kv_lengths']))}, {rb['head_dim']}] fp32) "
                  f"= {rb['total'] / 1e6:,.1f} MB")
            print_stages(lrun, merge_layers=False)
            if args.timeline:
                print("    timeline:")
                print_timeline(lrun)
    finally:
        # clean up
        if not args.keep:
            for o in outputs:
                remove_weight_cache(o)
                o.unlink(missing_ok=True)
            if not args.reuse_checkpoint:
                shutil.rmtree(ckpt, ignore_errors=True)

    # 4. memory bandwidth (after every conversion and load, so it inflates no RSS figure above)
    benched = [q["load"]["result"] for q in report["quants"].values()
               if (q.get("load") or {}).get("result", {}).get("bench")]
    if benched and args.bandwidth_mib > 0:
        counts = sorted({1, *(lr["threads"] for lr in benched)})
        print(f"\n[4] memory read bandwidth: {args.bandwidth_mib} MiB int32 array, np.max split over "
              f"{' / '.join(map(str, counts))} threads, {args.bandwidth_reps} passes each")
        brun = run_child("bandwidth", {"mib": args.bandwidth_mib, "threads": counts, "reps": args.bandwidth_reps},
                         args.interval, not args.quiet_children)
        report["bandwidth"] = {"returncode": brun["returncode"], "wall_s": brun["wall_s"], **brun["result"]}
        if brun["returncode"] != 0 or not brun["result"]:
            print(f"    bandwidth child failed (exit {brun['returncode']})\n" + brun["stderr_tail"])
        else:
            print_bandwidth(brun["result"])
            for quant, q in report["quants"].items():
                c = decode_ceiling(q, report["bandwidth"])
                if c:
                    print(f"    [{quant}] ceiling {c['bandwidth_gbs']:.2f} GB/s / {c['mb_per_token']:,.1f} MB = "
                          f"{c['ceiling_tps']:.2f} tok/s; decode {c['decode_tps']:.2f} tok/s = "
                          f"{100 * c['fraction']:.0f}% of it")

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


def print_bandwidth(bw: dict) -> None:
    l3 = bw.get("l3_bytes")
    print(f"    array {bw['array_bytes'] / MB:,.0f} MiB (VmRSS after the fill {fmt_mb(bw['rss_after_fill_mb'])}); "
          f"L3 {'?' if l3 is None else f'{l3 / MB:,.0f} MiB'}"
          + (" -- the array is under twice the L3: raise --bandwidth-mib" if l3 and bw["array_bytes"] < 2 * l3 else ""))
    for kind, what in (("read", "read (np.max)       "), ("copy", "copy (np.copyto, r+w)")):
        for T, f in bw[kind].items():
            print(f"    {what} {int(T)} thread{'s' if int(T) > 1 else ' '}: best {f['best_gbs']:6.2f} GB/s, median "
                  f"{f['median_gbs']:6.2f} GB/s, CPU/wall {f['cpu_per_wall']:.2f}")
    reads = bw["read"]
    if len(reads) > 1:
        T = max(reads, key=int)
        print(f"    {T} threads / 1 thread (read, best): {reads[T]['best_gbs'] / reads['1']['best_gbs']:.2f}x; "
              f"CPU/wall well under {T} means the threads did not run in parallel (a busy machine)")


def decode_ceiling(q: dict, bw: dict | None) -> dict | None:
    """Bandwidth ceiling of decode for one recipe: T-thread read bandwidth / bytes per token."""
    lr = (q.get("load") or {}).get("result") or {}
    if not lr.get("bench") or not bw or not bw.get("read") or str(lr["threads"]) not in bw["read"]:
        return None
    gbs = bw["read"][str(lr["threads"])]["best_gbs"]
    per_token = lr["read_bytes"]["total"]
    ceiling = gbs * 1e9 / per_token
    tps = lr["bench"]["decode_tps"]["median"]
    c = {"threads": lr["threads"], "bandwidth_gbs": gbs, "mb_per_token": per_token / 1e6,
         "weights_mb": lr["read_bytes"]["weights"] / 1e6, "kv_mb": lr["read_bytes"]["kv"] / 1e6,
         "ceiling_tps": ceiling, "decode_tps": tps, "fraction": tps / ceiling}
    q["ceiling"] = c
    return c


def summarize_run(run: dict) -> dict:
    return {"returncode": run["returncode"], "wall_s": run["wall_s"], "maxrss_floor_mb": run["maxrss_floor_mb"], "wait4_maxrss_mb": run["wait4_maxrss_mb"],
            "rusage_children_maxrss_mb": run["rusage_children_maxrss_mb"], "sampled_hwm_mb": run["last_hwm_mb"],
            "result": run["result"], "stages": stage_table(run)}


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "PASS" if ok else "FAIL"


def print_summary(report: dict, args) -> None:
    ck = report.get("checkpoint", {})
    bw = report.get("bandwidth")
    print("\n=== summary ===")
    rows = []
    if ck and not ck.get("reused"):
        rows.append(("checkpoint write", f"{ck['seconds']:.0f} s, {fmt_bytes(ck['bytes'])}, writer peak "
                     f"{fmt_mb(ck['writer_peak_rss_mb'])}", ""))
    if bw and bw.get("read"):
        rows.append(("memory read bandwidth (best)", ", ".join(
            f"{f['best_gbs']:.2f} GB/s with {T}" for T, f in bw["read"].items()), "(threads; CPU/wall "
            + ", ".join(f"{f['cpu_per_wall']:.2f}" for f in bw["read"].values()) + ")"))
    for quant, q in report["quants"].items():
        c, l = q.get("convert", {}), q.get("load", {})
        cr, lr = c.get("result") or {}, l.get("result") or {}
        peak = c.get("wait4_maxrss_mb")
        peak_ok = peak is not None and bool(cr) and peak < TARGET_PEAK_MB
        wall = c.get("wall_s")
        wall_ok = wall is not None and bool(cr) and wall < TARGET_WALL_S
        anon = max((s["max_anon_mb"] or 0 for s in c.get("stages", [])), default=None)
        fil = max((s["max_file_mb"] or 0 for s in c.get("stages", [])), default=None)
        tree = max((s.get("max_tree_mb") or 0 for s in c.get("stages", [])), default=None)
        rows += [
            (f"[{quant}] convert wall time", f"{c.get('wall_s', float('nan')):.1f} s"
             + (f" ({cr['seconds']:.1f} s in convert())" if cr else ""),
             f"target < {TARGET_WALL_S:.0f} s: {verdict(wall_ok)}"),
            (f"[{quant}] converter peak RSS (wait4)", fmt_mb(peak), f"target < {TARGET_PEAK_MB:,.0f} MB: "
             + verdict(peak_ok)),
            (f"[{quant}] ConvertResult.peak_rss_mb", fmt_mb(cr.get("peak_rss_mb")), ""),
            (f"[{quant}] RUSAGE_CHILDREN max", fmt_mb(c.get("rusage_children_maxrss_mb")), ""),
            (f"[{quant}] sampled max RssAnon / RssFile", f"{fmt_mb(anon)} / {fmt_mb(fil)}", "(converter process)"),
            (f"[{quant}] sampled max tree RSS", fmt_mb(tree), "(converter + its children, summed)"),
            (f"[{quant}] TensorFlow in converter process", str(cr.get("tensorflow_in_converter_process", "-")), ""),
            (f"[{quant}] output size", fmt_bytes(cr["file_size"]) if cr else "-", ""),
        ]
        load_ok = bool(lr) and lr.get("logits_finite") and not lr.get("tensorflow_imported")
        speed_ok = None  # not measured: --bench-runs 0 or --bandwidth-mib 0
        if lr:
            rows += [
                (f"[{quant}] load (engine.load)", f"{lr['load_s']:.2f} s ({lr['backend']})", ""),
                (f"[{quant}] decode median (backend.decode)", f"{lr['decode_ms_median']:.0f} ms/token "
                 f"({lr['threads']} threads)", ""),
                (f"[{quant}] loader peak RSS", fmt_mb(l.get("wait4_maxrss_mb")), ""),
                (f"[{quant}] logits finite, no TF", f"{lr['logits_finite']}, {not lr['tensorflow_imported']}",
                 verdict(load_ok)),
            ]
            rb, bench = lr["read_bytes"], lr.get("bench")
            rows.append((f"[{quant}] bytes read per token", f"{rb['total'] / 1e6:,.1f} MB = weights "
                         f"{rb['weights'] / 1e6:,.1f} + KV {rb['kv'] / 1e6:,.1f} (S={rb['context']})", ""))
            if bench:
                d = bench["decode_tps"]
                rows += [(f"[{quant}] decode tok/s (Model.benchmark)", f"{d['median']:.2f} median "
                          f"({d['min']:.2f}..{d['max']:.2f}), {bench['runs']} runs of {bench['gen_tokens']}", ""),
                         (f"[{quant}] prefill tok/s (Model.benchmark)",
                          f"{bench['prefill_tps']['median']:.1f} median ({bench['prompt_tokens']} tokens)", "")]
                if bw is not None:  # measured (or tried): its failure is a FAIL
                    ceil = q.get("ceiling") or decode_ceiling(q, bw)
                    speed_ok = bool(ceil) and ceil["fraction"] >= TARGET_CEILING
                    cpu = bw["read"][str(ceil["threads"])]["cpu_per_wall"] if ceil else None
                    busy = cpu is not None and cpu < 0.8 * ceil["threads"]  # threads not in parallel
                    rows += [
                        (f"[{quant}] bandwidth ceiling", f"{ceil['ceiling_tps']:.2f} tok/s = {ceil['bandwidth_gbs']:.2f} "
                         f"GB/s / {ceil['mb_per_token']:,.1f} MB" if ceil else "-",
                         f"unreliable: bandwidth CPU/wall {cpu:.2f} of {ceil['threads']} (busy machine)" if busy else ""),
                        (f"[{quant}] decode / ceiling", f"{100 * ceil['fraction']:.0f}%" if ceil else "-",
                         f"target >= {100 * TARGET_CEILING:.0f}%: {verdict(speed_ok)}"),
                    ]
        else:
            rows.append((f"[{quant}] load", "failed", "FAIL"))
        q["verdicts"] = {"peak_rss": peak_ok, "wall": wall_ok, "load": bool(load_ok), "decode_vs_ceiling": speed_ok}
        q["ok"] = bool(peak_ok and wall_ok and load_ok and speed_ok is not False)
    w = max(len(r[0]) for r in rows) if rows else 10
    for name, val, verdict_text in rows:
        print(f"  {name:{w}s}  {val:40s} {verdict_text}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child-convert":
        child_convert(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--child-load":
        child_load(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--child-bandwidth":
        child_bandwidth(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
