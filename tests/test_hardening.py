"""Bad input through the console scripts: each case is one clear error, exit code 2, no traceback,
nothing on stdout and no output file (or temporary file) left behind.

Cases covered in other modules (not repeated here):

====================================================  ===============================================
bad input                                             covered by
====================================================  ===============================================
config.json of another architecture (model_type       test_cli.py::test_convert_unsupported_model_type
llama)
HF checkpoint missing a tensor                        test_cli.py::test_convert_checkpoint_missing_a_tensor
HF checkpoint without config.json / tokenizer.model   test_cli.py::test_convert_directory_without_config,
                                                      test_convert_missing_tokenizer
a .tflite that is not a gemma-edge file; random       test_cli.py::test_not_a_model_file
bytes; garbage behind a TFL3 identifier; no file
invalid UTF-8 in ``gemma-edge eval --text``           test_cli.py::test_eval_reports_the_api_perplexity
prompt over the context, empty prompt, bad sampling   test_cli.py::test_run_bad_input
every safetensors / GGUF header corruption, in        test_checkpoint.py::test_safetensors_corruption_*,
process (SourceError naming the file)                 test_gguf_corruption_raises_source_error, test_fuzz_*
malformed GGUF tokenizer arrays, in process           test_tokenizer.py::test_gguf_tokenizer_errors
mutated metadata of a model file, in process          test_units.py::test_metadata_reader_fuzz, test_fuzz.py
Ctrl-C during gemma-convert (no output, exit 130)      test_cli.py::test_convert_interrupted_leaves_nothing
a write that fails half way (disk full)               test_cli.py::test_convert_write_failure_keeps_old_file_...
a chat message longer than the context                test_chat_policy.py::test_a_message_longer_than_the_...
a malicious or broken jinja chat template             test_chat_policy.py::test_template_reaching_python_...,
                                                      test_model_with_a_malicious_template_uses_the_...
====================================================  ===============================================

Here: a truncated or bit-flipped GGUF (a small Gemma 3 GGUF written with gguf.GGUFWriter), a
truncated or bit-flipped safetensors, a safetensors header that lies about its offsets, a
Gemma config of another family or size than its weights, a GGUF missing a tensor, tokenizers
bigger than the model's vocabulary (convert and run), a gemma-edge file whose metadata JSON is
damaged (syntax, keys, values that lie about the graph), bit flips in its graph, a truncated
gemma-edge file, invalid UTF-8 prompts (stdin, argv, chat), and Ctrl-C during ``gemma-edge run``.

Cases marked xfail(strict=True) are bugs found here, with the fix described in the reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from test_cli import GEMMA_EDGE, PROMPT, assert_convert_failed, assert_user_error, cli, convert_cli
from test_runtime import tiny_gemma3

# ---- helpers: editing a gemma-edge file's metadata ---------------------------------------------


def _blob_fields(data: bytes, key: str) -> tuple[int, int]:
    """File positions of the Buffer.offset and Buffer.size fields of metadata entry ``key``."""
    from gemma_edge.runtime.modelfile import _FlatBuffer

    fbuf = _FlatBuffer(data, len(data))
    root = fbuf.u32(0)
    buffers = fbuf.table_vector(root, 4)  # Model.buffers
    for m in fbuf.table_vector(root, 6):  # Model.metadata
        if fbuf.string(m, 0) == key:
            b = buffers[fbuf.scalar(m, 1, "<I")]
            return fbuf.field(b, 1), fbuf.field(b, 2)
    raise KeyError(key)


def replace_blob(data: bytes, key: str, blob: bytes) -> bytes:
    """The model file with metadata entry ``key`` replaced by ``blob``: appended (64-byte aligned)
    at the end, its Buffer's offset and size patched in place, and the header checksum written
    again (as a converter that wrote this metadata would have); nothing else changes."""
    at_offset, at_size = _blob_fields(data, key)
    out = bytearray(data) + bytes(-len(data) % 64)
    struct.pack_into("<Q", out, at_offset, len(out))
    struct.pack_into("<Q", out, at_size, len(blob))
    return resign(bytes(out) + blob)


def resign(data: bytes) -> bytes:
    """``data`` with its checksums recomputed over its (edited) header and metadata, as a
    converter that wrote them would have (the weights' digest is kept: they are unchanged)."""
    import hashlib

    from gemma_edge.runtime.modelfile import CHECKSUMS_KEY, _parse, metadata_digest

    try:
        at_offset, _ = _blob_fields(data, CHECKSUMS_KEY)
    except KeyError:  # a file written without one
        return data
    where = struct.unpack_from("<Q", data, at_offset)[0]
    n = struct.unpack_from("<Q", data, where)[0]
    entries, _ = _parse(data, len(data))
    out = bytearray(data)
    out[where + 8:where + 40] = hashlib.sha256(bytes(data[:n])).digest()
    out[where + 40:where + 72] = metadata_digest(entries)
    return bytes(out)


def config_blob(data: bytes) -> tuple[int, bytes]:
    """(file offset, bytes) of the gemma_edge.config JSON."""
    from gemma_edge.runtime.modelfile import CONFIG_KEY

    at_offset, at_size = _blob_fields(data, CONFIG_KEY)
    offset, size = (struct.unpack_from("<Q", data, at)[0] for at in (at_offset, at_size))
    return offset, data[offset:offset + size]


def with_meta(data: bytes, edit) -> bytes:
    """The model file with its metadata dict passed through ``edit(meta) -> meta``."""
    from gemma_edge.runtime.modelfile import CONFIG_KEY

    meta = json.loads(config_blob(data)[1])
    return replace_blob(data, CONFIG_KEY, json.dumps(edit(meta), indent=1).encode())


def patch_config_text(data: bytes, old: bytes, new: bytes, sign: bool = True) -> bytes:
    """Replace ``old`` by ``new`` (same length) inside the metadata JSON, in place. ``sign``: the
    checksums are written again, as a converter with a bug would have written them (so what
    is tested is the reader's checks behind the checksum); without it, a damaged copy."""
    assert len(old) == len(new), (old, new)
    offset, blob = config_blob(data)
    at = blob.find(old)
    assert at >= 0, f"{old!r} not in the metadata"
    out = data[:offset + at] + new + data[offset + at + len(old):]
    return resign(out) if sign else out


# ---- helpers: a small Gemma 3 GGUF -------------------------------------------------------------

D, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 64, 2, 1, 16, 2
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
NORMAL = ["\u2581", "a", "b", "c", "e", "h", "l", "m", "o", "t", "\u2581the", "\u2581model", "he", "th"]


def gguf_vocab() -> tuple[list[str], list[float], list[int]]:
    """Gemma's layout in small: control pieces, 256 byte pieces, scored normal pieces."""
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + NORMAL
    types = [3] * len(SPECIALS) + [6] * 256 + [1] * len(NORMAL)
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(NORMAL))]
    return tokens, scores, types


