"""Convert a synthetic full-size Gemma: converter peak memory, decode speed against the bandwidth
ceiling, and (Gemma 4) how little of the per-layer embedding tables the runtime keeps resident.

    python benchmarks/convert_memory.py [--model gemma-2b|gemma4-e2b] [--work-dir DIR] [--quant RECIPE ...]
        [--bench-prompt 32] [--bench-gen 32] [--bench-runs 3] [--bandwidth-mib 1024]
        [--keep] [--reuse-checkpoint] [--timeline] [--json [PATH]] [--calibrate [FILE]]

    # both int4 presets and a recipe (a recipe's own commas stay inside it):
    python benchmarks/convert_memory.py --quant int4-b32 --quant 'int4-b32,embedding=int8'
    python benchmarks/convert_memory.py --quant int8,int4-b32    # plain presets, comma separated
    python benchmarks/convert_memory.py --model gemma4-e2b --quant 'int4;int8'
    # calibrated, on text the model writes itself (a temporary int8 conversion above 1B
    # parameters, run in a child process); the summary gives the calibration's time and
    # which process held what
    python benchmarks/convert_memory.py --quant int8 --calibrate --reuse-checkpoint

``--quant`` may be given several times; each value is one recipe
(``gemma_edge.quantize.schemes.parse_recipe``), or several separated by ``;``, or plain
preset names separated by ``,`` (a value containing ``=`` is never split on ``,``).
Default int8. Output files are named ``<model>-synthetic-<recipe>.tflite``
(``gemma-2b-synthetic-int8.tflite``) with every character outside ``[A-Za-z0-9._-]``
replaced by ``_``.

Models (``--model``):
* ``gemma-2b`` (default): Gemma 2B (v1), ``GemmaForCausalLM`` names and shapes, 2.51B
  parameters, ~5 GB of bf16.
* ``gemma4-e2b``: Gemma 4 E2B's text decoder as the hub checkpoint holds it
  (``Gemma4ForConditionalGeneration``: config.json with model_type gemma4 and its
  text_config, tensors under ``model.language_model.``, plus a few tiny
  ``model.vision_tower.*`` / ``model.embed_vision.*`` tensors that the converter skips):
  35 layers, d_model 1536, FFN 6144 (12288 on the 20 KV-sharing layers), 8 query heads,
  1 KV head, head_dim 256 (512 on global layers), window 512, 4 sliding : 1 global,
  per-layer embeddings of 256 a layer (a [262144, 35*256] table), vocab 262144, final
  soft-cap 30, proportional RoPE (0.25, theta 1e6) on global layers; 4.63B parameters,
  ~9.3 GB of bf16. The norms and layer scalars are drawn around 1 (Gemma 4 multiplies by
  the stored weight; Gemma 1's are drawn around 0, its stored w of (1 + w)).

1. Writes the synthetic Hugging Face checkpoint (bf16 in ~2 GB shards, a tensor larger
   than a shard in one of its own, plus model.safetensors.index.json, config.json and a
   tiny SentencePiece tokenizer.model with the family's turn markers). The safetensors
   files are written by hand, each tensor generated in row chunks and appended, so this
   process stays small (its peak RSS is printed).
2. Converts it with ``gemma_edge.convert.pipeline.convert`` in a child process, so the
   converter's peak RSS is measured alone: ``wait4`` rusage of that child,
   ``getrusage(RUSAGE_CHILDREN)`` and the ``ConvertResult.peak_rss_mb`` the child reports
   (ru_maxrss survives fork + exec, so this process's own peak, ~100 MB, is a floor).
   /proc/<pid>/status is sampled while it runs (VmRSS = RssAnon + RssFile + RssShmem):
   the peaks per stage (``convert()``'s ``on_stage`` callback: open checkpoint, build
   template -- which also covers the source's sha256 and the graph surgery --, the weights
   by layer, finish = metadata, header and fsync) are always printed, ``--timeline`` prints
   the samples too. The converter's notes (``notes`` callback: skipped towers) are printed.
3. Loads the result TensorFlow-free in another child with
   ``gemma_edge.runtime.engine.load`` and checks it (prefill, decode, finite logits,
   median ms/token of raw ``backend.decode`` calls), then runs
   ``Model.benchmark(prompt_tokens, gen_tokens, runs)``, the code behind
   ``gemma-edge bench``: decode tok/s median/min/max and prefill tok/s. The synthetic
   tokenizer has only 300 pieces; ``benchmark`` draws its prompt from ids 150..299 of
   them, and the decode reads the full LM head regardless. The same child counts the
   bytes one decode step reads (below), and after the load, after the prefill and decodes,
   and after the benchmark it records its RSS, the resident bytes of its mappings of the
   model file and of the weight cache (/proc/self/smaps), and how much of the tables read
   only by EMBEDDING_LOOKUP (Gemma 4's per-layer embeddings) is resident, page by page
   (/proc/self/pagemap). The runtime's peak RSS is that process's own VmHWM (the XNNPACK
   weight cache is packed by a grandchild on the first load, which ``wait4`` includes).
   The weight cache the load writes (~the file's size, in ``gemma_edge.runtime.
   weight_cache.cache_dir()``: ~/.cache/gemma-edge/xnnpack or $GEMMA_EDGE_CACHE) is
   removed again unless ``--keep``.
4. Measures memory read bandwidth in a separate small child (so no converter or loader
   RSS figure includes its array): a ``--bandwidth-mib`` int32 array (default 1 GiB, well
   over the L3 the VM reports, which is printed; filled first so it is resident) is reduced
   with ``np.max`` split over T threads (numpy releases the GIL inside the reduction),
   best and median of ``--bandwidth-reps`` passes, for 1 thread and for the runtime's
   thread count T. The T-thread best is the bandwidth used for the ceiling. An
   ``np.copyto`` of one half into the other (read + written bytes per second) is printed
   for reference only. Each figure carries process CPU seconds / wall seconds: well
   below T means the threads did not run in parallel (a busy machine), so the
   bandwidth, and the ceiling, are understated.
5. Prints a summary against the targets: converter peak RSS < 1.5 GB, convert wall time
   < 5 min, decode tok/s >= 85% of the bandwidth ceiling, then one table row per recipe
   (and, for a model with lookup-only tables, the residency table). The exit status is 1
   if any measured target fails. The big files are removed unless ``--keep``
   (``--reuse-checkpoint`` keeps the checkpoint).

Bytes read per decoded token (the ceiling is bandwidth / these bytes; benchmarks/model_reads.py):
* weights: every buffer referenced by a constant tensor of the ``decode`` subgraph,
  each buffer once (the tied embedding is read whole by the LM head and counted once;
  its EMBEDDING_LOOKUP of one row adds nothing), plus per-channel scales kept in the
  header (4 bytes a row) and the few constants stored inline. Blockwise int4 scales are
  tensors over buffers of their own, so they are in the buffer sum. A table read only by
  EMBEDDING_LOOKUP (Gemma 4's ``l<i>_ple_embed``, [262144, 256] each) counts the one row
  a token reads (P x bytes a weight, with its scales), not the table.
* KV cache: per layer, K and V of the cache it attends over, [1, num_kv_heads, S,
  head_dim] float32. The graph's attention is a rank-4 BATCH_MATMUL over the whole cache,
  so a global layer reads all S = context length slots every step whatever the position;
  a sliding layer (Gemma 2/3/4) reads only its W = sliding_window slots (Gemma 1 2B has
  none). Gemma 4's KV-sharing layers read layer 13's or 14's cache and count again.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

# Gemma 4 E2B (google/gemma-4-E2B) text_config, with the keys a transformers 5 save writes
# (transformers.models.gemma4.Gemma4TextConfig). Layers 0..14 compute their own KV caches; 15..34
# read layer 13's (sliding) or 14's (global) and have no k/v projections or k_norm, and an
# FFN twice as wide (use_double_wide_mlp).
E2B_SHARED, E2B_LAYERS = 20, 35
GEMMA4_E2B_TEXT = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_k_eq_v": False,
    "bos_token_id": 2,
    "dtype": "bfloat16",
    "enable_moe_block": False,
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "global_head_dim": 512,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1536,
    "hidden_size_per_layer_input": 256,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
    "max_position_embeddings": 131072,
    "model_type": "gemma4_text",
    "moe_intermediate_size": None,
    "num_attention_heads": 8,
    "num_experts": None,
    "num_global_key_value_heads": None,
    "num_hidden_layers": E2B_LAYERS,
    "num_key_value_heads": 1,
    "num_kv_shared_layers": E2B_SHARED,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "sliding_window": 512,
    "tie_word_embeddings": True,
    "top_k_experts": None,
    "use_bidirectional_attention": None,
    "use_cache": True,
    "use_double_wide_mlp": True,
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
}
# Tiny stand-ins for the multimodal towers (the converter skips them and says so).
GEMMA4_VISION = {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma4_vision", "num_attention_heads": 2,
                 "num_hidden_layers": 1, "num_key_value_heads": 2, "head_dim": 32, "patch_size": 16}
GEMMA4_TOWER_TENSORS = [
    ("model.vision_tower.patch_embedder.input_proj.weight", (64, 768)),
    ("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight", (64, 64)),
    ("model.vision_tower.encoder.layers.0.input_layernorm.weight", (64,)),
    ("model.embed_vision.embedding_projection.weight", (1536, 64)),
]


def gemma_2b_config(num_layers: int) -> dict:
    return {**GEMMA_2B, "num_hidden_layers": num_layers}


def gemma4_e2b_config(num_layers: int) -> dict:
    """The hub's multimodal config.json; fewer layers keep the first 15 (which own their caches)
    and share the rest, the last layer global."""
    types = GEMMA4_E2B_TEXT["layer_types"][:num_layers]
    types[-1] = "full_attention"
    text = {**GEMMA4_E2B_TEXT, "num_hidden_layers": num_layers, "layer_types": types,
            "num_kv_shared_layers": max(0, num_layers - (E2B_LAYERS - E2B_SHARED))}
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "audio_token_id": 258881, "boa_token_id": 256000, "boi_token_id": 255999, "eoa_token_id": 258883,
        "eoi_token_id": 258882, "eos_token_id": [1, 106], "image_token_id": 258880, "initializer_range": 0.02,
        "model_type": "gemma4", "text_config": text, "tie_word_embeddings": True, "video_token_id": 258884,
        "vision_config": GEMMA4_VISION, "vision_soft_tokens_per_image": 280,
    }


def text_config(hf: dict) -> dict:
    return hf.get("text_config", hf)


def gemma_tensors(hf: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Gemma 1 (``GemmaForCausalLM``) tensor names and shapes, in state-dict order."""
    cfg = text_config(hf)
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


