"""Tool calls (``runtime/tools.py``) through the Python API and ``gemma-edge serve`` with the real
``openai`` client.

Two tiny random models made here, with a context long enough for tool declarations:

* a Gemma 3 (the tokenizer of ``conftest.sp_model_path``): the built-in fenced-JSON format;
* a Gemma 4 whose tokenizer has Gemma 4's tool tokens as controls (``<|tool_call>``, ``<|"|>``,
  ...) and whose checkpoint carries a chat template that renders tools: the native format,
  prompted by the template (and by the built-in rendering when jinja2 is not there).

Random weights write random text: whatever comes out of a call is the grammar's doing, so every
call must parse and its arguments validate against the tool's schema (``jsonschema``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

CONTEXT = 1024
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 8},
    "unit": {"type": "string", "enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": WEATHER_PARAMS}}
CLOCK_PARAMS = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]},
                                                 "h24": {"type": "boolean"}},
                "required": ["zone", "h24"], "additionalProperties": False}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "the time", "parameters": CLOCK_PARAMS}}
SCHEMAS = {"weather": WEATHER_PARAMS, "clock": CLOCK_PARAMS}
G4_CONTROLS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>", "<|tool_call>",
               "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
# A chat template in Gemma 4's tool format (a short one written for this test; the real one also
# declares parameters): declarations in the system turn, calls and results in the model's turn.
G4_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools or messages[0]['role'] == 'system' %}<|turn>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for t in tools or [] %}<|tool>declaration:{{ t['function']['name'] }}"
    "{description:<|\"|>{{ t['function']['description'] }}<|\"|>}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|turn>user\n{{ m['content'] }}<turn|>\n"
    "{% elif m['role'] == 'assistant' %}<|turn>model\n"
    "{% for c in m['tool_calls'] or [] %}<|tool_call>call:{{ c['function']['name'] }}{{ '{' }}"
    "{% for k, v in c['function']['arguments'] | dictsort %}{{ k }}:"
    "{% if v is string %}<|\"|>{{ v }}<|\"|>{% else %}{{ v | tojson }}{% endif %}{% if not loop.last %},{% endif %}"
    "{% endfor %}}<tool_call|>{% endfor %}{{ m['content'] or '' }}"
    "{% elif m['role'] == 'tool' %}<|tool_response>response:{{ m['name'] }}{value:<|\"|>{{ m['content'] }}<|\"|>}"
    "<tool_response|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'tool' %}<|turn>model\n{% endif %}")


# ---- the tiny models -----------------------------------------------------------------------------

def _convert(ckpt: Path, out: Path) -> Path:
    from gemma_edge.convert.pipeline import convert

    if not out.exists():
        convert(str(ckpt), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=(8, 32, 128), progress=False)
    return out


def _randomize(model, norm_mean: float) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(norm_mean if "norm" in name else 0.0, 0.3 if "norm" in name else 0.1)


@pytest.fixture(scope="module")
def g3_path(tmp_path_factory, sp_model_path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_hf_config

    root = tmp_path_factory.mktemp("tools_g3")
    torch.manual_seed(0)
    cfg = tiny_hf_config(3)
    cfg.max_position_embeddings = CONTEXT
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _randomize(model, 0.0)
    model.save_pretrained(root / "ckpt", safe_serialization=True)
    shutil.copy(sp_model_path, root / "ckpt" / "tokenizer.model")
    return str(_convert(root / "ckpt", root / "g3.tflite"))


@pytest.fixture(scope="module")
def g4_path(tmp_path_factory) -> str:
    import sentencepiece as spm
    import torch
    from transformers import Gemma4ForCausalLM

    from conftest import _corpus
    from test_gemma4 import tiny_config

    root = tmp_path_factory.mktemp("tools_g4")
    (root / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tok"), vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=G4_CONTROLS,
        character_coverage=0.9995, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2)
    torch.manual_seed(4)
    model = Gemma4ForCausalLM(tiny_config("e2b", max_position_embeddings=CONTEXT)).eval()
    _randomize(model, 1.0)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    shutil.copy(root / "tok.model", ckpt / "tokenizer.model")
    (ckpt / "chat_template.jinja").write_text(G4_TEMPLATE)
    return str(_convert(ckpt, root / "g4.tflite"))


@pytest.fixture(scope="module", params=["json", "gemma4"])
def path(request, g3_path, g4_path) -> str:
    return g3_path if request.param == "json" else g4_path


@pytest.fixture(scope="module")
def model(path):
    import gemma_edge

    return gemma_edge.load(path)


@pytest.fixture(scope="module")
def client(path):
    import gemma_edge
    from test_server import running

    with running(gemma_edge.load(path)) as srv:
        yield openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=300)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def valid_calls(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, checked: a declared tool, JSON arguments that validate."""
    out = []
    for c in calls:
        name, args = (c.name, c.arguments) if hasattr(c, "name") else \
            (c.function.name, json.loads(c.function.arguments))
        jsonschema.validate(args, SCHEMAS[name])
        out.append((name, args))
    return out