def gguf_tensors(vocab_rows: int) -> dict[str, np.ndarray]:
    """Every tensor of a Gemma 3 GGUF of LAYERS layers, in numpy (row-major) order."""
    rng = np.random.default_rng(0)
    w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    out = {"token_embd.weight": w(vocab_rows, D), "output_norm.weight": w(D)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        out |= {p + "attn_norm.weight": w(D), p + "attn_q.weight": w(HEADS * HEAD_DIM, D),
                p + "attn_k.weight": w(KV_HEADS * HEAD_DIM, D), p + "attn_v.weight": w(KV_HEADS * HEAD_DIM, D),
                p + "attn_output.weight": w(D, HEADS * HEAD_DIM), p + "ffn_norm.weight": w(D),
                p + "ffn_gate.weight": w(FFN, D), p + "ffn_up.weight": w(FFN, D), p + "ffn_down.weight": w(D, FFN),
                p + "post_attention_norm.weight": w(D), p + "post_ffw_norm.weight": w(D),
                p + "attn_q_norm.weight": w(HEAD_DIM), p + "attn_k_norm.weight": w(HEAD_DIM)}
    return out


def write_gemma3_gguf(path: Path, *, drop=(), vocab_rows: int | None = None, chat_template: str | None = None) -> Path:
    """A small but complete Gemma 3 GGUF (metadata, SentencePiece vocabulary, every tensor)."""
    import gguf

    toks, scores, types = gguf_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    if chat_template is not None:
        w.add_string("tokenizer.chat_template", chat_template)
    for name, a in gguf_tensors(vocab_rows or len(toks)).items():
        if name not in drop:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_field(data: bytes, key: bytes) -> int:
    """Position of the value-type field of metadata ``key`` (the value follows it)."""
    at = data.find(struct.pack("<Q", len(key)) + key)
    assert at > 0, key
    return at + 8 + len(key)


def gguf_tensor_info(data: bytes, name: bytes) -> int:
    """Position of the n_dims field of tensor ``name``'s info (shape, type, offset follow)."""
    at = data.find(struct.pack("<Q", len(name)) + name)
    assert at > 0, name
    return at + 8 + len(name)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model_path):
    return tiny_gemma3(tmp_path_factory, sp_model_path)


