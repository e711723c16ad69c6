"""The Python API (``gemma_edge.load``) on a real converted file, run by the real LiteRT runtime.

One tiny Gemma 3 (briefly trained, so its next-token distributions are peaked) is made and
converted at fp32 once per session (``conftest.tiny_gemma3``, the ``tiny`` and ``path`` fixtures).
Greedy output is checked against transformers: every generated token must be its argmax
given the same ids before it.
"""

from __future__ import annotations

import dataclasses
import os
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CONTEXT, PREFILL, corpus_ids, hf_logits

BOS, EOS, SOT, EOT = 2, 1, 4, 5  # ids fixed by the test tokenizer (conftest.sp_model_path)

# Logits closer than this are a tie: fp32 LiteRT and transformers differ by ~1e-5 relative,
# so either token of a closer pair is a correct greedy choice.
TIE = 1e-3


@pytest.fixture(scope="module")
def hf_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.checkpoint, attn_implementation="eager").eval()


@pytest.fixture
def model(path):
    """A freshly loaded model: its KV cache holds nothing yet."""
    import gemma_edge

    return gemma_edge.load(path)


def assert_hf_greedy(hf_model, ids: list[int], tokens: list[int], n: int, stop_ids=(EOS, EOT)) -> None:
    """``tokens`` is transformers' greedy continuation of ``ids``: n tokens, or fewer ending at
    the first stop id, each one transformers' argmax (within TIE) given everything before it.

    One teacher-forced forward over ids + tokens checks every step of the greedy loop.
    """
    stops = [i for i, t in enumerate(tokens) if t in stop_ids]
    assert len(tokens) == (min(n, stops[0] + 1) if stops else n), (tokens, n)
    logits = hf_logits(hf_model, list(ids) + list(tokens))[len(ids) - 1:-1]  # [len(tokens), V]
    for step, (row, token) in enumerate(zip(logits, tokens)):
        best = int(np.argmax(row))
        assert row[token] >= row[best] - TIE, (
            f"step {step}: generated {token} (logit {row[token]:.5f}) but transformers' argmax is "
            f"{best} (logit {row[best]:.5f})")


def prompt_ids(sp_model_path: str, n: int, seed: int) -> list[int]:
    return [BOS] + corpus_ids(sp_model_path, n - 1, seed=seed)


# ---- greedy generation against transformers -----------------------------------------------

@pytest.mark.parametrize("n_prompt", [3, 11, 40])
def test_greedy_matches_transformers(model, hf_model, sp_model_path, n_prompt):
    """40 tokens prefill as 32 + 8 and decode past the sliding window (8)."""
    ids = prompt_ids(sp_model_path, n_prompt, seed=5)
    got = model.generate(ids, max_tokens=16, temperature=0)
    assert_hf_greedy(hf_model, ids, got.tokens, 16)
    assert got.finish_reason == ("stop" if got.tokens[-1] in (EOS, EOT) else "length")
    assert got.prompt_tokens == n_prompt and got.prefilled_tokens == n_prompt


def test_text_prompt_gets_one_bos(model, hf_model):
    text = "the model and the cache"
    ids = model.tokenizer.encode(text, add_bos=True)
    assert ids[0] == BOS and BOS not in ids[1:]
    got = model.generate(text, max_tokens=8, temperature=0)
    assert got.prompt_tokens == len(ids)
    assert_hf_greedy(hf_model, ids, got.tokens, 8)


# ---- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [dict(temperature=0),
                                      dict(temperature=1.0, top_k=20, seed=1),
                                      dict(temperature=1.5, top_p=0.9, seed=2),
                                      dict(temperature=1.0, seed=3)],
                         ids=["greedy", "top_k", "top_p", "plain"])
