"""Constrained decoding (``runtime/constrained.py``): JSON Schemas and grammars as token masks.

Fast tier: the tiny Gemma 3 of ``test_runtime.py`` (random-ish text, so the constraint does all
the work). Every output is parsed and validated with the ``jsonschema`` package; the greedy
choice at each step is checked against an independent oracle (the model's logits from a second
copy, the allowed set from a fresh llguidance matcher without threads); every sampler still
works; bad and unsatisfiable schemas fail before any token. The real Gemma 3 270M (a base
model) runs a suite of schemas greedy and sampled, and every output validates.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_runtime import EOT  # noqa: E402

BIN = Path(sys.executable).parent

# The longest output of each schema below is under 50 tokens even written one byte per token (a
# 4-byte character in a string is 4 byte-fallback tokens): within the tiny model's context of 64.
MAX_TOKENS = 56
# A suite of schemas (OpenAI's subset and more): nested objects, arrays, enums, bounded numbers,
# required and optional properties, anyOf, $ref. Strings, arrays and numbers are bounded, so a model
# that rambles still finishes within max_tokens (a JSON number's digits are not: with "type":
# "number" a degenerate model may write 1.000... until max_tokens; the real 270M suite has them).
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"},
                                                  "c": {"type": "integer", "minimum": -5, "maximum": 5}},
                 "required": ["c"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                                   "y": {"type": "integer", "exclusiveMinimum": 0, "maximum": 3}},
                  "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["point", "label"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 4},
    "enum": {"enum": ["yes", "no", 3, None, True]},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 999},
                        {"type": "string", "pattern": "^[a-c]{2}$"}]},
    "ref": {"$defs": {"leaf": {"type": "string", "maxLength": 3}},
            "type": "object", "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
            "required": ["left", "right"], "additionalProperties": False},
    "list_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False}},
}
SAMPLERS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=1.0, seed=1),
    "top_k": dict(temperature=1.2, top_k=5, seed=2),
    "top_p": dict(temperature=1.0, top_p=0.8, seed=3),
    "min_p": dict(temperature=1.5, min_p=0.1, seed=4),
    "repetition": dict(temperature=0.9, repetition_penalty=1.3, seed=5),
}


@pytest.fixture(scope="module")
def model(path):
    import gemma_edge

    return gemma_edge.load(path)


def check(schema: dict, result) -> object:
    """The output parses as JSON and validates against ``schema`` (and it ended by itself)."""
    assert result.finish_reason == "stop", (result.finish_reason, result.text)
    value = json.loads(result.text)
    jsonschema.validate(value, schema)
    return value


# ---- the vocabulary ------------------------------------------------------------------------------

def test_vocabulary_is_the_files_sentencepiece(model):
    from gemma_edge.runtime import constrained

    tok = model.tokenizer
    v = constrained.vocabulary(tok)
    assert v is constrained.vocabulary(tok)  # built once
    assert v.lltok.vocab_size == tok.vocab_size
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if tok.is_special(i):  # control and unknown pieces are special tokens, never text
            assert v.lltok.is_special_token(i), piece
        elif piece == "<0xFF>":  # llguidance's special-token marker byte; never in valid UTF-8 anyway
            assert v.lltok.is_special_token(i)
        else:
            assert v.lltok.decode_bytes([i]) == tok.token_bytes(i), piece
    byte_pieces = [i for i in range(tok.vocab_size) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_piece(i))]
    assert len(byte_pieces) == 256
    assert v.lltok.decode_bytes([tok.piece_to_id("<0xE2>"), tok.piece_to_id("<0x98>"),
                                 tok.piece_to_id("<0x83>")]).decode() == "☃"


# ---- outputs follow the schema -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampler", ["greedy", "temperature", "top_k"])
def test_schema_outputs_validate(model, name, sampler):
    schema = SCHEMAS[name]
    result = model.generate("the model", max_tokens=MAX_TOKENS, json_schema=schema, **SAMPLERS[sampler])
    check(schema, result)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_works_under_a_mask(model, sampler):
    schema = SCHEMAS["nested"]
    for seed_shift in range(3):
        kw = dict(SAMPLERS[sampler])
        if "seed" in kw:
            kw["seed"] += 10 * seed_shift
        check(schema, model.generate("the cache", max_tokens=MAX_TOKENS, json_schema=schema, **kw))


def test_seeded_constrained_sampling_repeats(model):
    kw = dict(max_tokens=40, temperature=1.0, seed=11, json_schema=SCHEMAS["list_of_objects"])
    assert model.generate("a layer", **kw).tokens == model.generate("a layer", **kw).tokens


def test_greedy_is_the_argmax_over_the_allowed_tokens(model, path):
    """An oracle built apart: the model's logits from a second copy driven by hand, the allowed set
    from a fresh llguidance matcher with no worker thread, the stop tokens allowed where it may end."""
    import llguidance

    import gemma_edge
    from gemma_edge.runtime import constrained
    from gemma_edge.runtime.backend import run_prefill

    schema = SCHEMAS["object"]
    got = model.generate("the phone", max_tokens=50, temperature=0, json_schema=schema)
    check(schema, got)
    ref = gemma_edge.load(path)
    ids = ref.encode("the phone")
    run_prefill(ref.backend, ids[:-1], 0)
    vocab = constrained.vocabulary(ref.tokenizer)
    m = llguidance.LLMatcher(vocab.lltok, constrained.json_schema_grammar(schema).grammar, log_level=0)
    seq = list(ids)
    for token in got.tokens:
        logits = ref.backend.decode(seq[-1], len(seq) - 1)[:ref.tokenizer.vocab_size]
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
        allowed = set(np.flatnonzero(bits[:ref.tokenizer.vocab_size]).tolist())
        if vocab.eos in allowed:
            allowed |= set(ref.stop_token_ids)
        best = max(allowed, key=lambda t: logits[t])
        assert token == best
        assert m.consume_token(token)
        seq.append(token)
    assert m.is_stopped()  # generation ended exactly where the schema did
    ref.reset()


def test_overlap_changes_nothing(model, monkeypatch):
    """The mask computed in the worker thread or inline: the same tokens."""
    from gemma_edge.runtime import constrained

    kw = dict(max_tokens=40, json_schema=SCHEMAS["array"], temperature=1.0, seed=21)
    threaded = model.generate("the edge", **kw).tokens
    original = constrained.Constraint.matcher
    monkeypatch.setattr(constrained.Constraint, "matcher",
                        lambda self, stop_ids, overlap=True: original(self, stop_ids, overlap=False))
    assert model.generate("the edge", **kw).tokens == threaded


def test_the_mask_is_computed_while_the_model_decodes(model, monkeypatch):
    """The matcher's next mask is started before the decode call and waited for after it."""
    from gemma_edge.runtime import constrained

    events = []
    decode = model.backend.decode
    start, allowed = constrained.Matcher.start, constrained.Matcher.allowed
    monkeypatch.setattr(model.backend, "decode", lambda *a: (events.append("decode"), decode(*a))[1])
    monkeypatch.setattr(constrained.Matcher, "start", lambda self: (events.append("start"), start(self))[1])
    monkeypatch.setattr(constrained.Matcher, "allowed", lambda self: (events.append("wait"), allowed(self))[1])
    model.generate("the", max_tokens=6, temperature=0, json_schema=SCHEMAS["array"])
    events = events[events.index("start"):]  # (prefill may decode a token first)
    assert events[:6] == ["start", "decode", "wait"] * 2
    assert constrained._pool._max_workers >= 1 and threading.active_count() >= 2


