"""StopStringMatcher: stop strings split across segments, overlapping candidates, release at the end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma_edge.runtime.errors import GenerationError
from gemma_edge.runtime.stopping import StopStringMatcher


def run(stops, segments):
    """Feed segments until a hit; return (emitted text, hit, stop) with flush() if no hit."""
    m = StopStringMatcher(stops)
    out = []
    for seg in segments:
        emit, hit = m.feed(seg)
        out.append(emit)
        if hit:
            return "".join(out), True, m.stop
    out.append(m.flush())
    return "".join(out), False, None


def reference(stops, text):
    """Non-streaming answer: cut at the stop occurrence that ends first (then starts first)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return (text, False, None) if best is None else (text[: best[1]], True, best[2])


def test_stop_split_across_many_segments():
    m = StopStringMatcher(["<end>"])
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("e") == ("", False)
    assert m.feed("n") == ("", False)
    assert m.feed("d> and more") == ("", True)
    assert m.hit and m.stop == "<end>"
    assert m.feed("ignored") == ("", True)  # everything after the stop is discarded
    assert m.flush() == ""


def test_false_start_is_released_as_soon_as_it_is_decided():
    m = StopStringMatcher(["<end>"])
    assert m.feed("a <e") == ("a ", False)
    assert m.feed("x") == ("<ex", False)
    assert m.feed("<") == ("", False)
    assert m.feed("<en") == ("<", False)  # the first '<' can no longer start a stop
    assert m.flush() == "<en"  # partial match released at the end


def test_text_before_and_after_stop_in_one_segment():
    assert run(["STOP"], ["abcSTOPdef"]) == ("abc", True, "STOP")
    assert run(["STOP"], ["STOP"]) == ("", True, "STOP")
    assert run(["\n\n"], ["line\n", "\nnext"]) == ("line", True, "\n\n")


def test_overlapping_candidates():
    # "abab" inside "ababc": the held suffix must restart at the second 'ab'.
    assert run(["ababc"], ["ab", "ab", "ab", "c!"]) == ("ab", True, "ababc")
    # of two stops, the one that completes first wins, even if the other started earlier
    assert run(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", True, "bc")
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True, "bc")
    # same end: the longer one (earlier start) wins
    assert run(["xyz", "yz"], ["x", "y", "z"]) == ("", True, "xyz")
    # a prefix of one stop that is the whole of another
    assert run(["ab", "abc"], ["a", "b", "c"]) == ("", True, "ab")
    assert run(["aaa"], ["a", "a", "b", "a", "a", "a"]) == ("aab", True, "aaa")


def test_no_stops_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("anything <end>") == ("anything <end>", False)
    assert m.flush() == ""


def test_unicode_and_reset():
    m = StopStringMatcher(["日本語", "🙂"])
    assert m.feed("今日は日本") == ("今日は", False)
    assert m.feed("人") == ("日本人", False)
    assert m.feed("🙂 rest") == ("", True)
    m.reset()
    assert not m.hit and m.feed("日") == ("", False) and m.flush() == "日"


def test_empty_stop_string_is_an_error():
    with pytest.raises(GenerationError, match=r"stop strings must be non-empty text, got ''"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(GenerationError, match=r"got None"):
        StopStringMatcher([None])


@settings(max_examples=200, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
    text=st.text(alphabet="abcd\n", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_any_segmentation_gives_the_unsegmented_answer(stops, text, cuts):
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    segments = [text[a:b] for a, b in zip(points, points[1:])]
    assert run(stops, segments) == reference(stops, text)
    assert run(stops, list(text)) == reference(stops, text)


def test_held_text_is_never_more_than_a_stop_prefix():
    m = StopStringMatcher(["</answer>", "\nUser:"])
    emitted = ""
    for ch in "The result is </ans and\nUse it":
        emit, hit = m.feed(ch)
        emitted += emit
        assert not hit
        held = m._held
        assert any(s.startswith(held) for s in m.stops) or held == ""
    assert emitted + m.flush() == "The result is </ans and\nUse it"