def test_stream_segments_join_to_decode(model, sp_model_path, sampling):
    ids = prompt_ids(sp_model_path, 9, seed=6)
    responses = list(model.stream_generate(ids, max_tokens=40, **sampling))
    tokens = [r.token for r in responses]
    shown = [t for t in tokens if t not in model.stop_token_ids]
    assert "".join(r.text for r in responses) == model.tokenizer.decode(shown)
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)
    assert responses[-1].finish_reason in ("stop", "length")
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    for r in responses:
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.text = "changed"
    result = model.generate(ids, max_tokens=40, **sampling)  # generate() joins the same stream
    assert (result.text, result.tokens) == ("".join(r.text for r in responses), tokens)


# ---- sampling ------------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_seeds_differ(model, sp_model_path):
    ids = prompt_ids(sp_model_path, 6, seed=8)
    kw = dict(max_tokens=32, temperature=1.0, top_k=20, stop_tokens=False)
    a = model.generate(ids, seed=7, **kw).tokens
    b = model.generate(ids, seed=7, **kw).tokens
    c = model.generate(ids, seed=8, **kw).tokens
    assert a == b
    assert a != c
    assert a != model.generate(ids, max_tokens=32, temperature=0, stop_tokens=False).tokens


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(max_tokens=0)], ids=lambda d: next(iter(d)))
def test_bad_sampling_values_raise(model, bad):
    from gemma_edge.runtime.errors import GenerationError

    name = next(iter(bad))
    with pytest.raises(GenerationError, match=name):
        model.generate([BOS, 300], **bad)
    with pytest.raises(GenerationError, match=name):
        next(model.stream_generate([BOS, 300], **bad))


def test_ids_beyond_the_tokenizer_are_never_sampled(model):
    """The embedding may have more rows (512 here) than the tokenizer has pieces (400): the
    extra ids have no text, so even a flat distribution must not produce them."""
    assert model.tokenizer.vocab_size < model.config.vocab_size
    got = model.generate([BOS, 300], max_tokens=60, temperature=5.0, seed=0, stop_tokens=False)
    assert len(got.tokens) == 60 and max(got.tokens) < model.tokenizer.vocab_size


# ---- the KV cache across calls ---------------------------------------------------------------

def test_prefix_reuse(model, hf_model, sp_model_path):
    ids = prompt_ids(sp_model_path, 20, seed=9)
    first = model.generate(ids, max_tokens=8, temperature=0)
    again = model.generate(ids, max_tokens=8, temperature=0)
    assert first.prefilled_tokens == 20
    assert again.prefilled_tokens == 1  # only the last prompt token runs, through decode
    assert again.tokens == first.tokens
    assert_hf_greedy(hf_model, ids, first.tokens, 8)

    # A prompt that continues the last generation reuses the generated tokens too.
    longer = ids + first.tokens[:3]
    cont = model.generate(longer, max_tokens=5, temperature=0)
    assert cont.prefilled_tokens == 1
    assert cont.tokens == first.tokens[3:8]

    # A prompt that diverges at position 12 keeps 12 cached positions; the stale entries
    # after them must not leak into the new continuation.
    other = ids[:12] + corpus_ids(sp_model_path, 10, seed=10)
    diverged = model.generate(other, max_tokens=8, temperature=0)
    assert diverged.prefilled_tokens == len(other) - 12
    assert_hf_greedy(hf_model, other, diverged.tokens, 8)


# ---- chat ------------------------------------------------------------------------------------