@pytest.fixture(scope="module")
def model_bytes(tiny) -> bytes:
    return tiny.model_file.read_bytes()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """The small Gemma 3 GGUF, checked to be a valid source up to the point of writing
    (config, tokenizer, name map, shapes), so the errors below come from the damage alone."""
    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.runtime.contract import weight_shapes

    path = write_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "small-gemma3.gguf")
    src = Source(str(path))
    try:
        assert (src.config.family, src.config.num_layers, src.config.vocab_size) == (3, LAYERS, 276)
        src.check_shapes(weight_shapes(src.config))
        assert src.tokenizer.vocab_size == 276 and src.tokenizer.piece_to_id("<end_of_turn>") == 5
    finally:
        src.close()
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.tflite"


def convert_fails(source: Path, out: Path, *needles: str, names_file: bool = True) -> str:
    """gemma-convert exits 2 with one message naming ``needles`` (and the damaged file: errors of the
    config, name map and tokenizer name what disagrees instead), and leaves no file behind."""
    return assert_convert_failed(convert_cli(source, out), out, *([str(source)] if names_file else []), *needles)


# ---- gemma-convert: a damaged GGUF -------------------------------------------------------------


def _cut_in_tokens(d: bytes) -> int:
    return gguf_field(d, b"tokenizer.ggml.tokens") + 2000


def _cut_in_tensor_infos(d: bytes) -> int:
    return gguf_tensor_info(d, b"blk.1.ffn_up.weight")


GGUF_CUTS = {"in_header": lambda d: 20, "in_vocabulary": _cut_in_tokens,
             "in_tensor_table": _cut_in_tensor_infos, "in_tensor_data": lambda d: len(d) - 100}


@pytest.mark.parametrize("where", sorted(GGUF_CUTS))
def test_convert_truncated_gguf(small_gguf, tmp_path, out, where):
    data = small_gguf.read_bytes()
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(data[:GGUF_CUTS[where](data)])
    convert_fails(bad, out, "truncated")


def _set(at_fn, fmt: str, value):
    def edit(d: bytearray) -> None:
        struct.pack_into(fmt, d, at_fn(d), value)
    return edit


def _flip_in(pattern: bytes, new: bytes):
    def edit(d: bytearray) -> None:
        at = bytes(d).find(pattern)
        assert at > 0, pattern
        d[at:at + len(new)] = new
    return edit


