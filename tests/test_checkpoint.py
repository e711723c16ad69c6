"""Lazy checkpoint readers: round trips against the reference writers, row-range reads,
every corruption raising SourceError that names the file, fuzzing, and the real Gemma 3 270M GGUF."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_edge.convert.checkpoint import TensorInfo, open_checkpoint
from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
from gemma_edge.convert.hf_checkpoint import SafetensorsCheckpoint
from gemma_edge.runtime.errors import SourceError

Q = gguf.GGMLQuantizationType


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _open_fails(path: Path, *needles: str, opener=open_checkpoint) -> str:
    """Opening ``path`` raises SourceError (nothing else) whose message names the file and each needle."""
    with pytest.raises(SourceError) as exc:
        opener(path).close()
    msg = str(exc.value)
    assert path.name in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------
# safetensors: round trips
# --------------------------------------------------------------------------------------------


def _numpy_tensors() -> dict[str, np.ndarray]:
    r = _rng(1)
    return {
        "embed": r.standard_normal((37, 16)).astype(np.float32),
        "proj": r.standard_normal((5, 3, 8)).astype(np.float32),
        "norm": r.standard_normal(16).astype(np.float32),
        "half": r.standard_normal((9, 4)).astype(np.float16),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_round_trip_f32_f16(tmp_path):
    ref = _numpy_tensors()
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(ref, str(path), metadata={"format": "np"})
    with SafetensorsCheckpoint(path) as ck:
        infos = ck.tensors()
        assert set(infos) == set(ref)
        assert infos["half"] == TensorInfo("half", (9, 4), "F16")
        assert infos["scalar"].shape == ()
        assert ck.metadata() == {"format": "np"}
        for name, want in ref.items():
            got = ck.read(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want.astype(np.float32))


def test_safetensors_round_trip_bf16_via_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = {
        "w": torch.randn(33, 12, generator=g).to(torch.bfloat16),
        "b": torch.randn(12, generator=g).to(torch.bfloat16),
        "f": torch.randn(4, 4, generator=g),
    }
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ref, str(path))
    with open_checkpoint(tmp_path) as ck:  # a directory holding model.safetensors
        assert isinstance(ck, SafetensorsCheckpoint)
        assert ck.tensors()["w"].dtype == "BF16"
        for name, t in ref.items():
            np.testing.assert_array_equal(ck.read(name), t.float().numpy())
        full = ck.read("w")
        for r0, r1 in [(0, 1), (5, 17), (32, 33), (0, 33), (7, 7)]:
            np.testing.assert_array_equal(ck.read("w", rows=(r0, r1)), full[r0:r1])


def test_row_ranges_equal_rows_of_full_read(tmp_path):
    ref = _numpy_tensors()
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(ref, str(path))
    with SafetensorsCheckpoint(path) as ck:
        for name in ("embed", "proj", "norm", "half"):
            full = ck.read(name)
            n = full.shape[0]
            for r0, r1 in [(0, n), (0, 1), (n - 1, n), (1, n // 2), (n // 2, n // 2)]:
                part = ck.read(name, rows=(r0, r1))
                assert part.shape == full[r0:r1].shape
                np.testing.assert_array_equal(part, full[r0:r1])
        assert ck.read("empty", rows=(0, 0)).shape == (0, 4)
        # Reads are copies, not views of the map.
        a = ck.read("embed", rows=(0, 2))
        a[:] = 0
        assert ck.read("embed", rows=(0, 2)).any()


def _rss_file_mb() -> float:
    import re

    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_scattered_row_reads_leave_the_file_out_of_rss(tmp_path, fmt):
    """Calibration reads single rows all over a tensor (the embedding rows of its tokens, sampled
    rows of each weight). Linux maps 64 KB around each faulting page, so releasing only the row's
    own pages left most of a 64 MB tensor resident (RssFile) after 2000 reads of 4 KB rows."""
    w = _rng(5).standard_normal((16384, 1024)).astype(np.float32)  # 4 KB rows, 64 MB
    path = tmp_path / f"big.{fmt}"
    if fmt == "safetensors":
        safetensors.numpy.save_file({"w": w}, str(path))
    else:
        g = gguf.GGUFWriter(str(path), "llama")
        g.add_tensor("w", w)
        g.write_header_to_file()
        g.write_kv_data_to_file()
        g.write_tensors_to_file()
        g.close()
    # clean pages, as a downloaded checkpoint's are (freshly written dirty ones were not mapped around a fault here)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    ck = open_checkpoint(path)
    try:
        ck.read("w", rows=(0, 1))
        before = _rss_file_mb()
        for r in np.linspace(1, 16383, 2000).astype(int):
            row = ck.read("w", rows=(int(r), int(r) + 1))
        grew = _rss_file_mb() - before
    finally:
        ck.close()
    np.testing.assert_array_equal(row[0], w[16383])
    assert grew < 8, f"RssFile grew by {grew:.1f} MB reading 2000 rows of 4 KB"


@pytest.mark.parametrize("rows", [(-1, 2), (3, 2), (0, 38), (0,), "ab", (0.5, 2), (True, 2)])
def test_bad_row_ranges_are_value_errors(tmp_path, rows):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), str(path))
    with SafetensorsCheckpoint(path) as ck, pytest.raises(ValueError):
        ck.read("embed", rows=rows)


def test_scalar_has_no_rows(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), str(path))
    with SafetensorsCheckpoint(path) as ck, pytest.raises(ValueError, match="scalar"):
        ck.read("scalar", rows=(0, 1))


def test_unknown_name_and_unsupported_dtype(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"ids": np.arange(6, dtype=np.int32), "w": np.ones((2, 2), np.float32)}, str(path))
    with SafetensorsCheckpoint(path) as ck:
        assert ck.tensors()["ids"] == TensorInfo("ids", (6,), "I32")  # listed, so callers can skip it
        with pytest.raises(SourceError, match="I32") as exc:
            ck.read("ids")
        assert path.name in str(exc.value) and "F32, F16 and BF16" in str(exc.value)
        with pytest.raises(SourceError, match="'nope'") as exc:
            ck.read("nope")
        assert path.name in str(exc.value)


def _write_sharded(d: Path, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    wm = {}
    for fname, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(d / fname))
        wm.update({n: fname for n in tensors})
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map or wm}))
    return index


def _shards() -> dict[str, dict[str, np.ndarray]]:
    r = _rng(2)
    return {
        "model-00001-of-00002.safetensors": {
            "a": r.standard_normal((10, 4)).astype(np.float32),
            "b": r.standard_normal(4).astype(np.float16),
        },
        "model-00002-of-00002.safetensors": {"c": r.standard_normal((3, 5)).astype(np.float32)},
    }


def test_sharded_index(tmp_path):
    shards = _shards()
    index = _write_sharded(tmp_path / "ckpt", shards)
    for target in (index.parent, index):  # the directory, or the index file itself
        with open_checkpoint(target) as ck:
            assert set(ck.tensors()) == {"a", "b", "c"}
            for tensors in shards.values():
                for n, want in tensors.items():
                    np.testing.assert_array_equal(ck.read(n), want.astype(np.float32))
            np.testing.assert_array_equal(ck.read("a", rows=(3, 7)), shards["model-00001-of-00002.safetensors"]["a"][3:7])


def test_hf_save_pretrained_sharded_checkpoint(tmp_path):
    """The real layout Hugging Face writes: a tiny Gemma 3 saved in bf16 across several shards."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = {k: v for k, v in model.state_dict().items()}
    with open_checkpoint(tmp_path) as ck:
        infos = ck.tensors()
        assert len({f for f in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 1
        for name, info in infos.items():
            assert info.dtype == "BF16"
            np.testing.assert_array_equal(ck.read(name), state[name].float().numpy())


# --------------------------------------------------------------------------------------------
# safetensors: corruption
# --------------------------------------------------------------------------------------------


def _raw_safetensors(path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None,
                     length: int | None = None) -> Path:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def _case_missing(tmp):
    return tmp / "nowhere.safetensors", ["no such file"]


def _case_empty_dir(tmp):
    d = tmp / "empty_ckpt"
    d.mkdir()
    return d, ["model.safetensors"]


def _case_dir_without_model(tmp):
    d = tmp / "odd_ckpt"
    d.mkdir()
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, str(d / "adapter.safetensors"))
    return d, ["adapter.safetensors", "pass one of those files"]


def _case_too_short(tmp):
    p = tmp / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    return p, ["3 bytes", "truncated"]


def _case_header_longer_than_file(tmp):
    return _raw_safetensors(tmp / "long.safetensors", {"w": F32_2x2}, b"\0" * 16, length=10_000), ["header length 10000"]


def _case_header_not_json(tmp):
    return _raw_safetensors(tmp / "nojson.safetensors", None, raw_header=b"{not json at all"), ["not valid JSON"]


def _case_header_not_utf8(tmp):
    return _raw_safetensors(tmp / "bytes.safetensors", None, raw_header=b"\xff\xfe{}"), ["not valid JSON"]


def _case_header_not_object(tmp):
    return _raw_safetensors(tmp / "list.safetensors", [1, 2]), ["not an object"]


def _case_duplicate_names(tmp):
    hb = b'{"w": ' + json.dumps(F32_2x2).encode() + b', "w": ' + json.dumps(F32_2x2).encode() + b"}"
    return _raw_safetensors(tmp / "dup.safetensors", None, b"\0" * 16, raw_header=hb), ["twice"]


def _case_overlap(tmp):
    h = {"a": F32_2x2, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    return _raw_safetensors(tmp / "overlap.safetensors", h, b"\0" * 24), ["overlap", "'a'", "'b'"]


def _case_out_of_order_offsets(tmp):
    h = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}
    return _raw_safetensors(tmp / "order.safetensors", h, b"\0" * 16), ["data_offsets [16, 0]"]


def _case_offsets_outside_file(tmp):
    h = {"a": F32_2x2, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1000, 1016]}}
    return _raw_safetensors(tmp / "outside.safetensors", h, b"\0" * 16), ["truncated", "'b'", "1016"]


