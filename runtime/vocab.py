"""A compact vocabulary for SentencePiece BPE tokenizers like Gemma's: SentencePiece's encoding
and decoding from a few arrays, in a fifth of the memory SentencePiece takes.

SentencePiece parses the model into one protobuf message per piece and a hash map over them:
43 MB of the runtime's memory for Gemma's 262,144 pieces (``benchmarks/tokenizer_memory.py``),
in every process, for a model whose serialized form is 5 MB. ``Vocab`` holds the same pieces as
one UTF-8 blob with offsets, their scores and types, and a sorted CRC-32 index for looking a
piece up: 8 MB. It answers the calls ``Tokenizer`` makes of a ``SentencePieceProcessor``
(``EncodeAsIds``, ``DecodeIds``, ``IdToPiece``, ``PieceToId``, ``IsControl``, ...) with
SentencePiece's results:

- encoding is SentencePiece's BPE (``bpe_model.cc``): spaces become '▁'; the text is cut into
  symbols, a user-defined piece where one starts (the longest) and one character elsewhere;
  then the adjacent pair whose concatenation is a piece of the highest score is merged, the
  leftmost first on a tie, until no pair is a piece; a symbol that is no piece becomes its UTF-8
  bytes' ``<0xNN>`` pieces (byte fallback). The text is encoded in segments, cut before a '▁'
  that no piece joins to the character before it (for Gemma: every '▁' but those after another
  '▁' or a '>'); no merge can cross such a cut, so the result is the whole text's, and repeated
  segments (words) come from a cache;
- decoding gives control pieces no text, the unknown piece the model's ``unk_surface``, a run
  of byte pieces its UTF-8 characters with U+FFFD for each byte that starts none, and every
  other piece its text with '▁' as a space.

Only models whose encoding is exactly that are taken (``build`` returns None for the others,
which keep SentencePiece): BPE, byte fallback, no normalization but the space escape (no
precompiled character map, no dummy prefix, extra whitespace kept), no unused pieces. A build
also encodes and decodes a set of texts both ways and takes the tables only if every result is
SentencePiece's.

The tables are derived once per model and kept beside its XNNPACK weight cache
(``weight_cache.vocab_for``): a later load reads them (checked against their CRC-32) instead of
parsing the model.
"""

from __future__ import annotations

import heapq
import json
import re
import struct
import zlib
from array import array
from bisect import bisect_left

__all__ = ["Vocab", "build"]

MAGIC = b"GEVOCAB1"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
_SPACE = "\u2581"
_UNK_SURFACE = " \u2047 "  # TrainerSpec.unk_surface's default
_CACHE_WORDS = 16384  # segments whose ids are kept (a few MB at most: only those of _WORD_CHARS or fewer)
_WORD_CHARS = 64
_CACHE_PAIRS = 16384  # strings looked up as pieces, and what they are

# Texts a build encodes and decodes both ways: every path of the encoder (spaces and their runs,
# tabs, newlines, user-defined runs and tags, digits, accents, CJK, emoji, byte fallback of rare
# characters, control-piece strings as plain text, '▁' itself in the input).
_SELF_TEST = [
    "Hello, world! The quick brown fox jumps over the lazy dog.", "  two  spaces   and three\t\ttabs\n\n\nend ",
    "<h1>Title</h1>\n<div class=\"x\">a > b</div>", "1234567890 3.14159 2026-12-07", "naïve café Ünïcödé ﬁ Ω",
    "日本語のテキストです。中文也可以。한국어", "emoji 😀👍🏽 🏳️‍🌈 and \u0000 \x7f", "x\u2581y \u2581\u2581 z", "\u3000\xa0\u200b",
    "<start_of_turn>user\nhi<end_of_turn>", "def f(x):\n    return x ** 2  # square\n", "a" * 50 + " " * 20 + "b",
    "\U0001F9EC\U00010348 \uFFFD", "",
]


