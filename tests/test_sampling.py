"""Samplers: exact filtering sets, frequencies against a brute-force reference, seeds, errors.

The reference below sorts the whole vocabulary in float64, the straightforward way;
the samplers must agree with it on which tokens can be drawn, and their draw
frequencies must pass a chi-square test against its probabilities. Every test uses
fixed seeds, so the statistical checks are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from gemma_edge.runtime.errors import GenerationError
from gemma_edge.runtime.sampling import (
    _draw,
    _nucleus,
    _top_k,
    apply_repetition_penalty,
    make_sampler,
    validate_sampling,
)


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p, min-p, computed with a full sort."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    n = len(order)
    if top_p < 1.0:
        n = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, n)
    p = p[:n]
    if min_p > 0.0:
        p = np.where(p >= min_p * p[0], p, 0.0)
    out = np.zeros(len(z))
    out[order[:n]] = p / p.sum()
    return out


def draws(sampler, logits, n) -> np.ndarray:
    return np.array([sampler(logits) for _ in range(n)])


def assert_frequencies_match(samples, probs):
    """Chi-square test; categories with expected count < 5 are pooled. Threshold ~ p < 1e-6."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, f"drew tokens of zero probability: {np.flatnonzero(counts * (probs == 0))}"
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    assert chi2 < df + 7 * np.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} degrees of freedom"


@pytest.fixture
def logits() -> np.ndarray:
    # 64 distinct logits spread so that several filters have something to cut.
    return np.random.default_rng(1).normal(0.0, 2.0, 64).astype(np.float32)


N = 2000


# ------------------------------------------------------------------------ greedy / temperature


def test_greedy_is_argmax_and_uses_no_randomness():
    rng = np.random.default_rng(0)
    greedy = make_sampler(temperature=0.0, top_k=5, top_p=0.5, seed=123)  # filters are irrelevant
    for _ in range(20):
        x = rng.normal(size=1000).astype(np.float32)
        assert greedy(x) == int(np.argmax(x))
        assert greedy(x.astype(np.float64)) == int(np.argmax(x))
        assert greedy(x.reshape(1, 1, -1)) == int(np.argmax(x))  # decode output layout
    assert make_sampler()(np.array([0.0, 3.0, 3.0, -1.0])) == 1  # first maximum, like np.argmax


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies(logits, temperature):
    samples = draws(make_sampler(temperature=temperature, seed=7), logits, N)
    assert_frequencies_match(samples, reference_probs(logits, temperature))


def test_temperature_sharpens_and_flattens(logits):
    top = int(np.argmax(logits))
    share = {t: np.mean(draws(make_sampler(temperature=t, seed=3), logits, 2000) == top) for t in (0.25, 1.0, 4.0)}
    assert share[0.25] > share[1.0] > share[4.0]
    for t in share:
        assert abs(share[t] - reference_probs(logits, t)[top]) < 0.05
    tiny = make_sampler(temperature=1e-30, seed=0)  # no overflow: behaves like argmax
    assert all(tiny(logits) == top for _ in range(50))


# ------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_only_emits_the_top_k(logits, k):
    samples = draws(make_sampler(temperature=1.5, top_k=k, seed=11), logits, N)
    top_k = set(np.argsort(-logits)[:k].tolist())
    assert set(samples.tolist()) <= top_k
    assert_frequencies_match(samples, reference_probs(logits, 1.5, top_k=k))


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_emits_the_smallest_set_with_mass_p(logits, top_p):
    ref = reference_probs(logits, 1.0, top_p=top_p)
    # the reference set is the smallest prefix of the sorted distribution with mass >= p
    full = reference_probs(logits, 1.0)
    kept = np.sort(full[ref > 0])
    assert kept.sum() >= top_p > kept.sum() - kept.min()
    samples = draws(make_sampler(temperature=1.0, top_p=top_p, seed=5), logits, N)
    assert_frequencies_match(samples, ref)


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_never_emits_below_min_p_times_pmax(logits, min_p):
    samples = draws(make_sampler(temperature=1.0, min_p=min_p, seed=9), logits, N)
    p = reference_probs(logits, 1.0)
    assert (p[samples] >= min_p * p.max()).all()
    assert_frequencies_match(samples, reference_probs(logits, 1.0, min_p=min_p))


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(0.8, 20, 0.9, 0.0), (1.3, 30, 0.8, 0.05), (1.0, 0, 0.9, 0.1), (2.0, 10, 1.0, 0.3), (0.7, 40, 0.5, 0.02)],
)
def test_filters_compose_in_order(logits, temperature, top_k, top_p, min_p):
    sampler = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=21)
    assert_frequencies_match(draws(sampler, logits, N), reference_probs(logits, temperature, top_k, top_p, min_p))