def test_chat_second_turn_prefills_only_new_tokens(model, path, hf_model):
    import gemma_edge
    from gemma_edge.runtime import chat

    system, first_msg, second_msg = "Be brief.", "the model", "a cache"
    rendered = chat.render([{"role": "system", "content": system}, {"role": "user", "content": first_msg}])
    assert rendered == (f"<start_of_turn>user\n{system}\n\n{first_msg}<end_of_turn>\n"
                        "<start_of_turn>model\n")  # no turn of its own: folded into the first user turn

    conv = model.chat(system=system)
    turn1 = list(conv.send(first_msg, temperature=0, max_tokens=8))
    prompt1 = model.tokenizer.encode(rendered, add_bos=True, parse_special=True)
    assert prompt1[:2] == [BOS, SOT] and prompt1.count(SOT) == 2 and prompt1.count(EOT) == 1
    assert turn1[-1].prompt_tokens == len(prompt1)
    assert conv.tokens[:len(prompt1)] == prompt1
    assert conv.tokens[len(prompt1):len(prompt1) + len(turn1)] == [r.token for r in turn1]
    assert conv.tokens[-1] == EOT  # a reply cut by max_tokens still closes its turn
    history = list(conv.tokens)

    turn2 = list(conv.send(second_msg, temperature=0, max_tokens=8))
    reply2 = [r.token for r in turn2]
    prompt2 = conv.tokens[:turn2[-1].prompt_tokens]
    assert prompt2[:len(history)] == history
    new = prompt2[len(history):]
    assert new == model.tokenizer.encode(
        "\n" + chat.render([{"role": "user", "content": second_msg}]), add_bos=False, parse_special=True)
    assert conv.messages == [{"role": "user", "content": first_msg},
                             {"role": "model", "content": "".join(r.text for r in turn1)},
                             {"role": "user", "content": second_msg},
                             {"role": "model", "content": "".join(r.text for r in turn2)}]

    # The cache held every token fed so far (prompt 1 and reply 1 but its last token, which
    # was sampled and never run); turn 2 prefills the rest: reply 1's last token, the closing
    # <end_of_turn> and the new user turn.
    fed = len(prompt1) + len(turn1) - 1
    assert all(r.prefilled_tokens == len(prompt2) - fed for r in turn2)
    assert turn2[-1].prefilled_tokens <= len(new) + 2 < len(prompt2) // 2

    fresh = gemma_edge.load(path).generate(prompt2, temperature=0, max_tokens=8)
    assert fresh.prefilled_tokens == len(prompt2)
    assert reply2 == fresh.tokens
    assert_hf_greedy(hf_model, prompt2, reply2, 8)


# ---- stop strings --------------------------------------------------------------------------

def test_stop_string_spanning_tokens(model, sp_model_path):
    ids = prompt_ids(sp_model_path, 9, seed=11)
    greedy = model.generate(ids, max_tokens=24, temperature=0, stop_tokens=False)
    decode = model.tokenizer.decode
    ends = [len(decode(greedy.tokens[:k])) for k in range(len(greedy.tokens) + 1)]  # text after k tokens
    assert decode(greedy.tokens) == greedy.text
    # From the second character of one token's text to the first character of the next one's.
    j = next((j for j in range(2, len(greedy.tokens) - 1)
              if ends[j + 1] - ends[j] >= 2 and ends[j + 2] > ends[j + 1]), None)
    assert j is not None, f"no token of two or more characters in {greedy.text!r}: pick another prompt"
    stop = greedy.text[ends[j] + 1:ends[j + 1] + 1]
    cut = greedy.text.find(stop)
    k = next(k for k in range(len(greedy.tokens) + 1) if stop in decode(greedy.tokens[:k]))

    got = model.generate(ids, max_tokens=24, temperature=0, stop=["never appears", stop],
                         stop_tokens=False)
    assert got.finish_reason == "stop"
    assert got.text == greedy.text[:cut]
    assert got.tokens == greedy.tokens[:k]  # generation ended at the token completing the stop

    streamed = list(model.stream_generate(ids, max_tokens=24, temperature=0, stop=[stop], stop_tokens=False))
    assert "".join(r.text for r in streamed) == greedy.text[:cut]

    untouched = model.generate(ids, max_tokens=24, temperature=0, stop=["never appears"], stop_tokens=False)
    assert (untouched.text, untouched.finish_reason) == (greedy.text, "length")


# ---- the context -----------------------------------------------------------------------------

def test_prompt_over_context_raises_before_any_work(model, sp_model_path):
    from gemma_edge.runtime.errors import GenerationError

    short = prompt_ids(sp_model_path, 10, seed=12)
    before = model.generate(short, max_tokens=4, temperature=0)
    too_long = prompt_ids(sp_model_path, CONTEXT + 1, seed=13)
    with pytest.raises(GenerationError) as e:
        model.generate(too_long, max_tokens=4)
    assert str(CONTEXT + 1) in str(e.value) and str(CONTEXT) in str(e.value)
    text = " ".join(["model"] * 100)
    with pytest.raises(GenerationError, match=f"{len(model.encode(text))} tokens .* {CONTEXT}"):
        model.generate(text)  # text, too
    after = model.generate(short, max_tokens=4, temperature=0)  # the cache was not touched
    assert after.prefilled_tokens == 1 and after.tokens == before.tokens