# ---- grammars ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grammar,pattern", [
    ('start: "answer: " ("yes" | "no")', r"answer: (yes|no)"),
    ("start: NUM (\",\" NUM){2}\nNUM: /[1-9][0-9]?/", r"[1-9][0-9]?(,[1-9][0-9]?){2}"),
    ('root ::= "x" [a-c]+ "."', r"x[a-c]+\."),  # GBNF, as llama.cpp writes it
    ('start: "{" %json {"type": "integer", "minimum": 1, "maximum": 3} "}"', r"\{[123]\}"),
])
@pytest.mark.parametrize("sampler", ["greedy", "temperature"])
def test_grammar_outputs_match(model, grammar, pattern, sampler):
    result = model.generate("the model", max_tokens=30, grammar=grammar, **SAMPLERS[sampler])
    assert result.finish_reason == "stop"
    assert re.fullmatch(pattern, result.text), result.text


def test_a_grammar_may_name_special_tokens(model):
    """``<end_of_turn>`` in a grammar is the control token, which ends the generation."""
    result = model.generate("the", max_tokens=10, temperature=0, grammar='start: "ok" <end_of_turn>')
    assert result.text == "ok" and result.tokens[-1] == EOT and result.finish_reason == "stop"


def test_generation_ends_when_the_output_is_complete(model):
    """No decode call after the closing token: the grammar can take nothing more."""
    calls = []
    decode = model.backend.decode
    model.backend.decode = lambda *a: (calls.append(a), decode(*a))[1]
    try:
        result = model.generate("the", max_tokens=30, temperature=0, json_schema={"const": {"k": [1, 2]}})
    finally:
        del model.backend.decode
    assert result.text == '{"k": [1, 2]}' and result.finish_reason == "stop"
    assert len(calls) == len(result.tokens)


