"""Long contexts: decode signatures for shorter spans, sliding windows that read (and keep)
only their window, and a KV cache whose memory follows the tokens it holds.

A tiny Gemma 3 (sliding window 8, one global layer of four) is converted with a context of
4096, so its file has ``decode_s512`` and ``decode_s2048`` beside ``decode``; its sliding
layers' caches are rings of 262 slots (``contract.ring_length``: R = 8 + 128 - 1). The same
checkpoint is also converted with full-length caches (``ring_caches=False``, the earlier layout,
whose sliding slots are given back as they leave the window). Logits at positions on both sides
of 512 and 2048 are checked against transformers' on the same 2300 tokens; the memory tests use
a variant with 256-wide heads, where a cache slot is 1 KB and pages are measurable. A variant
with a window of 600 and full-length caches checks ``decode_s512`` within the window, where the
sliding layers read slots from 0 (a ring file gets no span within its window).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import hf_logits, tiny_hf_config

CONTEXT = 4096
N_TOKENS = 2300  # crosses the 2048 span
DRAFT_NOISE = 0.1  # of each weight tensor's spread, added to make a draft that is sometimes wrong


def _checkpoint(out_dir, sp_model_path: str, head_dim: int = 16, kv_heads: int = 2, max_pos: int = 8192,
                window: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    cfg = tiny_hf_config(3)
    cfg.max_position_embeddings, cfg.head_dim, cfg.num_key_value_heads = max_pos, head_dim, kv_heads
    if window:
        cfg.sliding_window = window
    cfg.query_pre_attn_scalar = head_dim
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.25)
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy(sp_model_path, os.path.join(out_dir, "tokenizer.model"))
    return model


@pytest.fixture(scope="module")
def long(tmp_path_factory, sp_model_path):
    from gemma_edge.convert.pipeline import convert

    root = tmp_path_factory.mktemp("long")
    hf = _checkpoint(root / "ckpt", sp_model_path)
    path = str(root / "long.tflite")
    convert(str(root / "ckpt"), path, quant="fp32", max_context=CONTEXT, prefill_lengths=(8, 32, 128),
            progress=False)
    ids = [2] + [int(t) for t in np.random.default_rng(0).integers(10, 500, N_TOKENS - 1)]
    return path, hf, ids, hf_logits(hf, ids)


@pytest.fixture(scope="module")
def long_full(long):
    """``long``'s checkpoint with full-length caches (a slot per position)."""
    from gemma_edge.convert.pipeline import convert

    path = os.path.join(os.path.dirname(long[0]), "long_full.tflite")
    convert(os.path.join(os.path.dirname(long[0]), "ckpt"), path, quant="fp32", max_context=CONTEXT,
            prefill_lengths=(8, 32, 128), progress=False, ring_caches=False)
    return (path, *long[1:])


@pytest.fixture(params=["ring", "full"])
def layout(request, long, long_full):
    """``long`` (ring caches) or ``long_full``, with the name of its layout."""
    return request.param, (long if request.param == "ring" else long_full)


def _close(got, want, what):
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err < 1e-4, f"{what}: max relative error {err:.2e}"


def test_the_file_has_a_short_span_decode_signature(long):
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(long[0])
    assert info.decode_spans == [512, 2048]


def test_the_ring_layout_and_its_caches(long, long_full):
    """The ring file's sliding caches hold 2R - W slots and it records R; the full one holds the
    context in every cache and records no ring (so earlier gemma-edge versions read it)."""
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.modelfile import read_info

    ring, full = read_info(long[0]).config, read_info(long_full[0]).config
    assert ring.kv_ring == 8 + 128 - 1 and full.kv_ring == 0 and "kv_ring" not in full.to_dict()
    shapes = contract.kv_shapes(ring, CONTEXT)
    assert shapes[contract.RING_POS] == (1, 1, 2 * 135 - 8, 1)
    assert {s[2] for n, s in shapes.items() if n != contract.RING_POS} == {262, CONTEXT}
    assert {s[2] for s in contract.kv_shapes(full, CONTEXT).values()} == {CONTEXT}