def test_every_prompt_that_fits_can_be_prefilled():
    """Wherever the cached prefix ends, the rest of a prompt that fits is prefilled, in
    chunks that never run past the cache end (the chunk lengths here are 8 and 32)."""
    from gemma_edge.runtime.backend import plan_prefill

    failures = []
    for start in range(CONTEXT):
        for n in range(1, CONTEXT - start + 1):
            try:
                plan = plan_prefill(n, start, list(PREFILL), CONTEXT)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(f"{n} tokens at {start}: {e}")
                continue
            pos = start
            for T, count in plan:
                assert 0 < count <= T and pos + T <= CONTEXT, (n, start, plan)
                pos += count
            assert pos == start + n, (n, start, plan)
    assert not failures, f"{len(failures)} cases, e.g. " + "; ".join(failures[:3])


def test_prefill_near_the_context_end_after_a_cached_prefix(model, hf_model, sp_model_path):
    """A chat's later turns: 41 positions cached, then 18 new tokens (8 + 8 + 2 near the end)."""
    ids = prompt_ids(sp_model_path, 60, seed=15)
    model.generate(ids[:41], max_tokens=1, temperature=0)  # caches ids[:41] at positions 0..40
    got = model.generate(ids[:60], max_tokens=4, temperature=0, stop_tokens=False)
    assert got.prefilled_tokens == 60 - 41
    assert_hf_greedy(hf_model, ids[:60], got.tokens, 4, stop_ids=())


@pytest.mark.parametrize("n_prompt", [CONTEXT - 5, CONTEXT])
def test_generation_stops_at_context_end(model, hf_model, sp_model_path, n_prompt):
    """Every cache slot is used: prompt + generated - 1 (the last token is never run) = context."""
    ids = prompt_ids(sp_model_path, n_prompt, seed=14)
    got = model.generate(ids, max_tokens=100, temperature=0, stop_tokens=False)
    assert got.finish_reason == "length"
    assert n_prompt + len(got.tokens) - 1 == CONTEXT
    assert_hf_greedy(hf_model, ids, got.tokens, CONTEXT - n_prompt + 1, stop_ids=())


# ---- imports ---------------------------------------------------------------------------------

def test_runtime_never_imports_tensorflow(path):
    """In a fresh interpreter: load and generate without TensorFlow (nor torch/transformers, nor
    ml_dtypes, whose import alone took longer than loading the 270M). A second load, with the
    compact vocabulary kept by the first, does not import SentencePiece either (6 MB, 13 ms), nor
    hashlib, which maps OpenSSL's libcrypto (3.5 MB resident) for the few hundred bytes a load
    hashes (``fileio.sha256``)."""
    code = (
        "import json, sys\n"
        "import gemma_edge\n"
        f"m = gemma_edge.load({path!r})\n"
        "r = m.generate('the model', max_tokens=4, temperature=0)\n"
        "print(json.dumps({'tokens': r.tokens, 'heavy': sorted({k.split('.')[0] for k in sys.modules} & "
        "{'tensorflow', 'tf_keras', 'keras', 'torch', 'transformers', 'ml_dtypes', 'sentencepiece', 'hashlib'})}))\n")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len(runs[0]["tokens"]) >= 1 and runs[1]["tokens"] == runs[0]["tokens"]
    assert set(runs[0]["heavy"]) <= {"sentencepiece", "hashlib"}  # a first load may derive the vocabulary with it
    assert runs[1]["heavy"] == []


