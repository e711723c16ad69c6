"""Speculative decoding (``runtime/speculative.py``) on tiny real files run by LiteRT.

The model is the session's tiny Gemma 3 (fp32, context 64; ``conftest.tiny_gemma3``). Three
drafts share its tokenizer: its own int8 conversion (a draft of itself: mostly right), a
smaller Gemma 3 of another shape, trained briefly on the same text, at a shorter context (the
"270M drafting for 1B" pairing: often wrong, so rounds are rejected and the caches roll back),
and that smaller model converted ``--for-draft`` (its steps' logits cover only the hot rows).
Greedy output must equal decoding without a draft, token for token; sampled output must have
the same distribution (chi-square against the plain sampler, with a control that must fail).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CONTEXT, PREFILL, _train, corpus_ids

DRAFT_CONTEXT = 48  # shorter than the model's: past it the draft reads only the latest tokens


@pytest.fixture(autouse=True)
def never_pause(monkeypatch):
    """Tiny drafts cost as much as the tiny model (call overhead), so the schedule would pause
    them; these tests are about rounds. ``test_a_draft_that_does_not_pay_pauses`` is about pausing."""
    from gemma_edge.runtime import speculative

    monkeypatch.setattr(speculative, "PROBE_EVERY", 0)


@pytest.fixture(scope="module")
def self_draft(tiny, tmp_path_factory) -> str:
    """The same checkpoint at int8."""
    from gemma_edge.convert.pipeline import convert

    out = tmp_path_factory.mktemp("draft") / "self_int8.tflite"
    convert(str(tiny.checkpoint), str(out), quant="int8", max_context=CONTEXT, prefill_lengths=PREFILL,
            progress=False, score_length=0)
    return str(out)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, sp_model_path) -> Path:
    """Another Gemma 3 shape (2 layers, d_model 32, 2 heads), same tokenizer, trained briefly."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_hf_config

    d = tmp_path_factory.mktemp("small_draft")
    cfg = tiny_hf_config(3)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 64, 2
    cfg.num_attention_heads, cfg.num_key_value_heads = 2, 1
    cfg.layer_types = ["sliding_attention", "full_attention"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        _train(model, sp_model_path, steps=60)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(d / "ckpt", safe_serialization=True)
    shutil.copy(sp_model_path, d / "ckpt" / "tokenizer.model")
    return d / "ckpt"


@pytest.fixture(scope="module")
def small_draft(small_ckpt) -> str:
    """``small_ckpt`` at context 48, fp32."""
    from gemma_edge.convert.pipeline import convert

    out = small_ckpt.parent / "small.tflite"
    convert(str(small_ckpt), str(out), quant="fp32", max_context=DRAFT_CONTEXT, prefill_lengths=(8,),
            progress=False, score_length=0)
    return str(out)


@pytest.fixture(scope="module")
def hot_draft(small_ckpt) -> str:
    """``small_ckpt`` converted --for-draft (int8): its steps go through decode_hot, whose logits
    cover the 64 hot rows of the 512 (``contract.hot_ranges``), so the draft cannot propose the
    other tokens the model writes (more rejections, and q is 0 where p is not)."""
    from gemma_edge.convert.pipeline import convert

    out = small_ckpt.parent / "small_hot.tflite"
    convert(str(small_ckpt), str(out), quant="int8", max_context=DRAFT_CONTEXT, prefill_lengths=(8,),
            progress=False, score_length=0, for_draft=True)
    return str(out)


@pytest.fixture(scope="module")
def plain(path):
    import gemma_edge

    return gemma_edge.load(path)


@pytest.fixture(scope="module", params=["self_int8", "small", "hot"])
def spec(request, path, self_draft, small_draft, hot_draft):
    import gemma_edge

    return gemma_edge.load(path, draft={"self_int8": self_draft, "small": small_draft, "hot": hot_draft}[request.param])


@pytest.fixture(scope="module")
def spec_hot(path, hot_draft):
    import gemma_edge

    return gemma_edge.load(path, draft=hot_draft)


@pytest.fixture(scope="module")
def spec_small(path, small_draft):
    import gemma_edge

    return gemma_edge.load(path, draft=small_draft)


def prompts(sp_model_path) -> list[list[int]]:
    ids = corpus_ids(sp_model_path, 200, seed=11)
    return [[2] + ids[:3], [2] + ids[20:32], [2] + ids[60:90], [2]]


# ---- greedy: identical to decoding alone --------------------------------------------------------

def test_greedy_output_is_identical(spec, plain, sp_model_path):
    """To the end of the context (finish "length" at the same token), for every prompt; the stats
    show rounds that kept tokens and rounds that were rejected (so the caches rolled back)."""
    kept = rejected = 0
    for ids in prompts(sp_model_path):
        for max_tokens in (1, 2, 3, 7, 200):
            want = plain.generate(ids, max_tokens=max_tokens, temperature=0.0)
            got = spec.generate(ids, max_tokens=max_tokens, temperature=0.0)
            assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason), \
                (ids, max_tokens)
            s = spec.speculator.stats
            kept += s.accepted
            rejected += s.drafted - s.accepted
    assert kept > 20 and rejected > 3, (kept, rejected)