@pytest.mark.parametrize("start", [2036, 700, 500])
def test_decode_on_both_sides_of_the_span_matches_transformers(layout, start):
    """Prefill (chunks whose sliding layers read their ring, or only their window of a full
    cache), then decode across 2048 (decode_s2048 below it, decode above it) or across 512
    (decode_s512, then decode_s2048); every step's logits are transformers'."""
    from gemma_edge.runtime.backend import CompiledBackend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    path, _, ids, want = layout[1]
    b = CompiledBackend(read_info(path), threads=1)
    used = []
    run = b._run
    b._run = lambda sig, *a: (used.append(sig), run(sig, *a))[1]
    run_prefill(b, ids[:start], 0)
    stop = {2036: 2060, 700: 712, 500: 520}[start]
    for p in range(start, stop):
        _close(b.decode(ids[p], p), want[p], f"position {p}")
    spans = {sig for sig in used if sig.startswith("decode")}
    assert spans == {2036: {"decode_s2048", "decode"}, 700: {"decode_s2048"},
                     500: {"decode_s512", "decode_s2048"}}[start], spans


def test_the_interpreter_backend_runs_a_ring_file(long):
    """The fallback without CompiledModel copies every cache between calls, the ring's slot
    positions included: past the ring (262 slots) its logits are transformers'."""
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    path, _, ids, want = long
    b = make_backend(read_info(path), kind="interp")
    run_prefill(b, ids[:600], 0)
    for p in range(600, 606):
        _close(b.decode(ids[p], p), want[p], f"position {p}")


@pytest.fixture(scope="module")
def wide_window(tmp_path_factory, sp_model_path):
    """The tiny Gemma 3 with a sliding window of 600 at context 1024, with full-length caches:
    decode_s512 lies within the window."""
    from gemma_edge.convert.pipeline import convert

    root = tmp_path_factory.mktemp("window")
    hf = _checkpoint(root / "ckpt", sp_model_path, window=600)
    path = str(root / "w600.tflite")
    convert(str(root / "ckpt"), path, quant="fp32", max_context=1024, prefill_lengths=(8, 32, 128), progress=False,
            score_length=0, ring_caches=False)
    ids = [2] + [int(t) for t in np.random.default_rng(2).integers(10, 500, 659)]
    return path, hf, ids, hf_logits(hf, ids)