def test_the_loads_sha256_is_hashlibs():
    """``fileio.sha256`` (Python's own sha256 up to 1 MiB, OpenSSL's above) gives hashlib's
    digests, on both sides of the switch and fed in pieces: files and weight caches written by
    earlier versions keep their names and checksums."""
    import hashlib
    import random

    from gemma_edge.runtime import fileio

    rng = random.Random(7)
    for n in (0, 1, 55, 56, 64, 1000, fileio._SMALL, fileio._SMALL + 1, 3 * fileio._SMALL + 17):
        data = rng.randbytes(n)
        assert fileio.sha256(data).hexdigest() == hashlib.sha256(data).hexdigest(), n
        h = fileio.sha256()
        h.update(data[: n // 3])
        h.update(data[n // 3:])
        assert h.digest() == hashlib.sha256(data).digest(), n


def test_public_compiled_model_api_is_the_fallback(path, hf_model, sp_model_path, monkeypatch):
    """Without the native wrappers gemma-edge drives directly, the public CompiledModel runs the
    same file: the cache bound in place, transformers' greedy tokens."""
    from gemma_edge.runtime import litert

    def missing():
        raise ImportError("no native wrapper")

    monkeypatch.setattr(litert, "_native", missing)
    import gemma_edge
    from ai_edge_litert.compiled_model import CompiledModel

    m = gemma_edge.load(path)
    assert isinstance(m.backend.model, CompiledModel)
    ids = prompt_ids(sp_model_path, 20, seed=5)
    r = m.generate(ids, max_tokens=12, temperature=0.0)
    assert_hf_greedy(hf_model, ids, r.tokens, 12)


@pytest.fixture(scope="module", params=[32, 24, 0], ids=["score32", "score24-then-decode", "decode-only"])
def scored_path(request, tiny, tmp_path_factory) -> str:
    """The tiny model with score_32 (the default file), score_24 (whose last chunk would pass
    the cache end, so the tail goes through decode), and no score signature at all."""
    if request.param == 32:
        return str(tiny.model_file)
    from gemma_edge.convert.pipeline import convert

    out = tmp_path_factory.mktemp("scored") / f"score{request.param}.tflite"
    convert(str(tiny.checkpoint), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL,
            progress=False, score_length=request.param)
    return str(out)


def test_perplexity_matches_transformers(scored_path, hf_model, sp_model_path):
    """Mean NLL over every predicted token equals transformers' cross-entropy (an oracle),
    whether chunks go through score_<T>, decode, or both."""
    import torch

    ids = [2] + corpus_ids(sp_model_path, CONTEXT - 1, seed=11)  # the whole context: past the window
    import gemma_edge

    m = gemma_edge.load(scored_path)
    calls = []
    r = m.perplexity(ids, progress=lambda done, total: calls.append((done, total)))
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    want = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    T = max(m.info.score_lengths, default=0)
    assert r["scored_with"] == (f"score_{T}" if T else "decode")
    assert r["predicted"] == len(ids) - 1 and calls[-1] == (len(ids) - 1, len(ids) - 1)
    # 63 predictions: score_32 in 2 calls; score_24 in 2 calls, then 15 decode calls (48 + 24
    # would pass the cache end of 64); decode alone in 63
    assert len(calls) == {32: 2, 24: 2 + 15, 0: 63}[T]
    assert abs(r["mean_nll"] - want) < 1e-4 * max(1.0, want)
    assert abs(r["perplexity"] - np.exp(want)) < 1e-3 * np.exp(want)
    # the cap: at most max_tokens tokens are scored
    assert m.perplexity(ids, max_tokens=10)["predicted"] == 9


def test_compare_reports_kl_divergence_like_an_independent_computation(tiny, scored_path, hf_model, sp_model_path,
                                                                        tmp_path_factory):
    """``Model.compare`` (``gemma-edge eval --base``): KL(base || model) per token, its mean and 99th
    percentile, top-1 agreement and both perplexities; the base here is an fp32 file (score_32,
    score_24 or decode only, so chunks of the two files do not line up) and the model an int8
    file. The oracle: transformers' logits as the base and the int8 file's logits read one
    decode call at a time, the KL computed here in float64."""
    import torch

    import gemma_edge
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.backend import make_backend

    out = tmp_path_factory.getbasetemp() / "tiny_gemma3" / "model_int8_compare.tflite"
    if not out.exists():
        convert(str(tiny.checkpoint), str(out), quant="int8", max_context=CONTEXT, prefill_lengths=PREFILL,
                progress=False)
    ids = [2] + corpus_ids(sp_model_path, CONTEXT - 1, seed=12)
    r = gemma_edge.load(str(out)).compare(gemma_edge.load(scored_path), ids)
    with torch.no_grad():
        base = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].double(), -1).numpy()
    backend = make_backend(gemma_edge.load(str(out)).info)
    z = np.stack([backend.decode(t, p) for p, t in enumerate(ids[:-1])]).astype(np.float64)
    lp = z - (z.max(1, keepdims=True) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)))
    kl = np.sum(np.exp(base) * (base - lp), axis=1)
    assert r["predicted"] == len(ids) - 1
    assert abs(r["kl_mean"] - kl.mean()) < 1e-3 * kl.mean() + 1e-6 and abs(r["kl_p99"] - np.percentile(kl, 99)) < 1e-2 * kl.max()
    assert r["top1_agreement"] == pytest.approx(np.mean(base.argmax(1) == lp.argmax(1)))
    nll = -base[np.arange(len(ids) - 1), ids[1:]]
    assert abs(np.log(r["base_perplexity"]) - nll.mean()) < 1e-4
    same = gemma_edge.load(scored_path).compare(gemma_edge.load(scored_path), ids)
    assert same["kl_mean"] < 1e-9 and same["top1_agreement"] == 1.0 and same["perplexity_ratio"] == pytest.approx(1.0)


