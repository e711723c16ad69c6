"""Speculative decoding: a smaller draft model proposes k tokens, the model checks them in one call.

A round, with the model's KV cache holding the context but its last token (as in plain decoding):

1. the draft catches up with the context, then decodes k tokens ``d_1 .. d_k``, one call each,
   drawing ``d_i`` from its filtered distribution ``q_i`` (a draft converted ``--for-draft``
   calls ``decode_hot``, whose LM head computes only the frequent pieces' logits and those of
   the context's latest ``contract.HOT_EXTRA`` other tokens: ``q_i`` is 0 on the rest, which
   the rule below allows);
2. the model runs ``[last, d_1 .. d_k]`` through one ``score_<T>`` call (the smallest T >= k + 1,
   padded): its filtered distributions ``p_1 .. p_{k+1}``, in the time of a few decode steps;
3. each position is decided by the same rule (Leviathan et al. 2023, Chen et al. 2023): the
   draft's token ``d_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; else a token is
   drawn from ``norm(max(0, p_i - q_i))`` and the round ends there. When all k are kept, the
   draft decodes ``d_k`` too and the rule decides position k + 1 against ``p_{k+1}`` (the draft
   must read ``d_k`` before the next round anyway, so this costs nothing extra).

Every emitted token is then distributed exactly as ``p``, the distribution ``make_sampler`` draws
from with the same temperature, top-k, top-p, min-p and repetition penalty (``p`` and ``q`` are
both filtered by ``sampling.make_distribution``, the sampler's own filter). At temperature 0,
``p`` and ``q`` are their argmax: the output is the model's greedy output (``score_<T>`` returns
the logits ``decode`` does, bit for bit, on the files tested).

The random numbers of a position come from ``(seed, position)``, and every position after the
first is decided by that same rule, so a seeded output does not depend on k or on the timings
that choose it; it differs from the output of the same seed without a draft (same distribution,
other draws).

Rollback: the model's cache was written up to ``d_k``; the context after a rejection at
``i`` ends with the replacement token, so its cache continues from ``d_{i-1}`` and the later
slots are overwritten before anything attends to them (the attention mask is by position).
Nothing relies on slots past the current position, and no call writes more than
``max(score lengths)`` (at most 32 in default files) slots past it. The draft rewinds by at
most k - 1 tokens, well inside ``engine.RELEASE_MARGIN``: the sliding-layer slots both models
give back as their positions advance (``Model._release_window``) are never reached by a rollback
(if they were, ``Model._prefill`` would start over, slower but still right). In a file with ring
caches a rollback stays within ``contract.ring_rewind_limit`` (R - W is at least the longest
chunk less one, and no round writes more than a score_<T>), so the ring still holds the window.

Long contexts: ``decode`` picks the shortest ``decode_s<S'>`` span that holds the position, but
there is one ``score_<T>`` per T, whose global layers read the whole cache. The slots past the
position are masked either way, so the logits are the same; only the cost differs, and the
schedule measures that (on a file with context above 2048, a round below position 2048 pays a
full-length score against decode_s2048's shorter step, and drafts less or pauses).

The draft reads at most the latest tokens it can hold: where it would have to prefill more than
``DRAFT_KEEP`` tokens (Gemma 3's sliding window) to catch up, a long prompt, or where a round
would run past its context (a 2048-token draft for an 8192-token model, cheaper to step than one
converted for the longer context), it starts over on the latest ``DRAFT_KEEP`` tokens, at its
own positions from 0, and goes on from there (``_draft_base``). It only proposes, so this
changes how often it is right, never the output. A seeded sampled generation keeps the draft to
the whole context (past the draft's, tokens are decoded without it), as it keeps it from
pausing.

k: before each round, the k in 1 .. ``MAX_DRAFT`` that maximizes the expected tokens per second,
from the measured acceptance rate and the measured time of a draft step, of the Python around a
round's calls and of each ``score_<T>`` (an unmeasured T is assumed as fast as the next shorter
one measured, so each is tried; so is one timed only once, since a signature's first call also
maps its memory). When even the best k is not expected ``PAY_MARGIN`` (1.1) times as fast as
decoding alone (a draft too close in cost to the model, or one that is rarely right), tokens are
decoded without the draft, with one round after ``PROBE_EVERY`` tokens to measure again, then
after twice as many each time it still does not pay (up to ``PROBE_EVERY * MAX_BACKOFF``), since
such a round's draft steps and score call buy little. A probe also makes the draft prefill the
tokens it missed, however rarely it comes: a draft whose rounds barely pay leaves the model no
faster than alone (the 270M int8 with an int4-b32 draft of itself: 0.93-1.02x, see README), so
use none there. Greedy output is the same either way, and a sampled output with a seed never
pauses (pausing follows timings, so the seed would no longer fix the output). The first
generated token is decoded plainly (the time to first token stays that of the model alone), and
so are positions where no round fits (the last slots of either model's context, the last token
of max_tokens).
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import contract
from .backend import common_prefix
from .errors import DraftError
from .sampling import REPETITION_WINDOW, Distribution, apply_repetition_penalty, make_distribution

MAX_DRAFT = 15  # most tokens drafted in a round; k + 1 <= 16 tokens go through one score_16 call
_EMA = 0.2  # weight of a new timing in the running means
_DECAY = 0.95  # per round, of the acceptance counts (recent rounds matter more)
_PRIOR = (4.0, 1.0)  # pseudo-counts (accepted, rejected) before any round: acceptance 0.8
_DRAFT_PRIOR = 0.25  # a draft step's time relative to the model's decode, until measured
PROBE_EVERY = 16  # while drafting does not pay, one round after this many tokens decoded alone
MAX_BACKOFF = 16  # ... and after twice as many each time it still does not pay, up to this factor
PAY_MARGIN = 1.1  # draft only where rounds are expected this much faster than decoding alone
EXTRA_SCAN = 1024  # a --for-draft draft's extra_ids come from at most this many latest tokens
DRAFT_KEEP = 512  # a draft the context outgrows restarts on this many latest tokens (Gemma 3's window);
# None: it reads the whole context, and past its own decodes without it (the previous behaviour)


def check_pair(model, draft) -> None:
    """The draft must read and write the same tokens: same tokenizer pieces and special ids. The
    model needs a ``score_<T>`` signature to check drafted tokens in one call."""
    if not model.info.score_lengths:
        raise DraftError(
            f"{model.info.path} has no score_<T> signature, which speculative decoding needs to check "
            "drafted tokens in one call; convert it again with gemma-convert (default --score-lengths 4,8,32)")
    a, b = model.tokenizer, draft.tokenizer
    if a.vocab_size != b.vocab_size:
        raise DraftError(f"the draft {draft.info.path} has a tokenizer of {b.vocab_size} pieces but the model "
                         f"{model.info.path} has {a.vocab_size}; a draft must share the model's tokenizer "
                         "(e.g. Gemma 3 270M drafting for Gemma 3 1B)")
    ta, tb = model.info.meta.tokenizer, draft.info.meta.tokenizer
    for what in ("bos_id", "eos_id", "pad_id", "start_of_turn_id", "end_of_turn_id"):
        if getattr(ta, what) != getattr(tb, what):
            raise DraftError(f"the draft {draft.info.path} has {what} {getattr(tb, what)} but the model "
                             f"{model.info.path} has {getattr(ta, what)}; a draft must share the model's "
                             "tokenizer and special tokens")
    if a.model_proto != b.model_proto:
        ids = list(range(a.vocab_size))
        pa, pb = a._sp.IdToPiece(ids), b._sp.IdToPiece(ids)
        bad = next((i for i in ids if pa[i] != pb[i]), None)
        if bad is not None:
            raise DraftError(f"token {bad} is {pb[bad]!r} in the draft {draft.info.path} but {pa[bad]!r} in the "
                             f"model {model.info.path}; a draft must share the model's tokenizer")


@dataclass
class SpeculationStats:
    """What speculative decoding did in one generation."""

    rounds: int = 0
    drafted: int = 0  # tokens the draft proposed and the model checked (k per round, + 1 when all kept)
    accepted: int = 0  # of those, kept
    tokens: int = 0  # tokens the rounds emitted (accepted + one per round)
    plain: int = 0  # tokens decoded without the draft (the first, and where no round fits)
    k_total: int = 0  # sum of k over the rounds

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_k(self) -> float:
        return self.k_total / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "tokens": self.tokens,
                "plain": self.plain, "acceptance_rate": self.acceptance_rate, "mean_k": self.mean_k}


class _Schedule:
    """Chooses k from the acceptance rate and the measured costs (see the module docstring)."""

    def __init__(self, lengths: list[int]):
        self.lengths = sorted(lengths)
        self.kept, self.rejected = _PRIOR
        self.t_draft: float | None = None  # seconds per draft decode
        self.t_decode: float | None = None  # seconds per model decode
        self.t_score: dict[int, float] = {}  # T -> seconds per score_<T> call
        self.t_round: float | None = None  # seconds per round beyond its draft steps and score call
        self.paused = 0  # tokens decoded without the draft since the last round
        self.backoff = 1  # rounds come every PROBE_EVERY * backoff tokens while drafting does not pay
        self._once: set = set()  # what has been timed only once: its next timing replaces that one

    def _mean(self, key, old: float | None, new: float) -> float:
        """The running mean of a call's time. A signature's first call in a process also maps its
        memory (its working memory's fresh pages; for ``decode`` the LM head's packed weights,
        which the prefill did not read): measured on the 270M int8, 13 ms against 9 for ``decode``
        and 31 against 14 for ``score_8``. So the first timing stands only until the second
        replaces it; otherwise a k whose score_<T> looked slow once would not be tried again."""
        if old is None:
            self._once.add(key)
            return new
        if key in self._once:
            self._once.discard(key)
            return new
        return (1 - _EMA) * old + _EMA * new

    def draft_time(self, seconds: float) -> None:
        self.t_draft = self._mean("draft", self.t_draft, seconds)

    def decode_time(self, seconds: float) -> None:
        self.t_decode = self._mean("decode", self.t_decode, seconds)

    def score_time(self, T: int, seconds: float) -> None:
        self.t_score[T] = self._mean(T, self.t_score.get(T), seconds)

    def round_time(self, seconds: float) -> None:
        """What a round cost beyond its timed calls: the acceptance rule over k + 1 rows of
        logits, reading them, filling the draft's. Not its catch-up (the tokens a paused draft
        missed, a cost of pausing that a next round does not pay again)."""
        self.t_round = self._mean("round", self.t_round, max(seconds, 0.0))

    def outcome(self, kept: int, rejected: bool) -> None:
        self.kept = self.kept * _DECAY + kept
        self.rejected = self.rejected * _DECAY + rejected

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def score_length(self, k: int) -> int | None:
        return next((T for T in self.lengths if T >= k + 1), None)

    def _score_cost(self, T: int) -> float:
        shorter = [self.t_score[t] for t in self.lengths if t < T and t in self.t_score]
        guess = max(shorter) if shorter else (self.t_decode or 1.0)  # optimistic: tried, then known
        if T not in self.t_score:
            return guess
        if T in self._once and shorter:  # its first call's time (see _mean): tried again
            return min(self.t_score[T], guess)
        return self.t_score[T]

    def rate(self, k: int) -> float | None:
        """Expected tokens per second of rounds that draft ``k`` (None: no score_<T> holds k + 1).
        A round costs k draft steps, one more when all k are kept (the draft has not yet seen the
        last of them), the score call, and the Python around them (``round_time``)."""
        T = self.score_length(k)
        if T is None:
            return None
        a = min(self.alpha, 0.999)
        t_d = self.t_draft or (self.t_decode or 1.0) * _DRAFT_PRIOR
        tokens = (1 - a ** (k + 1)) / (1 - a)  # expected tokens of a round: 1 + a + ... + a^k
        return tokens / ((k + a ** k) * t_d + self._score_cost(T) + (self.t_round or 0.0))

    def choose(self, k_max: int, may_pause: bool = True) -> int:
        """The k in 1..k_max with the most expected tokens per second; 0 (decode one token without
        the draft) when even that k is not expected ``PAY_MARGIN`` times as fast as decoding alone,
        except every ``PROBE_EVERY * backoff`` tokens, when a round measures the draft again. The
        margin: on the 270M the expectation ran 5-13% above what was measured (a paused draft's
        catch-up, calls slower between the other model's), and an int8 model drafting where it
        expected about 1.1x ran at 0.95x."""
        best, best_rate = 1, -1.0
        for k in range(1, k_max + 1):
            rate = self.rate(k)
            if rate is None:
                break
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        if may_pause and self.t_decode and best_rate * self.t_decode < PAY_MARGIN:
            if self.paused < PROBE_EVERY * self.backoff:
                self.paused += 1
                return 0
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)  # a probe; if it still does not pay, wait longer
        else:
            self.backoff = 1
        self.paused = 0
        return best


def accept(p: Distribution, q: Distribution, token: int, u_accept: float, u_resample: float,
           vocab: int) -> tuple[int, bool]:
    """The rule for one position: the draft drew ``token`` from ``q``; keep it with probability
    ``min(1, p(token) / q(token))`` (``u_accept`` uniform in [0, 1)), else draw from
    ``norm(max(0, p - q))`` with ``u_resample``. Returns (token, kept). The result is distributed
    as ``p`` whatever ``q`` is."""
    pt, qt = p.prob(token), q.prob(token)
    if qt > 0 and u_accept * qt < pt:
        return token, True
    r = np.maximum(p.probs - q.probs_of(p.tokens, vocab), 0.0)  # over p's support: p - q > 0 only there
    total = r.sum()
    if not total > 0:  # p == q up to rounding (a rejection then has probability ~0): draw from p
        return p.draw(u_resample), False
    return Distribution(p.tokens, r / total).draw(u_resample), False


class Speculator:
    """Speculative decoding for ``model`` with ``draft`` (both ``engine.Model``)."""

    def __init__(self, model, draft):
        check_pair(model, draft)
        self.model, self.draft = model, draft
        self.stats = SpeculationStats()  # of the last generation
        self._schedule = _Schedule([T for T in model.info.score_lengths])
        vocab = model.tokenizer.vocab_size
        # a draft converted --for-draft: its steps compute the hot rows' logits, and a few others'
        self._hot = (np.array([t for t in contract.hot_ids(draft.config) if t < vocab], np.int64)
                     if draft.info.decode_hot else None)
        self._hot_set = frozenset(self._hot.tolist()) if self._hot is not None else frozenset()
        self._base = 0  # the draft reads the context from here on, at its own positions from 0
        self._rebase = True  # may it (not with a seed: see _draft_base)

    def _keep(self, pos: int) -> int:
        """How many of the latest tokens a rebased draft reads: ``DRAFT_KEEP``, at most half its
        context (so rounds have room after it), and no more than there are."""
        return min(DRAFT_KEEP, (self.draft.context_length - 1) // 2, pos)

    def _draft_base(self, ctx: list[int], k: int) -> int:
        """Where the draft's view of the context starts for a round drafting ``k`` (the model's
        cache holds ``ctx[:-1]``, ``pos = len(ctx) - 1``): the draft reads ``ctx[base:pos]``,
        then the last token at its position ``pos - base`` and k more. From 0 where that leaves
        it room and at most ``_keep`` tokens to prefill; else where it started before, where that
        leaves it room, at least ``_keep`` tokens of context and at most ``_keep`` to prefill;
        else the latest ``_keep`` tokens, prefilled anew (after a long prompt or pause, or where
        it has no room). Not for a seeded sampled output: where the draft restarts depends on k
        and on timings, and so would its proposals' distributions, so the seed would no longer
        fix the output; such a generation reads the context from 0, and past the draft's context
        decodes without it."""
        pos = len(ctx) - 1
        if not self._rebase:
            self._base = 0
            return 0
        room = self.draft.context_length - 1 - k  # the highest position its round may read at
        keep = self._keep(pos)
        if pos <= room and self._missing(ctx, 0) <= keep:
            self._base = 0
        elif not (0 < self._base <= pos - keep and pos - self._base <= room
                  and self._missing(ctx, self._base) <= keep):
            self._base = pos - keep
        return self._base

    def _missing(self, ctx: list[int], base: int) -> int:
        """How many tokens of ``ctx[base:-1]`` the draft's cache lacks (those past the prefix it
        holds)."""
        want = ctx[base:-1]
        return len(want) - common_prefix(self.draft._cached, want)

    def _extra(self, ctx: list[int]) -> tuple[np.ndarray, int]:
        """decode_hot's ``extra_ids`` for a round: the context's latest distinct tokens outside the
        hot rows, up to ``contract.HOT_EXTRA`` (a text repeats its names and rare words, which the
        hot rows lack), padded with a hot token; and how many are real. Only the last
        ``EXTRA_SCAN`` tokens are read, so a round's cost does not grow with the context."""
        vocab, seen = self.draft.tokenizer.vocab_size, []
        for t in itertools.islice(reversed(ctx), EXTRA_SCAN):
            if t not in self._hot_set and t not in seen and 0 <= t < vocab:
                seen.append(t)
                if len(seen) == contract.HOT_EXTRA:
                    break
        ids = np.full(contract.HOT_EXTRA, self._hot[0], np.int32)
        ids[:len(seen)] = seen
        return ids, len(seen)

    def _draft_step(self, token: int, extra: tuple[np.ndarray, int] | None) -> np.ndarray:
        """The draft reads ``token``: its logits over the vocabulary. Through ``decode_hot`` when it
        has one (``extra``: ``_extra``): only those of the hot rows (``contract.hot_ids``) and of
        ``extra``'s tokens, the others -inf, so ``q`` gives them no mass. The rule needs nothing
        more of ``q`` (a token it cannot draw is never proposed, and a rejection draws from
        ``p - q``, which is ``p`` there), so the output is unchanged; only the acceptance rate
        drops by the model's tokens outside those."""
        d = self.draft
        z = d._decode_hot(token, extra[0]) if extra is not None else None
        if z is None:
            return d._decode(token)
        logits = np.full(d.tokenizer.vocab_size, -np.inf, np.float32)
        R, (ids, n) = d.config.embed_hot_rows, extra  # z: the hot rows' (hot ids past the tokenizer last), then extra's
        logits[self._hot] = z[:self._hot.size]
        logits[ids[:n]] = z[R:R + n]
        return logits

    def tokens(self, ids: list[int], max_tokens: int, history: list[int], repetition_penalty: float,
               sample, temperature: float, top_k: int, top_p: float, min_p: float,
               seed: int | None) -> Iterator[tuple[int, bool]]:
        """Yield (token, False) per generated token, as ``Model._plain_tokens`` does; the model's
        cache holds ``ids[:-1]``. Before each yield, ``model._cached`` is the context but its last
        token, so a stream closed after any token leaves both caches consistent."""
        m, d = self.model, self.draft
        dist = make_distribution(temperature, top_k, top_p, min_p)
        greedy = temperature == 0.0
        may_pause = greedy or seed is None  # pausing follows timings: a seeded sampled output must not
        base = seed if seed is not None else secrets.randbits(63)
        vocab = m.tokenizer.vocab_size
        sched, stats = self._schedule, SpeculationStats()
        self.stats = stats
        self._rebase = may_pause and DRAFT_KEEP is not None  # seeded sampled: the draft reads the whole context
        ctx = list(ids)  # everything so far; the model's cache holds ctx[:-1]

        def penalized(logits, hist):
            if repetition_penalty != 1.0:
                return apply_repetition_penalty(logits, hist[-REPETITION_WINDOW:], repetition_penalty)
            return logits

        def emit(token):
            ctx.append(token)
            history.append(token)
            m._cached = ctx[:-1]
            m._release_window()  # rounds bypass Model._decode, which does this per token
            return token, False

        produced = 0
        with d._exclusive():
            while produced < max_tokens:
                pos = len(ctx) - 1  # where the last token goes
                k = self._room(pos, max_tokens - produced) if produced else 0
                if k >= 1:
                    k = sched.choose(k, may_pause)
                if k < 1:  # plain decoding: the first token, no room for a round, or drafting does not pay
                    t0 = time.perf_counter()
                    logits = m._decode(ctx[-1])
                    sched.decode_time(time.perf_counter() - t0)
                    token = sample(penalized(logits, history))
                    stats.plain += 1
                    produced += 1
                    yield emit(token)
                    continue
                T = sched.score_length(k)
                # the uniforms (u_q, u_a, u_r) of positions pos + 1 .. pos + k + 1
                rng = None if greedy else [np.random.default_rng([base, pos + i]).random(3) for i in range(1, k + 2)]

                # 1. the draft: catch up, then k tokens
                start = self._draft_base(ctx, k)  # the draft reads ctx[start:]
                if d._cached != ctx[start:-1]:
                    d._prefill(ctx[start:])
                t_start = time.perf_counter()
                drafts, qs, hist = [], [], list(history)
                prev = ctx[-1]
                extra = self._extra(ctx) if self._hot is not None else None
                t0 = time.perf_counter()
                for i in range(k):
                    q = dist(penalized(self._draft_step(prev, extra), hist))
                    prev = int(q.tokens[0] if greedy else q.draw(rng[i][0]))
                    drafts.append(prev)
                    qs.append(q)
                    hist.append(prev)
                timed = time.perf_counter() - t0
                sched.draft_time(timed / k)

                # 2. the model: [last, d_1 .. d_k] in one call
                tokens = np.zeros((1, T), np.int32)
                positions = np.zeros((T,), np.int32)
                tokens[0, :k + 1] = [ctx[-1], *drafts]
                positions[:k + 1] = np.arange(pos, pos + k + 1, dtype=np.int32)
                t0 = time.perf_counter()
                z = m.backend.score(tokens, positions)  # [T, V]
                seconds = time.perf_counter() - t0
                sched.score_time(T, seconds)
                timed += seconds
                m._cached = ctx + drafts  # written up to d_k; cut back below as tokens are decided

                # 3. the rule at each position
                hist = list(history)
                out, kept_all = [], True
                for i in range(k + 1):
                    if i == k:  # every draft token kept: the draft reads d_k and proposes one more
                        t0 = time.perf_counter()
                        q = dist(penalized(self._draft_step(drafts[-1], extra), hist))
                        seconds = time.perf_counter() - t0
                        sched.draft_time(seconds)
                        timed += seconds
                        proposal = int(q.tokens[0] if greedy else q.draw(rng[i][0]))
                    else:
                        q, proposal = qs[i], drafts[i]
                    logits = penalized(z[i, :vocab], hist)
                    if greedy:
                        token = int(dist(logits).tokens[0])  # the argmax, NaN-checked as the sampler does
                        kept = token == proposal
                    else:
                        token, kept = accept(dist(logits), q, proposal, rng[i][1], rng[i][2], vocab)
                    stats.drafted += 1
                    stats.accepted += kept
                    out.append(token)
                    hist.append(token)
                    if not kept:
                        kept_all = False
                        break
                sched.outcome(len(out) - (not kept_all), not kept_all)
                sched.round_time(time.perf_counter() - t_start - timed)
                stats.rounds += 1
                stats.k_total += k
                stats.tokens += len(out)
                for token in out:
                    produced += 1
                    yield emit(token)
                    if produced >= max_tokens:
                        break

    def _room(self, pos: int, left: int) -> int:
        """The largest k a round at ``pos`` may draft: tokens left to generate, a score_<T> that
        fits the model's cache, and the draft's cache (it decodes up to its position
        ``pos - base + k``, after a rebase ``_keep + k``: ``_draft_base``; a ring file's draft may
        roll back by at most ``contract.ring_rewind_limit``)."""
        m, d = self.model, self.draft
        fits = [T for T in m.info.score_lengths if pos + T <= m.context_length]
        if not fits:
            return 0
        ring = contract.ring_rewind_limit(d.config)  # a draft's rollback must stay within its ring
        if self._rebase:  # the draft's position: now, or after a rebase
            draft_room = d.context_length - 1 - min(pos - self._base if self._base <= pos else pos, self._keep(pos))
        else:
            draft_room = d.context_length - 1 - pos
        return max(0, min(MAX_DRAFT, left - 1, max(fits) - 1, draft_room,
                          MAX_DRAFT if ring is None else ring))