def _computed_slice_starts(path: str, signature: str) -> int:
    """SLICE ops of ``signature`` whose start is computed in the graph (LiteRT runs those outside
    XNNPACK, as a copy) rather than a constant."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf(open(path, "rb").read(), 0)
    sg = next(model.subgraphs[s.subgraphIndex] for s in model.signatureDefs if s.signatureKey == signature.encode())
    code = {i: max(c.builtinCode, c.deprecatedBuiltinCode) for i, c in enumerate(model.operatorCodes)}

    def constant(t: int) -> bool:
        b = model.buffers[sg.tensors[t].buffer]
        return b is not None and ((b.data is not None and len(b.data) > 0) or (b.size or 0) > 0)

    return sum(1 for op in sg.operators if code[op.opcodeIndex] == fb.BuiltinOperator.SLICE and not constant(op.inputs[1]))


def test_a_span_within_the_window_reads_its_slots_from_zero(wide_window):
    """Below 512, inside a window of 600, every sliding layer sees all slots 0 .. pos: decode_s512
    reads them with SLICEs of constant start where plain decode slices each sliding layer's
    window from a start computed in the graph (the copy decode_s512 spares), and decode across
    512 and past the window (prefill 590, decode to 660) matches transformers at every step. With
    rings (what gemma-convert writes for Gemma 3 by default) the file gets no such span: its
    sliding layers read their ring in place."""
    import dataclasses

    from gemma_edge.runtime import contract
    from gemma_edge.runtime.backend import CompiledBackend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    path, _, ids, want = wide_window
    info = read_info(path)
    assert info.decode_spans == [512] and info.config.kv_ring == 0
    assert _computed_slice_starts(path, "decode_s512") == 0
    assert _computed_slice_starts(path, "decode") == 6  # the K and V windows of the three sliding layers
    ring = dataclasses.replace(info.config, kv_ring=contract.ring_length(info.config, 1024, 128))
    assert ring.kv_ring == 600 + 128 - 1 and contract.decode_spans(1024, ring) == ()
    assert contract.decode_spans(4096, ring) == (2048,) and contract.decode_spans(4096) == (512, 2048)
    b = CompiledBackend(info, threads=1)
    used = []
    run = b._run
    b._run = lambda sig, *a: (used.append(sig), run(sig, *a))[1]
    run_prefill(b, ids[:490], 0)
    for p in range(490, 530):
        _close(b.decode(ids[p], p), want[p], f"position {p}")
    b.clear_cache()
    run_prefill(b, ids[:590], 0)
    for p in range(590, 660):
        _close(b.decode(ids[p], p), want[p], f"position {p}")
    assert {sig for sig in used if sig.startswith("decode")} == {"decode_s512", "decode"}


def test_scoring_a_long_text_matches_transformers(layout):
    """score_<T> chunks over 2300 positions (sliding layers read their ring, or W + T - 1 slots
    of a full cache)."""
    import gemma_edge

    path, _, ids, want = layout[1]
    m = gemma_edge.load(path)
    got = dict(m._log_probs(ids))
    lp = want.astype(np.float64)
    lp = lp - (lp.max(axis=1, keepdims=True) + np.log(np.exp(lp - lp.max(axis=1, keepdims=True)).sum(1, keepdims=True)))
    for i, z in got.items():
        assert np.max(np.abs(z - lp[i:i + len(z)])) < 2e-3, i


def test_generation_past_released_slots_and_a_rewind_match_transformers(long_full, monkeypatch):
    """With the sliding layers' old slots given back every few tokens, greedy generation over
    ~2300 tokens still follows transformers; a rewind to before the released slots starts over."""
    import gemma_edge
    from gemma_edge.runtime import engine

    monkeypatch.setattr(engine, "RELEASE_MARGIN", 16)
    monkeypatch.setattr(engine, "RELEASE_STEP", 64)
    path, hf, ids, want = long_full
    m = gemma_edge.load(path)
    prompt = ids[:2250]
    out = m.generate(prompt, max_tokens=20, temperature=0.0, stop_tokens=False)
    assert m.backend.released > 2000
    V = m.tokenizer.vocab_size  # ids past the tokenizer's pieces are never generated
    full = hf_logits(hf, prompt + out.tokens)[:, :V]
    for step, t in enumerate(out.tokens):
        row = full[len(prompt) - 1 + step]
        assert row[t] >= row.max() - 1e-3, step
    # a prompt that shares only 1000 tokens with the cache: its window was released
    other = ids[:1000] + ids[1500:1600]
    again = m.generate(other, max_tokens=5, temperature=0.0, stop_tokens=False)
    assert again.prefilled_tokens >= len(other) - 1  # started over (it shares 1000 tokens with the cache)
    ref = hf_logits(hf, other + again.tokens)[:, :V]
    for step, t in enumerate(again.tokens):
        row = ref[len(other) - 1 + step]
        assert row[t] >= row.max() - 1e-3, step


def test_rewinds_of_a_ring_cache_match_transformers(long):
    """A ring holds the window and R - W = 127 slots more. A new prompt that shares all but the
    last few tokens of the cache (rewound by up to 127) goes on from the cache; one that shares
    less starts over, since the ring has overwritten the window it would need; one that extends it
    goes on. The logits of the next token match transformers' after each, and after 600 tokens
    decoded one by one, round the ring twice."""
    import gemma_edge

    path, hf, ids, want = long
    m = gemma_edge.load(path)
    V = m.tokenizer.vocab_size
    m._prefill(ids[:1000])
    for prompt, starts_over in ((ids[:950] + [7, 8, 9], False), (ids[:900] + [11, 12], False),
                                (ids[:700] + [5], True), (ids[:1001], False)):
        before = len(m._cached)
        done = m._prefill(prompt)
        assert (done == len(prompt) - 1) == starts_over, (before, len(prompt), done)
        got = m._decode(prompt[-1], full_vocab=True)[:V]
        _close(got, hf_logits(hf, prompt)[-1][:V], f"{len(prompt)} tokens after a cache of {before}")
    m.reset()
    m._prefill(ids[:10])
    for p in range(9, 610):
        got = m._decode(ids[p], full_vocab=True)
        if p % 50 == 9 or p >= 600:
            _close(got, want[p], f"position {p}")


@pytest.fixture(scope="module")
def long_draft(long):
    """The model with noise on its weights, so it is often but not always right (no score_<T>: a
    draft needs none)."""
    import copy

    import torch

    from gemma_edge.convert.pipeline import convert

    root = os.path.dirname(long[0])
    draft = copy.deepcopy(long[1])
    torch.manual_seed(8)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * DRAFT_NOISE * p.std())
    draft.save_pretrained(os.path.join(root, "draft_ckpt"), safe_serialization=True)
    shutil.copy(os.path.join(root, "ckpt", "tokenizer.model"), os.path.join(root, "draft_ckpt", "tokenizer.model"))
    paths = {}
    for name, ring in (("ring", True), ("full", False)):
        paths[name] = os.path.join(root, f"long_draft_{name}.tflite")
        convert(os.path.join(root, "draft_ckpt"), paths[name], quant="fp32", max_context=CONTEXT,
                prefill_lengths=(8, 32, 128), progress=False, score_length=0, ring_caches=ring)
    return paths


def test_speculative_decoding_across_the_span_and_released_slots(layout, long_draft, monkeypatch):
    """Rounds from position 2030 to past 2048 (the draft decodes with decode_s2048, then decode;
    the model scores with score_<T>, whose global layers read the whole cache) while the draft
    rolls back after rejections, and both models give back sliding-layer slots every few tokens
    (full caches) or go round their rings (80 tokens; rings of 262 slots, written modulo 135):
    the greedy tokens are the model's own."""
    import gemma_edge
    from gemma_edge.runtime import engine, speculative

    monkeypatch.setattr(engine, "RELEASE_MARGIN", 16)  # above the draft's largest rollback (MAX_DRAFT - 1)
    monkeypatch.setattr(engine, "RELEASE_STEP", 64)
    monkeypatch.setattr(speculative, "PROBE_EVERY", 0)  # rounds throughout, whatever the timings
    monkeypatch.setattr(speculative, "DRAFT_KEEP", None)  # the draft reads the whole prompt, from 0
    kind, (path, *_) = layout
    long_draft = long_draft[kind]
    n = 80
    plain = gemma_edge.load(path)
    V = plain.tokenizer.vocab_size  # the penalty takes only ids the tokenizer has
    prompt = [2] + [int(t) for t in np.random.default_rng(1).integers(10, V, 2029)]
    kw = dict(repetition_penalty=3.0)  # this random model repeats one token forever without it
    want = plain.generate(prompt, max_tokens=n, temperature=0.0, stop_tokens=False, **kw)
    m = gemma_edge.load(path, draft=long_draft)
    d, catch_up = m.draft, m.draft._prefill
    rewinds = []  # per catch-up of the draft: (tokens dropped from its cache, tokens prefilled)

    def watched(ids):
        dropped = len(d._cached) - (len(ids) - 1)
        rewinds.append((dropped, catch_up(ids)))
        return rewinds[-1][1]

    d._prefill = watched
    got, released = [], []  # per token: the token, and the model's released slots when it came
    for r in m.stream_generate(prompt, max_tokens=n, temperature=0.0, stop_tokens=False, **kw):
        got.append(r.token)
        released.append((m.backend.released, d.backend.released))
    assert got == want.tokens
    s = m.speculator.stats
    assert s.rounds > 5 and 0 < s.accepted < s.drafted, s
    first, *rest = rewinds  # the draft's first catch-up prefills the prompt; then it only rolls back
    assert first[1] == len(prompt) and max(r[0] for r in rest) >= 1 and all(r[1] == 0 for r in rest), rewinds
    if kind == "ring":  # nothing to give back
        assert released[-2] == (0, 0) and m.config.kv_ring and d.config.kv_ring, released
        return
    after_prefill = len(prompt) - 1 - m.config.sliding_window - engine.RELEASE_MARGIN
    # given back while drafting (the last token is decoded alone, as Model._decode does)
    assert min(released[-2]) > after_prefill, released


