"""Constrained decoding: a JSON Schema or a grammar, compiled to one token mask per step.

``llguidance`` (a Rust library with aarch64 wheels and no torch dependency) does the work:
the grammar is an Earley parser over a lexer, and the mask of the tokens that keep the output
inside the grammar is computed from a trie of the vocabulary's bytes, in tens of
microseconds a token here (a 262k-piece vocabulary).

The vocabulary is the file's own SentencePiece model (``Vocabulary``): every ordinary piece
stands for the bytes ``Tokenizer.token_bytes`` gives it ('▁' as a space, ``<0xNN>`` as its
one byte, so a character may be spelled by several byte pieces); control and unknown
pieces are special tokens, which no text can produce: a grammar names them in angle
brackets (``<end_of_turn>``, ``<|tool_call>``). The grammar's end is the model's stop
tokens: where the grammar may end, every stop token of the model is allowed, and
generation also ends, without another decode call, as soon as the grammar can take
nothing more (the closing ``}`` of a schema's object).

What a constraint can be (``compile``):

* ``json_schema``: a JSON Schema (dict or JSON text): objects with ``properties``,
  ``required`` and ``additionalProperties``, arrays (``items``, ``prefixItems``, ``minItems``
  / ``maxItems``), ``enum`` / ``const``, strings (``minLength`` / ``maxLength`` / ``pattern`` /
  ``format``), numbers and integers with ``minimum`` / ``maximum`` / exclusive bounds,
  ``anyOf`` / ``oneOf`` / ``allOf``, ``$ref`` / ``$defs``, ``type`` lists. ``{}`` or
  ``{"type": "object"}`` is any JSON (object). Output is JSON with ", " and ": "
  separators and no other whitespace (a base model then cannot fill the answer with
  newlines).
* ``grammar``: a Lark grammar in llguidance's dialect (``start: ...``, terminals in capitals,
  ``/regex/``, ``%json {schema}`` inline, ``<special_token>``), or a llama.cpp GBNF grammar
  (``root ::= ...``), told apart by llguidance.

A schema or grammar that llguidance rejects (a syntax error, an unknown type, a ``$ref``
that points nowhere) or proves unsatisfiable (``minimum`` above ``maximum``, an empty
``enum``, ``allOf`` of a string and a number) is a ``GrammarError`` with llguidance's reason,
raised before any token is generated; a state with no allowed token, which a checked
grammar should never reach, is a ``GrammarError`` too, never a hang. A grammar that can
run forever is ended by ``max_tokens`` (finish reason "length").

Cost. The mask for the next token depends only on the tokens sampled so far, so it is
computed in a worker thread while the model decodes the last token (llguidance and LiteRT
both release the GIL); the sampler then sees the model's logits with every disallowed token
at -inf (or, when few tokens are allowed, only the allowed ones, which makes sampling
cheaper). ``benchmarks/constrained_speed.py`` measures it on the real 270M.
"""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import GemmaEdgeError, GenerationError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SLICES: list[str] | None = []  # llguidance's mask-speeding sub-tries: none (see Vocabulary); None = its default
_SUBSET = 8  # sample over the allowed ids alone when they are at most 1/_SUBSET of the vocabulary


class GrammarError(GenerationError):
    """A JSON Schema or grammar that cannot be compiled, or that no output can satisfy."""


class ConstrainedDecodingUnavailable(GemmaEdgeError):
    """llguidance, which compiles schemas and grammars to token masks, is not installed."""


def _llg():
    try:
        import llguidance
    except ImportError:
        raise ConstrainedDecodingUnavailable(
            "structured output (json_schema, grammar, tools) needs the llguidance package, which gemma-edge "
            "installs: pip install 'llguidance>=1.9'") from None
    return llguidance


def available() -> bool:
    try:
        _llg()
    except ConstrainedDecodingUnavailable:
        return False
    return True


# ---- the grammar, independent of any vocabulary ------------------------------------------------

