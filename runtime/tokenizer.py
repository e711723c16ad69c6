"""The runtime tokenizer: SentencePiece plus llama.cpp-style special-token parsing.

Only SentencePiece is needed here (no TensorFlow, protobuf or gguf), so
it runs on a Raspberry Pi.  The model bytes are a serialized SentencePiece
``ModelProto``: Gemma's ``tokenizer.model``, one rebuilt from a GGUF by
``gemma_edge.convert.gguf_tokenizer``, or one trained in a test.

Special tokens are discovered from the model, never hard-coded: every CONTROL
piece (``<bos>``, ``<eos>``, ``<start_of_turn>``, ...) and the UNKNOWN piece.
SentencePiece never produces them from text; ``encode(..., parse_special=True)``
cuts them out of the text first, exactly as llama.cpp's special-token partition
does (longest special first, every occurrence).  USER_DEFINED pieces (Gemma 3's
newline/space/tab runs, HTML tags) need no help: SentencePiece always matches
them literally, as llama.cpp does.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections.abc import Callable, Iterable
from functools import cached_property

from gemma_edge.runtime.errors import TokenizerError

__all__ = ["Tokenizer"]

_ESCAPED_SPACE = "\u2581"  # '▁', SentencePiece's whitespace symbol


class Tokenizer:
    """A SentencePiece tokenizer built from serialized model bytes."""

    def __init__(self, model_proto: bytes, special_ids: Iterable[int] | None = None,
                 model_proto_source: Callable[[], bytes] | None = None, vocab=None):
        """``special_ids``: the ids of this model's CONTROL pieces and its UNKNOWN piece, as a
        gemma-edge file records them (``control_ids`` of the Tokenizer it was written with); a
        load then checks those ids instead of testing every piece. A list that does not match
        the model is ignored. ``model_proto_source``: returns these bytes again when asked
        (``model_proto``), so the Tokenizer need not keep them (a loaded file's, 5 MB for Gemma).
        ``vocab``: this model's ``vocab.Vocab``, which then encodes and decodes in place of
        SentencePiece (the same results, in a fifth of its memory); with both, ``model_proto``
        may be None (not read until asked)."""
        if not (model_proto is None and vocab is not None and model_proto_source is not None):
            if not isinstance(model_proto, (bytes, bytearray, memoryview)):
                raise TokenizerError(
                    f"Tokenizer needs the serialized SentencePiece model as bytes, got {type(model_proto).__name__}; "
                    f"use Tokenizer.from_file(path) for a tokenizer.model file"
                )
            model_proto = bytes(model_proto)
            if not model_proto:
                raise TokenizerError(
                    "the tokenizer model is empty (0 bytes); the model file carries no tokenizer, re-run gemma-convert"
                )
        sp = vocab
        if sp is None:
            from sentencepiece import SentencePieceProcessor  # not imported with a vocabulary: 6 MB, 13 ms

            sp = SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(model_proto)
            except (RuntimeError, ValueError, OSError) as e:
                raise TokenizerError(
                    f"the tokenizer model ({len(model_proto)} bytes) is not a valid SentencePiece model ({e}); "
                    f"re-run gemma-convert, or pass Gemma's tokenizer.model"
                ) from None
        self._sp = sp
        self._model_proto = None if model_proto_source else model_proto
        self._model_proto_source = model_proto_source
        self._vocab_size = sp.GetPieceSize()
        if self._vocab_size <= 0:
            raise TokenizerError("the tokenizer model has no pieces; re-run gemma-convert")

        # Control and unknown pieces: the strings parse_special turns into ids.
        native = getattr(sp, "_processor", sp)  # the bound native methods: half the time of the wrappers'
        unk = sp.unk_id()
        ids = list(special_ids) if special_ids is not None else []
        ids = sorted(set(ids)) if all(type(i) is int for i in ids) else []  # anything else: not this model's
        has_unk = not 0 <= unk < self._vocab_size or unk in ids  # the full test below always finds it
        if not (ids and has_unk and all(0 <= i < self._vocab_size and (i == unk or native.IsControl(i)) for i in ids)):
            # One pass of the bound native IsControl over every id (map + compress, no Python-level
            # test per id: 0.03 s for Gemma 3's 262k pieces, against 0.04 s testing IsControl and
            # IsUnknown in a loop); SentencePiece models have exactly one UNKNOWN piece, unk_id.
            ids = list(itertools.compress(range(self._vocab_size), map(native.IsControl, range(self._vocab_size))))
            if 0 <= unk < self._vocab_size and not native.IsControl(unk):
                bisect.insort(ids, unk)
        self._control_ids = tuple(ids)
        specials: dict[str, int] = {}
        for i in ids:
            piece = sp.IdToPiece(i)
            if piece:
                specials.setdefault(piece, i)
        self._special_ids = frozenset(specials.values())
        self._specials = specials
        # where a special may start: its first character -> the lengths of those starting with it,
        # longest first (so a scan tries the longest match first, as llama.cpp's partition does)
        by_first: dict[str, set[int]] = {}
        for piece in specials:
            by_first.setdefault(piece[0], set()).add(len(piece))
        self._special_lengths = {c: sorted(n, reverse=True) for c, n in by_first.items()}
        self._special_start = re.compile("[" + "".join(re.escape(c) for c in by_first) + "]") if by_first else None
        self._token_bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a SentencePiece ``.model`` file."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TokenizerError(
                f"cannot read tokenizer file {os.fspath(path)!r} ({e.strerror or e}); "
                f"pass the path of a SentencePiece tokenizer.model"
            ) from None
        return cls(data)

    # -- facts ------------------------------------------------------------------

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model this tokenizer was built from."""
        return self._model_proto if self._model_proto is not None else self._model_proto_source()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the model has none."""
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the model has none."""
        return _optional_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None if the model has none."""
        return _optional_id(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control and unknown pieces (those ``parse_special`` recognizes)."""
        return self._special_ids

    @property
    def control_ids(self) -> tuple[int, ...]:
        """Every CONTROL piece's id and the UNKNOWN piece's, ascending (what ``special_ids=``
        takes): ``special_ids`` less the pieces whose text is empty or repeats an earlier one."""
        return self._control_ids

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- encode / decode --------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, with ``<bos>`` first if ``add_bos``.

        With ``parse_special`` the literal strings of control tokens (``<start_of_turn>``,
        ``<bos>``, ...) become their ids and the text between them is encoded normally;
        without it they are encoded as plain text.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, kept by surrogateescape
            raise TokenizerError(f"the text is not valid UTF-8 (character {e.start}: {text[e.start:e.end]!r}); it "
                                 "was read from bytes in another encoding: convert them to UTF-8") from None
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no <bos> piece; call encode(..., add_bos=False)")
            ids.append(self.bos_id)
        if not parse_special:
            ids.extend(self._sp.EncodeAsIds(text))
            return ids
        for fragment in self.split_special(text):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._sp.EncodeAsIds(fragment))
        return ids

    def split_special(self, text: str) -> list[str | int]:
        """Text fragments and special ids, in order: every control string in ``text`` becomes its
        id, leftmost first and the longest at each place (llama.cpp's ``tokenizer_st_partition``
        gives the same for Gemma's control pieces, none of which overlaps another).

        Linear in the text: a position is tried only where a control piece could start, against
        the few lengths such pieces have (an 8 MB prompt takes milliseconds, not minutes)."""
        if self._special_start is None:
            return [text] if text else []
        out: list[str | int] = []
        specials, lengths = self._specials, self._special_lengths
        start = pos = 0
        find = self._special_start.search
        while (m := find(text, pos)) is not None:
            at = m.start()
            for n in lengths[text[at]]:
                token_id = specials.get(text[at:at + n])
                if token_id is not None:
                    if at > start:
                        out.append(text[start:at])
                    out.append(token_id)
                    start = pos = at + n
                    break
            else:
                pos = at + 1
        if start < len(text):
            out.append(text[start:])
        return out

    @cached_property
    def max_piece_bytes(self) -> int:
        """The most UTF-8 bytes one token can stand for (a control string counts as its text):
        no text longer than ``n * max_piece_bytes`` bytes encodes to n tokens or fewer."""
        sp = self._sp
        if not any(sp.IsByte(i) for i in range(self._vocab_size)):
            return 1 << 40  # no byte fallback: a run of unknown characters is one <unk> token, unbounded
        return max(1, max(len(sp.IdToPiece(i).encode("utf-8")) for i in range(self._vocab_size)))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control tokens (bos, eos, turn markers) decode to ''."""
        ids = [self._check_id(i) for i in ids]
        return self._sp.DecodeIds(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (spaces shown as '▁', bytes as '<0xNN>')."""
        return self._sp.IdToPiece(self._check_id(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        """Id of the vocabulary entry ``piece``, or None if there is none."""
        token_id = self._sp.PieceToId(piece)
        if token_id == self._sp.unk_id() and piece != self._sp.IdToPiece(token_id):
            return None
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes ``token_id`` contributes when decoded in the middle of a sequence.

        A byte-fallback piece ``<0xNN>`` gives that one byte (possibly part of a UTF-8
        character), '▁' gives a space, control tokens give b''.  Concatenating these for
        a sequence and decoding the result as UTF-8 gives ``decode(ids)`` whenever the
        byte pieces form whole characters (and the model adds no dummy prefix).
        """
        token_id = self._check_id(token_id)
        cached = self._token_bytes_cache.get(token_id)
        if cached is not None:
            return cached
        sp = self._sp
        if sp.IsControl(token_id):
            out = b""
        elif sp.IsByte(token_id):
            out = bytes([int(sp.IdToPiece(token_id)[3:5], 16)])
        elif sp.IsUnknown(token_id):
            out = sp.DecodeIds([token_id]).encode("utf-8")  # the model's unk_surface
        else:
            out = sp.IdToPiece(token_id).replace(_ESCAPED_SPACE, " ").encode("utf-8")
        self._token_bytes_cache[token_id] = out
        return out

    def _check_id(self, token_id) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < self._vocab_size or i != token_id:
            raise TokenizerError(
                f"token id {token_id!r} is outside the vocabulary [0, {self._vocab_size}); "
                f"the ids do not come from this tokenizer's model"
            )
        return i

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, specials={len(self._special_ids)})"
        )


def _optional_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