def test_a_draft_with_a_short_ring_drafts_no_more_than_it_can_roll_back(long, long_draft, monkeypatch):
    """A draft converted with prefill_8 only has rings of R = 8 + 8 - 1 (22 slots): it can roll
    back 7 tokens. Rounds then draft at most 7, so the draft never has to start over, and the
    greedy tokens are still the model's own."""
    import gemma_edge
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime import contract, speculative

    monkeypatch.setattr(speculative, "PROBE_EVERY", 0)
    monkeypatch.setattr(speculative, "_PRIOR", (99.0, 1.0))  # an acceptance prior that asks for long drafts
    root = os.path.dirname(long_draft["ring"])
    short = os.path.join(root, "short_ring_draft.tflite")
    convert(os.path.join(root, "draft_ckpt"), short, quant="fp32", max_context=CONTEXT, prefill_lengths=(8,),
            progress=False, score_length=0)
    V = gemma_edge.load(long[0]).tokenizer.vocab_size
    prompt = [2] + [int(t) for t in np.random.default_rng(3).integers(10, V, 300)]
    kw = dict(max_tokens=60, temperature=0.0, stop_tokens=False, repetition_penalty=3.0)
    want = gemma_edge.load(long[0]).generate(prompt, **kw)
    m = gemma_edge.load(long[0], draft=short)
    assert contract.ring_rewind_limit(m.draft.config) == 7
    ks, prefilled, choose, catch_up = [], [], m.speculator._schedule.choose, m.draft._prefill
    m.speculator._schedule.choose = lambda k_max, *a: (ks.append(k_max), choose(k_max, *a))[1]
    m.draft._prefill = lambda ids: (prefilled.append(catch_up(ids)), prefilled[-1])[1]
    got = m.generate(prompt, **kw)
    assert got.tokens == want.tokens
    assert ks and max(ks) == 7, ks
    assert prefilled[0] == len(prompt) and all(p <= 1 for p in prefilled[1:]), prefilled  # never started over