# ---- requests: tools, tool_choice, messages (no model) ------------------------------------------

@pytest.mark.parametrize("tools,says", [
    ("x", "tools must be a list"),
    ([{"type": "retrieval"}], "function tools only"),
    ([{"type": "function", "function": {"name": "bad name"}}], "letters, digits"),
    ([WEATHER, WEATHER], "declared twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "object"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "JSON schema object"),
])
def test_bad_tools(tools, says):
    from gemma_edge.runtime.tools import ToolError, parse_tools

    with pytest.raises(ToolError, match=says) as e:
        parse_tools(tools)
    assert e.value.param.startswith("tools")


def test_tool_choice_and_messages():
    from gemma_edge.runtime.tools import ToolError, normalize_messages, parse_tool_choice, parse_tools

    specs = parse_tools([WEATHER, CLOCK])
    assert parse_tool_choice(None, specs) == "auto" and parse_tool_choice(None, []) == "none"
    assert parse_tool_choice({"type": "function", "function": {"name": "clock"}}, specs) == "clock"
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, 3):
        with pytest.raises(ToolError):
            parse_tool_choice(bad, specs)
    with pytest.raises(ToolError, match="needs tools"):
        parse_tool_choice("required", [])
    msgs = normalize_messages([
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["tool_calls"][0].arguments == {"city": "Oslo"} and msgs[3]["name"] == "weather"
    with pytest.raises(ToolError, match="matches no earlier"):
        normalize_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zz", "content": "y"}])
    with pytest.raises(ToolError, match="not valid JSON"):
        normalize_messages([{"role": "assistant", "tool_calls": [{"id": "a", "function": {
            "name": "f", "arguments": "{oops"}}]}, {"role": "user", "content": "x"}])


@pytest.mark.parametrize("value", [
    {"city": "Paris", "days": 3}, {"s": "a, b: {c}", "n": -1.5e-3, "t": True, "f": False, "z": None},
    {"nested": {"list": [1, "two", [3, {"k": "v"}]], "empty": {}, "none": []}}, {"text": "line\nbreak ☃ 🙂"}, {},
])
def test_native_syntax_round_trips(value):
    """Gemma 4's call syntax, written as its template's format_argument does, parses back."""
    from gemma_edge.runtime.tools import _QUOTE, native_value, parse_native_call

    text = "call:f" + native_value(value)
    items = [_QUOTE if part == "\0" else part for part in text.replace('<|"|>', "\0")]
    assert parse_native_call(items) == ("f", value)


# ---- the Python API ------------------------------------------------------------------------------

def test_format_follows_the_tokenizer(g3_path, g4_path):
    import gemma_edge
    from gemma_edge.runtime import tools

    assert tools.format_for(gemma_edge.load(g3_path)).name == "json"
    assert tools.format_for(gemma_edge.load(g4_path)).name == "gemma4"


@pytest.mark.parametrize("choice", ["required", "weather", "clock"])
def test_calls_parse_and_validate(model, choice):
    from gemma_edge.runtime import tools

    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    for seed in range(3):
        reply = tools.chat(model, user("the weather"), [WEATHER, CLOCK], tool_choice, max_tokens=120,
                           temperature=1.0, seed=seed)
        calls = valid_calls(reply.tool_calls)
        assert calls, reply
        if choice != "required":
            assert {name for name, _ in calls} == {choice}
        assert reply.finish_reason in ("tool_calls", "length")
        if reply.finish_reason == "tool_calls":
            assert reply.content == ""


def test_parallel_calls_and_a_single_call(model):
    """The grammar allows a second call after the first unless parallel_tool_calls is false, when
    the reply ends (finish reason "tool_calls") right after one call."""
    from gemma_edge.runtime import tools

    many = [tools.chat(model, user("the model"), [WEATHER, CLOCK], "required", max_tokens=200, temperature=1.0,
                       seed=s) for s in range(4)]
    assert max(len(r.tool_calls) for r in many) >= 2
    for r in many:
        valid_calls(r.tool_calls)
    for seed in range(3):
        one = tools.chat(model, user("the model"), [WEATHER, CLOCK], "required", parallel_tool_calls=False,
                         max_tokens=200, temperature=1.0, seed=seed)
        assert len(one.tool_calls) == 1 and one.finish_reason == "tool_calls"
        valid_calls(one.tool_calls)


def test_none_never_calls(model):
    from gemma_edge.runtime import tools

    for seed in range(3):
        reply = tools.chat(model, user("the weather"), [WEATHER], "none", max_tokens=40, temperature=1.0, seed=seed)
        assert reply.tool_calls == [] and reply.finish_reason in ("stop", "length")


def test_round_trip_in_python(model):
    """Call, result, answer: the assistant message and the tool result go back in the history."""
    from gemma_edge.runtime import tools

    messages = user("the weather")
    reply = tools.chat(model, messages, [WEATHER], "required", parallel_tool_calls=False, max_tokens=80,
                       temperature=0)
    (call,) = reply.tool_calls
    messages += [reply.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert reply.message["tool_calls"][0]["function"]["arguments"] == call.arguments_json
    prompt = tools.prepare(model, messages, [WEATHER])
    text = model.tokenizer.decode(prompt.ids)
    assert "sunny" in text and call.arguments["city"] in text
    final = tools.chat(model, messages, [WEATHER], "none", max_tokens=20, temperature=0)
    assert final.tool_calls == [] and final.finish_reason in ("stop", "length")


def test_the_reply_text_can_follow_a_schema(model):
    from gemma_edge.runtime import tools

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = tools.chat(model, user("x"), [WEATHER], "none", json_schema=schema, max_tokens=20, temperature=0)
    assert json.loads(reply.content) in ({"ok": True}, {"ok": False})


def test_gemma4_prompt_from_the_template_or_built_in(g4_path, monkeypatch):
    """The checkpoint's template renders tools when it can (its short declarations); without jinja2
    the built-in rendering of the same format is used (which declares the parameters too)."""
    import gemma_edge
    from gemma_edge.runtime import chat, tools

    m = gemma_edge.load(g4_path)
    history = user("the weather") + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold <turn|>"}]
    ids = tools.prepare(m, history, [WEATHER]).ids
    pieces = [m.tokenizer.id_to_piece(i) for i in ids]
    text = m.tokenizer.decode(ids)
    assert "declaration:weather{description:the weather}" in text and "parameters" not in text
    assert pieces.count("<|tool_call>") == 1 and pieces.count("<|tool_response>") == 1
    assert pieces[-1] == "<tool_response|>"  # the model answers in the same turn, after the result
    assert "cold <turn|>" in text and pieces.count("<turn|>") == 2  # a result's control string stays text
    monkeypatch.setattr(chat, "jinja_available", lambda: False)
    built_in = tools.prepare(m, history, [WEATHER]).ids
    text = m.tokenizer.decode(built_in)
    assert "declaration:weather{description:the weather,parameters:{" in text
    assert "call:weather{city:Oslo}" in text and "response:weather{value:cold <turn|>}" in text
    assert m.tokenizer.id_to_piece(built_in[-1]) == "<tool_response|>"


def test_json_format_prompt(g3_path):
    import gemma_edge
    from gemma_edge.runtime import tools

    m = gemma_edge.load(g3_path)
    history = [{"role": "system", "content": "Be brief."}] + user("the weather") + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}]
    text = m.tokenizer.decode(tools.prepare(m, history, [WEATHER]).ids)
    assert text.startswith("user\nBe brief.\n\nYou can call the tools below.")
    assert json.dumps(WEATHER["function"]["parameters"]) in text
    assert '```tool_call\n{"name": "weather", "arguments": {"city": "Oslo"}}\n```' in text
    assert '```tool_response\n{"name": "weather", "content": "cold"}\n```' in text
    assert text.endswith("model\n")


def test_bad_tool_schemas_are_errors(model):
    from gemma_edge.runtime import tools

    for params, says in [({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
                         ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
                           "required": ["a"]}, "Unsatisfiable"),
                         ({"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}, "none")]:
        bad = {"type": "function", "function": {"name": "f", "parameters": params}}
        with pytest.raises(tools.ToolError, match=says) as e:
            tools.prepare(model, user("x"), [bad])
        assert e.value.param == "tools[0].function.parameters"


# ---- the server, through the openai client -------------------------------------------------------

def test_server_weather_round_trip(client, model):
    msgs = user("the weather")
    r = client.chat.completions.create(model="any", messages=msgs, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    ((name, args),) = valid_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    assert name == "weather" and call.type == "function" and call.id.startswith("call_")
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})}]
    final = client.chat.completions.create(model="any", messages=msgs, tools=[WEATHER], tool_choice="none",
                                           max_tokens=16, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > r.usage.prompt_tokens


def test_server_stream_equals_non_stream(client):
    kw = dict(model="any", messages=user("the model"), tools=[WEATHER, CLOCK], tool_choice="required",
              max_tokens=150, temperature=1.0, seed=5)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            got = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            got["name"] += tc.function.name or ""
            got["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason and content == (whole.message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert sorted(calls) == list(range(len(calls)))


@pytest.mark.parametrize("choice", ["auto", "none", "required", "clock"])
def test_server_tool_choice(client, choice):
    tool_choice = {"type": "function", "function": {"name": "clock"}} if choice == "clock" else choice
    for seed in range(2):
        r = client.chat.completions.create(model="any", messages=user("the time"), tools=[WEATHER, CLOCK],
                                           tool_choice=tool_choice, max_tokens=100, temperature=1.0, seed=seed)
        c = r.choices[0]
        calls = valid_calls(c.message.tool_calls or [])
        if choice == "none":
            assert not calls and c.finish_reason in ("stop", "length")
        if choice in ("required", "clock"):
            assert calls
        if choice == "clock":
            assert {n for n, _ in calls} == {"clock"}
        if calls:
            assert c.finish_reason in ("tool_calls", "length")


@pytest.mark.parametrize("body,param,says", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools[0].function.parameters", "strin"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}}}]}, "tools[0].function.parameters",
     "Unsatisfiable"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice",
     "clock"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
    ({"messages": user("x") + [{"role": "tool", "tool_call_id": "nope", "content": "y"}]},
     "messages[1].tool_call_id", "matches no earlier"),
])
def test_server_bad_tools_are_400(client, body, param, says):
    kw = dict(model="any", messages=user("x"), max_tokens=4)
    kw.update(body)
    extra = {k: kw.pop(k) for k in ("functions",) if k in kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw, extra_body=extra or None)
    assert e.value.param == param and says in e.value.message


def test_completions_refuse_tools(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="any", prompt="x", max_tokens=2, extra_body={"tools": [WEATHER]})
    assert e.value.param == "tools"


# ---- the real Gemma 3 270M -----------------------------------------------------------------------

def test_real_270m_tool_round_trip(real_gguf, tmp_path_factory):
    """The base model through the built-in JSON format: calls parse and validate, greedy and sampled,
    and the round trip's second turn sees the result."""
    import gemma_edge
    from gemma_edge.runtime import tools
    from test_constrained import real_int8_file

    m = gemma_edge.load(str(real_int8_file(tmp_path_factory, real_gguf)))
    messages = user("What is the weather in Paris? Use the tool.")
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=1)):
        reply = tools.chat(m, messages, [WEATHER, CLOCK], "required", parallel_tool_calls=False, max_tokens=60, **kw)
        assert reply.finish_reason == "tool_calls"
        valid_calls(reply.tool_calls)
    messages += [reply.message, {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "18 C, sunny"}]
    final = tools.chat(m, messages, [WEATHER, CLOCK], "none", max_tokens=24, temperature=0)
    assert final.tool_calls == [] and final.content


