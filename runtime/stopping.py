"""Stop strings over streamed text.

``StopStringMatcher(stops).feed(segment)`` returns ``(emit, hit)``: the text that
is now safe to show, and whether a stop string has completed. Text that might be
the start of a stop string is held back until the next segments decide it; once
a stop string completes, only the text before it is emitted and the rest of the
stream is discarded. ``flush()`` releases held text when the stream ends first.

Which stop wins: the occurrence that *ends* first in the text (generation would
have stopped there), and among those ending at the same place the one that
starts first. That rule does not depend on how the text was cut into segments,
so streaming and non-streaming generation agree.

Cost per ``feed``: one ``str.find`` per stop string over the held text (shorter
than the longest stop) plus the new segment, and a suffix check of at most
``max(len(stop))`` prefixes.

Runtime code: stdlib only.
"""

from __future__ import annotations

from typing import Iterable

from .errors import GenerationError


class StopStringMatcher:
    """Hold back possible stop-string prefixes; report the first completed stop string."""

    def __init__(self, stops: Iterable[str]):
        stops = list(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise GenerationError(
                    f"stop strings must be non-empty text, got {s!r} in {stops!r}; "
                    "drop it or use a token-level stop (eos) instead"
                )
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))  # unique, in the given order
        # Every proper prefix of a stop string: a held-back suffix must be one of these.
        self._prefixes = frozenset(s[:i] for s in self.stops for i in range(1, len(s)))
        self._max_prefix = max((len(s) - 1 for s in self.stops), default=0)
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._held = ""
        self.hit = False  # a stop string completed; everything after it is discarded
        self.stop: str | None = None  # the stop string that completed

    def feed(self, segment: str) -> tuple[str, bool]:
        """Add a text segment; return ``(text now safe to emit, whether a stop completed)``."""
        if self.hit:
            return "", True
        buf = self._held + segment
        if not self.stops:
            return buf, False
        best = None  # (end, start, stop)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            self.hit, self.stop, self._held = True, best[2], ""
            return buf[: best[1]], True
        keep = self._held_suffix_length(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The stream ended without (more) stops: release the held-back text."""
        out, self._held = self._held, ""
        return out

    def _held_suffix_length(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_prefix), 0, -1):
            if buf[len(buf) - k :] in self._prefixes:
                return k
        return 0