def test_a_draft_reads_at_most_the_latest_tokens_it_can_hold(spec_small, plain, sp_model_path, monkeypatch):
    """The draft's context is 48 tokens, the model's 64, and a draft that would have to prefill
    more than ``_keep`` tokens (23 here, half its context; 512 for real drafts) reads only the
    latest ``_keep``, at its own positions from 0 (``_draft_base``). So a long prompt costs the
    draft at most that, and once a round would run past the draft's context it starts over in
    the same way: rounds go on to the model's context end, where before every position past
    48 - k decoded without the draft. The output is the model's own. A prompt the draft can
    take whole is read whole, and a seeded sampled generation never rebases (where the draft
    restarts depends on k)."""
    from gemma_edge.runtime import speculative

    sp = spec_small.speculator
    assert spec_small.draft.context_length == DRAFT_CONTEXT < spec_small.context_length
    rounds, prefills = [], []
    real_base, real_prefill = speculative.Speculator._draft_base, spec_small.draft._prefill

    def draft_base(self, ctx, k):
        base = real_base(self, ctx, k)
        rounds.append((len(ctx) - 1, k, base))
        return base

    def prefill(ids):
        n = real_prefill(ids)
        prefills.append((len(ids), n))
        return n

    monkeypatch.setattr(speculative.Speculator, "_draft_base", draft_base)
    monkeypatch.setattr(spec_small.draft, "_prefill", prefill)
    keep = sp._keep(40)
    assert keep == (DRAFT_CONTEXT - 1) // 2
    for ids in prompts(sp_model_path)[1:3]:  # 13 tokens (read whole), 31 (more than keep)
        rounds.clear(), prefills.clear()
        want = plain.generate(ids, max_tokens=200, temperature=0.0)
        got = spec_small.generate(ids, max_tokens=200, temperature=0.0)
        assert (got.tokens, got.finish_reason) == (want.tokens, "length")
        first_pos, _, first_base = rounds[0]
        assert (first_base == 0) == (first_pos <= keep) and prefills[0][0] == first_pos - first_base + 1, rounds
        assert all(n <= keep for _, n in prefills), prefills
        late = [(pos, k, base) for pos, k, base in rounds if pos + k >= DRAFT_CONTEXT]
        assert len(late) >= 3 and all(base > 0 and pos - base + k < DRAFT_CONTEXT for pos, k, base in late), rounds
        assert max(pos for pos, _, _ in rounds) >= spec_small.context_length - 8, rounds  # to near the end
        restarts = {base for _, _, base in rounds} - {0}
        assert sum(1 for length, n in prefills if (length, n) == (keep + 1, keep)) >= len(restarts), (prefills, restarts)

    rounds.clear()
    kw = dict(max_tokens=200, temperature=0.9, top_k=20, seed=7)
    assert spec_small.generate(ids, **kw).tokens == spec_small.generate(ids, **kw).tokens
    assert rounds and all(base == 0 and pos + k < DRAFT_CONTEXT for pos, k, base in rounds), rounds


