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
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFValueType
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_edge.runtime.errors import TokenizerError

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

_INTEGER_TYPES = (
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
)
_FLOAT_TYPES = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)


def _type_name(field) -> str:
    return "/".join(t.name for t in field.types) or "no type"


def _get_field(reader: GGUFReader, key: str, *, required: bool = True):
    field = reader.fields.get(key)
    if field is None and required:
        present = sorted(k for k in reader.fields if k.startswith("tokenizer."))
        raise TokenizerError(
            f"GGUF has no {key!r} (tokenizer keys present: {present or 'none'}); "
            f"the file carries no usable SentencePiece tokenizer: {_HINT}"
        )
    return field


def _scalar(reader: GGUFReader, key: str, allowed: tuple, *, required: bool = True):
    field = _get_field(reader, key, required=required)
    if field is None:
        return None
    if len(field.types) != 1 or field.types[0] not in allowed or len(field.data) != 1:
        raise TokenizerError(
            f"GGUF {key!r} is {_type_name(field)} with {len(field.data)} value(s), "
            f"expected one {'/'.join(t.name for t in allowed)}: {_HINT}"
        )
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    if field.types[0] == GGUFValueType.BOOL:
        return bool(part[0])
    return part[0].item()


def _array(reader: GGUFReader, key: str, allowed: tuple):
    """Returns the field of an ARRAY of one of ``allowed`` element types."""
    field = _get_field(reader, key)
    if len(field.types) != 2 or field.types[0] != GGUFValueType.ARRAY or field.types[1] not in allowed:
        raise TokenizerError(
            f"GGUF {key!r} is {_type_name(field)}, expected ARRAY/"
            f"{'|'.join(t.name for t in allowed)}: {_HINT}"
        )
    return field


def _numeric_array(reader: GGUFReader, key: str, allowed: tuple, dtype) -> np.ndarray:
    field = _array(reader, key, allowed)
    if not field.data:
        return np.zeros(0, dtype=dtype)
    # Each element is its own one-value memmap part; one concatenate is ~0.1 s for 262k.
    return np.concatenate([field.parts[i] for i in field.data]).astype(dtype)  # [V]


def _special_id(reader: GGUFReader, key: str, n_vocab: int, *, required: bool) -> int:
    value = _scalar(reader, key, _INTEGER_TYPES, required=required)
    if value is None:
        return -1
    if not 0 <= value < n_vocab:
        raise TokenizerError(f"GGUF {key!r} is {value}, outside the vocabulary of {n_vocab} tokens: {_HINT}")
    return int(value)


def sentencepiece_from_gguf(reader: GGUFReader) -> bytes:
    """Returns a serialized SentencePiece ``ModelProto`` equivalent to the GGUF's tokenizer.

    Raises ``TokenizerError`` if the GGUF has no SentencePiece ("llama") tokenizer or
    its tokenizer fields are missing, of the wrong type or inconsistent.
    """
    model = _scalar(reader, "tokenizer.ggml.model", (GGUFValueType.STRING,))
    if model != "llama":
        raise TokenizerError(
            f"GGUF tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece, as in every Gemma GGUF); "
            f"this is not a Gemma tokenizer: {_HINT}"
        )

    token_field = _array(reader, "tokenizer.ggml.tokens", (GGUFValueType.STRING,))
    scores = _numeric_array(reader, "tokenizer.ggml.scores", _FLOAT_TYPES, np.float32)  # [V]
    token_types = _numeric_array(reader, "tokenizer.ggml.token_type", _INTEGER_TYPES, np.int64)  # [V]
    n_vocab = len(token_field.data)
    if n_vocab == 0:
        raise TokenizerError(f"GGUF tokenizer.ggml.tokens is empty: {_HINT}")
    if len(scores) != n_vocab or len(token_types) != n_vocab:
        raise TokenizerError(
            f"GGUF tokenizer arrays disagree: {n_vocab} tokens, {len(scores)} scores, "
            f"{len(token_types)} token types; the file is corrupt: {_HINT}"
        )
    bad_types = sorted(set(np.unique(token_types).tolist()) - GGUF_TO_SP_TYPE.keys())
    if bad_types:
        first = int(np.flatnonzero(np.isin(token_types, bad_types))[0])
        raise TokenizerError(
            f"GGUF tokenizer.ggml.token_type has unknown value(s) {bad_types} (first at token {first}); "
            f"known types are {sorted(GGUF_TO_SP_TYPE)}: {_HINT}"
        )

    unk_id = _special_id(reader, "tokenizer.ggml.unknown_token_id", n_vocab, required=True)
    bos_id = _special_id(reader, "tokenizer.ggml.bos_token_id", n_vocab, required=True)
    eos_id = _special_id(reader, "tokenizer.ggml.eos_token_id", n_vocab, required=True)
    pad_id = _special_id(reader, "tokenizer.ggml.padding_token_id", n_vocab, required=False)
    # llama.cpp defaults add_space_prefix to true when the key is absent, but every Gemma
    # tokenizer is trained without a dummy prefix and every Gemma GGUF writes the key False.
    add_space_prefix = _scalar(reader, "tokenizer.ggml.add_space_prefix", (GGUFValueType.BOOL,), required=False)

    other_unknown = np.flatnonzero(token_types == 2)
    other_unknown = other_unknown[other_unknown != unk_id]
    if len(other_unknown):
        raise TokenizerError(
            f"GGUF marks tokens {other_unknown[:5].tolist()} UNKNOWN besides unknown_token_id {unk_id}; "
            f"SentencePiece allows exactly one: {_HINT}"
        )

    pieces: list[str] = []
    for i in token_field.data:
        raw = bytes(token_field.parts[i])
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenizerError(
                f"GGUF token {len(pieces)} is not valid UTF-8 ({raw[:32]!r}): {_HINT}"
            ) from None

    sp_types = [GGUF_TO_SP_TYPE[t] for t in token_types.tolist()]
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