def test_top_p_after_top_k_is_renormalized():
    # p = (0.4, 0.3, 0.2, 0.1): over all tokens top_p=0.6 keeps two, but over the top-2
    # (renormalized to 4/7, 3/7) it keeps only the first.
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    assert set(draws(make_sampler(1.0, top_p=0.6, seed=0), x, 500).tolist()) == {0, 1}
    assert set(draws(make_sampler(1.0, top_k=2, top_p=0.5, seed=0), x, 500).tolist()) == {0}


# ------------------------------------------------------------ full vocabulary (262144)


@pytest.fixture(scope="module")
def big_logits() -> np.ndarray:
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, 262144).astype(np.float32)
    x[rng.choice(262144, 300, replace=False)] += rng.uniform(5.0, 12.0, 300).astype(np.float32)
    x[rng.choice(262144, 1000, replace=False)] = -np.inf  # masked tokens
    return x


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.7, 4.0])  # the threshold fast path, the quickselect
def test_nucleus_is_exact_on_the_full_vocabulary(big_logits, top_p, temperature):
    w = np.exp((big_logits - big_logits.max()) / np.float32(temperature), dtype=np.float32)
    got = np.sort(_nucleus(w, top_p))
    want = np.flatnonzero(reference_probs(big_logits, temperature, top_p=top_p))
    assert np.array_equal(got, want)


def _rows(big_logits) -> dict:
    rng = np.random.default_rng(9)
    V = big_logits.size
    draft = np.full(V, -np.inf, np.float32)  # a --for-draft draft's step: logits of 17440 tokens only
    live = rng.choice(V, 17440, replace=False)
    draft[live] = big_logits[live]
    few = np.full(V, -np.inf, np.float32)  # fewer finite logits than k
    few[rng.choice(V, 30, replace=False)] = rng.normal(0.0, 1.0, 30)
    plus = big_logits.copy()
    plus[rng.choice(V, 3, replace=False)] = np.inf
    return {"peaked": big_logits, "flat": rng.normal(0.0, 1.0, V).astype(np.float32),
            "ties": (np.round(rng.normal(0.0, 1.5, V) * 2) / 2).astype(np.float32),  # a coarse grid
            "peaked_ties": np.round(big_logits),  # ties at the edge of a peaked row's top k
            "draft": draft, "few_finite": few, "plus_inf": plus}


@pytest.mark.parametrize("row", ["peaked", "flat", "ties", "peaked_ties", "draft", "few_finite", "plus_inf"])
@pytest.mark.parametrize("k", [1, 64, 5000])
def test_top_k_is_the_k_largest_lowest_ids_first(big_logits, row, k):
    """``_top_k`` against a full stable sort: the k largest logits, of equal ones at the edge the
    lowest ids, ascending; whichever path it takes (the values near the largest, or the whole
    row: flat rows, rows with fewer than k finite values, +inf)."""
    x = _rows(big_logits)[row]
    want = np.sort(np.argsort(-x.astype(np.float64), kind="stable")[:k])
    got = _top_k(x, k)
    if row == "plus_inf":  # +inf: any k of the largest (no finite ties in this row)
        assert np.array_equal(np.sort(x[got]), np.sort(x[want])), row
    else:
        assert np.array_equal(got, want), (row, k)


def test_nucleus_of_a_flat_distribution():
    w = np.ones(262144, dtype=np.float32)
    assert len(_nucleus(w, 0.25)) == 65536


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.97])
def test_nucleus_with_many_ties_has_the_smallest_size(top_p):
    """Logits on a coarse grid (as from a quantized model): thousands of exact ties."""
    x = np.round(np.random.default_rng(6).normal(0.0, 1.5, 262144) * 2) / 2
    w = np.exp(x - x.max()).astype(np.float32)
    got = _nucleus(w, top_p)
    assert len(np.unique(got)) == len(got)
    s = np.sort(w.astype(np.float64))[::-1]
    n = int(np.searchsorted(np.cumsum(s), top_p * s.sum())) + 1
    assert len(got) == n
    assert np.array_equal(np.sort(w[got])[::-1], s[:n].astype(np.float32))


def test_full_vocabulary_samplers_stay_in_their_sets(big_logits):
    for kw in (dict(top_p=0.9), dict(top_k=40), dict(min_p=0.05), dict(top_k=1000, top_p=0.95, min_p=0.01)):
        ref = reference_probs(big_logits, 1.0, **kw)
        s = draws(make_sampler(temperature=1.0, seed=2, **kw), big_logits, 40)
        assert (ref[s] > 0).all(), kw
    s = draws(make_sampler(temperature=1.0, seed=2), big_logits, 40)
    assert np.isfinite(big_logits[s]).all()