def test_any_schedule_of_k_gives_the_same_tokens(spec_small, plain, sp_model_path, monkeypatch):
    """k from 1 to MAX_DRAFT in a fixed pseudo-random order instead of the cost model: greedy and
    seeded sampled output do not change (each position is decided by the same rule)."""
    from gemma_edge.runtime import speculative

    ids = prompts(sp_model_path)[1]
    kw = dict(max_tokens=40, temperature=0.9, top_k=20, seed=7)
    want_greedy = plain.generate(ids, max_tokens=40, temperature=0.0).tokens
    want_sampled = spec_small.generate(ids, **kw).tokens
    rng = np.random.default_rng(0)
    chosen = []

    def choose(self, k_max, may_pause=True):
        chosen.append(int(rng.integers(1, speculative.MAX_DRAFT + 1)))
        return min(chosen[-1], k_max)

    monkeypatch.setattr(speculative._Schedule, "choose", choose)
    assert spec_small.generate(ids, max_tokens=40, temperature=0.0).tokens == want_greedy
    assert spec_small.generate(ids, **kw).tokens == want_sampled
    assert max(chosen) > 8 and min(chosen) == 1


def test_chat_turns_are_identical(spec, plain):
    """A Conversation with a draft: each turn prefills only its new tokens in both models, and
    after the context fills, old turns are dropped; the replies are the model's own."""
    a, b = plain.chat(), spec.chat()
    for msg in ("the model", "cache layer weight", "gemma edge phone", "數學 x = [1, 22]", "the of and"):
        ra = a.ask(msg, max_tokens=12, temperature=0.0)
        rb = b.ask(msg, max_tokens=12, temperature=0.0)
        assert rb == ra, msg
        assert b.tokens == a.tokens
    assert a.dropped_turns > 0  # the context policy was exercised too


def test_a_draft_that_does_not_pay_pauses(spec_small, plain, sp_model_path, monkeypatch):
    """A draft step measured as slow as the model's decode: after a probing round, tokens are
    decoded without the draft, with a round after PROBE_EVERY tokens, then 2x, 4x as many (a
    round every 4 tokens left fewer than 40 of the 60 to decode alone); the output is the same."""
    from gemma_edge.runtime import speculative

    monkeypatch.setattr(speculative, "PROBE_EVERY", 4)
    sched = spec_small.speculator._schedule
    real = sched.draft_time
    monkeypatch.setattr(sched, "draft_time", lambda seconds: real(max(seconds, 2 * (sched.t_decode or 0))))
    ids = prompts(sp_model_path)[1]
    want = plain.generate(ids, max_tokens=60, temperature=0.0).tokens
    assert spec_small.generate(ids, max_tokens=60, temperature=0.0).tokens == want
    s = spec_small.speculator.stats
    assert s.plain > 40 and 2 <= s.rounds <= 5, s
    kw = dict(max_tokens=20, seed=3, **SAMPLING)  # with a seed, sampling never pauses
    spec_small.generate(ids, **kw)
    assert spec_small.speculator.stats.plain == 1


def test_stream_yields_one_response_per_token(spec_small, plain, sp_model_path):
    ids = prompts(sp_model_path)[2]
    want = plain.generate(ids, max_tokens=20, temperature=0.0)
    rs = list(spec_small.stream_generate(ids, max_tokens=20, temperature=0.0))
    assert [r.token for r in rs] == want.tokens
    assert [r.generation_tokens for r in rs] == list(range(1, len(rs) + 1))
    assert [r.finish_reason for r in rs[:-1]] == [None] * (len(rs) - 1) and rs[-1].finish_reason == "length"
    assert "".join(r.text for r in rs) == want.text
    assert spec_small.speculator.stats.rounds > 0


def test_stop_strings_and_a_closed_stream(spec_small, plain, sp_model_path):
    """A stop string ends generation inside a round: the same text as without the draft, and the
    next generation (which reuses the cached prefix) is still right."""
    ids = prompts(sp_model_path)[1]
    full = plain.generate(ids, max_tokens=30, temperature=0.0).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = plain.generate(ids, max_tokens=30, temperature=0.0, stop=[stop])
    got = spec_small.generate(ids, max_tokens=30, temperature=0.0, stop=[stop])
    assert (got.text, got.finish_reason) == (want.text, "stop")
    stream = spec_small.stream_generate(ids, max_tokens=30, temperature=0.0)
    for _ in range(5):
        next(stream)
    stream.close()  # mid-round
    longer = ids + want.tokens[:3]
    assert spec_small.generate(longer, max_tokens=15, temperature=0.0).tokens == \
        plain.generate(longer, max_tokens=15, temperature=0.0).tokens