def test_thinking_may_come_before_the_reply(g4_path):
    """A chat that asks Gemma 4 to think: its thought channel may open before the call (or the
    constrained answer), and the answer still follows the grammar."""
    import gemma_edge
    from gemma_edge.runtime import constrained, tools

    m = gemma_edge.load(g4_path)
    channel, call = m.tokenizer.piece_to_id("<|channel>"), m.tokenizer.piece_to_id("<|tool_call>")
    for thinking in (True, False):
        prompt = tools.prepare(m, user("x"), [WEATHER], "required", thinking=thinking)
        matcher = constrained.check(prompt.grammar, m.tokenizer).matcher(m.stop_token_ids)
        matcher.start()
        mask = matcher.allowed()
        assert mask.allows(call) and mask.allows(channel) == thinking
    schema = {"type": "integer", "minimum": 0, "maximum": 9}
    for seed in range(3):
        out = list(m.chat(thinking=True).send("the model", json_schema=schema, max_tokens=40, temperature=1.0,
                                              seed=seed))
        if out[-1].finish_reason == "stop":
            assert 0 <= int("".join(r.text for r in out)) <= 9


NATIVE_CASES = [
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 5},
                                       "b": {"type": "string", "enum": ["x", "y z"]},
                                       "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
      "required": ["a"]},
     [{"a": 3}, {"a": 1, "b": "y z"}, {"a": 5, "c": [True, False]}, {"a": 2, "b": "x", "c": []}],
     [{"a": 0}, {"b": "x"}, {"a": 3, "c": [True, True, True]}, {"a": 3, "b": "w"}, {"a": 2.5}]),
    ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
      "type": "object", "properties": {"p": {"$ref": "#/$defs/p"},
                                       "v": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}},
      "required": ["p", "v"]},
     [{"p": {"x": 1.5}, "v": None}, {"p": {"x": -2}, "v": "abc"}, {"p": {"x": 0}, "v": ""}],
     [{"p": {}, "v": None}, {"p": {"x": 1}, "v": "abcd"}, {"p": {"x": 1}}]),
    ({"type": "object", "properties": {"meta": {"type": "object"}, "code": {"type": "string",
                                                                           "pattern": "^[A-Z]{2}[0-9]$"}}},
     [{"meta": {"k": "v", "n": [1, {"z": None}], "t": True}}, {"code": "AB1"}, {}],
     [{"code": "ab1"}, {"code": "AB12"}]),
]


@pytest.mark.parametrize("case", range(len(NATIVE_CASES)))
def test_native_grammar_accepts_exactly_the_schema(g4_path, case):
    """Gemma 4's call syntax under a tool's schema: the values the schema accepts, written as the
    template writes them, are accepted token by token; the values it refuses are not."""
    import llguidance

    import gemma_edge
    from gemma_edge.runtime import constrained, tools

    schema, good, bad = NATIVE_CASES[case]
    m = gemma_edge.load(g4_path)
    tool = tools.parse_tools([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    g = tools.NativeFormat().grammar(m, tool, "f", False, None)
    vocab = constrained.check(g, m.tokenizer).vocab

    def accepts(value) -> bool:
        text = "<|tool_call>call:f" + tools.native_value(value) + "<tool_call|>"
        matcher = llguidance.LLMatcher(vocab.lltok, g.grammar, log_level=0)
        ids = m.tokenizer.encode(text, add_bos=False, parse_special=True)
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    for value in good:
        jsonschema.validate(value, schema)
        assert accepts(value), value
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
        assert not accepts(value), value
    assert not accepts({**good[0], "undeclared": 1})  # only declared properties are written