def gemma4_tensors(hf: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Gemma 4 (``Gemma4ForConditionalGeneration``) text tensors under ``model.language_model.``,
    in state-dict order, then the tiny tower stand-ins. KV-sharing layers have no k_proj,
    v_proj or k_norm; ``layer_scalar`` is a [1] buffer without ``.weight``."""
    t = text_config(hf)
    d, n, L, P = t["hidden_size"], t["num_attention_heads"], t["num_hidden_layers"], t["hidden_size_per_layer_input"]
    kvh, first_shared = t["num_key_value_heads"], L - t["num_kv_shared_layers"]
    pre = "model.language_model."
    out = [(pre + "embed_tokens.weight", (t["vocab_size"], d)),
           (pre + "embed_tokens_per_layer.weight", (t["vocab_size_per_layer_input"], L * P)),
           (pre + "per_layer_model_projection.weight", (L * P, d)),
           (pre + "per_layer_projection_norm.weight", (P,))]
    for i in range(L):
        h = t["global_head_dim"] if t["layer_types"][i] == "full_attention" else t["head_dim"]
        shared = i >= first_shared
        f = t["intermediate_size"] * (2 if shared and t["use_double_wide_mlp"] else 1)
        p = f"{pre}layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (n * h, d))]
        if not shared:
            out += [(p + "self_attn.k_proj.weight", (kvh * h, d)), (p + "self_attn.v_proj.weight", (kvh * h, d))]
        out += [(p + "self_attn.o_proj.weight", (d, n * h)), (p + "self_attn.q_norm.weight", (h,))]
        if not shared:
            out.append((p + "self_attn.k_norm.weight", (h,)))
        out += [
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "pre_feedforward_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
            (p + "post_feedforward_layernorm.weight", (d,)),
            (p + "per_layer_input_gate.weight", (P, d)),
            (p + "per_layer_projection.weight", (d, P)),
            (p + "post_per_layer_input_norm.weight", (d,)),
            (p + "layer_scalar", (1,)),
        ]
    out.append((pre + "norm.weight", (d,)))
    return out + GEMMA4_TOWER_TENSORS


@dataclass(frozen=True)
class Synthetic:
    name: str  # --model, and the stem of the folder and file names
    label: str
    layers: int
    config: Callable[[int], dict]  # config.json for a number of layers
    tensors: Callable[[dict], list]  # (name, shape) in write order, from config.json
    norm_center: float  # 1-D weights (norms, layer scalars) are drawn as center + 0.1 N(0, 1)
    turn_markers: tuple[str, ...]  # user-defined pieces of the tiny tokenizer
    transformers_version: str


MODELS = {m.name: m for m in (
    Synthetic("gemma-2b", "Gemma 2B", GEMMA_2B["num_hidden_layers"], gemma_2b_config, gemma_tensors, 0.0,
              ("<start_of_turn>", "<end_of_turn>"), "4.38.0"),
    Synthetic("gemma4-e2b", "Gemma 4 E2B", E2B_LAYERS, gemma4_e2b_config, gemma4_tensors, 1.0,
              ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"), "5.5.0"),
)}
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


def output_names(quants: list[str], model: str = "gemma-2b", suffix: str = "") -> dict[str, str]:
    """A filesystem-safe, distinct file name per recipe ('int4-b32,embedding=int8' ->
    'gemma-2b-synthetic-int4-b32_embedding_int8.tflite'; ``suffix`` after the recipe)."""
    names: dict[str, str] = {}
    for q in quants:
        stem = f"{model}-synthetic-" + re.sub(r"[^A-Za-z0-9._-]+", "_", q).strip("_") + suffix
        name, k = stem + ".tflite", 2
        while name in names.values():
            name, k = f"{stem}-{k}.tflite", k + 1
        names[q] = name
    return names


def estimate_output_bytes(hf: dict, quant: str) -> int:
    """Approximate size of the converted file for ``quant``: the converter's own weights
    (``contract.weight_shapes`` of the config the converter reads from config.json), each at
    its scheme's bytes a weight (raises QuantizationError for a mistyped recipe)."""
    from gemma_edge.convert.hf_checkpoint import config_from_hf
    from gemma_edge.quantize import schemes
    from gemma_edge.runtime import contract

    recipe = schemes.parse_recipe(quant)
    total = 0.0
    for name, shape in contract.weight_shapes(config_from_hf(hf)).items():
        kind = schemes.kind_of(name)  # None: a norm, kept fp32
        s = schemes.get_scheme(recipe[kind] if kind else "fp32")
        per_weight = s.bits / 8 + (2 / s.block_size if s.granularity == "block" else 0.0)
        total += math.prod(shape) * per_weight
    return int(total)


# --------------------------------------------------------------------------------------------
# 1. streamed synthetic checkpoint
# --------------------------------------------------------------------------------------------

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


def write_tensor_data(f, rng: np.random.Generator, shape: tuple[int, ...], center: float = 0.0) -> None:
    if len(shape) == 1:  # a norm (or Gemma 4's layer scalar): center + 0.1 N(0, 1)
        w = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1))
        if center:
            w += np.float32(center)
        f.write(memoryview(to_bf16(w)).cast("B"))
        return
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
        w *= np.float32(0.02)
        f.write(memoryview(to_bf16(w)).cast("B"))


