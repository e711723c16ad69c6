"""Rebuild a SentencePiece model from the tokenizer a GGUF file carries.

A Gemma GGUF stores its SentencePiece vocabulary as three parallel arrays
(``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``) plus a few scalars.
``sentencepiece_from_gguf`` turns them back into a serialized ``ModelProto`` that
``sentencepiece.SentencePieceProcessor`` loads and that encodes and decodes like
llama.cpp does with the same file (checked against llama.cpp's own output in
``tests/test_tokenizer.py``).

What has to be undone or filled in, because the GGUF converter changed it or
never stored it:

* ``<unk>`` is stored as CONTROL (the HF converter marks every "special" added
  token CONTROL); SentencePiece needs exactly one UNKNOWN piece, so the piece at
  ``unknown_token_id`` becomes UNKNOWN.
* USER_DEFINED pieces are stored with real spaces (``"  "``) because llama.cpp
  matches them against the raw text.  SentencePiece matches them after it has
  escaped spaces to ``▁``, so their spaces go back to ``▁``.
* The normalizer is the identity: no NFKC charsmap, no dummy prefix (unless the
  GGUF says ``add_space_prefix``), no collapsing of repeated whitespace; spaces
  are escaped to ``▁`` as in every SentencePiece model.  That keeps leading
  spaces, tabs and newline runs exactly as llama.cpp does.
* bos/eos/pad/unk piece names come from the GGUF ids.  SentencePiece's defaults
  (``<s>``, ``</s>``) would be wrong: in Gemma 3 those are USER_DEFINED HTML tags.

Sources: a ``GGUFCheckpoint`` (preferred) is read through its ``metadata()``, the
metadata already decoded to Python values by our fast header parser (~0.1 s for
Gemma 3's 262k-token vocabulary); its ``reader`` is never built.  A
``gguf.GGUFReader`` works too (~15 s to open the same file).  Both are turned into
the same key -> Python value view (strings, ints, floats, bools, lists) and go
through one validation, so they give byte-identical models and identical errors.
Types are therefore checked by kind (string / integer / float / bool / array),
which is all ``metadata()`` keeps: any GGUF integer type is accepted where an
integer is expected, float32 or float64 where a float is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from gguf import GGUFReader, GGUFValueType
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_edge.runtime.errors import SourceError, TokenizerError

from .gguf_checkpoint import GGUFCheckpoint

__all__ = ["GGUF_TO_SP_TYPE", "sentencepiece_from_gguf"]

_Piece = sp_pb2.ModelProto.SentencePiece

# GGUF ``tokenizer.ggml.token_type`` value -> SentencePiece piece type.
# (llama.cpp's LLAMA_TOKEN_TYPE_* were copied from SentencePiece, so the numbers
# coincide; the table keeps the mapping explicit and rejects anything else,
# e.g. 0 = "undefined".)
GGUF_TO_SP_TYPE: dict[int, int] = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}

_SPACE = " "
_ESCAPED_SPACE = "\u2581"  # '▁', SentencePiece's whitespace symbol
_HINT = "re-convert the checkpoint with llama.cpp's convert_hf_to_gguf.py, or convert from the HF directory (which carries tokenizer.model) instead"
_TOKENS = "tokenizer.ggml.tokens"

# Value kinds, named as in error messages.  A metadata value is a Python object
# (GGUFCheckpoint.metadata() decodes every GGUF integer type to int, both float
# types to float, BOOL to bool, STRING to str and ARRAY to list), so the kind is
# its exact Python type (``bool`` is not an integer here).
_STRING, _INTEGER, _FLOAT, _BOOL, _ARRAY = "STRING", "integer", "float", "BOOL", "ARRAY"
_KIND_OF_TYPE = {str: _STRING, int: _INTEGER, float: _FLOAT, bool: _BOOL, list: _ARRAY}


def _kind(value: object) -> str:
    return _KIND_OF_TYPE.get(type(value), type(value).__name__)


def _item_kinds(values: list) -> set[str]:
    return {_KIND_OF_TYPE.get(t, t.__name__) for t in set(map(type, values))}  # ~5 ms for 262k items


def _describe(value: object) -> str:
    """``'STRING with 1 value(s)'``, ``'ARRAY of integer with 5 value(s)'``, ``'empty ARRAY with 0 value(s)'``."""
    if not isinstance(value, list):
        return f"{_kind(value)} with 1 value(s)"
    kinds = sorted(_item_kinds(value))
    what = f"ARRAY of {'|'.join(kinds)}" if kinds else "empty ARRAY"
    return f"{what} with {len(value)} value(s)"


# ---------------------------------------------------------------------------- sources


class _ReaderFields(Mapping):
    """A ``GGUFReader``'s fields as key -> Python value, decoded on access the way
    ``GGUFCheckpoint.metadata()`` decodes them (so both sources look alike)."""

    def __init__(self, reader: GGUFReader):
        self._fields = reader.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, key: str) -> object:
        field = self._fields[key]
        vtype = field.types[0] if field.types else None
        if vtype == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        if vtype != GGUFValueType.ARRAY:
            return field.parts[field.data[0]][0].item()  # np.bool_ -> bool, integers -> int, floats -> float
        count = int(field.parts[4][0])  # parts = [key length, key, ARRAY, item type, item count, items...]
        if count == 0:
            return []
        sub = field.types[1]
        if sub == GGUFValueType.ARRAY:
            # The reader flattens nested arrays; no tokenizer key is one, so their shape
            # is enough (ARRAY of ARRAY with ``count`` values, as metadata() reports them).
            return [[] for _ in range(count)]
        if sub != GGUFValueType.STRING:
            # Each item is its own one-value memmap part; one concatenate is ~0.1 s for 262k.
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
        out: list[str] = []
        for i in field.data:
            raw = bytes(field.parts[i])
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                what = f"token {len(out)}" if key == _TOKENS else f"{key!r} item {len(out)}"
                raise TokenizerError(f"GGUF {what} is not valid UTF-8 ({raw[:32]!r}): {_HINT}") from None
        return out


def _fields_of(source: GGUFCheckpoint | GGUFReader) -> Mapping[str, object]:
    if isinstance(source, GGUFCheckpoint):
        try:
            return source.metadata()
        except SourceError as e:  # e.g. a token that is not valid UTF-8
            raise TokenizerError(f"cannot decode the GGUF metadata, so its tokenizer is unusable: {e}") from e
    if isinstance(source, GGUFReader):
        return _ReaderFields(source)
    raise TypeError(f"sentencepiece_from_gguf takes a GGUFCheckpoint or a gguf.GGUFReader, not {type(source).__name__}")


# ------------------------------------------------------------------------- validation

_MISSING = object()


def _get(fields: Mapping[str, object], key: str, *, required: bool = True) -> object:
    value = fields.get(key, _MISSING)
    if value is _MISSING and required:
        present = sorted(k for k in fields if k.startswith("tokenizer."))
        raise TokenizerError(
            f"GGUF has no {key!r} (tokenizer keys present: {present or 'none'}); "
            f"the file carries no usable SentencePiece tokenizer: {_HINT}"
        )
    return value


def _scalar(fields: Mapping[str, object], key: str, kind: str, *, required: bool = True):
    """The value of ``key``, one ``kind`` (not an array); None if absent and not required."""
    value = _get(fields, key, required=required)
    if value is _MISSING:
        return None
    if _kind(value) != kind:
        raise TokenizerError(f"GGUF {key!r} is {_describe(value)}, expected one {kind}: {_HINT}")
    return value


def _array(fields: Mapping[str, object], key: str, kind: str) -> list:
    """The value of ``key``, an array whose items are all ``kind`` (an empty array qualifies)."""
    value = _get(fields, key)
    if not isinstance(value, list) or not _item_kinds(value) <= {kind}:
        raise TokenizerError(f"GGUF {key!r} is {_describe(value)}, expected ARRAY of {kind}: {_HINT}")
    return value


def _special_id(fields: Mapping[str, object], key: str, n_vocab: int, *, required: bool) -> int:
    value = _scalar(fields, key, _INTEGER, required=required)
    if value is None:
        return -1
    if not 0 <= value < n_vocab:
        raise TokenizerError(f"GGUF {key!r} is {value}, outside the vocabulary of {n_vocab} tokens: {_HINT}")
    return int(value)


# ---------------------------------------------------------------------------- rebuild


def sentencepiece_from_gguf(source: GGUFCheckpoint | GGUFReader) -> bytes:
    """Returns a serialized SentencePiece ``ModelProto`` equivalent to the GGUF's tokenizer.

    ``source`` is a ``GGUFCheckpoint`` (fast: its ``metadata()`` is used and its
    ``reader`` is never built) or a ``gguf.GGUFReader``; both give identical bytes.
    Raises ``TokenizerError`` if the GGUF has no SentencePiece ("llama") tokenizer or
    its tokenizer fields are missing, of the wrong type or inconsistent.
    """
    fields = _fields_of(source)
    model = _scalar(fields, "tokenizer.ggml.model", _STRING)
    if model not in ("llama", "gemma4"):
        raise TokenizerError(
            f"GGUF tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece, Gemma 1-3) or 'gemma4' "
            f"(BPE with merges); this is not a Gemma tokenizer: {_HINT}"
        )

    tokens: list[str] = _array(fields, _TOKENS, _STRING)
    if model == "gemma4":  # the merge list orders BPE: scores that make SentencePiece merge in its order
        from .hf_tokenizer import merge_scores, piece_score

        merges = _array(fields, "tokenizer.ggml.merges", _STRING)
        by_merge = merge_scores(merges)
        scores = np.asarray([piece_score(by_merge, t, len(merges)) for t in tokens], dtype=np.float32)
    else:
        scores = np.asarray(_array(fields, "tokenizer.ggml.scores", _FLOAT), dtype=np.float32)  # [V]
    token_types: list[int] = _array(fields, "tokenizer.ggml.token_type", _INTEGER)  # [V]
    n_vocab = len(tokens)
    if n_vocab == 0:
        raise TokenizerError(f"GGUF tokenizer.ggml.tokens is empty: {_HINT}")
    if len(scores) != n_vocab or len(token_types) != n_vocab:
        raise TokenizerError(
            f"GGUF tokenizer arrays disagree: {n_vocab} tokens, {len(scores)} scores, "
            f"{len(token_types)} token types; the file is corrupt: {_HINT}"
        )
    bad_types = sorted(set(token_types) - GGUF_TO_SP_TYPE.keys())
    if bad_types:
        first = next(i for i, t in enumerate(token_types) if t not in GGUF_TO_SP_TYPE)
        raise TokenizerError(
            f"GGUF tokenizer.ggml.token_type has unknown value(s) {bad_types} (first at token {first}); "
            f"known types are {sorted(GGUF_TO_SP_TYPE)}: {_HINT}"
        )

    unk_id = _special_id(fields, "tokenizer.ggml.unknown_token_id", n_vocab, required=True)
    bos_id = _special_id(fields, "tokenizer.ggml.bos_token_id", n_vocab, required=True)
    eos_id = _special_id(fields, "tokenizer.ggml.eos_token_id", n_vocab, required=True)
    pad_id = _special_id(fields, "tokenizer.ggml.padding_token_id", n_vocab, required=False)
    # llama.cpp defaults add_space_prefix to true when the key is absent, but every Gemma
    # tokenizer is trained without a dummy prefix and every Gemma GGUF writes the key False.
    add_space_prefix = _scalar(fields, "tokenizer.ggml.add_space_prefix", _BOOL, required=False)

    other_unknown = [i for i, t in enumerate(token_types) if t == 2 and i != unk_id]
    if other_unknown:
        raise TokenizerError(
            f"GGUF marks tokens {other_unknown[:5]} UNKNOWN besides unknown_token_id {unk_id}; "
            f"SentencePiece allows exactly one: {_HINT}"
        )

    pieces = list(tokens)  # a copy: metadata() is cached, and USER_DEFINED pieces are rewritten below
    sp_types = [GGUF_TO_SP_TYPE[t] for t in token_types]
    sp_types[unk_id] = _Piece.UNKNOWN
    n_bytes = 0
    for i, t in enumerate(sp_types):
        if t == _Piece.USER_DEFINED:
            pieces[i] = pieces[i].replace(_SPACE, _ESCAPED_SPACE)
        elif t == _Piece.BYTE:
            n_bytes += 1
    if n_bytes not in (0, 256):
        raise TokenizerError(f"GGUF has {n_bytes} byte tokens <0x00>..<0xFF>, expected 256 or none: {_HINT}")
    if "" in pieces:
        raise TokenizerError(f"GGUF token {pieces.index('')} is the empty string: {_HINT}")
    if len(set(pieces)) != n_vocab:
        seen: set[str] = set()
        dups = [p for p in pieces if p in seen or seen.add(p)]
        raise TokenizerError(f"GGUF vocabulary has {len(dups)} duplicate token(s), e.g. {dups[:3]!r}: {_HINT}")

    proto = sp_pb2.ModelProto()
    score_list = scores.tolist()
    proto.pieces.extend(
        _Piece(piece=p, score=s, type=t) for p, s, t in zip(pieces, score_list, sp_types)
    )

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = n_vocab
    trainer.byte_fallback = n_bytes == 256
    # Descriptive only (SentencePiece consults them when training, not when encoding);
    # they record how Gemma's tokenizer was trained.
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    trainer.unk_piece = pieces[unk_id]
    trainer.bos_piece = pieces[bos_id]
    trainer.eos_piece = pieces[eos_id]
    if pad_id >= 0:
        trainer.pad_piece = pieces[pad_id]

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.precompiled_charsmap = b""
    normalizer.add_dummy_prefix = bool(add_space_prefix)
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    model_proto = proto.SerializeToString()
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, ValueError) as e:
        raise TokenizerError(f"SentencePiece rejects the tokenizer rebuilt from the GGUF ({e}): {_HINT}") from None
    return model_proto