def test_a_second_generation_while_one_runs_is_refused(model):
    """Two streams at once would share one KV cache: the second gets a clear error, and once
    the first is closed the model is free again."""
    from gemma_edge.runtime.errors import GenerationError

    first = model.stream_generate("the model", max_tokens=8)
    next(first)
    with pytest.raises(GenerationError, match="one generation at a time"):
        next(model.stream_generate("the cache", max_tokens=2))
    with pytest.raises(GenerationError, match="already generating"):
        model.perplexity("the model and the cache")
    first.close()
    assert model.generate("the cache", max_tokens=2).finish_reason in ("stop", "length")


def test_stop_tokens_come_from_the_checkpoint(tiny, model, tmp_path):
    """An instruction-tuned checkpoint's generation_config.json eos_token_id list is honoured:
    a token it declares ends generation where the base file would go on."""
    import shutil

    import gemma_edge
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.modelfile import read_info

    base = model.generate("the model", max_tokens=12, stop_tokens=False)
    special = set(model.stop_token_ids) | {BOS}
    stop_at = next(i for i, t in enumerate(base.tokens) if t not in special and i > 0)
    declared = base.tokens[stop_at]
    ckpt = tmp_path / "it"
    shutil.copytree(tiny.checkpoint, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, declared]}))
    out = tmp_path / "it.tflite"
    convert(str(ckpt), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL, progress=False,
            score_length=0)
    tok = read_info(str(out)).meta.tokenizer
    assert tok.declared_stop_ids == (EOS, declared) and declared in tok.stop_token_ids
    assert EOT in tok.stop_token_ids  # <end_of_turn> always ends a turn
    got = gemma_edge.load(str(out)).generate("the model", max_tokens=12)
    assert got.tokens == base.tokens[:base.tokens.index(declared) + 1] and got.finish_reason == "stop"


