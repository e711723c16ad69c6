"""Streaming detokenizer: token ids in, finished text segments out.

Invariant (tested in ``tests/test_detokenizer.py``)::

    "".join(d.add(t) for t in ids) + d.flush() == tokenizer.decode(ids)

and no segment ever ends in the middle of a UTF-8 character: the bytes of a
character assembled from several byte-fallback pieces (``<0xE6><0x97><0xA5>``)
are held back until the character is complete.

How it works, O(1) per token:

* Most tokens contribute complete UTF-8 (``token_bytes`` of an ordinary piece);
  their text is emitted at once, decoded from those bytes alone.
* Bytes that do not yet form a complete character (at most 3) are held back in
  a *tail*, together with the ids that produced them. When the tail resolves
  (the character completes, or a byte shows it can never complete), the tail's
  ids are rendered by ``tokenizer.decode`` itself. So replacement characters
  come out exactly as the tokenizer renders them: SentencePiece writes one
  U+FFFD per stray byte, ``bytes.decode(errors="replace")`` one per maximal
  invalid subsequence; both are matched without knowing which one is in use.
* The first token that contributes text is also rendered by
  ``tokenizer.decode`` (with the control tokens before it), because
  SentencePiece models with ``add_dummy_prefix`` drop the leading space of the
  first piece. Gemma's model has no dummy prefix and keeps it.

Runtime code: stdlib only.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class DetokenizerTokenizer(Protocol):
    """What the detokenizer needs from a tokenizer (``runtime.tokenizer.Tokenizer`` has it)."""

    def token_bytes(self, token_id: int) -> bytes:
        """Exact UTF-8 bytes the token contributes mid-sequence (b'' for control tokens)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a whole id sequence."""


def _incomplete_tail_start(data: bytes) -> int:
    """Index where a trailing, still-completable UTF-8 prefix starts, or len(data) if none.

    Only the last 3 bytes can belong to an unfinished character. A suffix is held
    back only if some continuation could still make it a valid character (second
    byte ranges per RFC 3629: E0 needs A0..BF, ED 80..9F, F0 90..BF, F4 80..8F),
    so bytes that can never complete are released at once.
    """
    n = len(data)
    for back in range(1, min(3, n) + 1):
        lead = data[n - back]
        if 0x80 <= lead <= 0xBF:  # continuation byte: keep looking for the lead
            continue
        if 0xC2 <= lead <= 0xDF:
            need = 2
        elif 0xE0 <= lead <= 0xEF:
            need = 3
        elif 0xF0 <= lead <= 0xF4:
            need = 4
        else:  # ASCII or a byte that never starts a character
            return n
        if back >= need:  # the character (valid or not) is already complete
            return n
        if back >= 2:
            second = data[n - back + 1]
            lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
                lead, (0x80, 0xBF)
            )
            if not lo <= second <= hi:
                return n
        return n - back
    return n


class StreamingDetokenizer:
    """Turn a stream of token ids into text segments that never split a character.

    ``add(id)`` returns the text completed by that token (often ``''`` while a
    byte-fallback character is being assembled); ``flush()`` returns what is
    still held back at the end of the stream (an unfinished character rendered
    the way ``tokenizer.decode`` renders it, usually U+FFFD); ``text`` is
    everything emitted so far; ``reset()`` starts a new stream.
    """

    def __init__(self, tokenizer: DetokenizerTokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        """Forget the stream: held-back bytes, emitted text, first-token state."""
        self._tail = b""  # bytes of an unfinished character (at most 3 once resolved)
        self._tail_ids: list[int] = []  # ids that produced the tail (plus empty tokens in between)
        self._tail_exact = True  # tail starts at a token boundary, so decode(_tail_ids) renders it
        self._started = False  # has any token contributed bytes yet?
        self._parts: list[str] = []
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (not including the held-back tail)."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def add(self, token_id: int) -> str:
        """Feed one token id; return the newly completed text (possibly '')."""
        token_id = int(token_id)
        data = self.tokenizer.token_bytes(token_id)
        if not self._started:
            # Control tokens before the first text (e.g. <bos>) are kept with the
            # first visible token so decode sees the real start of the sequence.
            self._tail_ids.append(token_id)
            if not data:
                return ""
            self._started = True
            if _is_complete_utf8(data):
                out = self.tokenizer.decode(self._tail_ids)  # dummy-prefix rules apply here only
                self._tail_ids = []
                return self._emit(out)
            self._tail_ids.pop()  # re-added below, with the bytes
        if not data:
            if self._tail:
                self._tail_ids.append(token_id)  # may split a byte group in decode's view
            return ""
        if not self._tail:
            try:
                return self._emit(data.decode("utf-8"))  # the common case: a whole piece
            except UnicodeDecodeError:
                pass
        return self._emit(self._add_to_tail(token_id, data))

    def flush(self) -> str:
        """Release the held-back tail at the end of the stream and return it."""
        if not self._tail:
            return ""
        out = self._render(self._tail_ids, self._tail, self._tail_exact)
        self._tail, self._tail_ids, self._tail_exact = b"", [], True
        return self._emit(out)

    # -- internals ---------------------------------------------------------

    def _add_to_tail(self, token_id: int, data: bytes) -> str:
        old = len(self._tail)
        buf = self._tail + data
        cut = _incomplete_tail_start(buf)
        if cut == 0:  # still one unfinished character
            self._tail_ids.append(token_id)
            self._tail = buf
            return ""
        if cut == len(buf):  # everything resolved, tail and this token together
            self._tail_ids.append(token_id)
            out = self._render(self._tail_ids, buf, self._tail_exact)
            self._tail, self._tail_ids, self._tail_exact = b"", [], True
            return out
        if cut == old:  # the old tail can never complete; this token starts a new one
            out = self._render(self._tail_ids, self._tail, self._tail_exact)
            self._tail, self._tail_ids, self._tail_exact = data, [token_id], True
            return out
        # The cut falls inside this token's bytes: only possible for tokenizers whose
        # pieces are arbitrary byte strings (byte-level BPE). Their decode is the byte
        # concatenation decoded with errors="replace", so render from bytes.
        out = self._render(self._tail_ids + [token_id], buf[:cut], False)
        self._tail, self._tail_ids, self._tail_exact = buf[cut:], [token_id], False
        return out

    def _render(self, ids: list[int], data: bytes, exact: bool) -> str:
        if exact:
            return self.tokenizer.decode(ids)
        return data.decode("utf-8", errors="replace")

    def _emit(self, s: str) -> str:
        if s:
            self._parts.append(s)
        return s


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