@pytest.fixture(scope="module")
def long_hot_draft(long_draft):
    """``long_draft``'s checkpoint converted --for-draft: decode_hot, and decode_hot_s512 and
    decode_hot_s2048 beside decode_s512 and decode_s2048."""
    from gemma_edge.convert.pipeline import convert

    root = os.path.dirname(long_draft["ring"])
    path = os.path.join(root, "long_hot_draft.tflite")
    convert(os.path.join(root, "draft_ckpt"), path, quant="fp32", max_context=CONTEXT,
            prefill_lengths=(8, 32, 128), progress=False, score_length=0, for_draft=True)
    return path


def _hot_parts(b, token, pos, extra):
    """(decode's logits, decode_hot's) at ``pos``: the same slot written twice with the same token."""
    return b.decode(token, pos).copy(), b.decode_hot(token, pos, extra).copy()


@pytest.mark.parametrize("kind", ["compiled", "interpreter"])
@pytest.mark.parametrize("start", [500, 2040])
def test_a_long_context_draft_steps_through_the_span_of_its_position(long_hot_draft, long, start, kind):
    """Below each decode_s<S'> the draft's step runs decode_hot_s<S'> (what decode_s<S'> reads),
    past the last span decode_hot; each gives decode's logits at the hot rows and at extra_ids,
    on both backends. (decode_s<S'> and decode are checked against transformers above.)"""
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.backend import CompiledBackend, InterpreterBackend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(long_hot_draft)
    assert info.decode_hot and info.decode_hot_spans == info.decode_spans == [512, 2048]
    hot = contract.hot_ids(info.config)
    cold = np.array([t for t in range(info.config.vocab_size) if t not in set(hot)][:contract.HOT_EXTRA], np.int32)
    ids = long[2]
    b = (CompiledBackend if kind == "compiled" else InterpreterBackend)(info, threads=1)
    used = []
    run = b._run
    b._run = lambda sig, *a: (used.append(sig), run(sig, *a))[1]
    run_prefill(b, ids[:start], 0)
    for p in range(start, start + 16):
        full, part = _hot_parts(b, ids[p], p, cold)
        np.testing.assert_allclose(part[:len(hot)], full[hot], rtol=0, atol=1e-5 * np.abs(full).max())
        np.testing.assert_allclose(part[len(hot):], full[cold], rtol=0, atol=1e-4 * np.abs(full).max())
    steps = [sig for sig in used if sig.startswith("decode")]
    assert set(steps) == {500: {"decode_s512", "decode_hot_s512", "decode_s2048", "decode_hot_s2048"},
                          2040: {"decode_s2048", "decode_hot_s2048", "decode", "decode_hot"}}[start], steps
    assert all(h == sig.replace("decode", "decode_hot", 1) for sig, h in zip(steps[::2], steps[1::2])), steps


