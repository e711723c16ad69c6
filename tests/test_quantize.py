"""Reference int8 quantizer, and the written file's bytes and scales against it."""

from __future__ import annotations

import json

import numpy as np

import pytest

from gemma_edge.quantize.reference import (dequantize_blockwise, dequantize_per_channel, pack_int4,
                                           quantize_blockwise, quantize_per_channel, unpack_int4)
from gemma_edge.quantize.schemes import SCHEMES, kind_of, parse_recipe, recipe_name, role_of
from gemma_edge.runtime.errors import QuantizationError


def test_zero_row_is_exact_and_finite():
    w = np.zeros((3, 8), np.float32)
    w[1] = np.linspace(-1, 1, 8)
    q, s = quantize_per_channel(w, 8)
    assert s[0] == 1.0 and not q[0].any() and np.isfinite(s).all()
    np.testing.assert_array_equal(dequantize_per_channel(q, s)[0], 0.0)


def test_round_trip_error_bound_and_range():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    q, s = quantize_per_channel(w, 8)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert (np.abs(q).max(axis=1) == 127).all()  # every row uses its full range
    err = np.abs(dequantize_per_channel(q, s) - w)
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_int4_nibble_packing():
    # element 2k in the low nibble, 2k+1 in the high one; negative values two's complement
    assert pack_int4(np.array([[1, -1, -8, 7]], np.int8)).tolist() == [[0xF1, 0x78]]
    q = np.random.default_rng(0).integers(-8, 8, (7, 64)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(np.zeros((2, 3), np.int8))


def test_int4_per_channel_round_trip():
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    q, s = quantize_per_channel(w, 4)
    assert q.min() >= -7 and q.max() <= 7
    assert (np.abs(dequantize_per_channel(q, s) - w) <= s[:, None] / 2 + 1e-7).all()


def test_recipes_and_roles():
    assert role_of("embed") == "embedding" and role_of("l12_q") == "attention"
    assert role_of("l0_down") == "ffn" and role_of("l3_q_norm") is None and role_of("final_norm") is None
    assert role_of("l0_v") == "attention" and kind_of("l0_v") == "attn_v" and kind_of("embed") == "embedding"
    kinds = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
    ple = {k: "int4-b32" for k in ("ple_embed", "ple_proj", "ple_gate", "ple_out")}  # Gemma 4's per-layer embeddings
    assert role_of("l3_ple_embed") == "ple" and role_of("ple_proj") == "ple" and role_of("l3_ple_norm") is None
    dense = {"dense_0": "int8", "dense_1": "int8"}  # an embedding model's Dense layers after pooling
    assert role_of("dense_0") == "dense" and kind_of("dense_1") == "dense_1"
    # int4: the FFN's gate and up in int4 blocks; its down projection, attention and embedding int8
    assert parse_recipe("int4") == {"embedding": "int8", "embedding_hot": "int8",
                                    **{k: "int4-b32" if k in ("ffn_gate", "ffn_up") else "int8" for k in kinds},
                                    **ple, **dense}
    # int4-emb: the embedding in int4 blocks but its rows of frequent pieces, a table of their own
    assert role_of("embed_hot") == role_of("embed_cold") == "embedding"
    assert kind_of("embed_hot") == "embedding_hot" and kind_of("embed_cold") == "embedding"
    got = parse_recipe("int4-emb")
    assert (got["embedding"], got["embedding_hot"], got["ffn_up"]) == ("int4-b32", "int8", "int8")
    assert parse_recipe("int4-emb,embedding=int4-b32")["embedding_hot"] == "int4-b32"  # the role sets both
    assert parse_recipe("int4,ffn_down=int4-b32")["ffn_down"] == "int4-b32"
    assert parse_recipe("int4,ffn=int4-b64")["ffn_down"] == "int4-b64"  # a role given overrides the preset's kind
    # the mixed preset keeps the embedding (and an embedding model's small Dense layers) in int8
    assert parse_recipe("int4-b32,embedding=int8,dense=int8") == parse_recipe("int4-b32-mixed")
    assert parse_recipe("ffn=int4") == {"embedding": "int8", "embedding_hot": "int8",
                                        **{k: "int4" if k.startswith("ffn") else "int8" for k in kinds},
                                        **dict.fromkeys(ple, "int8"), **dense}
    # a kind overrides its role whatever the order they are given in
    got = parse_recipe("int4-b32,ffn_down=int8,ffn=int4-b64")
    assert got["ffn_down"] == "int8" and got["ffn_up"] == "int4-b64" and got["attn_q"] == "int4-b32"
    assert recipe_name("int4-b32,ffn_down=int8,embedding=int8") == (
        "embedding=int8,attention=int4-b32,ffn_gate=int4-b32,ffn_up=int4-b32,ffn_down=int8,ple=int4-b32,"
        "dense=int4-b32")
    # a model's file names only the roles it has: a causal LM has no Dense layers
    present = [k for k in parse_recipe("int8") if not k.startswith("dense")]
    assert recipe_name("int4-b32,ffn_down=int8,embedding=int8", present).endswith("ffn_down=int8,ple=int4-b32")
    assert recipe_name("int4-b32") == "int4-b32"
    with pytest.raises(QuantizationError, match="int3"):
        parse_recipe("int3")
    with pytest.raises(QuantizationError, match="roles?"):
        parse_recipe("int8,mlp=int4")
    with pytest.raises(QuantizationError, match="fp32, int8, int4"):
        parse_recipe("int8,ffn=int2")


def test_blockwise_reference():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 128)) * rng.uniform(0.001, 5, (6, 1))).astype(np.float32)
    w[2, 32:64] = 0.0  # an all-zero block
    q, s = quantize_blockwise(w, 4, 32)
    assert s.shape == (6, 4) and s.dtype == np.float16 and s[2, 1] == 1.0 and not q[2, 32:64].any()
    assert q.min() >= -8 and q.max() <= 7
    # scales carry bf16 precision (XNNPACK computes with bf16 scales): low mantissa bits are zero
    assert not np.any(s.astype(np.float32).view(np.uint32) & 0xFFFF)
    err = np.abs(dequantize_blockwise(q, s) - w).reshape(6, 4, 32)
    assert (err <= s.astype(np.float32)[:, :, None] * 0.51 + 1e-6).all()
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        quantize_blockwise(np.zeros((2, 48), np.float32), 4, 32)


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-b32"])
def test_written_file_holds_the_reference_bytes_and_scales(tmp_path, quant):
    """Every stored byte and scale is the reference quantizer's, and the file computes with them.
    A per-channel embedding keeps its row scales as a float32 tensor of their own
    (``contract.row_scales_name``) with a single scale of 1 as its quantization, as
    gemma-convert writes it: the logits below check that the graph applies them after both the
    lookup and the LM head (a missing or misplaced one changes every logit)."""
    from ai_edge_litert import schema_py_generated as fb

    from gemma_edge.convert import tflite_writer as tw
    from gemma_edge.convert.template import build_template
    from gemma_edge.runtime.contract import weight_shapes
    from gemma_edge.runtime import modelfile
    from gemma_edge.runtime.config import FULL, GemmaConfig

    cfg = GemmaConfig(family=1, vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, layer_types=(FULL,))
    shapes = weight_shapes(cfg)
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    slots = [tw.WeightSlot(n, s, SCHEMES[quant if len(s) == 2 else "fp32"]) for n, s in shapes.items()]
    row_scaled = [] if quant == "int4-b32" else ["embed"]
    for slot in slots:
        slot.row_scales = slot.name in row_scaled
    tw.CHUNK_BYTES, saved = 1024, tw.CHUNK_BYTES  # many row chunks even for tiny tensors
    try:
        path = tmp_path / "m.tflite"
        tw.write_model(build_template(cfg, 16, [4], isolate=False, row_scaled=row_scaled), slots,
                       lambda n, a, b: weights[n].reshape(-1, weights[n].shape[-1])[a:b],
                       {modelfile.CONFIG_KEY: json.dumps({"x": 1}).encode()}, str(path))
    finally:
        tw.CHUNK_BYTES = saved
    data = path.read_bytes()
    model = fb.ModelT.InitFromPackedBuf(data, 0)
    sg = next(model.subgraphs[s.subgraphIndex] for s in model.signatureDefs if s.signatureKey == b"decode")
    seen = set()
    for t in sg.tensors:
        name = t.name.decode()
        for canon in ("l0_q", "l0_down", "embed", "l0_attn_norm"):
            if name.endswith(f"_{canon}:0") or name.endswith(f"_{canon}"):
                buf = model.buffers[t.buffer]
                raw = np.frombuffer(data, np.uint8, count=buf.size, offset=buf.offset)
                assert buf.offset % tw.ALIGN == 0
                if len(shapes[canon]) == 2 and quant == "int4-b32":
                    q, s = quantize_blockwise(weights[canon], 4, 32)
                    assert t.type == fb.TensorType.INT4
                    np.testing.assert_array_equal(unpack_int4(raw.reshape(q.shape[0], -1)), q)
                    d = t.quantization.details
                    assert t.quantization.detailsType == fb.QuantizationDetails.BlockwiseQuantization
                    assert d.blockSize == 32 and d.zeroPoints == -1
                    st = sg.tensors[d.scales]
                    assert st.type == fb.TensorType.FLOAT16 and list(st.shape) == list(s.shape)
                    sb = model.buffers[st.buffer]
                    np.testing.assert_array_equal(
                        np.frombuffer(data, np.float16, count=s.size, offset=sb.offset).reshape(s.shape), s)
                elif len(shapes[canon]) == 2:
                    q, s = quantize_per_channel(weights[canon], SCHEMES[quant].bits)
                    if quant == "int8":
                        assert t.type == fb.TensorType.INT8
                        np.testing.assert_array_equal(raw.view(np.int8).reshape(q.shape), q)
                    else:
                        assert t.type == fb.TensorType.INT4
                        np.testing.assert_array_equal(unpack_int4(raw.reshape(q.shape[0], -1)), q)
                    if canon in row_scaled:  # one scale of 1; the rows' own in a float32 tensor
                        np.testing.assert_array_equal(np.asarray(t.quantization.scale, np.float32), [1.0])
                        st = next(x for x in sg.tensors if x.name.decode().endswith("_embed_row_scales:0"))
                        sb = model.buffers[st.buffer]
                        assert st.type == fb.TensorType.FLOAT32 and list(st.shape) == [s.size] and sb.offset % tw.ALIGN == 0
                        np.testing.assert_array_equal(np.frombuffer(data, np.float32, count=s.size, offset=sb.offset), s)
                    else:
                        np.testing.assert_array_equal(np.asarray(t.quantization.scale, np.float32), s)
                    assert t.quantization.quantizedDimension == 0 and not np.any(t.quantization.zeroPoint)
                else:
                    np.testing.assert_array_equal(raw.view(np.float32), weights[canon])
                seen.add(canon)
    assert seen == {"l0_q", "l0_down", "embed", "l0_attn_norm"}, seen

    # the file runs in LiteRT and computes with exactly these weights: its logits match an
    # fp32 file of the dequantized weights up to the kernels' on-the-fly activation rounding
    from gemma_edge.runtime.backend import make_backend
    from gemma_edge.runtime.modelfile import FileMeta, ModelInfo

    deq = {n: (dequantize_blockwise(*quantize_blockwise(w, 4, 32)) if quant == "int4-b32" else
               dequantize_per_channel(*quantize_per_channel(w, SCHEMES[quant].bits))) if w.ndim == 2 else w
           for n, w in weights.items()}
    ref_path = tmp_path / "ref.tflite"
    tw.write_model(build_template(cfg, 16, [4], isolate=False),
                   [tw.WeightSlot(n, s, SCHEMES["fp32"]) for n, s in shapes.items()],
                   lambda n, a, b: deq[n].reshape(-1, deq[n].shape[-1])[a:b],
                   {modelfile.CONFIG_KEY: b"{}"}, str(ref_path))
    meta = FileMeta(cfg, context_length=16, prefill_lengths=(4,))
    logits = []
    for p in (path, ref_path):
        b = make_backend(ModelInfo(str(p), meta, b"x"))
        logits.append(np.stack([b.decode(t, i) for i, t in enumerate([2, 7, 11, 13])]))
    got, want = logits
    assert np.mean(np.abs(got - want)) < 0.03 * np.mean(np.abs(want))