class Vocab:
    """The tables of one SentencePiece BPE model (``build``'s bytes), answering as a
    ``SentencePieceProcessor`` of that model does."""

    def __init__(self, data):
        """``data``: ``build``'s bytes, or a read-only memory map of a file holding them. The tables
        are views of it, not copies: mapped, they are clean file pages that processes share and the
        kernel can drop, not anonymous memory (once a text has touched them they count in RSS all
        the same: on the development machine one sentence made 6.6 of Gemma's 6.8 MB resident)."""
        if data[:8] != MAGIC:
            raise ValueError("not a gemma-edge vocabulary")
        (n_head,) = struct.unpack_from("<I", data, 8)
        head = json.loads(bytes(data[12:12 + n_head]))
        at = 12 + n_head
        view = memoryview(data)
        arrays = {}
        for name, code, count in head["arrays"]:
            size = array(code).itemsize * count
            if at + size > len(view):
                raise ValueError(f"the vocabulary's {name} is cut short")
            arrays[name] = view[at:at + size].cast(code)
            at += size
        self._blob = view[at:at + head["blob"]]
        if len(self._blob) != head["blob"] or at + head["blob"] != len(data):
            raise ValueError("the vocabulary's size does not match its header")
        self._off, self._scores, self._types = arrays["offsets"], arrays["scores"], arrays["types"]
        self._keys, self._key_ids = arrays["keys"], arrays["key_ids"]
        self._n = len(self._types)
        self._ids = {k: head[k] for k in ("bos", "eos", "pad", "unk")}
        self._unk_surface = head["unk_surface"]
        # control, unknown and byte pieces, by their text (in the head, so that a mapped file's tables
        # are not read at load: Gemma's 6505 are spread over all of them; a file kept before has ids only)
        names = head.get("reserved_pieces") or [self.IdToPiece(i) for i in head["reserved"]]
        self._reserved = dict(zip(names, head["reserved"]))
        self._byte_id = [self._reserved[f"<0x{b:02X}>"] for b in range(256)]
        self._byte_of = {i: b for b, i in enumerate(self._byte_id)}
        user = sorted(head.get("user_pieces") or map(self.IdToPiece, head["user"]), key=len, reverse=True)
        self._user = re.compile("|".join(map(re.escape, user))) if user else None
        joins = head["joins"]  # characters some piece joins to a following '▁'
        self._cut = re.compile(f"(?<=[^{re.escape(_SPACE + joins)}])(?={_SPACE})")
        self._words: dict[str, tuple[int, ...]] = {}
        self._seen: dict[str, int] = {}

    # -- what Tokenizer asks of a SentencePieceProcessor ------------------------------------

    def GetPieceSize(self) -> int:
        return self._n

    def bos_id(self) -> int:
        return self._ids["bos"]

    def eos_id(self) -> int:
        return self._ids["eos"]

    def pad_id(self) -> int:
        return self._ids["pad"]

    def unk_id(self) -> int:
        return self._ids["unk"]

    def IsControl(self, i: int) -> bool:
        return self._types[i] == CONTROL

    def IsByte(self, i: int) -> bool:
        return self._types[i] == BYTE

    def IsUnknown(self, i: int) -> bool:
        return self._types[i] == UNKNOWN

    def IdToPiece(self, i):
        if isinstance(i, list):
            return [self.IdToPiece(j) for j in i]
        return str(self._blob[self._off[i]:self._off[i + 1]], "utf-8")

    def PieceToId(self, piece: str) -> int:
        i = self._reserved.get(piece)
        if i is None:
            i = self._lookup(piece)
        return self._ids["unk"] if i < 0 else i

    def EncodeAsIds(self, text: str) -> list[int]:
        out: list[int] = []
        words = self._words
        for seg in self._cut.split(text.replace(" ", _SPACE)):
            ids = words.get(seg)
            if ids is None:
                ids = self._encode(seg)
                if len(seg) <= _WORD_CHARS:  # a word; a long run without spaces is not kept
                    if len(words) >= _CACHE_WORDS:
                        words.clear()
                    words[seg] = ids
            out.extend(ids)
        return out

    def DecodeIds(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        types, byte_of = self._types, self._byte_of
        for i in ids:
            t = types[i]
            if t == BYTE:
                run.append(byte_of[i])
                continue
            if run:
                out.append(_bytes_text(run))
                run.clear()
            if t == CONTROL:
                continue
            out.append(self._unk_surface if t == UNKNOWN else self.IdToPiece(i).replace(_SPACE, " "))
        if run:
            out.append(_bytes_text(run))
        return "".join(out)

    # -- encoding ---------------------------------------------------------------------------

    def _lookup(self, s: str) -> int:
        """The id of ``s`` among the pieces a merge may make (normal, user-defined), or -1."""
        seen = self._seen
        j = seen.get(s)
        if j is None:
            if len(seen) >= _CACHE_PAIRS:
                seen.clear()
            j = seen[s] = self._find(s)
        return j

    def _find(self, s: str) -> int:
        b = s.encode("utf-8")
        k = zlib.crc32(b)
        keys, key_ids, off, blob = self._keys, self._key_ids, self._off, self._blob
        i = bisect_left(keys, k)
        while i < len(keys) and keys[i] == k:
            j = key_ids[i]
            if blob[off[j]:off[j + 1]] == b:
                return j
            i += 1
        return -1

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        """The symbols BPE starts from, and which are user-defined pieces (never merged): the longest
        user-defined piece where one starts, else one character."""
        user = self._user
        if user is None or not user.search(text):  # most words: one symbol per character
            return list(text), [False] * len(text)
        syms, frozen, i = [], [], 0
        while i < len(text):
            m = user.match(text, i)
            syms.append(m.group() if m else text[i])
            frozen.append(bool(m))
            i = m.end() if m else i + 1
        return syms, frozen

    def _encode(self, text: str) -> tuple[int, ...]:
        syms, frozen = self._symbols(text)
        count = len(syms)
        prev = list(range(-1, count - 1))
        nxt = list(range(1, count + 1))
        if count:
            nxt[-1] = -1
        heap: list = []
        lookup, scores = self._lookup, self._scores

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            piece = syms[left] + syms[right]
            j = lookup(piece)
            if j >= 0:
                heapq.heappush(heap, (-scores[j], left, right, len(piece)))

        for r in range(1, count):
            add(r - 1, r)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size or nxt[left] != right:
                continue  # a pair one of whose symbols has changed since
            syms[left] = a + b
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out: list[int] = []
        k = 0 if count else -1
        reserved, unk, byte_id = self._reserved, self._ids["unk"], self._byte_id
        while k != -1:
            s = syms[k]
            j = reserved.get(s)
            if j is None:
                j = lookup(s)
            if j < 0 or j == unk:
                out.extend(byte_id[c] for c in s.encode("utf-8"))
            else:
                out.append(j)
            k = nxt[k]
        return tuple(out)


def _bytes_text(run: bytes) -> str:
    """SentencePiece's text of a run of byte pieces: each UTF-8 character they form, and U+FFFD
    for each byte that starts no valid character (so a cut character gives one per byte)."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, i, n = [], 0, len(run)
    while i < n:
        c = run[i]
        width = 1 if c < 0x80 else 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4 if c >> 3 == 30 else 0
        try:
            if not width or i + width > n:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "")
            out.append(run[i:i + width].decode("utf-8"))
            i += width
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    return "".join(out)


# -- building ---------------------------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = buf[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def _field(buf: bytes, i: int) -> tuple[int, object, int]:
    """(field number, value, where the next field starts) of the protobuf field at ``i``: an int
    for varints and fixed32 (its raw bits), (start, end) for length-delimited fields."""
    key, i = _varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
        v, i = _varint(buf, i)
    elif wire == 2:
        n, i = _varint(buf, i)
        v, i = (i, i + n), i + n
    elif wire == 5:
        v, i = struct.unpack_from("<I", buf, i)[0], i + 4
    elif wire == 1:
        v, i = struct.unpack_from("<Q", buf, i)[0], i + 8
    else:
        raise ValueError(f"protobuf wire type {wire}")
    return field, v, i


def _fields(buf: bytes, i: int, end: int) -> dict:
    out = {}
    while i < end:
        field, v, i = _field(buf, i)
        out[field] = v
    return out


def _parse(proto: bytes):
    """(pieces as UTF-8, scores as float32 bytes, types, trainer fields, normalizer fields,
    denormalizer fields) of a serialized SentencePiece ModelProto. Its pieces (262k for Gemma)
    are read by a fast path for the layout SentencePiece writes (piece, score, then the type
    unless NORMAL, each short), any other by the general reader."""
    pieces, scores, types, specs = [], [], [], {}
    i, n = 0, len(proto)
    pack = struct.Struct("<I").pack
    while i < n:
        field, v, nxt = _field(proto, i)
        if field == 1:  # a SentencePiece: piece = 1, score = 2, type = 3 (NORMAL if absent)
            a, end = v
            k = a + 2 + proto[a + 1] if a + 1 < end else end + 1
            fast = proto[a] == 0x0A and proto[a + 1] < 0x80 and k + 5 <= end and proto[k] == 0x15
            if fast:
                piece, score, kind = proto[a + 2:k], proto[k + 1:k + 5], NORMAL
                k += 5
                if k + 2 <= end and proto[k] == 0x18 and proto[k + 1] < 0x80:
                    kind, k = proto[k + 1], k + 2
            if not fast or k != end:
                f = _fields(proto, a, end)
                r = f.get(1, (0, 0))
                piece, score, kind = proto[r[0]:r[1]], pack(f.get(2, 0)), f.get(3, NORMAL)
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif field in (2, 3, 5):
            specs[field] = _fields(proto, *v)
        i = nxt
    return pieces, b"".join(scores), types, specs.get(2, {}), specs.get(3, {}), specs.get(5, {})


def build(model_proto: bytes) -> bytes | None:
    """The tables of a serialized SentencePiece model (``Vocab``'s bytes), or None when it is not
    a model ``Vocab`` encodes exactly as SentencePiece does (see the module docstring)."""
    from sentencepiece import SentencePieceProcessor

    try:
        pieces, raw_scores, types, trainer, norm, denorm = _parse(model_proto)
        kinds = bytes(types)
    except (ValueError, IndexError, TypeError, struct.error):
        return None

    def spec(fields, number, default):
        return fields.get(number, default)

    charsmap = spec(norm, 2, (0, 0))
    if not (spec(trainer, 3, 1) == 2 and spec(trainer, 35, 0) and not spec(trainer, 24, 0)  # BPE, byte fallback
            and not spec(norm, 3, 1) and not spec(norm, 4, 1) and spec(norm, 5, 1)  # no dummy prefix, ws kept, escaped
            and charsmap[0] == charsmap[1] and spec(denorm, 2, (0, 0))[0] == spec(denorm, 2, (0, 0))[1]
            and UNUSED not in types and types.count(UNKNOWN) == 1 and pieces):
        return None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, ValueError, OSError):
        return None  # Tokenizer names what is wrong with it
    if sp.GetPieceSize() != len(pieces) or {f"<0x{b:02X}>".encode() for b in range(256)} - {
            p for p, t in zip(pieces, types) if t == BYTE}:
        return None
    unk = spec(trainer, 44, None)
    unk_surface = model_proto[unk[0]:unk[1]].decode("utf-8") if unk else _UNK_SURFACE
    import numpy as np

    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    kinds = np.frombuffer(kinds, np.uint8)
    mergeable = np.flatnonzero((kinds == NORMAL) | (kinds == USER_DEFINED))
    crcs = np.fromiter(map(zlib.crc32, (pieces[i] for i in mergeable.tolist())), np.uint32, len(mergeable))
    order = np.argsort(crcs, kind="stable")
    space = _SPACE.encode("utf-8")
    joins = sorted({p[k - 1] for p in (pieces[i].decode("utf-8") for i in mergeable.tolist() if space in pieces[i][1:])
                    for k in range(1, len(p)) if p[k] == _SPACE and p[k - 1] != _SPACE})
    arrays = [("offsets", array("I", offsets.astype("<u4").tobytes())),
              ("scores", array("f", np.frombuffer(raw_scores, "<f4").tobytes())),
              ("types", array("B", kinds.tobytes())), ("keys", array("I", crcs[order].astype("<u4").tobytes())),
              ("key_ids", array("i", mergeable[order].astype("<i4").tobytes()))]
    total = int(offsets[-1])
    reserved = np.flatnonzero((kinds == CONTROL) | (kinds == UNKNOWN) | (kinds == BYTE)).tolist()
    user = np.flatnonzero(kinds == USER_DEFINED).tolist()
    try:
        reserved_pieces, user_pieces = ([pieces[i].decode("utf-8") for i in ids] for ids in (reserved, user))
    except UnicodeDecodeError:  # a piece that is no UTF-8
        return None
    head = json.dumps({"arrays": [(name, a.typecode, len(a)) for name, a in arrays], "blob": total,
                       "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id(),
                       "unk_surface": unk_surface, "joins": "".join(joins),
                       "reserved": reserved, "reserved_pieces": reserved_pieces,
                       "user": user, "user_pieces": user_pieces}).encode()
    data = b"".join([MAGIC, struct.pack("<I", len(head)), head, *(a.tobytes() for _, a in arrays), *pieces])
    try:
        vocab = Vocab(data)
        if vocab.IdToPiece(list(range(len(pieces)))) != sp.IdToPiece(list(range(len(pieces)))):
            return None
    except (ValueError, UnicodeDecodeError, KeyError):  # a piece that is no UTF-8, a byte piece missing
        return None
    for text in _SELF_TEST:  # the same ids and text as SentencePiece, or SentencePiece stays
        ids = sp.EncodeAsIds(text)
        if vocab.EncodeAsIds(text) != ids or vocab.DecodeIds(ids) != sp.DecodeIds(ids):
            return None
    return data