def test_cache_is_zero_and_resident_only_where_written(path):
    """The KV cache starts as zeros without being written whole (its pages are given back
    to the OS: ``host_memory.zero``), and ``reset`` clears it the same way: a buffer full of
    data reads as zeros afterwards, and its memory leaves the process."""
    code = r"""
import json, re, sys, numpy as np
from gemma_edge.runtime.modelfile import read_info
from gemma_edge.runtime.backend import CompiledBackend
from gemma_edge.runtime import host_memory
anon = lambda: int(re.search(r'RssAnon:\s+(\d+)', open('/proc/self/status').read()).group(1))
b = CompiledBackend(read_info(sys.argv[1]), threads=1)
zero_at_load = all(not b.kv[n].read(int(np.prod(s)), np.float32).any() for n, s in b._kv_shapes.items())
b.decode(2, 0)
written = any(b.kv[n].read(int(np.prod(s)), np.float32).any() for n, s in b._kv_shapes.items())
# one large buffer, filled, then cleared: its pages must leave the process
name, shape = next(iter(b._kv_shapes.items()))
import ai_edge_litert.tensor_buffer as tb
big = b.model.create_input_buffer_by_name("decode", name)
ones = np.ones(shape, np.float32)
found = host_memory.address(big, ones.nbytes) is not None
b.clear_cache()
cleared = all(not b.kv[n].read(int(np.prod(s)), np.float32).any() for n, s in b._kv_shapes.items())
print(json.dumps(dict(zero_at_load=zero_at_load, written=written, cleared=cleared, found=found)))
"""
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == dict(zero_at_load=True, written=True, cleared=True, found=True), r


def test_zeroing_gives_pages_back():
    """``host_memory.zero`` on a 64 MB buffer full of ones: zeros after, and ~64 MB less resident."""
    code = r"""
import json, mmap, re, numpy as np
from ai_edge_litert.tensor_buffer import TensorBuffer
from gemma_edge.runtime import host_memory
anon = lambda: int(re.search(r'RssAnon:\s+(\d+)', open('/proc/self/status').read()).group(1)) / 1024
mem = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
data = np.frombuffer(mem, np.float32)  # page-aligned, so LiteRT's view of it is zero-copy
data[:] = 1
buf = TensorBuffer.create_from_host_memory(data)
full = anon()
host_memory.zero(buf, data.shape)
print(json.dumps(dict(freed_mb=full - anon(), zero=not data.any())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["zero"] and r["freed_mb"] > 60, r


def test_a_loaded_model_gives_back_the_file_pages_its_compile_read(path):
    """LiteRT maps the model file read-only and its compile reads part of it (the graph's tables;
    on an int4 file every block scale, 19 MB on the 270M int4-b32), which the packed weights then
    replace. A load gives those pages back (``host_memory.drop_file_pages``): none of the file is
    resident in the process after it, and a decode reads what it needs again, with the logits of
    the Interpreter backend, which drops nothing. So does the code of LiteRT's libraries that
    parsed and compiled the graph (10 MB on the 270M): after the load, less than half of what
    was dropped is resident again, and the calls still run."""
    code = r"""
import json, os, sys, numpy as np
from gemma_edge.runtime.modelfile import read_info
from gemma_edge.runtime import backend as B, host_memory, litert
path = os.path.realpath(sys.argv[1])
libs = litert.library_folder() + os.sep
def resident(match):
    kb, mine = 0, False
    for line in open('/proc/self/smaps'):
        f = line.split(None, 5)
        if len(f) >= 5 and '-' in f[0] and ':' in f[3]:
            mine = len(f) == 6 and match(f[5].strip())
        elif mine and f[0] == 'Rss:':
            kb += int(f[1])
    return kb * 1024
dropped = {}
real = host_memory.drop_file_pages
host_memory.drop_file_pages = lambda *p, **k: dropped.update(real(*p, **k)) or dropped
info = read_info(path)
b = B.CompiledBackend(info, threads=1)
after_load = resident(lambda n: n == path)
libs_after_load = resident(lambda n: n.startswith(libs))
got = b.decode(2, 0)
ref = B.InterpreterBackend(info, threads=1).decode(2, 0)
print(json.dumps(dict(dropped={os.path.realpath(k): v for k, v in dropped.items()}, after_load=after_load,
                      libs_after_load=libs_after_load, file=path, libs=libs[:-1],
                      same=bool(np.allclose(got, ref, atol=1e-4)))))
