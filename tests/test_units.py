"""Fast unit tests of the pieces around the oracle: norm shift, config, name maps, prefill
planning, the metadata reader's errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gemma_edge.convert import gguf_checkpoint, hf_checkpoint
from gemma_edge.convert.gguf_checkpoint import config_from_gguf
from gemma_edge.convert.hf_checkpoint import config_from_hf
from gemma_edge.convert.names import build_map, norm_scale, source_names
from gemma_edge.runtime.backend import common_prefix, plan_prefill
from gemma_edge.runtime.config import FULL, SLIDING, GemmaConfig
from gemma_edge.runtime.errors import GemmaEdgeError, ModelFileError, UnsupportedModelError, WeightMapError

GEMMA3_270M_HF = {  # google/gemma-3-270m config.json (transformers 4.x format)
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
    "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "rope_scaling": None,
}


def test_norm_shift_lives_in_one_place():
    w = np.array([-0.5, 0.0, 1.5], np.float32)
    np.testing.assert_array_equal(norm_scale(w, 1.0), [0.5, 1.0, 2.5])  # HF Gemma 1-3 store w of (1 + w)
    np.testing.assert_array_equal(norm_scale(w, 0.0), w)  # llama.cpp baked in +1; Gemma 4 applies w itself


def test_config_from_hf_gemma3_old_format():
    c = config_from_hf(GEMMA3_270M_HF)
    assert c.family == 3 and c.num_layers == 18 and c.head_dim == 256
    assert [i for i in range(18) if not c.is_sliding(i)] == [5, 11, 17]  # global where (i+1) % 6 == 0
    assert c.rope_base_for(5) == 1e6 and c.rope_base_for(0) == 1e4
    assert c.query_scale == 1 / 16 and c.has_qk_norm and c.has_post_norms
    assert GemmaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_a_split_embedding_is_part_of_the_file_config():
    """``embed_hot`` (row ranges of the split embedding's first table) round-trips, is left out of a
    one-table file's config (earlier versions read it), and a corrupt one is refused."""
    from gemma_edge.runtime.contract import EMBED_COLD, EMBED_HOT, embed_segments, source_rows, weight_shapes
    from gemma_edge.runtime.errors import UnsupportedModelError

    c = config_from_hf(GEMMA3_270M_HF)
    assert "embed_hot" not in c.to_dict() and c.embed_hot_rows == 0
    s = dataclasses.replace(c, embed_hot=(0, 16384, 236743, 237767))
    assert GemmaConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s and s.embed_hot_rows == 17408
    shapes = weight_shapes(s)
    assert shapes[EMBED_HOT] == (17408, 640) and shapes[EMBED_COLD] == (262144 - 17408, 640) and "embed" not in shapes
    assert embed_segments(EMBED_COLD, s) == [(16384, 236743), (237767, 262144)]
    # rows of a table as checkpoint rows: a chunk across two ranges reads both
    assert source_rows(EMBED_HOT, s, 16000, 16500) == ("embed", [(16000, 16384), (236743, 236859)])
    assert source_rows(EMBED_COLD, s, 220000, 220359) == ("embed", [(236384, 236743)])
    assert source_rows(EMBED_COLD, s, 220359, 220360) == ("embed", [(237767, 237768)])
    assert source_rows("l0_q", s, 3, 9) == ("l0_q", [(3, 9)])
    for bad in ((0,), (0, 16384, 100, 200), (5, 5), (-1, 3), (0, 262145), (0, 262144), (0, True)):
        with pytest.raises(UnsupportedModelError, match="embed_hot"):
            dataclasses.replace(c, embed_hot=bad)



def test_id_ranges_round_trip_and_are_checked():
    """The file's spelling of id sets (a split embedding's rows, the tokenizer's control ids)."""
    from gemma_edge.runtime.config import are_ranges, from_ranges, to_ranges

    for ids in ([], [7], [0, 1, 2, 7], [5, 3, 4, 4, 9, 10, 11], list(range(100)) + [262143]):
        r = to_ranges(ids)
        assert from_ranges(r) == sorted(set(ids)) and are_ranges(r, 262144)
    assert to_ranges([0, 1, 2, 7]) == (0, 3, 7, 8)
    for bad in ((0,), (3, 3), (0, 4, 4, 6), (5, 2), (-1, 2), (0, 11), (0, True), (0, 2.0)):
        assert not are_ranges(bad, 10), bad


def test_a_file_records_its_tokenizer_control_ids(path):
    """The converter writes the tokenizer's control ids into the file's metadata as ranges; a file
    without them (an earlier version's) reads as () and its load tests every piece; corrupt ranges
    are refused."""
    from gemma_edge.runtime import modelfile
    from gemma_edge.runtime.config import from_ranges
    from gemma_edge.runtime.tokenizer import Tokenizer

    info = modelfile.read_info(path)
    recorded = info.meta.tokenizer.special_ranges
    assert recorded and from_ranges(recorded) == list(Tokenizer(info.tokenizer_model).control_ids)
    d = json.loads(info.meta.to_json())
    assert modelfile.FileMeta.from_dict(d) == info.meta
    del d["tokenizer"]["special_ranges"]
    assert modelfile.FileMeta.from_dict(d).tokenizer.special_ranges == ()
    for bad in ([3], [4, 2], [0, 2, 1, 5], "0-5", [0, True]):
        d["tokenizer"]["special_ranges"] = bad
        with pytest.raises(ValueError, match="special_ranges"):
            modelfile.FileMeta.from_dict(d)

def test_config_matches_between_hf_and_gguf(real_gguf):
    with gguf_checkpoint.GGUFCheckpoint(real_gguf) as ck:
        g = config_from_gguf(ck.metadata(), vocab_size=262144)
    h = config_from_hf(GEMMA3_270M_HF)
    assert g == dataclasses.replace(h, rms_norm_eps=g.rms_norm_eps)
    assert abs(g.rms_norm_eps - 1e-6) < 1e-12


def test_gemma2_layer_pattern_and_softcaps():
    hf = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
          "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
          "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0}
    c = config_from_hf(hf)
    assert c.layer_types[:2] == (SLIDING, FULL) and c.attn_softcap == 50.0 and c.final_softcap == 30.0


def test_unsupported_architecture_names_what_was_found():
    with pytest.raises(UnsupportedModelError, match="llama.*gemma"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(UnsupportedModelError, match="'qwen2'"):
        config_from_gguf({"general.architecture": "qwen2"}, vocab_size=10)


def test_incomplete_or_mistyped_config_is_a_typed_error():
    incomplete = {k: v for k, v in GEMMA3_270M_HF.items() if k != "num_hidden_layers"}
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        config_from_hf(incomplete)
    with pytest.raises(UnsupportedModelError, match="wrong type"):
        config_from_hf({**GEMMA3_270M_HF, "num_hidden_layers": "eighteen"})
    with pytest.raises(UnsupportedModelError, match="wrong type"):
        config_from_gguf({"general.architecture": "gemma3", "gemma3.block_count": "x"}, vocab_size=10)


def test_name_map_reports_missing_and_leftover():
    c = config_from_hf({**GEMMA3_270M_HF, "num_hidden_layers": 1, "layer_types": [SLIDING]})
    table, ignorable = hf_checkpoint.table_for(c), hf_checkpoint.IGNORABLE
    names = {src for src, _ in source_names(table, c, "model.").values()}
    assert names == _transformers_names(c)  # the table names what transformers saves
    build_map(table, c, names, ignorable, "model.")
    with pytest.raises(WeightMapError, match="model.layers.0.mlp.up_proj.weight"):
        build_map(table, c, names - {"model.layers.0.mlp.up_proj.weight"}, ignorable, "model.")
    with pytest.raises(WeightMapError, match="model.layers.1.mlp.up_proj.weight"):
        build_map(table, c, names | {"model.layers.1.mlp.up_proj.weight"}, ignorable, "model.")
    build_map(table, c, names | {"lm_head.weight"}, ignorable, "model.")  # tied head: allowed, unused


def _transformers_names(c) -> set[str]:
    """Tensor names of a transformers Gemma 3 of ``c``'s layout (tiny sizes), without the tied head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tiny = Gemma3TextConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=c.num_layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=4, layer_types=list(c.layer_types))
    return set(Gemma3ForCausalLM(tiny).state_dict()) - {"lm_head.weight"}


def test_gemma1_naming_trap():
    """HF Gemma 1 calls its pre-FFN norm post_attention_layernorm; Gemma 2/3 their post-attention norm."""
    g1 = config_from_hf({**GEMMA3_270M_HF, "model_type": "gemma", "num_hidden_layers": 1})
    g3 = config_from_hf({**GEMMA3_270M_HF, "num_hidden_layers": 1, "layer_types": [SLIDING]})
    assert source_names(hf_checkpoint.table_for(g1), g1)["l0_ffn_norm"][0] == "layers.0.post_attention_layernorm.weight"
    assert source_names(hf_checkpoint.table_for(g3), g3)["l0_post_attn_norm"][0] == "layers.0.post_attention_layernorm.weight"


@pytest.mark.parametrize("n,start,want", [
    (39, 0, [(32, 32), (8, 7)]),  # largest first, then a padded small chunk
    (127, 0, [(128, 127)]),       # one padded call instead of 32+32+32+32
])
def test_plan_prefill(n, start, want):
    assert plan_prefill(n, start, [8, 32, 128], 2048) == want


def test_plan_prefill_near_the_cache_end():
    """A chunk never runs past the cache (DYNAMIC_UPDATE_SLICE would clamp its start and
    overwrite earlier slots); where no chunk fits, tokens go one by one through decode."""
    assert plan_prefill(3, 58, [8, 32], 64) == [(1, 1)] * 3  # 6 free slots < the smallest chunk
    assert plan_prefill(12, 50, [8, 32], 64) == [(8, 8)] + [(1, 1)] * 4  # 8+8 would pass slot 64
    with pytest.raises(GemmaEdgeError, match="cache is full"):
        plan_prefill(3, 62, [8, 32], 64)


def test_common_prefix_is_the_item_by_item_count():
    """``common_prefix`` (list comparisons, halving) against a loop over items, on lists that part
    at every distance from their ends, on both sides of its 64-item tail."""
    import random

    def loop(a, b):
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        return i

    rng = random.Random(3)
    for _ in range(3000):
        n = rng.choice([0, 1, 2, 63, 64, 65, 129, 500, 3000])
        a = [rng.randrange(3) for _ in range(n)]
        b = a[:rng.randrange(n + 1)] + [rng.randrange(3) for _ in range(rng.randrange(200))]
        if rng.random() < 0.5:
            a, b = b, a
        assert common_prefix(a, b) == loop(a, b), (a, b)


def test_metadata_reader_errors(tmp_path):
    from gemma_edge.runtime.modelfile import read_info

    with pytest.raises(ModelFileError, match="no such file"):
        read_info(str(tmp_path / "missing.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a TensorFlow Lite"):
        read_info(str(junk))
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x10\x00\x00\x00TFL3" + b"\xff" * 64)
    with pytest.raises(ModelFileError):
        read_info(str(bad))


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory) -> bytes:
    from gemma_edge.convert import tflite_writer as tw
    from gemma_edge.convert.template import build_template
    from gemma_edge.runtime.contract import weight_shapes
    from gemma_edge.quantize.schemes import SCHEMES
    from gemma_edge.runtime import modelfile

    cfg = GemmaConfig(family=1, vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, layer_types=(FULL,))
    shapes = weight_shapes(cfg)
    meta = modelfile.FileMeta(cfg, context_length=8, prefill_lengths=(4,),
                              quantization=modelfile.Quantization("int8"), tokenizer=modelfile.TokenizerMeta(bos_id=2))
    path = tmp_path_factory.mktemp("fuzz") / "m.tflite"
    tw.write_model(build_template(cfg, 8, [4], isolate=False),
                   [tw.WeightSlot(n, s, SCHEMES["int8" if len(s) == 2 else "fp32"]) for n, s in shapes.items()],
                   lambda n, a, b: np.ones((b - a, shapes[n][-1]), np.float32),
                   modelfile.metadata_entries(meta, b"sp"), str(path))
    return path.read_bytes()


def test_weight_regions_are_the_buffers_the_schema_names(small_model_file, path, tmp_path_factory):
    """read_info's (offset, size) of every stored weight buffer, read for all buffers at once, are
    those the TFLite schema (ai_edge_litert's generated reader) gives; under bit flips of the
    header, that reading (and its metadata) agrees with the entry-by-entry one, or both refuse the
    file."""
    from unittest import mock

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ai_edge_litert import schema_py_generated as fb
    from gemma_edge.runtime import modelfile

    d = tmp_path_factory.mktemp("regions")
    for i, data in enumerate((small_model_file, open(path, "rb").read())):
        m = fb.Model.GetRootAs(data, 0)
        meta = {m.Metadata(j).Buffer() for j in range(m.MetadataLength())}
        want = sorted((m.Buffers(k).Offset(), m.Buffers(k).Size()) for k in range(m.BuffersLength())
                      if k not in meta and m.Buffers(k).Offset() > 1 and m.Buffers(k).Size())
        p = d / f"{i}.tflite"
        p.write_bytes(data)
        assert want and list(modelfile.read_info(str(p)).weight_regions) == want
        assert m.BuffersLength() >= modelfile._VECTOR_AT_ONCE  # Model.buffers is read at once

    def regions(p, one_by_one: bool):
        try:
            if not one_by_one:
                return modelfile._read(str(p))
            with mock.patch.object(modelfile, "_stored_buffers", lambda *a: None), \
                    mock.patch.object(modelfile, "_VECTOR_AT_ONCE", 1 << 62):
                return modelfile._read(str(p))
        except ModelFileError:
            return ModelFileError

    data = small_model_file
    header = int.from_bytes(data[:4], "little") + 4096

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, min(header, len(data)) - 1), st.integers(1, 255)), min_size=1, max_size=6))
    def check(flips):
        b = bytearray(data)
        for at, x in flips:
            b[at] ^= x
        p = d / "case.tflite"
        p.write_bytes(bytes(b))
        assert regions(p, False) == regions(p, True)

    check()


def test_metadata_reader_fuzz(small_model_file, tmp_path_factory):
    """Bit flips and truncations of a real file: read_info succeeds or raises a typed error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from gemma_edge.runtime.modelfile import read_info

    d = tmp_path_factory.mktemp("fuzzcases")
    data = small_model_file
    header = int.from_bytes(data[:4], "little") + 4096  # flips within the flatbuffer header region

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, min(header, len(data)) - 1), st.integers(1, 255)), max_size=6),
           st.one_of(st.none(), st.integers(0, len(data))))
    def check(flips, cut):
        b = bytearray(data)
        for at, x in flips:
            b[at] ^= x
        if cut is not None:
            b = b[:cut]
        p = d / "case.tflite"
        p.write_bytes(bytes(b))
        try:
            read_info(str(p))
        except GemmaEdgeError:  # ModelFileError, or e.g. UnsupportedModelError for a mangled config key
            pass

    check()
