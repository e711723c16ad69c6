"""Token samplers over one row of logits, exact and O(vocab) per call.

``make_sampler(temperature, top_k, top_p, min_p, seed)`` returns a function
``logits -> token id``. The filters run in this order (llama.cpp / Hugging Face):

1. repetition penalty: done by the caller with ``apply_repetition_penalty``;
2. temperature: ``0`` means greedy argmax (exact, no random numbers used);
3. top-k: keep the ``k`` highest logits (exactly ``k``; of equal logits at the edge, the
   lowest token ids), as candidates in ascending id order;
4. top-p: keep the smallest set of most probable tokens whose probability,
   renormalized over what top-k kept, reaches ``top_p``;
5. min-p: drop tokens whose probability is below ``min_p`` times the largest;
6. draw one token from what is left, in proportion to its probability, with a
   ``numpy.random.Generator`` seeded by ``seed`` (same seed, same sequence; every
   non-greedy call consumes exactly one uniform number).

Nothing sorts the whole vocabulary (262144 entries for Gemma 3). Top-k selects among
the logits within a few units of the largest (one cheap pass; a language model's top 64
are almost always there), with a partition over the whole vocabulary only when they
are too few or too many. (A partition over the whole of a speculative draft's logits,
-inf outside its frequent pieces, took 7.7 ms in ``benchmarks/sampler_speed.py``:
numpy's introselect is slow on runs of equal values.) Top-p sorts only a candidate
set: the top-k survivors, or the tokens above a probability threshold lowered step
by step until they hold ``top_p`` of the mass (the nucleus is a prefix of the sorted
order, so it lies inside any such set); when that set would be large, a quickselect by mass over
the values finds the nucleus in O(vocab). Min-p is a threshold. The final
draw over the full vocabulary is an inverse-CDF search in two levels (block sums,
then one block), because a float64 cumsum over 262144 entries costs more than the
rest of the sampler. ``benchmarks/sampler_speed.py`` measures each path.

Runtime code: numpy and stdlib only.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import numpy as np

from .errors import GenerationError

Sampler = Callable[[np.ndarray], int]
REPETITION_WINDOW = 64  # the repetition penalty applies to the last this many tokens

# Top-p fast path: thresholds relative to the largest probability. Each step costs
# one cheap pass; the first whose (few) survivors hold `top_p` of the mass is sorted.
_TOP_P_THRESHOLDS = (1e-1, 1e-2, 1e-3, 1e-4)
# Top-k fast path: candidates within this many logits of the largest, tried in turn; a set
# holding at least k and at most 1/_TOP_K_SHARE of the vocabulary is partitioned alone.
_TOP_K_GAPS = (8.0, 32.0)
_TOP_K_SHARE = 8
_SMALL = 4096  # below this many candidates, just sort / cumsum them directly
_BLOCK = 512  # block length of the two-level draw


# -- validation --------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_sampling(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> None:
    """Raise ``GenerationError`` naming the first bad sampling value and its valid range.

    The CLI calls this before loading a model so a typo fails in milliseconds.
    """
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(
            f"temperature must be a number >= 0 (0 means greedy argmax), got {temperature!r}"
        )
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise GenerationError(
            f"top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}"
        )
    if not _is_real(top_p) or not (0.0 < top_p <= 1.0):
        raise GenerationError(
            f"top_p must be in (0, 1] (1 disables top-p), got {top_p!r}"
        )
    if not _is_real(min_p) or not (0.0 <= min_p < 1.0):
        raise GenerationError(
            f"min_p must be in [0, 1) (0 disables min-p), got {min_p!r}"
        )
    if not _is_real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise GenerationError(
            "repetition penalty must be a finite number > 0 (1 disables it, > 1 discourages "
            f"repeats), got {repetition_penalty!r}"
        )
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
        raise GenerationError(f"seed must be an integer >= 0 or None (random), got {seed!r}")


def _as_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1:
        if x.ndim > 1 and all(d == 1 for d in x.shape[:-1]):
            x = x.reshape(-1)  # e.g. the decode output [1, 1, V]
        else:
            raise GenerationError(
                f"logits must be one row of shape (vocab,), got shape {x.shape}; "
                "pass logits[0, -1] (or reshape(-1)) for a single sequence"
            )
    if x.size == 0:
        raise GenerationError("logits are empty (shape (0,)); the model returned no vocabulary row")
    if x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)
    return x


def _argmax_checked(x: np.ndarray) -> int:
    i = int(np.argmax(x))  # argmax returns the first NaN if there is one
    v = float(x[i])
    if math.isnan(v) or v == -math.inf:
        raise GenerationError(
            f"logits have no usable maximum (logits[{i}] = {v}); the model produced NaN or all -inf. "
            "Check the model file and the input tokens."
        )
    return i


# -- repetition penalty -------------------------------------------------------


def apply_repetition_penalty(
    logits: np.ndarray, previous_token_ids: Iterable[int], penalty: float
) -> np.ndarray:
    """Return a copy of ``logits`` with each distinct previous token penalized once.

    llama.cpp / Hugging Face semantics: a positive logit is divided by ``penalty``,
    a negative one multiplied (both make the token less likely when ``penalty > 1``).
    The caller chooses the window (e.g. the last 64 tokens). The input is not modified.
    """
    validate_sampling(repetition_penalty=penalty)
    x = _as_logits(logits).copy()
    ids = np.unique(np.fromiter((int(t) for t in previous_token_ids), dtype=np.int64))
    if ids.size == 0 or penalty == 1.0:
        return x
    if ids[0] < 0 or ids[-1] >= x.size:
        bad = int(ids[0] if ids[0] < 0 else ids[-1])
        raise GenerationError(
            f"previous token id {bad} is outside the vocabulary [0, {x.size}); "
            "pass the ids of tokens this model produced"
        )
    v = x[ids]
    x[ids] = np.where(v > 0, v / penalty, v * penalty)
    return x


# -- the sampler --------------------------------------------------------------


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """Return ``sample(logits) -> int`` for a 1-D float logits row (see module docstring)."""
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    temperature, top_k, top_p, min_p = float(temperature), int(top_k), float(top_p), float(min_p)

    if temperature == 0.0:

        def greedy(logits) -> int:
            return _argmax_checked(_as_logits(logits))

        return greedy

    rng = np.random.default_rng(seed)
    inv_t = _inverse_temperature(temperature)

    def sample(logits) -> int:
        ids, w, keep = _filter(_as_logits(logits), inv_t, top_k, top_p, min_p)
        u = rng.random()
        if keep is not None:
            j = int(keep[_draw(w[keep], u)])
        else:
            j = _draw(w, u)
        return int(ids[j]) if ids is not None else j

    return sample


def _inverse_temperature(temperature: float) -> np.float32:
    # a tiny temperature is greedy, not inf * 0; capped so that (x - top) * inv_t stays finite in
    # float32 for any logit gap under 1e8 (no overflow warning): exp of it is 0 either way
    return np.float32(min(1.0 / temperature, 1e30))


def _filter(x: np.ndarray, inv_t: np.float32, top_k: int, top_p: float, min_p: float):
    """Steps 2-5 of the module docstring: ``(ids, w, keep)``. The candidates are ``ids`` (None: the
    whole vocabulary, in order), ``w`` their weights p / p_max, and ``keep`` the indices into ``w``
    that survive top-p and min-p (None: all); the filtered distribution is ``w[keep]`` normalized."""
    vocab = x.size
    ids = None  # None: candidates are the whole vocabulary, in order
    if 0 < top_k < vocab:
        ids = _top_k(x, top_k)
        x = x[ids]
    top = x[_argmax_checked(x)]
    # w = p / p_max = exp((x - x_max) / T), in [0, 1]; x - top <= 0 so nothing overflows.
    w = np.exp((x - top) * inv_t, dtype=np.float32)  # [n]
    keep = None  # indices into w that survive top-p / min-p (None: all)
    if top_p < 1.0:
        keep = _nucleus(w, top_p)
    if min_p > 0.0:
        # min-p keeps a prefix of the sorted order, so after top-p it is an intersection.
        if keep is None:
            keep = np.flatnonzero(w >= min_p)
        else:
            keep = keep[w[keep] >= min_p]
    return ids, w, keep


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest of ``x`` (0 < k < x.size), ascending; of equal values at the
    edge, the lowest ids. The k largest lie among the values within a gap of the largest whenever
    at least k do, so a pass finds them there; the whole vocabulary is partitioned only when no
    gap holds between k and 1/_TOP_K_SHARE of it (a flat row), or the largest is not finite
    (NaN comes first there, and ``_argmax_checked`` then names it)."""
    top = x.max()
    if np.isfinite(top):
        for gap in _TOP_K_GAPS:
            cand = np.flatnonzero(x >= top - gap)
            if cand.size >= k:
                if cand.size <= x.size // _TOP_K_SHARE:
                    return _top_k_of(x[cand], k, cand)
                break
    return _top_k_of(x, k, None)