"""
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dropped"].get(r["file"], 0) > 0, r  # the compile had read some of the file
    assert r["after_load"] == 0 and r["same"], r
    assert r["dropped"].get(r["libs"], 0) > 1 << 20, r  # LiteRT's code that compiled it
    assert r["libs_after_load"] < r["dropped"][r["libs"]] / 2, r


def test_dropping_file_pages_keeps_what_was_written(tmp_path):
    """``drop_file_pages`` takes a read-only mapping's pages out of the process (they read the
    same afterwards, from the page cache), and leaves alone a mapping holding pages written in
    it: here one mapped private and writable, written, then made read-only (a loader might do
    that), whose written bytes exist nowhere else."""
    code = r"""
import ctypes, json, mmap, os, sys
f = os.path.realpath(sys.argv[1])
from gemma_edge.runtime import host_memory
def rss():  # the file's mappings' resident KB, by permissions
    kb, mine = {}, None
    for line in open('/proc/self/smaps'):
        p = line.split(None, 5)
        if len(p) >= 5 and '-' in p[0] and ':' in p[3]:
            mine = p[1] if len(p) == 6 and p[5].strip() == f else None
        elif mine and p[0] == 'Rss:':
            kb[mine] = kb.get(mine, 0) + int(p[1])
    return kb
fd = open(f, 'rb')
ro = mmap.mmap(fd.fileno(), 0, prot=mmap.PROT_READ)
sum(ro[i] for i in range(0, len(ro), 4096))  # touch every page
cow = mmap.mmap(fd.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
cow[:4] = b'WRIT'
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(cow)), len(cow), mmap.PROT_READ) == 0
before = rss()
dropped = host_memory.drop_file_pages(f)[f]
print(json.dumps(dict(before=before, after=rss(), dropped=dropped, ro=ro[:4].decode(), cow=cow[:4].decode())))
"""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"DATA" + bytes(range(256)) * (4 << 10))  # 1 MB
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"]["r--s"] >= 1000 and r["after"]["r--s"] == 0 and r["dropped"] >= 1000 * 1024, r
    assert r["cow"] == "WRIT" and r["ro"] == "DATA" and r["after"]["r--p"] == r["before"]["r--p"] > 0, r


def test_peak_rss_is_this_programs_not_its_parents():
    """``host_memory.peak_rss_mb`` (``bench``'s peak RSS) counts from the program's exec: a child
    started by a process holding 300 MB reports its own small peak, where ``ru_maxrss`` carries
    the parent's RSS at the fork across exec. In the child itself, touching 100 MB more shows."""
    code = r"""
import json, resource
import numpy as np
from gemma_edge.runtime import host_memory
before = host_memory.peak_rss_mb()
a = np.ones(100 << 18, np.float32)  # 100 MB, touched
print(json.dumps(dict(before=before, after=host_memory.peak_rss_mb(),
                      maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
    held = np.ones(300 << 18, np.float32)  # this process holds 300 MB at the fork
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    del held
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["maxrss"] > 300, r  # the trap the helper avoids, still present on this kernel
    assert r["before"] < 200 and 95 < r["after"] - r["before"] < 130, r


def test_a_loaded_model_keeps_no_copy_of_its_tokenizer(path, tmp_path):
    """Once SentencePiece holds the tokenizer, a loaded model drops the file's bytes of it (Gemma's
    are 5 MB, in every process): ``model_proto`` reads the same bytes from the file again, and a
    file changed since the load is an error, never another file's tokenizer."""
    import shutil

    import gemma_edge
    from gemma_edge.runtime.errors import ModelFileError
    from gemma_edge.runtime.modelfile import read_info

    p = tmp_path / "m.tflite"
    shutil.copy(path, p)
    m = gemma_edge.load(str(p))
    want = read_info(str(p)).tokenizer_model
    assert len(want) > 1000
    assert m.info._tokenizer is None and m.tokenizer._model_proto is None  # neither keeps the bytes
    assert m.tokenizer.model_proto == want and m.info.tokenizer_model == want
    assert m.generate([BOS, 10, 11], max_tokens=2, temperature=0.0).tokens  # still runs
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # another version in its place
    with pytest.raises(ModelFileError, match="changed since it was loaded"):
        m.tokenizer.model_proto
