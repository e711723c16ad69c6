"""A SentencePiece model rebuilt from a Hugging Face ``tokenizer.json`` (Gemma 4's checkpoints
ship no ``tokenizer.model``).

gemma-edge embeds a SentencePiece model in every file (the runtime needs only the small
``sentencepiece`` package, and LiteRT-LM reads the same model). Gemma's ``tokenizer.json`` is a
byte-fallback BPE over the whole text, with spaces replaced by ``▁`` and no pre-tokenizer:
exactly what a SentencePiece BPE model computes, once

* every piece keeps its id;
* a piece made by merge number r scores -r, so SentencePiece (which merges the adjacent pair
  whose result scores highest) merges in the order of the merge list;
* ``<0xNN>`` pieces are BYTE pieces (byte fallback), ``unk_token`` the UNKNOWN piece, special
  added tokens CONTROL pieces (cut out of prompts by ``Tokenizer.encode(parse_special=True)``
  as llama.cpp does), other added tokens USER_DEFINED (matched literally);
* the normalizer only escapes spaces (no dummy prefix, no whitespace folding).

Anything else (another model type, a pre-tokenizer that splits the text, a normalizer that does
more than the space replacement, a byte-level alphabet) is refused with a TokenizerError: its
encodings would differ. ``tests/test_tokenizer.py`` checks the result against the ``tokenizers``
library on the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime.errors import TokenizerError

_SPACE = "\u2581"


def _fail(path, why: str) -> TokenizerError:
    return TokenizerError(f"{path}: {why}. gemma-edge rebuilds Gemma's byte-fallback BPE tokenizer from "
                          "tokenizer.json; put the checkpoint's tokenizer.model beside it instead if it has one")


def _check_normalizer(path, norm) -> None:
    steps = norm.get("normalizers", [norm]) if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    for step in steps:
        if step is None:
            continue
        ok = (isinstance(step, dict) and step.get("type") == "Replace" and step.get("pattern") == {"String": " "}
              and step.get("content") == _SPACE)
        if not ok:
            raise _fail(path, f"its normalizer {json.dumps(step)[:120]} does more than replace spaces with '▁'")


def _check_pre_tokenizer(path, pre) -> None:
    """None, or transformers' Split on " ": a no-op once the normalizer has replaced every space."""
    if pre is None or (isinstance(pre, dict) and pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        return
    raise _fail(path, f"its pre-tokenizer {json.dumps(pre)[:120]} splits the text before BPE")


def sentencepiece_from_tokenizer_json(path: str | Path) -> bytes:
    """The serialized SentencePiece ModelProto equivalent to ``path`` (a tokenizer.json)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(path, f"it cannot be read as JSON ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise _fail(path, f"its model is {model.get('type') if isinstance(model, dict) else model!r}, not BPE")
    if not model.get("byte_fallback"):
        raise _fail(path, "it has no byte fallback")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _fail(path, "it uses subword prefixes or suffixes")
    _check_normalizer(path, doc.get("normalizer"))
    _check_pre_tokenizer(path, doc.get("pre_tokenizer"))
    vocab, merges = model.get("vocab"), model.get("merges") or []
    if not isinstance(vocab, dict) or not vocab or not isinstance(merges, list):
        raise _fail(path, "its vocabulary or merge list is missing")
    added = {a["content"]: a for a in doc.get("added_tokens") or [] if isinstance(a, dict) and "content" in a}
    by_id: dict[int, str] = {}
    for piece, i in list(vocab.items()) + [(a["content"], a.get("id")) for a in added.values()]:
        if not isinstance(i, int) or i < 0 or i > 10_000_000:
            raise _fail(path, f"piece {piece!r} has id {i!r}")
        if by_id.get(i, piece) != piece:
            raise _fail(path, f"id {i} names two pieces, {by_id[i]!r} and {piece!r}")
        by_id[i] = piece
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise _fail(path, f"ids {missing[:5]} have no piece ({len(missing)} in all)")

    score = merge_scores(merges)
    unk = model.get("unk_token")
    Piece = sp_pb2.ModelProto.SentencePiece
    proto = sp_pb2.ModelProto()
    for i in range(n):
        piece = by_id[i]
        p = proto.pieces.add()
        p.piece = piece
        a = added.get(piece)
        if piece == unk:
            p.type = Piece.UNKNOWN
        elif a is not None and a.get("special"):
            p.type = Piece.CONTROL
        elif a is not None:
            p.type = Piece.USER_DEFINED
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            p.type = Piece.BYTE
        else:
            p.type = Piece.NORMAL
            # single characters (never made by a merge) rank below every merge result
            p.score = piece_score(score, piece, len(merges))
    if sum(p.type == Piece.BYTE for p in proto.pieces) != 256:
        raise _fail(path, "it lacks the 256 <0xNN> byte pieces of byte fallback")
    if unk is None or unk not in vocab:
        raise _fail(path, f"its unk_token {unk!r} is not in the vocabulary")
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = True
    spec.unk_id = vocab[unk]
    for field, names in (("bos_id", ("<bos>",)), ("eos_id", ("<eos>",)), ("pad_id", ("<pad>",))):
        ids = [by_id_rev for name in names if (by_id_rev := _id_of(by_id, name)) is not None]
        setattr(spec, field, ids[0] if ids else -1)
    for field in ("bos_piece", "eos_piece", "pad_piece", "unk_piece"):
        pid = getattr(spec, field.replace("_piece", "_id"))
        if pid >= 0:
            setattr(spec, field, by_id[pid])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def merge_scores(merges) -> dict[str, float]:
    """piece -> -rank of the first merge that makes it: a SentencePiece BPE model with these
    scores merges in the merge list's order (the one place this mapping lives; the GGUF
    rebuild of Gemma 4's tokenizer uses it too)."""
    score: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        parts = merge.split(" ", 1) if isinstance(merge, str) else merge
        if len(parts) != 2:
            raise TokenizerError(f"merge #{rank} {merge!r} is not two pieces")
        score.setdefault(parts[0] + parts[1], -float(rank))
    return score


def piece_score(score: dict[str, float], piece: str, n_merges: int) -> float:
    """Single characters (never made by a merge) 0; pieces no merge makes rank below every merge."""
    return score.get(piece, -float(n_merges + 1) if len(piece) > 1 else 0.0)


def _id_of(by_id: dict[int, str], piece: str) -> int | None:
    return next((i for i, p in by_id.items() if p == piece), None)