def _top_k_of(v: np.ndarray, k: int, ids: np.ndarray | None) -> np.ndarray:
    """``_top_k`` over the values ``v`` of the ids ``ids`` (ascending; None: 0 .. v.size - 1)."""
    n = v.size
    if n == k:
        return ids if ids is not None else np.arange(n)
    if not np.isfinite(v.max()):  # NaN (partitioned last, as the largest) or inf: any k of them do
        sel = np.sort(np.argpartition(v, n - k)[n - k:])
    else:
        kth = np.partition(v, n - k)[n - k]  # the k-th largest value
        above = np.flatnonzero(v > kth)
        sel = np.sort(np.concatenate([above, np.flatnonzero(v == kth)[:k - above.size]]))
    return sel if ids is None else ids[sel]


class Distribution:
    """A filtered next-token distribution: ``probs[i]`` (float64, summing to 1) of token
    ``tokens[i]`` (ascending), or with ``tokens`` None, of token ``i`` over the whole vocabulary.
    What ``make_distribution`` returns; speculative decoding compares two of them."""

    __slots__ = ("tokens", "probs")

    def __init__(self, tokens: np.ndarray | None, probs: np.ndarray):
        self.tokens, self.probs = tokens, probs

    def prob(self, token: int) -> float:
        if self.tokens is None:
            return float(self.probs[token]) if 0 <= token < self.probs.size else 0.0
        i = int(np.searchsorted(self.tokens, token))
        return float(self.probs[i]) if i < self.tokens.size and self.tokens[i] == token else 0.0

    def probs_of(self, tokens: np.ndarray | None, vocab: int) -> np.ndarray:
        """Probabilities of ``tokens`` (None: of every token 0..vocab-1)."""
        if tokens is None:
            if self.tokens is None:
                return self.probs
            out = np.zeros(vocab, np.float64)
            out[self.tokens] = self.probs
            return out
        if self.tokens is None:
            return self.probs[tokens]
        i = np.minimum(np.searchsorted(self.tokens, tokens), self.tokens.size - 1)
        return np.where(self.tokens[i] == tokens, self.probs[i], 0.0)

    def draw(self, u: float) -> int:
        """The token at ``u`` in [0, 1) of the inverse CDF (a token of probability 0 never comes)."""
        j = _draw(self.probs, u)
        return j if self.tokens is None else int(self.tokens[j])

    def __repr__(self) -> str:
        n = self.probs.size if self.tokens is None else self.tokens.size
        return f"Distribution({n} tokens, top {self.probs.max():.3g})"