def test_report_weight_errors_match_the_reference_quantizers(tmp_path, sp_model_path):
    """convert(report=True) measures each role's relative RMS error from the bytes it wrote;
    recomputed here from the checkpoint read by the safetensors library itself."""
    from safetensors.numpy import load_file

    from gemma_edge.convert import hf_checkpoint
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.quantize.reference import dequantize_rows, quantize_rows

    from conftest import make_hf_checkpoint

    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint(2, ckpt, sp_model_path, seed=5)
    r = convert(str(ckpt), str(tmp_path / "m.tflite"), quant="int4-b32-mixed", max_context=16,
                prefill_lengths=(8,), progress=False, report=True)
    rows = {row.role: row for row in r.weight_errors}
    assert {role: row.schemes for role, row in rows.items()} == {
        "embedding": ("int8",), "attention": ("int4-b32",), "ffn": ("int4-b32",)}

    hf = load_file(str(ckpt / "model.safetensors"))
    cfg = hf_checkpoint.config_from_hf(json.loads((ckpt / "config.json").read_text()))
    canon_to_hf = {c: src for c, (src, _) in hf_checkpoint.build_map_for(cfg, hf).items()}
    for role, row in rows.items():
        err = ref = 0.0
        worst = (0.0, "")
        for canon, src in canon_to_hf.items():
            if role_of(canon) != role:
                continue
            w = hf[src].astype(np.float32)
            scheme = SCHEMES[parse_recipe("int4-b32-mixed")[kind_of(canon)]]
            d = dequantize_rows(*quantize_rows(w, scheme), scheme) - w
            e, n = float((d.astype(np.float64) ** 2).sum()), float((w.astype(np.float64) ** 2).sum())
            err, ref = err + e, ref + n
            worst = max(worst, (np.sqrt(e / n), canon))
        assert abs(row.rel_rms - np.sqrt(err / ref)) < 1e-9, role
        assert row.worst_tensor == worst[1] and abs(row.worst_rel_rms - worst[0]) < 1e-9
    # int8's error is ~1/127 of the row's range, int4's ~1/7 of a block's: the table must say so
    assert rows["embedding"].rel_rms < 0.02 < rows["attention"].rel_rms < 0.2