def test_eos_ends_generation(spec_small, plain, monkeypatch, sp_model_path):
    """A stop token inside a round ends it there: make a frequent token a stop token."""
    ids = prompts(sp_model_path)[1]
    tokens = plain.generate(ids, max_tokens=30, temperature=0.0).tokens
    stop = tokens[len(tokens) // 2]
    for m in (plain, spec_small):
        monkeypatch.setattr(m, "stop_token_ids", frozenset({stop}))
    want = plain.generate(ids, max_tokens=30, temperature=0.0)
    got = spec_small.generate(ids, max_tokens=30, temperature=0.0)
    assert got.tokens == want.tokens and got.tokens[-1] == stop and got.finish_reason == "stop"


def test_repetition_penalty_greedy(spec_small, plain, sp_model_path):
    ids = prompts(sp_model_path)[2]
    kw = dict(max_tokens=30, temperature=0.0, repetition_penalty=1.5)
    assert spec_small.generate(ids, **kw).tokens == plain.generate(ids, **kw).tokens


def test_constrained_requests_decode_without_the_draft(spec_small, plain, monkeypatch):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    want = plain.generate("the model", max_tokens=20, temperature=0.0, json_schema=schema)

    def refuse(*a, **k):
        raise AssertionError("the draft was used for a constrained request")

    monkeypatch.setattr(spec_small.speculator, "tokens", refuse)
    got = spec_small.generate("the model", max_tokens=20, temperature=0.0, json_schema=schema)
    assert got.text == want.text


# ---- sampling: the distribution is unchanged ----------------------------------------------------

SAMPLING = dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
DRAWS = 1500


def _outcomes(model, ids, draws: int) -> list[tuple[int, ...]]:
    """Tokens 2..4 of `draws` generations (the first is decoded plainly in both runs)."""
    return [tuple(model.generate(ids, max_tokens=4, seed=s, **SAMPLING).tokens[1:]) for s in range(draws)]


def _homogeneity_p(a: list, b: list) -> float:
    """Chi-square test that two samples come from one distribution (outcomes seen fewer than 10
    times in both together are pooled)."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    big = [k for k in keys if ca[k] + cb[k] >= 10]
    rest = [k for k in keys if ca[k] + cb[k] < 10]
    table = [[ca[k] for k in big] + [sum(ca[k] for k in rest)], [cb[k] for k in big] + [sum(cb[k] for k in rest)]]
    table = [row[:-1] for row in table] if not rest else table
    return float(chi2_contingency(np.array(table)).pvalue)


@pytest.fixture(scope="module")
def plain_draws(plain, sp_model_path):
    return _outcomes(plain, prompts(sp_model_path)[1], DRAWS)


@pytest.mark.parametrize("which", ["small", "hot"])
def test_sampled_distribution_is_unchanged(which, spec_small, spec_hot, plain_draws, sp_model_path):
    """Also with a --for-draft draft, whose q gives no mass to the tokens outside its hot rows."""
    spec = {"small": spec_small, "hot": spec_hot}[which]
    got = _outcomes(spec, prompts(sp_model_path)[1], DRAWS)
    stats = spec.speculator.stats
    assert stats.rounds > 0
    p = _homogeneity_p(plain_draws, got)
    assert p > 1e-3, f"speculative sampling changed the distribution (chi-square p = {p:.2g})"


def test_the_distribution_test_can_fail(spec_small, plain_draws, sp_model_path, monkeypatch):
    """Control: keep every drafted token (the draft's distribution instead of the model's)."""
    from gemma_edge.runtime import speculative

    monkeypatch.setattr(speculative, "accept", lambda p, q, token, *a, **k: (token, True))
    got = _outcomes(spec_small, prompts(sp_model_path)[1], DRAWS)
    assert _homogeneity_p(plain_draws, got) < 1e-6


def _distributions(rng, vocab: int):
    from gemma_edge.runtime.sampling import make_distribution

    x, y = rng.normal(0, 1.5, vocab), rng.normal(0, 1.5, vocab)
    dense = make_distribution(temperature=1.0)
    sparse = make_distribution(temperature=1.5, top_k=7, top_p=0.9)
    return [(dense(x), dense(y)), (sparse(x), sparse(y)), (dense(x), sparse(y)), (sparse(x), dense(y))]


@pytest.mark.parametrize("case", range(4), ids=["dense", "sparse", "dense-p", "sparse-p"])
def test_acceptance_rule_gives_p(case):
    """The rule alone, with the exact p as reference: 200000 positions, chi-square goodness of fit;
    the control (every drafted token kept) fails the same test."""
    from scipy.stats import chisquare

    from gemma_edge.runtime.speculative import accept

    vocab = 12
    rng = np.random.default_rng(case)
    p, q = _distributions(rng, vocab)[case]
    P, Q = p.probs_of(None, vocab), q.probs_of(None, vocab)
    n = 200_000
    u = rng.random((n, 3))
    qc = np.cumsum(Q)
    drafts = np.minimum(np.searchsorted(qc, u[:, 0] * qc[-1], side="right"), vocab - 1)
    out = np.array([accept(p, q, int(d), a, r, vocab)[0] for d, a, r in zip(drafts, u[:, 1], u[:, 2])])
    def fits_p(tokens) -> bool:
        counts = np.bincount(tokens, minlength=vocab)
        if counts[P == 0].sum():
            return False
        assert (P > 0).sum() >= 3  # a test with some power
        return chisquare(counts[P > 0], n * P[P > 0]).pvalue > 1e-3

    assert fits_p(out)
    assert not fits_p(drafts)  # control: the draft's own tokens, all kept


def test_a_for_draft_file_drafts_through_decode_hot(hot_draft, spec_hot, plain, sp_model_path):
    """decode_hot's logits are decode's at the hot rows (``contract.hot_ids``) and at the tokens
    of ``extra_ids``, position by position (those through a float product of the looked-up rows,
    not the int8 kernel's, so to within its rounding); the speculator's draft steps go through
    it, passing the context's tokens outside the hot rows, and the output is the model's own."""
    import gemma_edge
    from gemma_edge.runtime import contract

    d = gemma_edge.load(hot_draft)
    assert d.info.decode_hot and d.config.embed_hot_rows == 64
    hot = contract.hot_ids(d.config)
    assert len(hot) == 64 and hot == sorted(set(hot))
    ids = prompts(sp_model_path)[2][:20]
    d._prefill(ids)
    cold = [t for t in range(d.tokenizer.vocab_size) if t not in set(hot)]
    extra = np.array(cold[-contract.HOT_EXTRA:], np.int32)  # the last ones: rare pieces
    token = ids[-1]
    for pos in range(len(ids) - 1, len(ids) + 5):
        full = d.backend.decode(token, pos).copy()
        part = d.backend.decode_hot(token, pos, extra).copy()  # the same slot written again, with the same token
        np.testing.assert_allclose(part[:64], full[hot], rtol=0, atol=1e-5)
        np.testing.assert_allclose(part[64:], full[extra], rtol=0, atol=0.02 * np.abs(full).max())
        token = int(np.argmax(full))

    spec_hot.reset()
    draft = spec_hot.draft
    calls = []
    real = draft.backend.decode_hot

    def counted(token, pos, extra):
        calls.append(spec_hot.speculator._hot_set.isdisjoint(extra[extra != spec_hot.speculator._hot[0]].tolist()))
        return real(token, pos, extra)

    draft.backend.decode_hot = counted
    try:
        for ids in prompts(sp_model_path)[:3]:
            want = plain.generate(ids, max_tokens=25, temperature=0.0).tokens
            assert spec_hot.generate(ids, max_tokens=25, temperature=0.0).tokens == want
    finally:
        del draft.backend.decode_hot
    s = spec_hot.speculator.stats
    assert s.rounds > 0 and len(calls) >= s.k_total and all(calls)  # extra_ids: tokens outside the hot rows


def test_a_draft_step_puts_each_logit_at_its_token(spec_hot, hot_draft, sp_model_path):
    """``_draft_step``'s logits over the vocabulary: the draft's own (``decode`` of a second copy
    of the file, at the same position) at the hot ids and at the context's latest other tokens,
    -inf elsewhere."""
    import gemma_edge

    sp, other = spec_hot.speculator, gemma_edge.load(hot_draft)
    ids = prompts(sp_model_path)[3] + corpus_ids(sp_model_path, 40, seed=5)
    extra = sp._extra(ids)
    assert extra[1] >= 3  # the context has tokens outside the hot rows
    sp.draft.reset()
    sp.draft._prefill(ids)
    other._prefill(ids)
    got, want = sp._draft_step(ids[-1], extra), other._decode(ids[-1])
    finite = np.flatnonzero(np.isfinite(got))
    assert set(finite.tolist()) == set(sp._hot.tolist()) | set(extra[0][:extra[1]].tolist())
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=0.02 * np.abs(want).max())


def test_the_draft_extra_ids_are_the_context_s_latest_tokens_outside_the_hot_rows(spec_hot):
    from gemma_edge.runtime import contract

    sp = spec_hot.speculator
    hot = sp._hot.tolist()
    cold = [t for t in range(300) if t not in sp._hot_set][:40]
    ids, n = sp._extra([hot[0], cold[0], hot[1], cold[1], cold[0], hot[2]])
    assert n == 2 and ids[:2].tolist() == [cold[0], cold[1]] and set(ids[2:].tolist()) == {hot[0]}
    ids, n = sp._extra(cold + [hot[3]])
    assert n == contract.HOT_EXTRA and ids.tolist() == cold[::-1][:contract.HOT_EXTRA]
    assert sp._extra(hot[:5])[1] == 0
    from gemma_edge.runtime.speculative import EXTRA_SCAN

    far = [cold[0]] + [hot[0]] * EXTRA_SCAN  # a token outside the scan: a round reads a bounded tail
    assert sp._extra(far)[1] == 0 and sp._extra(far[1:] + [cold[0]])[1] == 1


def test_seeded_sampling_repeats_with_a_draft(spec_small, sp_model_path):
    ids = prompts(sp_model_path)[0]
    kw = dict(max_tokens=25, seed=99, **SAMPLING)
    assert spec_small.generate(ids, **kw).tokens == spec_small.generate(ids, **kw).tokens


# ---- the pairing, errors, CLI ------------------------------------------------------------------

def test_draft_must_share_the_tokenizer(path, tmp_path, tiny):
    """Another tokenizer (a SentencePiece model trained on other text) -> DraftError naming both."""
    import shutil

    import sentencepiece as spm

    import gemma_edge
    from conftest import _corpus
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.errors import DraftError

    (tmp_path / "c.txt").write_text("\n".join(reversed(_corpus(seed=3))), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "tok"), vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
        control_symbols=["<start_of_turn>", "<end_of_turn>"], split_digits=True, add_dummy_prefix=False)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint, ckpt)
    shutil.copy(tmp_path / "tok.model", ckpt / "tokenizer.model")
    other = tmp_path / "other.tflite"
    convert(str(ckpt), str(other), quant="int8", max_context=32, prefill_lengths=(8,), progress=False,
            score_length=0)
    with pytest.raises(DraftError, match="share the model's tokenizer") as e:
        gemma_edge.load(path, draft=str(other))
    assert str(other) in str(e.value) and path in str(e.value)
    m = gemma_edge.load(path)
    with pytest.raises(DraftError, match="its own draft"):
        m.set_draft(m)


def test_a_model_without_score_signature_says_to_reconvert(self_draft, path):
    import gemma_edge
    from gemma_edge.runtime.errors import DraftError

    with pytest.raises(DraftError, match="score_<T>.*convert it again") as e:
        gemma_edge.load(self_draft, draft=path)  # the int8 file was converted with score_length=0
    assert self_draft in str(e.value)


def test_set_draft_switches_it_on_and_off(path, small_draft, plain, sp_model_path):
    import gemma_edge

    m = gemma_edge.load(path)
    ids = prompts(sp_model_path)[1]
    want = plain.generate(ids, max_tokens=12, temperature=0.0).tokens
    d = gemma_edge.load(small_draft)
    m.set_draft(d)
    assert m.draft is d and m.generate(ids, max_tokens=12, temperature=0.0).tokens == want
    assert m.speculator.stats.rounds > 0
    m.set_draft(None)
    assert m.draft is None and m.generate(ids, max_tokens=12, temperature=0.0).tokens == want


def _cli(*args):
    exe = Path(sys.executable).with_name("gemma-edge")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ})


def test_cli_run_with_a_draft(path, small_draft, plain):
    want = plain.generate("the model", max_tokens=10, temperature=0.0).text
    proc = _cli("run", path, "--draft", small_draft, "-p", "the model", "-t", "0", "-n", "10", "-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"
    assert "draft" in proc.stderr and "accepted" in proc.stderr


def test_cli_convert_for_draft_then_run_with_it(path, small_ckpt, plain, tmp_path):
    """`gemma-convert --for-draft` writes a draft `gemma-edge info` names as one, without the
    score_<T> signatures a draft never uses (unless --score-lengths asks for them), which `run
    --draft` uses (the model's own text), and which runs alone as any file does."""
    out = tmp_path / "d.tflite"
    convert = [str(Path(sys.executable).with_name("gemma-convert")), str(small_ckpt), "--quant", "int4-b32",
               "--max-context", str(DRAFT_CONTEXT), "--prefill-lengths", "8", "--for-draft", "-q"]
    proc = subprocess.run(convert + ["-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = _cli("info", out)
    assert info.returncode == 0 and "decode_hot over 64 frequent pieces" in info.stdout, info.stdout + info.stderr
    assert "score chunks none" in info.stdout, info.stdout
    asked = tmp_path / "d4.tflite"
    proc = subprocess.run(convert + ["-o", str(asked), "--score-lengths", "4"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "score chunks 4" in _cli("info", asked).stdout
    reported = tmp_path / "dr.tflite"  # --report keeps the defaults: its perplexity reads through them
    proc = subprocess.run(convert + ["-o", str(reported), "--report"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "score chunks 4, 8, 32" in _cli("info", reported).stdout
    want = plain.generate("the model", max_tokens=10, temperature=0.0).text
    proc = _cli("run", path, "--draft", out, "-p", "the model", "-t", "0", "-n", "10", "-v")
    assert proc.returncode == 0 and proc.stdout == want + "\n", proc.stderr
    assert "rounds" in proc.stderr
    alone = _cli("run", out, "-p", "the model", "-t", "0", "-n", "5")
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr


def test_cli_draft_errors_exit_2(path, self_draft, tmp_path):
    proc = _cli("run", self_draft, "--draft", path, "-p", "hi", "-n", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "convert it again" in proc.stderr
    proc = _cli("run", path, "--draft", tmp_path / "missing.tflite", "-p", "hi", "-n", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing.tflite" in proc.stderr


def test_bench_reports_the_draft(path, small_draft):
    import gemma_edge

    m = gemma_edge.load(path, draft=small_draft)
    r = m.benchmark(prompt_tokens=8, gen_tokens=16, runs=1)
    assert r["draft"]["model"] == small_draft
    assert 0.0 <= r["draft"]["acceptance_rate"] <= 1.0 and r["draft"]["mean_k"] >= 1.0


def test_serve_with_a_draft(path, small_draft, plain):
    """`serve MODEL --draft DRAFT`: the OpenAI API answers with the model's own greedy text."""
    import openai

    want = plain.generate("the model", max_tokens=12, temperature=0.0, stop_tokens=False).text
    proc = subprocess.Popen([sys.executable, "-m", "gemma_edge.runtime.cli", "serve", path, "--draft", small_draft,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        got = client.completions.create(model="m", prompt="the model", max_tokens=12, temperature=0)
        assert got.choices[0].text == want
    finally:
        proc.send_signal(2)  # Ctrl-C
        _, err = proc.communicate(timeout=300)
    assert f"draft {small_draft}" in err and "Traceback" not in err, err


def test_serve_refuses_a_bad_draft(path, self_draft):
    from click.testing import CliRunner

    from gemma_edge.runtime.cli import serve

    out = CliRunner().invoke(serve, [self_draft, "--draft", path])
    assert out.exit_code == 2 and "gemma-edge: error:" in out.output and "convert it again" in out.output


def test_a_first_slow_call_does_not_fix_the_schedule():
    """A signature's first call also maps its memory (measured on the 270M int8: score_8's first
    call 31 ms, later ones 14). Timed once, a score_<T> is still tried, and its second timing
    replaces the first; only from then on are timings averaged. Before, a slow first score_8 kept
    every later round at k <= 3."""
    from gemma_edge.runtime.speculative import _Schedule

    s = _Schedule([4, 8, 32])
    s.kept, s.rejected = 0.9, 0.1
    s.decode_time(0.013)  # the first decode: its first call
    s.draft_time(0.004)
    s.draft_time(0.002)
    for T, seconds in ((4, 0.011), (32, 0.060)):
        s.score_time(T, seconds)
        s.score_time(T, seconds)
    s.score_time(8, 0.031)  # its first call
    assert (s.t_decode, s.t_draft) == (0.013, 0.002)
    assert 3 < s.choose(15, may_pause=False) < 8  # score_8 tried again, as if it cost what score_4 does
    s.score_time(8, 0.014)
    assert s.t_score[8] == 0.014  # replaced, not averaged with 0.031
    k = s.choose(15, may_pause=False)
    assert 3 < k < 8, k  # at 0.9 and these costs, score_8's rounds are the fastest
    s.score_time(8, 0.024)
    assert s.t_score[8] == pytest.approx(0.8 * 0.014 + 0.2 * 0.024)  # from the second on: the running mean
    s.decode_time(0.009)
    assert s.t_decode == 0.009
    s2 = _Schedule([4, 8, 32])
    s2.kept, s2.rejected = 0.9, 0.1
    s2.t_draft, s2.t_decode, s2.t_score = 0.002, 0.009, {4: 0.011, 8: 0.031, 32: 0.060}  # each timed twice or more
    assert s2.choose(15, may_pause=False) <= 3  # a score_8 known to be slow is not chosen


def test_the_python_around_a_round_counts_in_its_cost(monkeypatch):
    """``round_time`` (a round's time beyond its draft steps and score call) is part of what a
    round costs, and rounds must be expected ``PAY_MARGIN`` times as fast as decoding alone: rounds
    whose calls alone would be 1.15x as fast, but which spend 2 ms more each in the acceptance
    rule and reading logits (1.05x), do not pay, and tokens are decoded without the draft. So do
    rounds expected at 1.05x from their calls alone. (Before, the schedule drafted at an
    expected 1.1x, and an int8 270M with its int4-b32 draft ran at 0.95x.)"""
    from gemma_edge.runtime import speculative
    from gemma_edge.runtime.speculative import PAY_MARGIN, _Schedule

    monkeypatch.setattr(speculative, "PROBE_EVERY", 16)  # as shipped (this module's tests never pause)
    assert PAY_MARGIN == 1.1

    def schedule(score_4):
        s = _Schedule([4, 8, 32])
        s.kept, s.rejected = 0.82, 0.18
        s.t_draft, s.t_decode, s.t_score = 0.0035, 0.0077, {4: score_4, 8: 0.0123, 32: 0.0289}
        return s

    def best(s):
        return max(s.rate(k) for k in range(1, 16) if s.rate(k)) * s.t_decode

    s = schedule(0.008)
    assert 1.12 < best(s) < 1.18
    assert s.choose(15) >= 1
    s.round_time(0.003)  # the first round: replaced by the next
    s.round_time(0.002)
    assert s.t_round == 0.002
    assert 1.0 < best(s) < 1.08
    assert s.choose(15) == 0
    s = schedule(0.0098)
    assert 1.0 < best(s) < 1.08
    assert s.choose(15) == 0


@pytest.mark.parametrize("alpha", [0.3, 0.8, 0.97])
def test_schedule_rate_is_the_rounds_mean(alpha):
    """``_Schedule.rate`` (what ``choose`` and ``benchmarks/speculative.py --costs`` use) against
    rounds simulated one by one: each drafted token kept with probability alpha until the first
    rejection; a round yields the kept tokens plus the model's own, and costs k draft steps, the
    score call, and one more draft step when all k were kept (the draft then has not seen its last
    token). ``choose`` must pick the k with the best simulated rate."""
    from gemma_edge.runtime.speculative import _Schedule

    s = _Schedule([4, 8, 32])
    s.kept, s.rejected = alpha, 1 - alpha
    s.t_draft, s.t_decode = 0.006, 0.020
    s.t_score = {4: 0.024, 8: 0.033, 32: 0.060}
    rng = np.random.default_rng(int(alpha * 100))
    simulated = {}
    for k in range(1, 12):
        kept = np.minimum(rng.geometric(1 - alpha, 200_000) - 1, k)  # kept before the first rejection, at most k
        T = next(t for t in (4, 8, 32) if t >= k + 1)
        seconds = k * s.t_draft + s.t_score[T] + (kept == k) * s.t_draft
        simulated[k] = (kept + 1).sum() / seconds.sum()
        assert s.rate(k) == pytest.approx(simulated[k], rel=0.01)
    assert s.rate(40) is None  # no score_<T> holds 41 tokens
    assert simulated[s.choose(11, may_pause=False)] >= 0.99 * max(simulated.values())