def make_distribution(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Callable[[np.ndarray], Distribution]:
    """Return ``dist(logits) -> Distribution``: exactly the distribution ``make_sampler`` with the
    same values draws from (the same filter code), as an object. Temperature 0 is all the mass
    on the argmax."""
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    temperature, top_k, top_p, min_p = float(temperature), int(top_k), float(top_p), float(min_p)
    one = np.ones(1, np.float64)
    if temperature == 0.0:
        return lambda logits: Distribution(np.array([_argmax_checked(_as_logits(logits))]), one)
    inv_t = _inverse_temperature(temperature)

    def dist(logits) -> Distribution:
        ids, w, keep = _filter(_as_logits(logits), inv_t, top_k, top_p, min_p)
        if keep is not None:
            w = w[keep]
            ids = keep if ids is None else ids[keep]
        p = w.astype(np.float64)
        p /= p.sum()
        if ids is None:
            return Distribution(None, p)
        order = np.argsort(ids)
        return Distribution(ids[order].astype(np.int64), p[order])

    return dist


def _nucleus(w: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of largest ``w`` whose sum reaches ``top_p * w.sum()``.

    ``w`` is non-negative with maximum 1; the indices come in no particular order.
    Fast path (a peaked, language-model-like distribution): the tokens within a
    factor 10, 100, ... of the maximum are few; as soon as such a set holds
    enough mass, the nucleus is a prefix of it and only it is sorted. Otherwise
    (flat distributions, whose nucleus can hold most of the vocabulary) a
    quickselect on the values finds the nucleus size ``n`` and its smallest value
    ``tau`` in O(vocab) expected time, and one pass collects the indices.
    """
    target = top_p * float(w.sum(dtype=np.float64))
    if w.size > _SMALL:
        for t in _TOP_P_THRESHOLDS:
            cand = np.flatnonzero(w >= t)
            if cand.size > _SMALL:
                break
            cw = w[cand]
            if float(cw.sum(dtype=np.float64)) >= target:
                n, _ = _nucleus_size(cw, target)
                return cand[np.argsort(-cw, kind="stable")[:n]]
    n, tau = _nucleus_size(w, target)
    above = np.flatnonzero(w > tau)
    ties = np.flatnonzero(w == tau)[: n - above.size]  # tokens tied at the edge: lowest ids first
    return np.concatenate([above, ties])


def _nucleus_size(v: np.ndarray, target: float) -> tuple[int, float]:
    """``(n, tau)``: the fewest largest values of ``v`` summing to ``target``, and the n-th largest.

    Quickselect by mass: split the values in halves with ``np.partition`` and keep the
    half that holds the answer, so the work is about two passes over ``v``.
    """
    count = 0
    while v.size > _SMALL:
        k = v.size // 2
        v = np.partition(v, v.size - k)
        top = v[v.size - k :]  # the k largest, unordered
        mass = float(top.sum(dtype=np.float64))
        if mass >= target:
            v = top
        else:
            count += k
            target -= mass
            v = v[: v.size - k]
    s = np.sort(v)[::-1]  # most probable first
    c = np.cumsum(s, dtype=np.float64)
    j = min(int(np.searchsorted(c, target, side="left")) + 1, s.size)  # first prefix reaching target
    return count + j, float(s[j - 1])


def _draw(w: np.ndarray, u: float) -> int:
    """Index ``i`` with probability ``w[i] / w.sum()``, by inverse CDF at ``u`` in [0, 1).

    Zero weights are never drawn. Long arrays search block sums first, then one block.
    """
    n = w.size
    if n <= _SMALL:
        c = np.cumsum(w, dtype=np.float64)
        return _search(c, u * c[-1], w)
    nb = n // _BLOCK
    sums = np.empty(nb + (n % _BLOCK > 0), dtype=np.float64)
    sums[:nb] = w[: nb * _BLOCK].reshape(nb, _BLOCK).sum(axis=1, dtype=np.float64)
    if n % _BLOCK:
        sums[nb] = w[nb * _BLOCK :].sum(dtype=np.float64)
    cs = np.cumsum(sums)
    target = u * cs[-1]
    b = _search(cs, target, sums)
    block = w[b * _BLOCK : (b + 1) * _BLOCK]
    c = np.cumsum(block, dtype=np.float64)
    rest = target - (cs[b - 1] if b > 0 else 0.0)
    return b * _BLOCK + _search(c, min(rest, c[-1]), block)


def _search(c: np.ndarray, target: float, w: np.ndarray) -> int:
    """First i with c[i] > target (so w[i] > 0); the last positive weight if rounding ran past."""
    i = int(np.searchsorted(c, target, side="right"))
    if i >= c.size:
        i = int(np.flatnonzero(w > 0)[-1])
    return i