@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form (``grammar``), with what it came from for
    messages (``what``). Build one with ``json_schema_grammar`` / ``lark_grammar``, or from
    parts with ``combine``; ``compile`` checks it against a vocabulary."""

    grammar: str  # llguidance's top-level grammar: {"grammars": [...]} JSON
    what: str = "grammar"


def _as_schema(schema) -> dict | bool:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object (or true/false), got {type(schema).__name__}")
    return schema


def json_schema_grammar(schema) -> Grammar:
    """The grammar of JSON documents that ``schema`` (a dict, or JSON text) accepts."""
    schema = _as_schema(schema)
    try:
        text = _llg().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
    return _validated(Grammar(text, "JSON schema"))


def lark_grammar(text: str) -> Grammar:
    """A Lark (llguidance dialect) or GBNF grammar's text, as a Grammar."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("the grammar is empty; give a Lark grammar (start: ...) or a GBNF one (root ::= ...)")
    try:
        lark = _llg().grammar_from("grammar", text)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the grammar cannot be read: {e}") from None
    return _validated(Grammar(json.dumps({"grammars": [{"lark_grammar": lark}]}), "grammar"))


def _validated(g: Grammar, vocab: "Vocabulary | None" = None) -> Grammar:
    """``g`` if llguidance accepts it (against ``vocab``, or with special tokens unchecked)."""
    try:
        is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(g.grammar, vocab and vocab.lltok)
    except (ValueError, TypeError) as e:
        is_error, messages = True, [str(e)]
    if is_error:
        reason = (messages[0] if messages else "rejected").strip()
        raise GrammarError(f"the {g.what} cannot be used: {reason}")
    return g


def combine(top_lark: str, parts: dict[str, Grammar], what: str = "grammar") -> Grammar:
    """A Lark grammar ``top_lark`` whose rules refer to other grammars as ``@name``."""
    grammars = [{"lark_grammar": top_lark}]
    for name, g in parts.items():
        sub = json.loads(g.grammar)["grammars"]
        if len(sub) != 1:
            raise GrammarError(f"{g.what} is itself made of {len(sub)} grammars; nest one at a time")
        grammars.append({**sub[0], "name": name})
    return Grammar(json.dumps({"grammars": grammars}), what)


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def with_thought(grammar: Grammar, start: int | None, end: int | None) -> Grammar:
    """``grammar`` after an optional thinking channel (Gemma 4: ``<|channel>...<channel|>``),
    whose text is free. ``start`` / ``end`` are the markers' token ids (special tokens)."""
    if start is None or end is None:
        return grammar
    top = f"start: (<[{int(start)}]> THOUGHT <[{int(end)}]>)? @body\nTHOUGHT: /(.|\\n)*/\n"
    return combine(top, {"body": grammar}, grammar.what)


def make_grammar(json_schema=None, grammar=None) -> Grammar | None:
    """The Grammar of ``json_schema`` or ``grammar`` (text or a Grammar), or None if neither."""
    if json_schema is not None and grammar is not None:
        raise GrammarError("give json_schema or grammar, not both")
    if json_schema is not None:
        return json_schema if isinstance(json_schema, Grammar) else json_schema_grammar(json_schema)
    if grammar is not None:
        return grammar if isinstance(grammar, Grammar) else lark_grammar(grammar)
    return None


# ---- the vocabulary ----------------------------------------------------------------------------

class _Wrapper:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes, the special ids, eos, and
    a tokenize function (text -> ids, used for forced text)."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int], eos: int):
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text):
        if not isinstance(text, str):
            raise TypeError("text only")  # TokenizerWrapper then always passes str
        return self._tokenizer.encode(text, add_bos=False)