def write_safetensors(path: Path, tensors, rng: np.random.Generator, progress=None, center: float = 0.0) -> int:
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
            write_tensor_data(f, rng, shape, center)
            if progress:
                progress(name)
    os.replace(tmp, path)
    return 8 + len(raw) + off


def make_tokenizer(seed: int, user_defined=("<start_of_turn>", "<end_of_turn>")) -> bytes:
    import sentencepiece as spm

    rnd = random.Random(seed)
    words = ("the cat sat on a mat and dog ran to park big small red blue house tree bird "
             "sings today gemma edge model runs fast on every phone").split()
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=list(user_defined), minloglevel=2)
    return buf.getvalue()


def checkpoint_stamp(cfg: dict, seed: int, shard_bytes: int) -> dict:
    return {"version": CHECKPOINT_VERSION, "config": cfg, "seed": seed, "shard_bytes": shard_bytes}


def write_checkpoint(ckpt: Path, model: Synthetic, cfg: dict, seed: int, shard_bytes: int, cold: bool) -> dict:
    """Write the sharded checkpoint; returns figures about the writer."""
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    t0 = time.time()
    rng = np.random.default_rng(seed)
    shards = plan_shards(model.tensors(cfg), shard_bytes)
    n = len(shards)
    total_params = sum(math.prod(s) for sh in shards for _, s in sh)
    weight_map, written = {}, 0
    peak_sample = self_rss_mb()

    def progress(name):
        nonlocal peak_sample
        peak_sample = max(peak_sample, self_rss_mb())

    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        size = write_safetensors(ckpt / fname, tensors, rng, progress, model.norm_center)
        written += size
        for name, _ in tensors:
            weight_map[name] = fname
        print(f"  wrote {fname}: {len(tensors)} tensors, {fmt_bytes(size)}, "
              f"{time.time() - t0:.0f} s, writer RSS now {fmt_mb(self_rss_mb())}", flush=True)
    data_bytes = 2 * total_params
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}, indent=2))
    (ckpt / "config.json").write_text(json.dumps({**cfg, "transformers_version": model.transformers_version},
                                                 indent=2))
    (ckpt / "tokenizer.model").write_bytes(make_tokenizer(seed, model.turn_markers))
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
    print(f"@@STAGE {time.monotonic():.6f} {stage}", flush=True)