def _case_size_mismatch(tmp):
    h = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}
    return _raw_safetensors(tmp / "size.safetensors", h, b"\0" * 16), ["needs 24 bytes", "span 16"]


def _case_bad_shape(tmp):
    h = {"a": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}
    return _raw_safetensors(tmp / "shape.safetensors", h, b"\0" * 16), ["shape [2, -2]"]


def _case_unknown_dtype(tmp):
    h = {"a": {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}}
    return _raw_safetensors(tmp / "dtype.safetensors", h, b"\0" * 16), ["'Q4'"]


def _case_bad_metadata(tmp):
    return _raw_safetensors(tmp / "meta.safetensors", {"__metadata__": {"a": 1}}), ["__metadata__"]


def _case_truncated(tmp):
    p = tmp / "trunc.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), str(p))
    p.write_bytes(p.read_bytes()[:-7])
    return p, ["truncated"]


def _case_index_missing_shard(tmp):
    index = _write_sharded(tmp / "ckpt_missing", _shards())
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    return index.parent, ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]


def _case_index_names_absent_tensor(tmp):
    shards = _shards()
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "ghost": "model-00002-of-00002.safetensors"}
    index = _write_sharded(tmp / "ckpt_ghost", shards, wm)
    return index.parent, ["'ghost'", "model-00002-of-00002.safetensors"]