def test_a_block_that_does_not_divide_the_rows_is_a_clear_error(tmp_path, sp_model_path):
    """int4-b128 on a model whose rows hold 64 values: the error names the tensor, its shape and
    the block, and suggests what to do; nothing is written."""
    from gemma_edge.convert.pipeline import convert

    from conftest import make_hf_checkpoint

    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint(1, ckpt, sp_model_path)  # hidden 64: q is (64, 64)
    out = tmp_path / "m.tflite"
    with pytest.raises(QuantizationError) as e:
        convert(str(ckpt), str(out), quant="int8,attention=int4-b128", max_context=16, prefill_lengths=(8,),
                progress=False)
    msg = str(e.value)
    assert "l0_q" in msg and "(64, 64)" in msg and "block size 128" in msg and "int4-b32" in msg, msg
    assert list(tmp_path.iterdir()) == [ckpt]


# ---- weights already on a 4-bit grid (GGUF Q4_0, QAT checkpoints) keep it --------------------------

def _q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's own Q4_0 of w (the gguf package): (dequantized values, codes k in -8..7, scale d per block)."""
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(w, GGMLQuantizationType.Q4_0)
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(w.shape[0], -1)
    qs = blocks[:, 2:]
    k = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return quants.dequantize(raw, GGMLQuantizationType.Q4_0), k.reshape(w.shape), d