_Q = b"blk.0.attn_q.weight"
GGUF_FLIPS = {
    # name: (edit of the bytes, words the message must contain); the last three damage the model
    # description rather than the file format, and their messages name what disagrees, not the file
    "magic": (lambda d: d.__setitem__(0, ord("g")), ["not a GGUF file"]),
    "version": (lambda d: d.__setitem__(6, 0x40), ["version"]),
    "tensor_count": (lambda d: d.__setitem__(14, 0x10), ["claims"]),
    "value_type": (_set(lambda d: gguf_field(bytes(d), b"general.architecture"), "<I", 99), ["unknown value type 99"]),
    "key_length": (_set(lambda d: 24, "<Q", 1 << 40), ["truncated"]),
    "token_not_utf8": (_flip_in("\u2581model".encode(), b"\xff"), ["UTF-8"]),
    "n_dims": (_set(lambda d: gguf_tensor_info(bytes(d), _Q), "<I", 9), ["9 dimensions"]),
    "tensor_type": (_set(lambda d: gguf_tensor_info(bytes(d), _Q) + 4 + 16, "<I", 200), ["ggml type 200"]),
    "tensor_offset": (_set(lambda d: gguf_tensor_info(bytes(d), _Q) + 4 + 16 + 4, "<Q", 4), ["alignment"]),
    "architecture": (_set(lambda d: gguf_field(bytes(d), b"general.architecture") + 4 + 8 + 4, "<B", ord("b")),
                     ["'gemmb3'", "gemma3"]),
    "block_count": (_set(lambda d: gguf_field(bytes(d), b"gemma3.block_count") + 4, "<I", 3),
                    ["missing", "blk.2.attn_q.weight"]),
    "embedding_length": (_set(lambda d: gguf_field(bytes(d), b"gemma3.embedding_length") + 4, "<I", 48),
                         ["disagree", "token_embd.weight"]),
}
_DESCRIPTION_FLIPS = {"architecture", "block_count", "embedding_length", "head_count_kv_zero", "head_count_zero"}
GGUF_FLIPS_BUGS = {
    # found here: a zero head count divided by zero in gguf_checkpoint.config_from_gguf (now a typed error)
    "head_count_kv_zero": (_set(lambda d: gguf_field(bytes(d), b"gemma3.attention.head_count_kv") + 4, "<I", 0),
                           ["head_count_kv"]),
    "head_count_zero": (_set(lambda d: gguf_field(bytes(d), b"gemma3.attention.head_count") + 4, "<I", 0),
                        ["head_count"]),
}

@pytest.mark.parametrize("flip", sorted(GGUF_FLIPS) +
                         [k for k in sorted(GGUF_FLIPS_BUGS)])
def test_convert_bit_flipped_gguf(small_gguf, tmp_path, out, flip):
    edit, needles = {**GGUF_FLIPS, **GGUF_FLIPS_BUGS}[flip]
    data = bytearray(small_gguf.read_bytes())
    edit(data)
    bad = tmp_path / f"flip-{flip}.gguf"
    bad.write_bytes(bytes(data))
    convert_fails(bad, out, *needles, names_file=flip not in _DESCRIPTION_FLIPS)


def test_convert_gguf_missing_a_tensor(tmp_path, out):
    gone = "blk.1.ffn_up.weight"
    src = write_gemma3_gguf(tmp_path / "missing.gguf", drop=[gone])
    assert_convert_failed(convert_cli(src, out), out, gone, "missing")


def test_convert_gguf_tokenizer_bigger_than_the_embedding(tmp_path, out):
    src = write_gemma3_gguf(tmp_path / "bigvocab.gguf", vocab_rows=200)  # 276 tokens, 200 embedding rows
    assert_convert_failed(convert_cli(src, out), out, "276 pieces", "200 rows")


# ---- gemma-convert: a damaged safetensors checkpoint ---------------------------------------------


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint, d)
    return d