def test_speculative_rounds_below_a_span_draft_through_decode_hot(long, long_hot_draft, monkeypatch):
    """Rounds from position 2030 to past 2048 with the --for-draft draft: every draft step is a
    decode_hot signature (decode_hot_s2048, then decode_hot), none a full decode, and the greedy
    tokens are the model's own. An earlier --for-draft file (metadata without decode_hot_spans,
    the same graph) steps through decode_s2048 below 2048 instead, and decode_hot past it."""
    import gemma_edge
    from gemma_edge.runtime import speculative
    from test_hardening import with_meta

    monkeypatch.setattr(speculative, "PROBE_EVERY", 0)  # rounds throughout, whatever the timings
    monkeypatch.setattr(speculative, "DRAFT_KEEP", None)  # the draft reads the whole prompt, from 0
    plain = gemma_edge.load(long[0])
    V = plain.tokenizer.vocab_size
    prompt = [2] + [int(t) for t in np.random.default_rng(1).integers(10, V, 2029)]
    kw = dict(max_tokens=40, temperature=0.0, stop_tokens=False, repetition_penalty=3.0)
    want = plain.generate(prompt, **kw).tokens
    earlier = os.path.join(os.path.dirname(long_hot_draft), "long_hot_draft_earlier.tflite")
    with open(long_hot_draft, "rb") as f:
        data = f.read()
    with open(earlier, "wb") as f:
        f.write(with_meta(data, lambda meta: {k: v for k, v in meta.items() if k != "decode_hot_spans"}))
    for path, steps in ((long_hot_draft, {"decode_hot_s2048", "decode_hot"}), (earlier, {"decode_s2048", "decode_hot"})):
        m = gemma_edge.load(long[0], draft=path)
        d = m.draft
        used = []
        run = d.backend._run
        d.backend._run = lambda sig, *a: (used.append(sig), run(sig, *a))[1]
        assert m.generate(prompt, **kw).tokens == want, path
        s = m.speculator.stats
        assert s.rounds > 5 and 0 < s.accepted < s.drafted, s
        assert {sig for sig in used if sig.startswith("decode")} == steps, (path, set(used))


MEMORY_CHILD = r"""
import json, re, sys
import gemma_edge
from gemma_edge.runtime import contract
status = lambda key: int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) / 1024
m = gemma_edge.load(sys.argv[1], threads=1)
m.generate([2] + [7] * 300, max_tokens=1, temperature=0.0, stop_tokens=False)  # every signature's arena
m.reset()  # gives the cache's pages back
before, rss = status('RssAnon'), status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:  # VmHWM starts again from VmRSS (Linux 4.0+)
    f.write('5')
n = int(sys.argv[2])
m.generate([2] + [10 + i % 400 for i in range(n)], max_tokens=4, temperature=0.0, stop_tokens=False)
print(json.dumps({"grew_mb": status('RssAnon') - before, "peak_grew_mb": status('VmHWM') - rss,
                  "released": m.backend.released}))
"""