def test_two_level_draw_frequencies():
    """The block search over a long array: mass spread over blocks, zeros never drawn."""
    rng = np.random.default_rng(8)
    w = np.zeros(262144 + 77, dtype=np.float32)  # not a multiple of the block length
    hot = rng.choice(w.size, 12, replace=False)
    hot[0] = w.size - 1  # the ragged last block
    hot[1] = 0
    w[hot] = rng.uniform(0.2, 1.0, 12).astype(np.float32)
    u = np.random.default_rng(9).random(1000)
    samples = np.array([_draw(w, float(x)) for x in u])
    assert_frequencies_match(samples, w / w.sum(dtype=np.float64))
    assert _draw(w, 0.0) == 0 and _draw(w, np.nextafter(1.0, 0.0)) == w.size - 1


# -------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("kw", [dict(), dict(top_k=10), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=20, top_p=0.9, min_p=0.05)])
def test_same_seed_same_sequence(logits, kw):
    a = draws(make_sampler(temperature=1.0, seed=42, **kw), logits, 200)
    b = draws(make_sampler(temperature=1.0, seed=42, **kw), logits, 200)
    c = draws(make_sampler(temperature=1.0, seed=43, **kw), logits, 200)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_semantics():
    x = np.array([2.0, -2.0, 0.0, 4.0, -1.0], dtype=np.float32)
    out = apply_repetition_penalty(x, [0, 1, 2, 0, 1], 2.0)  # repeats count once
    np.testing.assert_array_equal(out, [1.0, -4.0, 0.0, 4.0, -1.0])
    np.testing.assert_array_equal(x, [2.0, -2.0, 0.0, 4.0, -1.0])  # input untouched
    np.testing.assert_array_equal(apply_repetition_penalty(x, [3, 4], 0.5), [2.0, -2.0, 0.0, 8.0, -0.5])
    np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1], 1.0), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, [], 1.3), x)
    np.testing.assert_allclose(apply_repetition_penalty(x, np.array([3]), 1.5), [2.0, -2.0, 0.0, 4.0 / 1.5, -1.0], rtol=1e-6)


def test_repetition_penalty_lowers_the_repeated_token():
    x = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    assert make_sampler()(apply_repetition_penalty(x, [0], 1.2)) == 1


def test_repetition_penalty_errors():
    x = np.zeros(5, dtype=np.float32)
    with pytest.raises(GenerationError, match=r"previous token id 5 is outside the vocabulary \[0, 5\)"):
        apply_repetition_penalty(x, [1, 5], 1.1)
    with pytest.raises(GenerationError, match=r"previous token id -1"):
        apply_repetition_penalty(x, [-1], 1.1)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(GenerationError, match=r"repetition penalty must be a finite number > 0.*got"):
            apply_repetition_penalty(x, [1], bad)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(temperature=-0.1), r"temperature must be a number >= 0 .*got -0\.1"),
        (dict(temperature=float("nan")), r"temperature must be .*got nan"),
        (dict(temperature="hot"), r"temperature must be .*got 'hot'"),
        (dict(top_k=-1), r"top_k must be an integer >= 0 .*got -1"),
        (dict(top_k=2.5), r"top_k must be an integer >= 0 .*got 2\.5"),
        (dict(top_k=True), r"top_k must be an integer .*got True"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\] .*got 0\.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\] .*got 1\.5"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\) .*got 1\.0"),
        (dict(min_p=-0.2), r"min_p must be in \[0, 1\) .*got -0\.2"),
        (dict(seed=-3), r"seed must be an integer >= 0 or None .*got -3"),
        (dict(seed=1.5), r"seed must be .*got 1\.5"),
    ],
)
def test_bad_sampling_values_are_named(kw, message):
    with pytest.raises(GenerationError, match=message):
        validate_sampling(**kw)
    with pytest.raises(GenerationError, match=message):
        make_sampler(**{"temperature": 1.0, **kw})


def test_validate_accepts_the_edges():
    validate_sampling(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None)
    validate_sampling(temperature=1e-6, top_k=np.int64(40), top_p=1e-9, min_p=0.999, repetition_penalty=1e-3, seed=0)
    with pytest.raises(GenerationError, match=r"repetition penalty must be .*> 0.*got 0"):
        validate_sampling(repetition_penalty=0)


def test_bad_logits():
    for sampler in (make_sampler(), make_sampler(temperature=1.0, seed=0), make_sampler(1.0, top_k=2, seed=0)):
        with pytest.raises(GenerationError, match=r"NaN or all -inf"):
            sampler(np.array([0.0, np.nan, 1.0], dtype=np.float32))
        with pytest.raises(GenerationError, match=r"NaN or all -inf"):
            sampler(np.full(4, -np.inf, dtype=np.float32))
        with pytest.raises(GenerationError, match=r"shape \(2, 3\)"):
            sampler(np.zeros((2, 3), dtype=np.float32))
        with pytest.raises(GenerationError, match=r"empty"):
            sampler(np.zeros(0, dtype=np.float32))