def _case_shard_tensor_not_in_index(tmp):
    shards = _shards()
    wm = {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}
    index = _write_sharded(tmp / "ckpt_extra", shards, wm)
    return index.parent, ["'b'", "does not list"]


def _case_index_not_json(tmp):
    index = _write_sharded(tmp / "ckpt_badjson", _shards())
    index.write_text("{weight_map: oops")
    return index.parent, ["model.safetensors.index.json", "not valid JSON"]


def _case_index_without_weight_map(tmp):
    index = _write_sharded(tmp / "ckpt_nomap", _shards())
    index.write_text(json.dumps({"metadata": {}}))
    return index.parent, ["weight_map"]


def _case_corrupt_shard(tmp):
    index = _write_sharded(tmp / "ckpt_badshard", _shards())
    shard = index.parent / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    return index.parent, [shard.name, "truncated"]  # the message names the shard, not just the directory


@pytest.mark.parametrize("case", [v for k, v in sorted(globals().items()) if k.startswith("_case_")],
                         ids=lambda f: f.__name__[6:])
def test_safetensors_corruption_raises_source_error(tmp_path, case):
    path, needles = case(tmp_path)
    _open_fails(path, *needles)


# --------------------------------------------------------------------------------------------
# fuzz: any byte-level damage raises SourceError or reads cleanly
# --------------------------------------------------------------------------------------------


