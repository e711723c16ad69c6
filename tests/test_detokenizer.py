"""StreamingDetokenizer: the invariant "".join(segments) + flush() == tokenizer.decode(ids).

The tokenizers are real SentencePiece models trained here (Gemma's settings: byte
fallback, no dummy prefix, identity normalization), small enough that CJK and
emoji only exist as byte-fallback pieces, wrapped in the runtime ``Tokenizer``.
A second model with ``add_dummy_prefix`` checks the first-token rule, and a
byte-level tokenizer whose decode is ``bytes.decode(errors="replace")`` checks the
other replacement policy.
"""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_edge.runtime.detokenizer import StreamingDetokenizer, _incomplete_tail_start
from gemma_edge.runtime.tokenizer import Tokenizer

SAMPLES = [
    "hello world",
    " leading space",
    "  two leading spaces\tand a tab",
    "日本語のテキスト",
    "数学是科学的皇后",
    "emoji 😀🎉 and a flag 🇯🇵 and skin tone 👍🏽",
    "café naïve résumé über",
    "line one\nline two\n\n\nafter blank lines\n",
    "mixed 中文, English, 한국어 and Ελληνικά 🚀\n",
    "",
    "\n",
    "🙂",
]


def _train(add_dummy_prefix: bool) -> bytes:
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog model token stream hello world café naïve".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(1500)]
    lines += ["a\tb  c", "x\n\ny"] * 30
    # CJK and emoji appear once each: below character_coverage, so only byte pieces cover them.
    lines += ["日本語 数学 😀 🎉"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=340,
        byte_fallback=True, character_coverage=0.999, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=["<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=["\n\n"], allow_whitespace_only_pieces=True, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def gemma_like() -> Tokenizer:
    return Tokenizer(_train(add_dummy_prefix=False))


@pytest.fixture(scope="module")
def dummy_prefix() -> Tokenizer:
    return Tokenizer(_train(add_dummy_prefix=True))


class ByteLevelTokenizer:
    """Pieces are arbitrary byte strings (some split characters); decode = bytes, errors='replace'."""

    def __init__(self):
        pieces = [b""] + [bytes([b]) for b in range(256)]
        for s in ["é", "日本", "語", "😀", " the", "ab"]:
            e = s.encode()
            pieces += [e, e[:-1], e[1:], e[:1]]  # whole, and cut at either end
        self.pieces = pieces
        self.vocab_size = len(pieces)

    def token_bytes(self, i: int) -> bytes:
        return self.pieces[i]

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(tokenizer, ids):
    d = StreamingDetokenizer(tokenizer)
    segments = [d.add(t) for t in ids]
    tail = d.flush()
    return d, segments, tail


def check_invariant(tokenizer, ids):
    d, segments, tail = stream(tokenizer, ids)
    expected = tokenizer.decode(ids)
    assert "".join(segments) + tail == expected, (ids, segments, tail)
    assert d.text == expected
    return segments


# ----------------------------------------------------------------------------- tests


def test_cjk_and_emoji_are_byte_fallback(gemma_like):
    """The test model really exercises byte pieces (otherwise the tests below prove little)."""
    ids = gemma_like.encode("日本語 😀", add_bos=False)
    pieces = [gemma_like.id_to_piece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) >= 13, pieces


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("add_bos", [False, True])
def test_invariant_on_encoded_text(gemma_like, dummy_prefix, text, add_bos):
    for tok in (gemma_like, dummy_prefix):
        ids = tok.encode(text, add_bos=add_bos)
        segments = check_invariant(tok, ids)
        assert "".join(segments) == tok.decode(ids)  # valid text: nothing left for flush
        assert not any("\ufffd" in s for s in segments), segments  # never half a character


def test_first_token_leading_space(gemma_like, dummy_prefix):
    """Gemma keeps the first piece's '▁'; a dummy-prefix model drops it; both match decode."""
    for tok in (gemma_like, dummy_prefix):
        space = tok.piece_to_id("\u2581")
        he, t = tok.piece_to_id("he"), tok.piece_to_id("\u2581t")
        for ids in ([space, he], [t, he], [tok.bos_id, t, he], [tok.bos_id, tok.bos_id, space],
                    [space, space], [tok.piece_to_id("<0xE6>"), space, he], [3, space], [3, t]):
            check_invariant(tok, ids)
    assert StreamingDetokenizer(gemma_like).add(gemma_like.piece_to_id("\u2581")) == " "


def test_segments_hold_back_only_the_incomplete_tail(gemma_like):
    """After each token the emitted text is exactly the complete characters so far."""
    for text in SAMPLES:
        ids = gemma_like.encode(text, add_bos=True)
        d = StreamingDetokenizer(gemma_like)
        data = b""
        for t in ids:
            d.add(t)
            data += gemma_like.token_bytes(t)
            complete = data[: _incomplete_tail_start(data)]
            assert d.text == complete.decode("utf-8")


def test_emoji_emitted_when_its_last_byte_arrives(gemma_like):
    ids = gemma_like.encode("😀", add_bos=False)
    assert [gemma_like.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    d = StreamingDetokenizer(gemma_like)
    assert [d.add(i) for i in ids] == ["", "", "", "😀"]
    assert d.flush() == ""


def test_incomplete_end_matches_decode(gemma_like):
    """A stream cut mid-character: flush renders it exactly as SentencePiece does (U+FFFD per byte)."""
    ids = gemma_like.encode("ok 😀", add_bos=False)[:-1]
    d, segments, tail = stream(gemma_like, ids)
    assert "".join(segments) == "ok "
    assert tail == gemma_like.decode(ids)[len("ok "):] == "\ufffd" * 3


def test_invalid_bytes_and_control_tokens_inside_a_character(gemma_like):
    b = lambda n: gemma_like.piece_to_id(f"<0x{n:02X}>")  # noqa: E731
    eot = gemma_like.piece_to_id("<end_of_turn>")
    for ids in (
        [b(0xE4), b(0xB8)] + gemma_like.encode("中x", add_bos=False),  # truncated then restarted
        [b(0xE4), eot, b(0xB8), b(0xAD)],  # a control token splits SentencePiece's byte group
        [b(0x80), b(0xBF), b(0xFF), b(0xC0), b(0xAF)],  # bytes that never start a character
        [b(0xED), b(0xA0), b(0x80)],  # a UTF-16 surrogate
        [b(0xE0), b(0x80), b(0xF4), b(0x90)],  # bad second bytes
        [b(0xF0), b(0x9F), b(0x98)],  # truncated at the end
    ):
        check_invariant(gemma_like, ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invariant_random_token_sequences(gemma_like, dummy_prefix, data):
    tok = data.draw(st.sampled_from([gemma_like, dummy_prefix]))
    n = tok.vocab_size
    byte_ids = [tok.piece_to_id(f"<0x{v:02X}>") for v in (0x20, 0x80, 0x9F, 0xBF, 0xC3, 0xA9, 0xE4, 0xB8, 0xAD, 0xF0, 0x98)]
    ids = data.draw(st.lists(st.one_of(st.integers(0, n - 1), st.sampled_from(byte_ids)), max_size=40))
    check_invariant(tok, ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab \n\t日本語数😀🎉éï中") + ["\U0001F1EF", "\u00e9"]), max_size=30))
def test_invariant_random_text(gemma_like, dummy_prefix, text):
    for tok in (gemma_like, dummy_prefix):
        segments = check_invariant(tok, tok.encode(text, add_bos=True))
        assert not any("\ufffd" in s for s in segments)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 256 + 24 - 1), max_size=30))
def test_invariant_byte_level_tokenizer(ids):
    """Pieces that split characters at both ends, and Python's errors='replace' policy."""
    check_invariant(ByteLevelTokenizer(), ids)


def test_reset_and_text(gemma_like):
    d = StreamingDetokenizer(gemma_like)
    for t in gemma_like.encode("hello 😀", add_bos=False)[:-2]:
        d.add(t)
    assert d.text == "hello "
    d.reset()
    assert d.text == "" and d.flush() == ""
    ids = gemma_like.encode("日本", add_bos=True)
    assert "".join(d.add(t) for t in ids) + d.flush() == "日本" == d.text


def test_constant_work_per_token(gemma_like):
    """O(1) per token: decode is only ever asked about a few ids at a time."""
    calls = []

    class Counting:
        def token_bytes(self, i):
            return gemma_like.token_bytes(i)

        def decode(self, ids):
            calls.append(len(ids))
            return gemma_like.decode(ids)

    ids = gemma_like.encode("the 日本語 fox 😀 café\n\n" * 200, add_bos=True)
    _, segments, tail = stream(Counting(), ids)
    assert "".join(segments) + tail == gemma_like.decode(ids)
    assert max(calls) <= 5 and sum(calls) <= 2 * len(ids)


@pytest.mark.slow
def test_invariant_on_the_real_gemma3_vocabulary(real_gguf):
    """262144 pieces with USER_DEFINED whitespace runs and the chat markers."""
    from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
    from gemma_edge.convert.gguf_tokenizer import sentencepiece_from_gguf

    tok = Tokenizer(sentencepiece_from_gguf(GGUFCheckpoint(real_gguf)))
    for text in SAMPLES + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀"]:
        segments = check_invariant(tok, tok.encode(text, add_bos=True, parse_special=True))
        assert not any("\ufffd" in s for s in segments)
    rng = random.Random(0)
    byte_ids = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(2000):
        n = rng.randint(1, 30)
        check_invariant(tok, [rng.randrange(tok.vocab_size) if rng.random() < 0.6 else rng.choice(byte_ids)
                              for _ in range(n)])