def test_max_tokens_mid_object_is_length(model):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    result = model.generate("the", max_tokens=6, temperature=0, json_schema=schema)
    assert result.finish_reason == "length" and len(result.tokens) == 6
    assert result.text.startswith('{"')
    with pytest.raises(ValueError):
        json.loads(result.text)


# ---- bad schemas and grammars: errors before any token -----------------------------------------

@pytest.mark.parametrize("kw,says", [
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 3}), "Unsatisfiable"),
    (dict(json_schema={"type": "string", "enum": []}), "Unsatisfiable"),
    (dict(json_schema={"allOf": [{"type": "string"}, {"type": "number"}]}), "Unsatisfiable"),
    (dict(json_schema={"type": "strin"}), "strin"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "missing"),
    (dict(json_schema={"type": "string", "pattern": "(("}), "regex"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1, 2]), "object"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(grammar="   "), "empty"),
    (dict(grammar='start: "a" <no_such_token>'), "no_such_token"),
    (dict(json_schema={}, grammar='start: "a"'), "not both"),
])
def test_bad_constraints_fail_before_generating(model, kw, says):
    from gemma_edge.runtime.constrained import GrammarError
    from gemma_edge.runtime.errors import GemmaEdgeError, GenerationError

    assert issubclass(GrammarError, GenerationError) and issubclass(GrammarError, GemmaEdgeError)
    calls = []
    decode = model.backend.decode
    model.backend.decode = lambda *a: (calls.append(a), decode(*a))[1]
    try:
        with pytest.raises(GrammarError, match=re.escape(says)):
            model.generate("the", max_tokens=5, **kw)
    finally:
        del model.backend.decode
    assert calls == []
    assert model.generate("the", max_tokens=2).finish_reason  # the model is free again


# ---- chat ----------------------------------------------------------------------------------------

def test_chat_ask_with_a_schema(model):
    chat = model.chat()
    schema = SCHEMAS["object"]
    first = chat.ask("the model", max_tokens=40, temperature=0, json_schema=schema)
    jsonschema.validate(json.loads(first), schema)
    second = list(chat.send("the cache", max_tokens=40, temperature=0.8, seed=3, grammar='start: "a"+'))
    assert re.fullmatch("a+", "".join(r.text for r in second))
    assert chat.messages[1]["content"] == first and len(chat.messages) == 4


def test_thinking_chat_may_think_before_the_schema(model):
    from gemma_edge.runtime import constrained

    sot = model.tokenizer.piece_to_id("<start_of_turn>")
    g = constrained.with_thought(constrained.json_schema_grammar({"type": "integer"}), sot, EOT)
    c = constrained.check(g, model.tokenizer)
    m = c.matcher(model.stop_token_ids)
    m.start()
    mask = m.allowed()
    assert mask.allows(sot) and mask.allows(model.tokenizer.encode("7", add_bos=False)[0])  # the marker, or the answer at once
    m.close()


# ---- the CLI -------------------------------------------------------------------------------------

def _run(*args, timeout=300):
    return subprocess.run([str(BIN / "gemma-edge"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_run_with_a_schema_and_a_grammar(model, path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["nested"]))
    r = _run("run", path, "-p", "the model", "--json-schema", schema, "-t", "0", "-n", "50")
    assert r.returncode == 0, r.stderr
    want = model.generate("the model", max_tokens=50, temperature=0, json_schema=SCHEMAS["nested"])
    assert r.stdout == want.text + "\n"
    jsonschema.validate(json.loads(r.stdout), SCHEMAS["nested"])
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "n=" /[0-9]{3}/\n')
    r = _run("run", path, "-p", "the model", "--grammar", grammar, "--seed", "1")
    assert r.returncode == 0 and re.fullmatch(r"n=[0-9]{3}\n", r.stdout), r.stderr


@pytest.mark.parametrize("content,option,says", [
    ('{"type": "integer", "minimum": 2, "maximum": 1}', "--json-schema", "Unsatisfiable"),
    ("not json", "--json-schema", "not valid JSON"),
    ("start: nothing", "--grammar", "nothing"),
])
def test_cli_bad_constraint_files_exit_2(path, tmp_path, content, option, says):
    f = tmp_path / "c.txt"
    f.write_text(content)
    r = _run("run", path, "-p", "x", option, f)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("gemma-edge: error: ") and says in r.stderr
    r = _run("run", path, "-p", "x", option, tmp_path / "missing.json")
    assert r.returncode == 2 and "cannot read" in r.stderr


# ---- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(path):
    import openai

    import gemma_edge
    from test_server import running

    with running(gemma_edge.load(path)) as srv:
        yield openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=300)


def test_server_response_format_json_schema(client, model):
    schema = SCHEMAS["nested"]
    msgs = [{"role": "user", "content": "the model"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="any", messages=msgs, max_tokens=50, temperature=0,
                                       response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    want = model.generate(model.encode_chat(msgs), max_tokens=50, temperature=0, json_schema=schema)
    assert r.choices[0].message.content == want.text
    chunks = list(client.chat.completions.create(model="any", messages=msgs, max_tokens=50, temperature=0,
                                                 response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_server_json_object_grammar_and_completions(client):
    msgs = [{"role": "user", "content": "the cache"}]
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=50, temperature=1.0, seed=2,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    r = client.completions.create(model="x", prompt="the", max_tokens=20, temperature=0,
                                  extra_body={"grammar": 'start: "v" /[0-9]/'})
    assert re.fullmatch("v[0-9]", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="x", messages=msgs, max_tokens=4, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"t": {"type": "string"}}, "required": ["t"]}}})
    assert r.choices[0].finish_reason == "length"  # cut mid-object


@pytest.mark.parametrize("fmt,says", [
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 3,
                                                                     "maximum": 1}}}, "Unsatisfiable"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nope"}}}, "nope"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": "x"}}, "schema"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "response_format"),
    ("json", "response_format"),
])
def test_server_bad_response_format_is_400(client, fmt, says):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format=fmt)
    assert e.value.param == "response_format" and says in e.value.message