def _header(st: Path) -> tuple[int, dict, bytes]:
    raw = st.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(st: Path, header: dict, data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    st.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


@pytest.mark.parametrize("cut", ["header_length", "header", "data"])
def test_convert_truncated_safetensors(ckpt, out, cut):
    st = ckpt / "model.safetensors"
    raw = st.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    st.write_bytes(raw[:{"header_length": 5, "header": 8 + n // 2, "data": len(raw) - 1000}[cut]])
    convert_fails(ckpt, out, "model.safetensors", "truncated" if cut != "header" else "header length")


@pytest.mark.parametrize("flip,needles", [
    ("brace", ["not valid JSON"]),  # '{' -> '['
    ("dtype", ["'G32'"]),  # "F32" -> "G32"
    ("shape_digit", ["needs", "span"]),  # a shape of 64 -> 74: the data no longer matches
    ("length_high_byte", ["header length"]),
])
def test_convert_bit_flipped_safetensors_header(ckpt, out, flip, needles):
    st = ckpt / "model.safetensors"
    raw = bytearray(st.read_bytes())
    n = struct.unpack_from("<Q", raw)[0]
    header = bytes(raw[8:8 + n])
    if flip == "brace":
        raw[8] = ord("[")
    elif flip == "dtype":
        at = 8 + header.find(b'"F32"') + 1
        raw[at] = ord("G")
    elif flip == "shape_digit":
        at = 8 + header.find(b'"shape":[64,')
        assert at > 8, header[:200]
        raw[at + len(b'"shape":[')] = ord("7")
    else:
        raw[6] = 0x01
    st.write_bytes(bytes(raw))
    convert_fails(ckpt, out, "model.safetensors", *needles)


@pytest.mark.parametrize("lie,needles", [
    ("overlap", ["overlap"]),
    ("past_the_end", ["truncated"]),
    ("wrong_span", ["needs", "span"]),
])
def test_convert_safetensors_header_lies_about_offsets(ckpt, out, lie, needles):
    st = ckpt / "model.safetensors"
    _, header, data = _header(st)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    if lie == "overlap":  # b starts inside a, same length
        span = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][1] - 4, a["data_offsets"][1] - 4 + span]
    elif lie == "past_the_end":  # the last tensor moved past the data
        last = header[names[-1]]
        span = last["data_offsets"][1] - last["data_offsets"][0]
        last["data_offsets"] = [len(data) + 64, len(data) + 64 + span]
    else:
        a["data_offsets"][1] += 4
    _write_header(st, header, data)
    convert_fails(ckpt, out, "model.safetensors", *needles)


def test_convert_config_of_another_gemma_family(ckpt, out):
    """A Gemma 2 config.json next to Gemma 3 weights: the name map reports what does not fit."""
    config = json.loads((ckpt / "config.json").read_text())
    config |= {"model_type": "gemma2", "layer_types": None, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    convert_fails(ckpt, out, "q_norm", "not used by a Gemma 2 model", names_file=False)


def test_convert_config_of_another_size(ckpt, out):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    convert_fails(ckpt, out, "disagree", "gate_proj", "(96, 64)", names_file=False)


def _bigger_tokenizer(model_proto: bytes, extra: int) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = pb.ModelProto()
    p.ParseFromString(model_proto)
    for i in range(extra):
        p.pieces.add(piece=f"zzq{i}", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    return p.SerializeToString()


def test_convert_tokenizer_bigger_than_the_model(ckpt, out):
    tok = ckpt / "tokenizer.model"
    tok.write_bytes(_bigger_tokenizer(tok.read_bytes(), 200))  # 600 pieces, 512 embedding rows
    convert_fails(ckpt, out, "600 pieces", "512 rows", names_file=False)


# ---- gemma-edge: a damaged model file ----------------------------------------------------------


def _model_file(tmp_path: Path, data: bytes, name: str = "bad.tflite") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


JSON_FLIPS = {
    # name: (old, new) inside the metadata JSON, the words the message must contain
    "syntax": (b'{\n "format"', b'[\n "format"', ["metadata is corrupt"]),
    "quote": (b'"context_length"', b"'context_length\"", ["metadata is corrupt"]),
    "key": (b'"context_length"', b'"context_lengtx"', ["metadata is corrupt", "context_length"]),
    "format": (b'"gemma-edge",', b'"gemma-edgf",', ["metadata is corrupt", "gemma-edgf"]),
    "format_version": (b'"format_version": 2', b'"format_version": 9', ["format 9", "upgrade gemma-edge"]),
    "not_utf8": (b'"gemma-edge",', b'"gemma-ed\xff\xfe",', ["metadata is corrupt", "UnicodeDecodeError"]),
    "number": (b'"context_length": 64', b'"context_length": 6x', ["metadata is corrupt"]),
}
JSON_FLIPS_BUGS = {
    # read_info re-raises the config's UnsupportedModelError as is: the message names no file and
    # blames "the checkpoint's config.json". Fix: wrap it in ModelFileError naming the path (report).
    "layer_count": (b'"num_layers": 4', b'"num_layers": 9', ["4 layer types for 9 layers"]),
}

@pytest.mark.parametrize("command", [["info"], ["run", "-p", PROMPT, "-n", "2"]], ids=["info", "run"])
@pytest.mark.parametrize("flip", sorted(JSON_FLIPS) + [k for k in JSON_FLIPS_BUGS])
def test_corrupt_metadata_json(model_bytes, tmp_path, command, flip):
    old, new, needles = {**JSON_FLIPS, **JSON_FLIPS_BUGS}[flip]
    bad = _model_file(tmp_path, patch_config_text(model_bytes, old, new))
    assert_user_error(cli(GEMMA_EDGE, command[0], bad, *command[1:]), "gemma-edge", str(bad), *needles)



METADATA_LIES = {
    # values that parse, but disagree with the graph the file holds (the backend checks them)
    "context_length": ((b'"context_length": 64', b'"context_length": 94'), ["context"]),
    "head_dim": ((b'"head_dim": 16', b'"head_dim": 99'), ["head_dim"]),
    "vocab_size": ((b'"vocab_size": 512', b'"vocab_size": 999'), ["vocab"]),
    "prefill_lengths": ((b'"prefill_lengths": [\n  8,', b'"prefill_lengths": [\n  9,'), ["prefill_9"]),
}
METADATA_ZERO = {"num_kv_heads_zero": ((b'"num_kv_heads": 2', b'"num_kv_heads": 0'), ["num_kv_heads"])}


@pytest.mark.parametrize("lie", sorted(METADATA_LIES) + sorted(METADATA_ZERO))
def test_metadata_that_lies_about_the_graph(model_bytes, tmp_path, lie):
    (old, new), needles = {**METADATA_LIES, **METADATA_ZERO}[lie]
    bad = _model_file(tmp_path, patch_config_text(model_bytes, old, new))
    prompt = "the model and the cache and the model and the cache and more"  # long enough for a prefill chunk
    assert_user_error(cli(GEMMA_EDGE, "run", bad, "-p", prompt, "-n", "2", "-t", "0"), "gemma-edge", str(bad), *needles)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_model_file(model_bytes, tmp_path, keep):
    bad = _model_file(tmp_path, model_bytes[:int(len(model_bytes) * keep)])
    assert_user_error(cli(GEMMA_EDGE, "run", bad, "-p", PROMPT, "-n", "2"), "gemma-edge", str(bad), "truncated")


def test_run_tokenizer_bigger_than_the_model(model_bytes, tmp_path):
    from gemma_edge.runtime.modelfile import TOKENIZER_KEY, read_info

    tok = read_info(str(_model_file(tmp_path, model_bytes, "ok.tflite"))).tokenizer_model
    bad = _model_file(tmp_path, replace_blob(model_bytes, TOKENIZER_KEY, _bigger_tokenizer(tok, 200)))
    assert read_info(str(bad)).config.vocab_size == 512
    proc = cli(GEMMA_EDGE, "run", bad, "-p", "zzq150 the model", "-n", "2", "-t", "0")
    assert_user_error(proc, "gemma-edge", str(bad), "600", "512")


def test_bit_flipped_graph_is_an_error_not_a_crash(model_bytes, tmp_path):
    """LiteRT does not verify the flatbuffer it loads: before the header checksum, 31 of 80 random
    1-3 bit flips in the graph region made `gemma-edge run` die with SIGSEGV. Now read_info checks
    the header's sha256 first: each flip is a clear error, exit code 2."""
    import random

    from gemma_edge.runtime.modelfile import _FlatBuffer

    fbuf = _FlatBuffer(model_bytes, len(model_bytes))
    buffers = fbuf.table_vector(fbuf.u32(0), 4)
    header = min(o for o in (fbuf.scalar(b, 1, "<Q") for b in buffers) if o > 1)  # where the data starts
    rng = random.Random(0)
    for k in range(10):
        data = bytearray(model_bytes)
        for _ in range(2):
            data[rng.randrange(8, header)] ^= 1 << rng.randrange(8)
        bad = _model_file(tmp_path, bytes(data), f"flip{k}.tflite")
        proc = cli(GEMMA_EDGE, "run", bad, "-p", PROMPT, "-n", "3", "-t", "0")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (k, proc.returncode, proc.stderr[-300:])
        assert "damaged" in proc.stderr or "corrupt" in proc.stderr or "outside" in proc.stderr, proc.stderr


def test_replace_blob_keeps_the_file_valid(model_bytes, tmp_path):
    """The helper above: a file whose metadata was rewritten (same content) still runs."""
    p = _model_file(tmp_path, with_meta(model_bytes, lambda m: m), "same.tflite")
    proc = cli(GEMMA_EDGE, "run", p, "-p", PROMPT, "-n", "3", "-t", "0")
    ref = cli(GEMMA_EDGE, "run", _model_file(tmp_path, model_bytes, "ref.tflite"), "-p", PROMPT, "-n", "3", "-t", "0")
    assert proc.returncode == 0 and proc.stdout == ref.stdout and proc.stdout.strip(), proc.stderr


# ---- gemma-edge: prompts that are not UTF-8 --------------------------------------------------------

NOT_UTF8 = b"caf\xe9 the model"


def test_run_prompt_on_stdin_not_utf8(tiny):
    proc = subprocess.run([GEMMA_EDGE, "run", str(tiny.model_file), "-p", "-"], input=NOT_UTF8,
                          capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and proc.stdout == b"", err
    assert err.startswith("gemma-edge: error: ") and "not valid UTF-8 (byte 3)" in err



@pytest.mark.parametrize("option", ["-p", "--system"])
def test_run_prompt_in_argv_not_utf8(tiny, option):
    args = [GEMMA_EDGE.encode(), b"run", bytes(tiny.model_file), b"-n", b"2"]
    args += [b"-p", NOT_UTF8] if option == "-p" else [b"--system", NOT_UTF8, b"-p", b"the model"]
    proc = subprocess.run(args, capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in err and proc.stdout == b"", err
    assert "UTF-8" in err


def test_chat_line_not_utf8(tiny):
    """One bad line in an interactive chat: an error for that line, not a traceback."""
    proc = subprocess.run([GEMMA_EDGE, "chat", str(tiny.model_file), "-n", "2"], input=NOT_UTF8 + b"\n",
                          capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "UTF-8" in err, err


# ---- Ctrl-C during gemma-edge run ------------------------------------------------------------------

# runtime/cli.py `run` treats Ctrl-C as "stop the answer": the text so far, a newline, exit 130
# (as gemma-convert and shells do for SIGINT).
RUN_INTERRUPTED_EXIT = 130


def test_sigint_during_generation_ends_the_stream_cleanly(tiny):
    """SIGINT while `gemma-edge run` streams: the text so far (a prefix of the full answer), then a
    newline, no traceback. The child is made to wait inside its output loop, deterministically: its
    stdout is a pipe filled to one byte short of full, so the first token it prints blocks in
    write() until the test reads; SIGINT arrives there."""
    if not Path("/proc/self/wchan").exists():
        pytest.skip("needs /proc/<pid>/wchan to see the child blocked in its output")
    path = str(tiny.model_file)
    args = [GEMMA_EDGE, "run", path, "-p", PROMPT, "-t", "0", "-n", "1000"]
    full = cli(*args)
    assert full.returncode == 0 and len(full.stdout) > 20, full.stderr  # the uninterrupted answer

    r, w = os.pipe()
    proc = None
    try:
        size = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
        os.set_blocking(w, False)
        filler = b"F" * (size - 1)
        assert os.write(w, filler) == len(filler)
        os.set_blocking(w, True)  # the child's writes must wait, not fail
        proc = subprocess.Popen(args, stdout=w, stderr=subprocess.PIPE, start_new_session=True)
        os.close(w)
        w = -1
        deadline = time.monotonic() + 300  # a hang guard: loading is slow on a loaded machine
        while "pipe_write" not in Path(f"/proc/{proc.pid}/wchan").read_text():
            assert proc.poll() is None, "run ended without blocking on its output"
            assert time.monotonic() < deadline, "run never started printing"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        stderr = proc.communicate(timeout=300)[1].decode()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    out = b"".join(chunks)
    assert out.startswith(filler)
    text = out[len(filler):].decode()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert proc.returncode == RUN_INTERRUPTED_EXIT, (proc.returncode, stderr)
    assert text.endswith("\n")
    partial = text[:-1]
    answer = full.stdout[:-1]
    assert answer.startswith(partial) and len(partial) < len(answer), (partial, answer)