def _must_fail_cleanly(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        ck = open_checkpoint(path)
    except SourceError as e:
        assert path.name in str(e)
        return
    with ck:
        # Damage the header walk cannot see (a bad UTF-8 byte inside a string, a dtype we do not
        # convert) may surface later, but still only as SourceError.
        for action in [ck.metadata] + [lambda n=n: ck.read(n) for n in ck.tensors()]:
            try:
                action()
            except SourceError as e:
                assert path.name in str(e)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _valid_safetensors_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        safetensors.numpy.save_file({k: v for k, v in _numpy_tensors().items() if k != "empty"}, str(p), metadata={"m": "x"})
        return p.read_bytes()


VALID_ST = _valid_safetensors_bytes()
ST_HEADER_END = 8 + struct.unpack_from("<Q", VALID_ST)[0]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(cut=st.integers(0, len(VALID_ST) - 1))
def test_fuzz_safetensors_truncation(fuzz_dir, cut):
    _must_fail_cleanly(fuzz_dir / "t.safetensors", VALID_ST[:cut])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, ST_HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_safetensors_header_bytes(fuzz_dir, edits):
    data = bytearray(VALID_ST)
    for pos, b in edits:
        data[pos] = b
    _must_fail_cleanly(fuzz_dir / "h.safetensors", bytes(data))


@FUZZ
@given(header=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_safetensors_random_header(fuzz_dir, header, length):
    n = len(header) if length is None else length
    _must_fail_cleanly(fuzz_dir / "r.safetensors", struct.pack("<Q", n) + header + VALID_ST[ST_HEADER_END:])


@FUZZ
@given(blob=st.binary(max_size=200))
def test_fuzz_random_files_any_format(fuzz_dir, blob):
    _must_fail_cleanly(fuzz_dir / "blob.gguf", blob)
    _must_fail_cleanly(fuzz_dir / "blob.safetensors", blob)
    _must_fail_cleanly(fuzz_dir / "blob.bin", b"GGUF" + blob)


# --------------------------------------------------------------------------------------------
# GGUF: a small file written by gguf.GGUFWriter, checked against gguf.GGUFReader
# --------------------------------------------------------------------------------------------


def _small_gguf_tensors() -> dict[str, tuple[np.ndarray, Q]]:
    r = _rng(3)
    m = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "f32_2d": (m(6, 64), Q.F32),
        "f16_2d": (m(5, 32).astype(np.float16), Q.F16),
        "norm": (m(64), Q.F32),
        "q8_0": (m(40, 64), Q.Q8_0),
        "q4_0": (m(7, 96), Q.Q4_0),
        "q5_1": (m(3, 2, 32), Q.Q5_1),
        "bf16": (m(9, 16), Q.BF16),
        "q8_1d": (m(64), Q.Q8_0),
    }


def _write_small_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_uint32("gemma3.block_count", 2)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("test.i64", -5)
    w.add_float64("test.f64", 0.25)
    w.add_string("general.name", "tiny ☃")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "a", "é", "🙂", "▁the"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0, -3.0, -4.0])
    w.add_key_value("test.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY)
    for name, (a, qt) in _small_gguf_tensors().items():
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    return _write_small_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_small_gguf_matches_gguf_reader(small_gguf):
    with open_checkpoint(small_gguf) as ck:
        assert isinstance(ck, GGUFCheckpoint)
        reader = ck.reader  # built lazily: the oracle
        infos = ck.tensors()
        assert list(infos) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = infos[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert info.dtype == t.tensor_type.name
            want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            got = ck.read(t.name)
            assert got.dtype == np.float32 and got.shape == info.shape
            np.testing.assert_array_equal(got, want.reshape(info.shape))
            n = info.shape[0]
            for r0, r1 in [(0, 1), (1, n), (n // 2, n), (n // 3, 2 * n // 3)]:
                np.testing.assert_array_equal(ck.read(t.name, rows=(r0, r1)), got[r0:r1])
        meta = ck.metadata()
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            got = meta[key]
            if key == "test.nested":  # GGUFReader flattens arrays of arrays (a FIXME in gguf-py); we keep them
                got = [x for sub in got for x in sub]
            assert got == field.contents(), key


def test_small_gguf_values_and_shapes(small_gguf):
    ref = _small_gguf_tensors()
    with GGUFCheckpoint(small_gguf) as ck:
        meta = ck.metadata()
        assert meta["tokenizer.ggml.tokens"] == ["<pad>", "a", "é", "🙂", "▁the"]
        assert meta["general.name"] == "tiny ☃" and meta["gemma3.block_count"] == 2
        assert meta["test.i64"] == -5 and meta["test.f64"] == 0.25 and meta["tokenizer.ggml.add_bos_token"] is True
        assert meta["test.nested"] == [[1, 2], [3]]
        assert ck.metadata() is meta  # cached
        for name, (a, qt) in ref.items():
            assert ck.tensors()[name] == TensorInfo(name, a.shape, qt.name)
            got = ck.read(name)
            tol = {Q.F32: 0, Q.F16: 0, Q.BF16: 1e-2, Q.Q8_0: 3e-2, Q.Q5_1: 0.2, Q.Q4_0: 0.5}[qt]
            np.testing.assert_allclose(got, a.astype(np.float32), atol=tol * np.abs(a).max() + 1e-7)
        with pytest.raises(SourceError, match="'missing'"):
            ck.read("missing")
        with pytest.raises(ValueError):
            ck.read("q8_0", rows=(0, 41))


# --------------------------------------------------------------------------------------------
# GGUF: corruption
# --------------------------------------------------------------------------------------------


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf_bytes(*, magic=b"GGUF", version=3, kv=(), tensors=(), data=b"", alignment=32, n_tensors=None, n_kv=None) -> bytes:
    """A hand-made GGUF (independent of the reader under test): kv = (key, type, payload), tensors = (name, ne, type, offset)."""
    out = magic + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    for key, vtype, payload in kv:
        out += _gguf_string(key) + struct.pack("<I", vtype) + payload
    for name, ne, qtype, offset in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", qtype, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


ONE_F32 = [(b"w", (4, 2), int(Q.F32), 0)]  # 2 rows of 4 floats
ONE_F32_DATA = np.arange(8, dtype="<f4").tobytes()


def test_hand_made_gguf_reads(tmp_path):
    p = tmp_path / "hand.gguf"
    p.write_bytes(_gguf_bytes(kv=[(b"general.architecture", 8, _gguf_string(b"gemma3"))], tensors=ONE_F32, data=ONE_F32_DATA))
    with open_checkpoint(p) as ck:
        assert ck.tensors() == {"w": TensorInfo("w", (2, 4), "F32")}
        np.testing.assert_array_equal(ck.read("w"), np.arange(8, dtype=np.float32).reshape(2, 4))
        assert ck.metadata() == {"general.architecture": "gemma3"}


GGUF_CASES = {
    "bad_magic": (dict(magic=b"GGML"), ["not a GGUF file"]),
    "version_1": (dict(version=1), ["version 1"]),
    "big_endian": (dict(version=3 << 24), ["big-endian"]),
    "huge_counts": (dict(n_kv=2**60), ["claims"]),
    "unknown_value_type": (dict(kv=[(b"k", 99, b"")]), ["'k'", "unknown value type 99"]),
    "unknown_tensor_type": (dict(tensors=[(b"w", (4, 2), 250, 0)], data=ONE_F32_DATA), ["'w'", "ggml type 250"]),
    "too_many_dims": (dict(tensors=[(b"w", (1, 1, 1, 1, 8), int(Q.F32), 0)], data=ONE_F32_DATA), ["5 dimensions"]),
    "misaligned": (dict(tensors=[(b"w", (2,), int(Q.F32), 4)], data=ONE_F32_DATA), ["alignment"]),
    "block_mismatch": (dict(tensors=[(b"w", (20, 1), int(Q.Q8_0), 0)], data=b"\0" * 64), ["block of 32"]),
    "overlap": (dict(tensors=[(b"a", (8,), int(Q.F32), 0), (b"b", (8,), int(Q.F32), 0)], data=b"\0" * 32), ["overlaps"]),
    "duplicate_tensor": (dict(tensors=[(b"a", (2,), int(Q.F32), 0), (b"a", (2,), int(Q.F32), 32)], data=b"\0" * 40), ["twice"]),
    "duplicate_key": (dict(kv=[(b"k", 4, b"\1\0\0\0"), (b"k", 4, b"\1\0\0\0")]), ["'k'", "twice"]),
    "bad_alignment": (dict(kv=[(b"general.alignment", 4, struct.pack("<I", 3))]), ["power of two"]),
    "data_past_end": (dict(tensors=ONE_F32, data=ONE_F32_DATA[:20]), ["truncated", "'w'"]),
    "string_past_end": (dict(kv=[(b"k", 8, struct.pack("<Q", 1000) + b"abc")]), ["truncated", "'k'"]),
    "string_array_past_end": (dict(kv=[(b"toks", 9, struct.pack("<IQ", 8, 3) + _gguf_string(b"a"))]), ["truncated", "'toks'"]),
    "bad_utf8_key": (dict(kv=[(b"\xff\xfe", 4, b"\0\0\0\0")]), ["UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_corruption_raises_source_error(tmp_path, case):
    kwargs, needles = GGUF_CASES[case]
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(_gguf_bytes(**kwargs))
    _open_fails(p, *needles)


def test_gguf_bad_utf8_token_is_source_error_on_metadata(tmp_path):
    p = tmp_path / "tok.gguf"
    p.write_bytes(_gguf_bytes(kv=[(b"toks", 9, struct.pack("<IQ", 8, 2) + _gguf_string(b"ok") + _gguf_string(b"\xff"))]))
    with open_checkpoint(p) as ck, pytest.raises(SourceError, match="item 1 of metadata 'toks'") as exc:
        ck.metadata()
    assert p.name in str(exc.value)


def test_gguf_truncated_anywhere(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    # GGUFWriter pads the last tensor to the alignment, so cut at least 32 bytes off the end.
    for cut in [0, 3, 4, 10, 23, 24, 100, 500, len(data) // 2, len(data) - 40]:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        _open_fails(p, "truncated")


VALID_GGUF = _write_small_gguf(Path(tempfile.mkdtemp()) / "fuzz_src.gguf").read_bytes()


@FUZZ
@given(cut=st.integers(0, len(VALID_GGUF) - 1))
def test_fuzz_gguf_truncation(fuzz_dir, cut):
    _must_fail_cleanly(fuzz_dir / "t.gguf", VALID_GGUF[:cut])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_gguf_header_bytes(fuzz_dir, edits):
    data = bytearray(VALID_GGUF)
    for pos, b in edits:
        data[pos] = b
    _must_fail_cleanly(fuzz_dir / "h.gguf", bytes(data))


# --------------------------------------------------------------------------------------------
# open_checkpoint dispatch
# --------------------------------------------------------------------------------------------


def test_open_checkpoint_dispatch(tmp_path, small_gguf):
    st_path = tmp_path / "weights.bin"
    safetensors.numpy.save_file({"w": np.ones((2, 2), np.float32)}, str(st_path))
    with open_checkpoint(st_path) as ck:  # safetensors sniffed from its header
        assert isinstance(ck, SafetensorsCheckpoint)
    renamed = tmp_path / "model.bin"
    shutil.copy(small_gguf, renamed)
    with open_checkpoint(renamed) as ck:  # GGUF magic, any name
        assert isinstance(ck, GGUFCheckpoint)
    other = tmp_path / "pytorch_model.bin"
    other.write_bytes(b"PK\x03\x04 a torch zip")
    msg = _open_fails(other, ".safetensors", ".gguf")
    assert "directory" in msg
    _open_fails(tmp_path / "absent.gguf", "no such file")


# --------------------------------------------------------------------------------------------
# the real Gemma 3 270M GGUF (Q8_0, Q5_0, Q4_K, Q6_K, F32)
# --------------------------------------------------------------------------------------------


# ``real_gguf`` (the assembled file's path) is the session fixture in conftest.py.


def test_real_gguf_shapes_and_metadata(real_gguf):
    with open_checkpoint(real_gguf) as ck:
        t = ck.tensors()
        assert len(t) == 236
        assert t["token_embd.weight"] == TensorInfo("token_embd.weight", (262144, 640), "Q8_0")
        assert t["blk.0.attn_q.weight"] == TensorInfo("blk.0.attn_q.weight", (1024, 640), "Q5_0")
        assert t["blk.0.attn_k.weight"].shape == (256, 640)
        assert t["blk.0.attn_output.weight"] == TensorInfo("blk.0.attn_output.weight", (640, 1024), "Q4_K")
        assert t["blk.0.ffn_down.weight"] == TensorInfo("blk.0.ffn_down.weight", (640, 2048), "Q6_K")
        assert t["output_norm.weight"] == TensorInfo("output_norm.weight", (640,), "F32")
        m = ck.metadata()
        assert m["general.architecture"] == "gemma3" and m["gemma3.block_count"] == 18
        assert m["gemma3.embedding_length"] == 640
        tokens = m["tokenizer.ggml.tokens"]
        assert len(tokens) == 262144 and tokens[:3] == ["<pad>", "<eos>", "<bos>"]
        assert len(m["tokenizer.ggml.scores"]) == 262144


class _QuickVocabReader(gguf.GGUFReader):
    """gguf.GGUFReader, except that metadata arrays are kept as one blob instead of one numpy view per
    element: the stock reader needs ~15 s for Gemma's 262k-token vocabulary.  Tensor info and tensor
    data views are still built by gguf-py's own code, which is what the oracle below relies on.
    (Uses a private GGUFReader method; test_real_gguf_stock_reader checks the same with the stock reader.)"""

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        sub, count = struct.unpack_from("<IQ", self.data, orig_offs)
        pos = orig_offs + 12
        if sub == gguf.GGUFValueType.STRING:
            for _ in range(count):
                pos += 8 + struct.unpack_from("<Q", self.data, pos)[0]
        else:
            pos += count * np.dtype(self.gguf_scalar_to_np[gguf.GGUFValueType(sub)]).itemsize
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(sub)]
        return pos - orig_offs, [self.data[orig_offs:pos]], [], types


def _check_against_reader(ck: GGUFCheckpoint, reader) -> None:
    by_name = {t.name: t for t in reader.tensors}
    infos = ck.tensors()
    assert list(infos) == list(by_name)
    for name, rt in by_name.items():
        assert infos[name].shape == tuple(int(d) for d in reversed(rt.shape)), name
        assert infos[name].dtype == rt.tensor_type.name
        assert rt.data.shape[0] == infos[name].shape[0]  # [rows, bytes_per_row] for block types

    # token_embd (Q8_0): chunked reads equal the same rows of one bigger dequantize.
    emb = by_name["token_embd.weight"]
    block = gguf.quants.dequantize(emb.data[100_000:104_096], emb.tensor_type)  # [4096, 640]
    for r0, r1 in [(0, 1), (1, 700), (700, 4096), (2047, 2049)]:
        np.testing.assert_array_equal(ck.read("token_embd.weight", rows=(100_000 + r0, 100_000 + r1)), block[r0:r1])
    np.testing.assert_array_equal(ck.read("token_embd.weight", rows=(0, 3)), gguf.quants.dequantize(emb.data[:3], emb.tensor_type))
    last = gguf.quants.dequantize(emb.data[-3:], emb.tensor_type)
    np.testing.assert_array_equal(ck.read("token_embd.weight", rows=(262141, 262144)), last)

    # One tensor of each other type: Q5_0, Q4_K, Q6_K, F32 (and the last layer).
    for name in ("blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
                 "blk.3.attn_norm.weight", "blk.17.ffn_gate.weight"):
        rt = by_name[name]
        whole = np.asarray(gguf.quants.dequantize(rt.data, rt.tensor_type), np.float32)
        np.testing.assert_array_equal(ck.read(name), whole)
        np.testing.assert_array_equal(ck.read(name, rows=(5, 77)), whole[5:77])


def test_real_gguf_row_chunks_match_dequantize(real_gguf):
    """Tensor table and row-chunked reads agree with gguf-py's reader and gguf.quants.dequantize."""
    with GGUFCheckpoint(real_gguf) as ck:
        _check_against_reader(ck, _QuickVocabReader(real_gguf))


@pytest.mark.slow
def test_real_gguf_stock_reader(real_gguf):
    """The same with the unmodified gguf.GGUFReader (via the lazy ``reader`` attribute), plus metadata."""
    with GGUFCheckpoint(real_gguf) as ck:
        _check_against_reader(ck, ck.reader)
        meta = ck.metadata()
        for key, field in ck.reader.fields.items():
            if not key.startswith("GGUF."):
                assert meta[key] == field.contents(), key


def test_real_gguf_truncated_copy(real_gguf, tmp_path):
    p = tmp_path / "gemma-3-270m-truncated.gguf"
    with open(real_gguf, "rb") as f:
        p.write_bytes(f.read(1 << 20))
    msg = _open_fails(p, "truncated", "1048576 bytes")
    assert "tokenizer.ggml" in msg  # 1 MB ends inside the vocabulary


def test_real_gguf_row_reads_stay_small(real_gguf):
    """Opening and reading 64 rows of the 262144-row embedding allocates ~64 rows' worth, not the tensor."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with GGUFCheckpoint(real_gguf) as ck:
            open_peak = tracemalloc.get_traced_memory()[1] - base
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            rows = ck.read("token_embd.weight", rows=(5000, 5064))
            read_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert rows.shape == (64, 640)
    assert open_peak < 2 << 20, open_peak  # the whole header walk, vocabulary included
    assert read_peak < 2 << 20, read_peak  # 64 x 640 float32 = 160 KB (+ dequantize temporaries)


def test_reads_after_close_are_errors(tmp_path, small_gguf):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), str(path))
    for p in (path, small_gguf):
        ck = open_checkpoint(p)
        name = next(iter(ck.tensors()))
        ck.close()
        ck.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            ck.read(name)