def _result(obj: dict) -> None:
    print("@@RESULT " + json.dumps(obj), flush=True)


STAGE_NAMES = {  # convert()'s on_stage names -> what the stage covers
    "open checkpoint": "open checkpoint (headers, config, tokenizer)",
    "build template": "build template (TF children), sha256, surgery",
    "finish": "metadata, header, fsync",
}


def stage_label(name: str) -> str:
    """One row per layer ('write layer  3') for ``write l3_q``, ``write l3_up``, ...; Gemma 4's
    per-layer embedding tables, written together from one pass over the packed source
    table, as one row."""
    m = re.fullmatch(r"write l(\d+)_(.+)", name)
    if m:
        return "write ple_embed tables" if m.group(2) == "ple_embed" else f"write layer {int(m.group(1)):2d}"
    return STAGE_NAMES.get(name, name)


def child_convert(spec: dict) -> None:
    _mark("python start + import gemma_edge")
    from gemma_edge.convert.pipeline import convert

    last = [None]

    def on_stage(name):
        label = stage_label(name)
        if label != last[0]:
            last[0] = label
            _mark(label)

    notes = []

    def note(line):
        notes.append(line)
        print(f"note: {line}", flush=True)

    t0 = time.time()
    r = convert(spec["source"], spec["output"], quant=spec["quant"], max_context=spec["max_context"],
                prefill_lengths=tuple(spec["prefill_lengths"]), force=True, progress=spec["progress"],
                on_stage=on_stage, notes=note, calibrate=spec.get("calibrate"))
    _result({"path": r.path, "file_size": r.file_size, "seconds": r.seconds, "wall_in_child": time.time() - t0,
             "peak_rss_mb": r.peak_rss_mb, "quant": r.quant, "context_length": r.context_length,
             "prefill_lengths": list(r.prefill_lengths), "num_layers": r.config.num_layers,
             "vocab_size": r.config.vocab_size, "notes": notes,
             "tensorflow_in_converter_process": "tensorflow" in sys.modules})