class Vocabulary:
    """A tokenizer's vocabulary as llguidance sees it: a trie of the pieces' bytes, built once per
    tokenizer (about a second for Gemma 3's 262144 pieces; ``vocabulary()`` caches it).

    Memory. llguidance's default "slices" (sub-tries that speed up masks inside strings) cost
    ~100 MB for this vocabulary; without them the trie takes ~11 MB and a mask costs a few
    hundred microseconds more on average (up to tens of ms on the first token of a new kind of
    string), computed in the worker thread while the model decodes: ``SLICES`` chooses."""

    def __init__(self, tokenizer):
        llg = _llg()
        n = tokenizer.vocab_size
        special = sorted(tokenizer.special_ids)
        special_set = set(special)
        # a special token's "bytes" are its name, which llguidance marks as not-text (0xFF first)
        tokens = [tokenizer.id_to_piece(i).encode("utf-8") if i in special_set else tokenizer.token_bytes(i)
                  for i in range(n)]
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else (special[0] if special else 0)
        self.size = n
        self.eos = eos
        inner = _Wrapper(tokenizer, tokens, special, eos)
        wrapper = llg.TokenizerWrapper(inner)
        self.lltok = llg.LLTokenizer(wrapper, slices=SLICES)
        inner.tokens = wrapper.tokens = []  # the trie has them; the Python copies would hold ~40 MB


_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_vocab_lock = threading.Lock()


def vocabulary(tokenizer) -> Vocabulary:
    """The Vocabulary of ``tokenizer`` (a ``runtime.tokenizer.Tokenizer``), built on first use."""
    with _vocab_lock:
        v = _vocabularies.get(tokenizer)
        if v is None:
            v = _vocabularies[tokenizer] = Vocabulary(tokenizer)
        return v


# ---- checking and running ------------------------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    """A Grammar checked against one tokenizer's vocabulary: ready to run (``matcher()``)."""

    grammar: Grammar
    vocab: Vocabulary

    def matcher(self, stop_ids, overlap: bool = True) -> "Matcher":
        return Matcher(self, stop_ids, overlap)


def compile(tokenizer, json_schema=None, grammar=None) -> Constraint | None:
    """Check ``json_schema`` or ``grammar`` against ``tokenizer``'s vocabulary; None if neither is
    given. Raises GrammarError (with llguidance's reason) for a bad or unsatisfiable one."""
    g = make_grammar(json_schema, grammar)
    if g is None:
        return None
    return check(g, tokenizer)


def check(g: Grammar, tokenizer) -> Constraint:
    """``g`` checked against ``tokenizer``'s vocabulary (its special tokens exist, ...)."""
    vocab = vocabulary(tokenizer)
    return Constraint(_validated(g, vocab), vocab)


_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gemma-edge-mask")


@dataclass(frozen=True)
class _Mask:
    """One step's mask over the vocabulary: its bits, and the short side of it as ids (or, when
    neither side is short, the whole mask as booleans)."""

    words: np.ndarray  # uint32 [ceil(vocab / 32)], bit t of word t // 32: token t is allowed
    allowed: np.ndarray | None = None  # ids of the allowed tokens, when they are few
    refused: np.ndarray | None = None  # ids of the refused tokens, when they are few
    full: np.ndarray | None = None  # bool [vocab], otherwise

    def allows(self, token: int) -> bool:
        return bool((self.words[token >> 5] >> np.uint32(token & 31)) & 1)


_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint16)
_BITS = np.arange(32, dtype=np.int64)


def _popcount(words: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(words).sum())
    return int(_POP8[words.view(np.uint8)].sum())