def test_q4_0_blocks_keep_their_values_and_scale():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2, (48, 1))).astype(np.float32)
    snap, k, d = _q4_0(w)
    stats = {}
    q, s = quantize_blockwise(snap, 4, 32, stats)
    assert stats == {"blocks": 48 * 8, "imported": 48 * 8, "clipped": int((d < 0).sum())}
    pos = np.repeat(d > 0, 32, axis=1)
    # a positive Q4_0 scale: the same codes and the same fp16 scale
    assert np.array_equal(q[pos], k[pos]) and np.array_equal(s[d > 0].astype(np.float32), d[d > 0])
    # a negative one (its largest value is positive; LiteRT takes no negative scales): -k with |d|,
    # the values at +8 steps (the largest, and any as large) clipped to +7; every other value exact
    assert np.array_equal(s[d < 0].astype(np.float32), -d[d < 0])
    deq = dequantize_blockwise(q, s)
    off = deq != snap
    at_8 = (k == -8) & ~pos
    assert np.array_equal(off, at_8) and np.allclose((snap - deq)[off], np.repeat(np.abs(d), 32, axis=1)[off])
    assert at_8.sum() < 0.02 * at_8.size
    # QAT checkpoints store the grid in bf16: the same codes are found, the scale refitted
    bf = ((snap.view(np.uint32) + 0x7FFF + ((snap.view(np.uint32) >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    q_bf, s_bf = quantize_blockwise(bf, 4, 32)
    assert np.array_equal(q_bf, q) and np.max(np.abs(s_bf.astype(np.float32) / s.astype(np.float32) - 1)) < 4e-3
    # weights on no grid are rounded as before (max / 7, byte-identical with ai-edge-quantizer)
    stats = {}
    quantize_blockwise(w, 4, 32, stats)
    assert stats["imported"] == 0


def test_q4_0_gguf_converts_at_int4_b32_with_its_own_blocks(tmp_path, capsys):
    """A GGUF whose FC weights and embedding are Q4_0 (llama.cpp's layout, written by the gguf
    package): at int4-b32 every weight in the file equals the GGUF's own values, but for the one
    clipped value of each negative-scale block; the report says every tensor was imported."""
    import gguf
    from ai_edge_litert import schema_py_generated as fb

    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.modelfile import read_info
    from test_hardening import gguf_tensors, gguf_vocab

    toks, scores, types = gguf_vocab()
    tensors = gguf_tensors(len(toks))
    path = tmp_path / "q4_0.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for add, v in ((w.add_context_length, 256), (w.add_embedding_length, 32), (w.add_block_count, 2),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                   (w.add_key_length, 16), (w.add_value_length, 16), (w.add_layer_norm_rms_eps, 1e-6),
                   (w.add_rope_freq_base, 1e6), (w.add_sliding_window, 8), (w.add_tokenizer_model, "llama"),
                   (w.add_token_list, toks), (w.add_token_scores, scores), (w.add_token_types, types),
                   (w.add_bos_token_id, 2), (w.add_eos_token_id, 1), (w.add_unk_token_id, 3)):
        add(v)
    source = {}
    for name, a in tensors.items():
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            source[name] = _q4_0(a)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = convert(str(path), str(tmp_path / "m.tflite"), quant="int4-b32", max_context=16, prefill_lengths=(8,),
                progress=False, report=True)
    assert all(g["imported"] == g["blocks"] for g in r.grid_blocks.values()) and len(r.grid_blocks) == len(source)
    info = read_info(r.path)
    data = (tmp_path / "m.tflite").read_bytes()
    model = fb.ModelT.InitFromPackedBuf(data, 0)
    sg = next(model.subgraphs[s.subgraphIndex] for s in model.signatureDefs if s.signatureKey == b"decode")
    checked = 0
    for t in sg.tensors:
        if t.type != fb.TensorType.INT4:
            continue
        buf = model.buffers[t.buffer]
        q = unpack_int4(np.frombuffer(data, np.uint8, count=buf.size, offset=buf.offset).reshape(t.shape[0], -1))
        st = sg.tensors[t.quantization.details.scales]
        s = np.frombuffer(data, np.float16, count=int(np.prod(st.shape)), offset=model.buffers[st.buffer].offset)
        deq = dequantize_blockwise(q, s.reshape(st.shape))
        match = [v for v in source.values()
                 if v[0].shape == deq.shape and np.array_equal(v[0] != deq, (v[1] == -8) & np.repeat(v[2] < 0, 32, axis=1))]
        assert match, t.name
        checked += 1
    assert checked == len(source) and info.quant == "int4-b32"


@pytest.mark.parametrize("kind", ["compiled", "interpreter"])
def test_a_split_embedding_looks_up_and_scores_every_row_where_it_belongs(tmp_path, tiny, kind):
    """``int4-emb`` stores the tied embedding's frequent rows (``contract.hot_ranges``: the first
    ones, and a block from the first single character on) as a table of their own (int8) beside
    the rest (int4 blocks). Here the rest stays fp32 (``fp32,embedding_hot=int8``), so the oracle
    is exact: transformers with those rows rounded to int8. Tokens of every range of both tables
    are looked up, in the prompt and while decoding; the logits of the fp32 rows must match to
    float precision (a misplaced column or row would not), the int8 rows' to the kernel's
    on-the-fly rounding of the final hidden state. Both backends: the Interpreter (a Pi 4's) runs
    the lookups, select, slices and concatenation with builtin kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import CONTEXT, PREFILL, corpus_ids, hf_logits
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.contract import hot_ranges
    from gemma_edge.runtime.modelfile import read_info
    from gemma_edge.runtime.tokenizer import Tokenizer

    out = tmp_path / "split.tflite"
    convert(str(tiny.checkpoint), str(out), quant="fp32,embedding_hot=int8", max_context=CONTEXT,
            prefill_lengths=PREFILL, progress=False)
    info = read_info(str(out))
    V = info.config.vocab_size
    tok = Tokenizer.from_file(tiny.checkpoint / "tokenizer.model")
    ranges = info.config.embed_hot
    assert ranges == hot_ranges(V, tok.piece_to_id)
    (a0, b0), (a1, b1) = zip(ranges[0::2], ranges[1::2])  # the tiny vocabulary has its characters after its merges
    assert a0 == 0 and b0 == V // 16 < a1 < b1 < V and tok.id_to_piece(a1) in ("\u2581", ".", ",", "e", "t")
    hot = np.zeros(V, bool)
    hot[a0:b0] = hot[a1:b1] = True
    tensors = info.meta.quantization.tensors
    assert (tensors["embed_hot"], tensors["embed_cold"]) == ("int8", "fp32") and "embed" not in tensors
    assert f"embedding's {hot.sum()} frequent-piece rows int8" in info.meta.quantization.description  # `gemma-edge info`
    # one table when the rows share a scheme: int8 and the fp32 conversion keep "embed"
    assert read_info(str(tiny.model_file)).config.embed_hot == ()

    model = AutoModelForCausalLM.from_pretrained(str(tiny.checkpoint), dtype=torch.float32).eval()
    emb = model.get_input_embeddings().weight  # tied: also the LM head
    with torch.no_grad():
        q, s = quantize_per_channel(emb[hot].numpy(), 8)
        emb[torch.from_numpy(hot)] = torch.from_numpy(dequantize_per_channel(q, s))
    seq = [2] + corpus_ids(str(tiny.checkpoint / "tokenizer.model"), 55, seed=21)
    edges = (5, b0 - 1, b0, a1 - 1, a1, b1 - 1, b1, V - 1)  # first and last rows of every range of both tables
    for k, t in enumerate(edges):
        seq[3 + 4 * k] = t  # in the prompt
        seq[40 + 2 * k] = t  # and decoded
    want = hf_logits(model, seq)

    backend = make_backend(info, kind=kind)
    run_prefill(backend, seq[:39], 0)
    got = np.stack([backend.decode(seq[p], p).copy() for p in range(39, len(seq))])
    want = want[39:]
    scale = np.max(np.abs(want))
    assert np.max(np.abs(got[:, ~hot] - want[:, ~hot])) < 1e-4 * scale
    assert np.max(np.abs(got[:, hot] - want[:, hot])) < 2e-2 * scale