def child_load(spec: dict) -> None:
    _mark("python start + import runtime")
    from gemma_edge.runtime import engine
    from gemma_edge.runtime.backend import run_prefill
    from gemma_edge.runtime.modelfile import read_info

    from model_reads import decode_reads, snapshot

    tf_loaded = "tensorflow" in sys.modules
    _mark("count bytes read per token")
    path = spec["path"]
    reads = decode_reads(path, read_info(path))  # its map of the file is closed again
    regions = reads.pop("lookup_regions")
    _mark("engine.load (read_info + tokenizer + backend)")
    model = engine.load(path, threads=spec.get("threads"))
    info, b = model.info, model.backend
    load_s = model.load_seconds
    memory = {"load": snapshot(path, regions)}
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
    memory["prefill + decode"] = snapshot(path, regions)
    bench = None
    if spec["bench_runs"] > 0:
        _mark("Model.benchmark")
        bench = model.benchmark(prompt_tokens=spec["bench_prompt"], gen_tokens=spec["bench_gen"],
                                runs=spec["bench_runs"])
        memory["benchmark"] = snapshot(path, regions)
    _mark("done")
    _result({"backend": type(b).__name__, "threads": getattr(b, "threads", None), "load_s": load_s,
             "prefill_s": prefill_s, "first_decode_ms": 1e3 * first_decode_s,
             "decode_ms_median": 1e3 * statistics.median(times) if times else None,
             "decode_ms_all": [round(1e3 * t, 1) for t in times],
             "logits_shape": list(logits.shape), "logits_finite": finite,
             "logits_argmax": int(np.argmax(logits)), "logits_std": float(np.std(logits)),
             "tokenizer_vocab": model.tokenizer.vocab_size, "bench": bench, "read_bytes": reads,
             "memory": memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
                kids = [proc_status(k) for k in descendants(proc.pid)]
                st["Desc"] = sum(k.get("VmRSS", 0.0) for k in kids)  # the child's own children (TF template builders)
                st["DescAnon"] = sum(k.get("RssAnon", 0.0) for k in kids)
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
    marks = sorted(run["marks"], key=lambda m: m[0])  # stable: a tie keeps arrival order
    rows = []
    for i, (t, name) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else run["t_end"]
        inside = [s for ts, s in run["samples"] if t <= ts < t1]
        rows.append({"stage": name, "start_s": t - run["t_start"], "seconds": t1 - t,
                     "max_rss_mb": max((s.get("VmRSS", 0) for s in inside), default=None),
                     "max_anon_mb": max((s.get("RssAnon", 0) for s in inside), default=None),
                     "max_file_mb": max((s.get("RssFile", 0) for s in inside), default=None),
                     "max_desc_mb": max((s.get("Desc", 0) for s in inside), default=None),
                     "max_desc_anon_mb": max((s.get("DescAnon", 0) for s in inside), default=None),
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
    marks = sorted(run["marks"], key=lambda m: m[0])  # stable: a tie keeps arrival order
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
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma-2b",
                    help="the synthetic checkpoint: Gemma 2B (v1, default) or Gemma 4 E2B")
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
    ap.add_argument("--calibrate", nargs="?", const="-", default=None, metavar="FILE",
                    help="convert with --calibrate (FILE, or the model writes its own text); output names get -cal")
    ap.add_argument("--prefill-lengths", default="8,32,128", help="prefill chunk lengths (default: the converter's)")
    ap.add_argument("--decode-steps", type=int, default=5, help="timed decode calls (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the backend's)")
    ap.add_argument("--bench-prompt", type=int, default=32, help="Model.benchmark prompt tokens (default 32)")
    ap.add_argument("--bench-gen", type=int, default=32, help="Model.benchmark generated tokens (default 32)")
    ap.add_argument("--bench-runs", type=int, default=3,
                    help="Model.benchmark runs (default 3; 0 skips the benchmark and the ceiling)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024,
                    help="array for the bandwidth measurement, MiB (default 1024; 0 skips it)")
    ap.add_argument("--bandwidth-reps", type=int, default=7, help="timed passes per bandwidth figure (default 7)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="layers of the synthetic model (default the model's: 18 for Gemma 2B, 35 for E2B; "
                         "fewer for a quick try)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint from the page cache before converting (fadvise DONTNEED)")
    ap.add_argument("--no-progress", action="store_true", help="no converter progress bar (shown only when stderr is a terminal)")
    ap.add_argument("--quiet-children", action="store_true", help="hide the children's output")
    return ap.parse_args(argv)


def remove_weight_cache(path: Path) -> None:
    """Remove the XNNPACK weight caches the runtime wrote for the model file ``path``: in
    ``weight_cache.cache_dir()``, ``<basename>.<8 hex>.<16 hex>.xnnpack`` with its ``.ok``
    record, whose record names ``path`` (a cache without a record is one whose 8 hex digits,
    the place of the model, are those of ``path``). Works after ``path`` is deleted."""
    import hashlib

    from gemma_edge.runtime import weight_cache as wc

    real = os.path.realpath(path)
    place = hashlib.sha256(real.encode()).hexdigest()[:8]
    pattern = re.compile(re.escape(os.path.basename(real)) + r"\.([0-9a-f]{8})\.[0-9a-f]{16}" + re.escape(wc.SUFFIX))
    folder = wc.cache_dir()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        record = Path(str(p) + wc.RECORD)
        try:
            model = json.loads(record.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
        if model == real or (model is None and m.group(1) == place):
            p.unlink(missing_ok=True)
            record.unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    model = MODELS[args.model]
    ckpt = work / f"{model.name}-synthetic"
    cfg = model.config(args.num_layers or model.layers)
    shard_bytes = int(args.shard_gb * 1e9)
    quants = parse_quants(args.quant)
    try:  # a mistyped recipe fails now, not after writing a 5 GB checkpoint
        sizes = {q: estimate_output_bytes(cfg, q) for q in quants}
    except Exception as e:  # QuantizationError, with the list of presets / schemes
        print(f"error: --quant: {e}", file=sys.stderr)
        return 2
    names = output_names(quants, model.name, "-cal" if args.calibrate else "")
    work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.prefill_lengths.split(",") if x.strip()]
    report: dict = {"model": model.name, "work_dir": str(work), "target_peak_rss_mb": TARGET_PEAK_MB, "target_wall_s": TARGET_WALL_S,
                    "target_ceiling_fraction": TARGET_CEILING, "quants": {}}
    params = sum(math.prod(s) for _, s in model.tensors(cfg))
    print(f"synthetic {model.label}: {params / 1e9:.3f}B parameters, {fmt_bytes(2 * params)} of bf16, "
          f"{text_config(cfg)['num_hidden_layers']} layers; work dir {work}; recipes: {', '.join(quants)}")

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
        w = write_checkpoint(ckpt, model, cfg, args.seed, shard_bytes, args.cold)
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
                    "prefill_lengths": lengths, "calibrate": args.calibrate,
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
            print(f"    runtime peak RSS (the loader's own VmHWM) {fmt_mb(lr['peak_rss_mb'])} = "
                  f"{lr['peak_rss_mb'] * MB / lr['read_bytes']['file_size']:.2f}x the file; wait4 "
                  f"{fmt_mb(lrun['wait4_maxrss_mb'])} includes the first load's weight-cache builder")
            bench = lr.get("bench")
            if bench:
                d, p = bench["decode_tps"], bench["prefill_tps"]
                print(f"    Model.benchmark(prompt_tokens={bench['prompt_tokens']}, gen_tokens={bench['gen_tokens']}, "
                      f"runs={bench['runs']}): decode {d['median']:.2f} tok/s median (min {d['min']:.2f}, max "
                      f"{d['max']:.2f}); prefill {p['median']:.1f} tok/s median; tokenizer {lr['tokenizer_vocab']} pieces")
            rb = lr["read_bytes"]
            lookup = (f" + {rb['lookup_tables']} lookup-only tables {rb['lookup_read_bytes'] / 1e3:,.1f} kB (one row "
                      f"each of {rb['lookup_tables_bytes'] / 1e6:,.1f} MB)") if rb["lookup_tables"] else ""
            print(f"    bytes read per decode step: weights {rb['weights'] / 1e6:,.1f} MB ({rb['weight_buffers']} "
                  f"buffers {rb['weight_buffers_bytes'] / 1e6:,.1f} MB + header scales "
                  f"{rb['header_scales_bytes'] / 1e6:.2f} MB + inline {rb['inline_bytes'] / 1e6:.2f} MB{lookup}; file "
                  f"{rb['file_size'] / 1e6:,.1f} MB) + KV {rb['kv'] / 1e6:,.1f} MB ({rb['kv_desc']}) "
                  f"= {rb['total'] / 1e6:,.1f} MB")
            print_memory(lr)
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
    print_tables(report)
    if args.json:
        text = json.dumps(report, indent=1, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
            print(f"JSON written to {args.json}")
    ok = all(q.get("ok") for q in report["quants"].values())
    return 0 if ok else 1


def fmt_resident(m: dict) -> str:
    if m.get("regions_resident") is None:
        return "-"
    return (f"{m['regions_resident'] / MB:,.1f} MB of {m['regions_bytes'] / MB:,.0f} MB "
            f"({100 * m['regions_resident'] / max(m['regions_bytes'], 1):.2f}%)")


def print_memory(lr: dict) -> None:
    """The loader's memory after each step, and what of the model file is resident."""
    rb, mem = lr["read_bytes"], lr.get("memory") or {}
    if not mem:
        return
    tables = rb["lookup_tables"]
    print(f"    loader memory (MB; model map / cache map: resident bytes of its mappings of the model file / "
          f"XNNPACK weight cache, /proc/self/smaps{'; lookup tables: resident bytes of the ' + str(tables) + ' tables read only by EMBEDDING_LOOKUP, /proc/self/pagemap' if tables else ''}):")
    print(f"      {'after':18s} {'VmRSS':>8s} {'RssAnon':>8s} {'RssFile':>8s} {'model map':>10s} {'cache map':>10s}"
          + ("  lookup tables resident" if tables else ""))
    for step, m in mem.items():
        print(f"      {step:18s} {m['VmRSS'] / MB:8,.0f} {m['RssAnon'] / MB:8,.0f} {m['RssFile'] / MB:8,.0f} "
              f"{m['model_map_rss'] / MB:10,.0f} {m['cache_map_rss'] / MB:10,.0f}"
              + (f"  {fmt_resident(m)}" if tables else ""))
    last = list(mem.values())[-1]
    print(f"      the model file ({rb['file_size'] / MB:,.0f} MB) is mapped {last['model_maps']} time(s), "
          f"{last['model_mapped'] / MB:,.0f} MB; resident {last['model_map_rss'] / MB:,.0f} MB of it "
          f"({100 * last['model_map_rss'] / rb['file_size']:.1f}%)")


def print_tables(report: dict) -> None:
    """The README-style table, and for models with lookup-only tables (Gemma 4's per-layer
    embeddings) the residency table."""
    rows, res = [], []
    for quant, q in report["quants"].items():
        c, l = q.get("convert") or {}, q.get("load") or {}
        cr, lr = c.get("result") or {}, l.get("result") or {}
        if not cr:
            continue
        ceil, bench = q.get("ceiling"), lr.get("bench")
        size = cr["file_size"]
        peak = lr.get("peak_rss_mb")
        rows.append(f"| `{quant}` | {size / 1e9:.2f} GB | {c['wall_s']:.0f} s | {fmt_mb(c.get('wait4_maxrss_mb'))} | "
                    + (f"{bench['decode_tps']['median']:.2f}" if bench else "-") + " | "
                    + (f"{lr['read_bytes']['total'] / 1e9:.2f} GB" if lr else "-") + " | "
                    + (f"{ceil['ceiling_tps']:.1f} tok/s | {100 * ceil['fraction']:.0f}%" if ceil else "- | -") + " | "
                    + (f"{fmt_mb(peak)} ({peak * MB / size:.2f}x file)" if peak else "-") + " |")
        if lr and lr["read_bytes"]["lookup_tables"]:
            rb, mem = lr["read_bytes"], lr["memory"]
            last = list(mem.values())[-1]
            res.append(f"| `{quant}` | {size / 1e9:.2f} GB | {rb['lookup_tables']} x {rb['lookup_tables_bytes'] / 1e9 / rb['lookup_tables']:.3f} GB "
                       f"= {rb['lookup_tables_bytes'] / 1e9:.2f} GB | {rb['lookup_read_bytes'] / 1e3:,.1f} kB | "
                       + " | ".join(fmt_resident(m) for m in mem.values()) + " | "
                       f"{last['model_map_rss'] / MB:,.0f} MB ({100 * last['model_map_rss'] / size:.1f}% of the file) | "
                       f"{last['VmRSS'] / MB:,.0f} MB |")
    if not rows:
        return
    print("\n| recipe | file | convert | converter peak RSS | decode tok/s | bytes / token | ceiling | decode / ceiling "
          "| runtime peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if res:
        steps = list(next(q["load"]["result"]["memory"] for q in report["quants"].values()
                          if ((q.get("load") or {}).get("result") or {}).get("memory")))
        print("\nper-layer embedding tables (read only by EMBEDDING_LOOKUP): resident in the runtime process "
              "(/proc/self/pagemap)")
        print("| recipe | file | tables | read / token | " + " | ".join(f"resident after {s}" for s in steps)
              + " | model-file mapping RSS | VmRSS |")
        print("|---|---:|---:|---:|" + "---:|" * len(steps) + "---:|---:|")
        print("\n".join(res))


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
        ]
        cal = [st for st in c.get("stages", []) if st["stage"].startswith("calibrate")]
        if cal:  # --calibrate: its time, and which process held what
            own = max((st["max_rss_mb"] or 0 for st in c.get("stages", [])), default=None)
            rows += [(f"[{quant}] calibration time", f"{sum(st['seconds'] for st in cal):.1f} s", "(" + ", ".join(
                f"{st['stage'][len('calibrate: '):] or 'start'} {st['seconds']:.1f} s" for st in cal) + ")"),
                (f"[{quant}] converter process max VmRSS", fmt_mb(own), "(sampled; without its children)")]
            rows += [(f"[{quant}] children during '{st['stage'][len('calibrate: '):]}'", fmt_mb(st.get("max_desc_mb")),
                      f"(sampled RSS of its children, summed; anonymous {fmt_mb(st.get('max_desc_anon_mb'))})")
                     for st in cal if st.get("max_desc_mb")]
        rows += [
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
                (f"[{quant}] loader peak RSS", fmt_mb(l.get("wait4_maxrss_mb")), "(wait4: with the weight-cache builder)"),
                (f"[{quant}] runtime peak RSS (loader VmHWM)", f"{fmt_mb(lr['peak_rss_mb'])} = "
                 f"{lr['peak_rss_mb'] * MB / lr['read_bytes']['file_size']:.2f}x the file", ""),
                (f"[{quant}] logits finite, no TF", f"{lr['logits_finite']}, {not lr['tensorflow_imported']}",
                 verdict(load_ok)),
            ]
            rb, bench = lr["read_bytes"], lr.get("bench")
            rows.append((f"[{quant}] bytes read per token", f"{rb['total'] / 1e6:,.1f} MB = weights "
                         f"{rb['weights'] / 1e6:,.1f} + KV {rb['kv'] / 1e6:,.1f} (S={rb['context']})", ""))
            if rb["lookup_tables"] and lr.get("memory"):
                last = list(lr["memory"].values())[-1]
                rows.append((f"[{quant}] lookup-only tables resident", fmt_resident(last),
                             f"(model-file mapping RSS {last['model_map_rss'] / MB:,.0f} MB of {rb['file_size'] / MB:,.0f})"))
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