def _set_bits(words: np.ndarray) -> np.ndarray:
    """Indices of the set bits of ``words`` (uint32), ascending: only the non-zero words are unpacked."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 32).view(np.bool_)
    return (nz[:, None] * 32 + _BITS)[bits]


class Matcher:
    """One generation's position in the grammar.

    ``start()`` begins computing the mask of the next token (in a worker thread, so it runs
    while the model decodes); ``allowed()`` waits for it; ``sample(sampler, logits)`` draws a
    token under it (among the allowed ids alone when they are few, with the refused ones at -inf
    otherwise); ``consume(token)`` moves past a sampled token and says whether the grammar is
    complete (nothing but the end may follow)."""

    def __init__(self, constraint: Constraint, stop_ids, overlap: bool = True):
        llg = _llg()
        vocab = constraint.vocab
        self._m = llg.LLMatcher(vocab.lltok, constraint.grammar.grammar, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"the {constraint.grammar.what} cannot be used: {self._m.get_error()}")
        self.what = constraint.grammar.what
        self._n = vocab.size
        self._eos = vocab.eos
        self._stops = np.array(sorted(int(t) for t in stop_ids if 0 <= int(t) < vocab.size), np.int64)
        self._stop_set = frozenset(self._stops.tolist())
        self._words = np.zeros(((vocab.size + 31) // 32,), np.uint32)
        self._overlap = overlap
        self._future = None
        self._ready = None

    def start(self) -> None:
        """Begin computing the next token's mask (at once in the calling thread without overlap)."""
        if self._overlap:
            self._future = _pool.submit(self._compute)
        else:
            self._ready = self._compute()

    def _compute(self) -> "_Mask | GrammarError":
        w = self._words.view(np.uint32)
        self._m.unsafe_compute_mask_ptr(w.ctypes.data, w.nbytes)  # drops the GIL
        if self._m.is_error():
            return GrammarError(f"the {self.what} failed: {self._m.get_error()}")
        eos = self._eos
        if (w[eos >> 5] >> np.uint32(eos & 31)) & 1:  # the grammar may end here
            if self._stops.size:  # so may the model, with any of its stop tokens
                np.bitwise_or.at(w, self._stops >> 5, np.left_shift(1, self._stops & 31).astype(np.uint32))
            else:  # stop_tokens=False: the grammar ends only when it is complete
                w[eos >> 5] &= ~np.uint32(1 << (eos & 31))
        n = _popcount(w)
        if n == 0:
            return GrammarError(f"the {self.what} allows no token after the output so far; it cannot be "
                                "completed (check the schema or grammar)")
        if n * _SUBSET <= self._n:  # few allowed (a key, a number, a closing bracket): sample among them
            return _Mask(w.copy(), allowed=_set_bits(w))
        if (self._n - n) * _SUBSET <= self._n:  # few refused (inside a string): mask them out
            refused = _set_bits(~w)
            return _Mask(w.copy(), refused=refused[refused < self._n])
        return _Mask(w.copy(), full=np.unpackbits(w.view(np.uint8), bitorder="little", count=self._n).view(np.bool_))

    def allowed(self) -> "_Mask":
        """The pending mask (waiting for the worker if it is still computing)."""
        if self._future is not None:
            out, self._future = self._future.result(), None
        else:
            out, self._ready = self._ready, None
        if isinstance(out, GrammarError):
            raise out
        return out

    def sample(self, sample, logits: np.ndarray) -> int:
        """Mask ``logits`` with the pending mask and draw a token with ``sample``."""
        m = self.allowed()
        if m.allowed is not None:
            return int(m.allowed[sample(logits[m.allowed])])
        if m.refused is not None:
            logits = np.array(logits, dtype=np.float32)  # a copy: the model's output buffer stays as it was
            logits[m.refused] = -np.inf
            return sample(logits)
        return sample(np.where(m.full, logits, np.float32(-np.inf)))

    def consume(self, token: int) -> bool:
        """Move past ``token``; True when the grammar can take nothing more (the output is complete)."""
        if int(token) in self._stop_set:
            return True
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"the {self.what} refused token {token}: {self._m.get_error()}")
        return self._m.is_stopped()

    def close(self) -> None:
        if self._future is not None:
            self._future.result()
            self._future = None


def thought_markers(model) -> tuple[int | None, int | None]:
    """The ids of ``model``'s thinking-channel markers when its tokenizer has them as special
    tokens (Gemma 4), else (None, None)."""
    fmt, tok = model.chat_format, model.tokenizer
    ids = [tok.piece_to_id(p) if p else None for p in (fmt.channel_start, fmt.channel_end)]
    if all(i is not None and tok.is_special(i) for i in ids):
        return ids[0], ids[1]
    return None, None


def allow_thought(model, kwargs: dict) -> dict:
    """``stream_generate`` keyword arguments whose json_schema / grammar (if any) may be preceded
    by ``model``'s thinking channel: what a chat that asked the model to think passes on."""
    g = make_grammar(kwargs.get("json_schema"), kwargs.get("grammar"))
    if g is None:
        return kwargs
    return {**kwargs, "json_schema": None, "grammar": with_thought(g, *thought_markers(model))}