@pytest.mark.parametrize("ring", [False, True])
def test_cache_memory_follows_the_tokens_and_the_window(tmp_path, sp_model_path, ring):
    """A context-8192 file with 1 KB slots (head_dim 256, one KV head): its cache would be 64 MB
    written whole. After 6000 tokens the process grew by about the global layer's 6000 slots
    (12 MB for K and V) plus three sliding layers' windows, not by the 36 MB the sliding layers
    would hold without giving their old slots back, nor by the 64 MB of the whole cache. That holds
    at the peak too: the slots are given back chunk by chunk while the prompt is prefilled, not
    once it is all in (when the sliding layers would have held all 6000 for a moment). With ring
    caches nothing is given back: the sliding layers' caches are 262 slots (1.5 MB in all)."""
    from gemma_edge.convert.pipeline import convert

    _checkpoint(tmp_path / "ckpt", sp_model_path, head_dim=256, kv_heads=1)
    path = str(tmp_path / "wide.tflite")
    convert(str(tmp_path / "ckpt"), path, quant="fp32", max_context=8192, prefill_lengths=(8, 128), progress=False,
            ring_caches=ring)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, path, "6000"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    global_mb = 2 * 6000 / 1024  # one global layer, K and V, 1 KB a slot
    sliding_full_mb = 3 * 2 * 6000 / 1024
    assert (r["released"] == 0) if ring else (r["released"] > 5000), r
    assert r["grew_mb"] < global_mb + 0.25 * sliding_full_mb, r
    assert r["peak_grew_mb"] < global_mb + 0.25 * sliding_full_mb, r


@pytest.mark.parametrize("n_prompt", [40, 700])
def test_litert_lm_runs_a_file_with_span_signatures(long, sp_model_path, tmp_path, n_prompt):
    """LiteRT-LM ignores decode_s2048 and runs the packed file like gemma-edge (greedy), with its
    own prefill chunks: 700 tokens go round the sliding layers' rings (262 slots) twice."""
    import gemma_edge
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.litertlm import pack
    from test_litertlm import explain_divergence, litert_engine, litert_greedy
    from test_runtime import prompt_ids

    packed = pack(long[0], tmp_path / "long.litertlm")
    engine = litert_engine(packed, tmp_path / "cache")
    try:
        m = gemma_edge.load(long[0])
        assert contract.ring_slots(m.config) < n_prompt or n_prompt == 40
        text = m.tokenizer.decode(prompt_ids(sp_model_path, n_prompt, seed=9)[1:])
        ours = m.generate(text, max_tokens=12, temperature=0)
        theirs, _, _ = litert_greedy(engine, text, 12)
        assert theirs == ours.text, explain_divergence(m, m.encode(text), ours, theirs)
    finally:
        engine.close()


def test_an_interrupted_long_prefill_leaves_a_cache_that_says_what_it_holds(tmp_path, sp_model_path, monkeypatch):
    """Slots leave the window while a long prompt is prefilled. If that prefill is interrupted
    (Ctrl-C, a closed stream), the model must not go on believing the cache holds the tokens
    before it: the next prompt that shares them starts over instead of attending to slots that
    were given back (zeros), and its logits still match transformers'. (1 KB slots, so that
    whole pages of a window are given back.)"""
    import gemma_edge
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime import engine

    monkeypatch.setattr(engine, "RELEASE_MARGIN", 16)
    monkeypatch.setattr(engine, "RELEASE_STEP", 64)
    hf = _checkpoint(tmp_path / "ckpt", sp_model_path, head_dim=256, kv_heads=1)
    path = str(tmp_path / "wide.tflite")
    convert(str(tmp_path / "ckpt"), path, quant="fp32", max_context=4096, prefill_lengths=(8, 128), progress=False,
            ring_caches=False)  # the released slots: full-length caches
    ids = [2] + [int(t) for t in np.random.default_rng(1).integers(10, 500, 2299)]
    m = gemma_edge.load(path)
    m.generate(ids[:1000], max_tokens=1, temperature=0.0, stop_tokens=False)  # the cache holds that prompt
    real, calls = m.backend.prefill_chunk, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(m.backend, "prefill_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.generate(ids[:2250], max_tokens=1, temperature=0.0, stop_tokens=False)
    assert m.backend.released > 1000  # the window moved past what the first prompt left
    monkeypatch.setattr(m.backend, "prefill_chunk", real)
    prompt = ids[:1100]  # shares its first 999 tokens with both earlier prompts
    m._prefill(prompt)  # what generate() does first; then the logits of the prompt's last token
    got = m._decode(prompt[-1], full_vocab=True)
    _close(got, hf_logits(hf, prompt)[-1], "the logits after the interrupted prefill")