def test_server_bad_grammar_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="a", max_tokens=4, extra_body={"grammar": "start: b"})
    assert e.value.param == "grammar"


# ---- the real Gemma 3 270M -----------------------------------------------------------------------

REAL_SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 30}},
        "required": ["name", "age"], "additionalProperties": False},
    "city": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 40},
        "capital": {"type": "boolean"}},
        "required": ["city", "country", "capital"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"}},
        "required": ["items"], "additionalProperties": False},
    "answer": {"anyOf": [{"type": "object", "properties": {"yes": {"const": True}}, "required": ["yes"],
                          "additionalProperties": False},
                         {"type": "string", "enum": ["no", "unsure"]}]},
    "tags": {"type": "array", "maxItems": 5, "items": {"type": "string", "maxLength": 10}},
    "event": {"$defs": {"time": {"type": "object", "properties": {
        "h": {"type": "integer", "minimum": 0, "maximum": 23}, "m": {"type": "integer", "minimum": 0, "maximum": 59}},
        "required": ["h", "m"], "additionalProperties": False}},
        "type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                         "start": {"$ref": "#/$defs/time"}, "end": {"$ref": "#/$defs/time"}},
        "required": ["title", "start", "end"], "additionalProperties": False},
}
REAL_PROMPTS = {
    "person": "A person record in JSON:\n", "city": "Facts about Paris as JSON:\n",
    "order": "The customer's order as JSON:\n", "answer": "Is the sky blue? Answer in JSON:\n",
    "tags": "Tags for a post about cooking pasta:\n", "event": "The meeting, as JSON:\n",
}


def real_int8_file(tmp_path_factory, real_gguf) -> Path:
    """The real 270M at int8, context 512, converted once per session (``test_tools.py`` shares it);
    renamed into place by ``convert`` only when complete."""
    from gemma_edge.convert.pipeline import convert

    out = tmp_path_factory.getbasetemp() / "real_int8_512" / "gemma3-270m-int8.tflite"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        convert(real_gguf, str(out), quant="int8", max_context=512, prefill_lengths=(8, 32, 128), progress=False)
    return out


@pytest.fixture(scope="module")
def real(real_gguf, tmp_path_factory):
    import gemma_edge

    return gemma_edge.load(str(real_int8_file(tmp_path_factory, real_gguf)))


@pytest.mark.parametrize("name", sorted(REAL_SCHEMAS))
def test_real_270m_outputs_validate(real, name):
    """The base model knows nothing of the schema: the mask does all the work. Greedy and two
    sampled runs (one with every filter on) each parse and validate."""
    schema = REAL_SCHEMAS[name]
    runs = [dict(temperature=0), dict(temperature=1.0, seed=1),
            dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=2)]
    for kw in runs:
        result = real.generate(REAL_PROMPTS[name], max_tokens=120, json_schema=schema, **kw)
        check(schema, result)


def test_real_270m_max_tokens_mid_object_is_length(real):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    result = real.generate("A story as JSON:", max_tokens=8, temperature=0, json_schema=schema)
    assert result.finish_reason == "length" and result.text.startswith('{"story": "')
