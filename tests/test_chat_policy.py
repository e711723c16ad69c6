"""Chat templates and the conversation's context policy.

Templates: ``runtime/chat.py`` renders a checkpoint's own jinja template in jinja2's
``ImmutableSandboxedEnvironment``. Gemma 3's official template renders exactly what the
built-in format does; templates that reach for Python internals, or would build huge
results, are refused and the built-in format is used, with a ChatTemplateWarning.

Policy: a ``Conversation`` on the tiny Gemma 3 (context 64) runs far past its context: it
keeps answering, drops its oldest whole turns, and what it feeds after a drop is exactly the
remaining history rendered and tokenized again (checked with the tokenizer).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from gemma_edge.runtime import chat
from gemma_edge.runtime.chat import ChatTemplateError, ChatTemplateWarning, render, render_chat, render_jinja
from gemma_edge.runtime.errors import GemmaEdgeError, GenerationError
from test_hardening import with_meta, write_gemma3_gguf
from conftest import CONTEXT
from test_runtime import EOT

# Gemma 3's chat template, as the instruction-tuned checkpoints ship it in tokenizer_config.json
# (google/gemma-3-4b-it and its siblings), verbatim.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [SYSTEM, {"role": "user", "content": "Hi"}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Two\nlines, 数学 🙂"}],
    [{"role": "user", "content": "x"}, {"role": "model", "content": "y"}, {"role": "user", "content": "z"},
     {"role": "assistant", "content": "w"}],
]

# Templates that try to reach Python: each raises jinja2's SecurityError inside the sandbox.
ESCAPES = {
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__ }}",
    "globals_os": "{{ lipsum.__globals__['os'].system('true') }}",
    "init_globals": "{{ cycler.__init__.__globals__ }}",
    "self": "{{ self.__init__ }}",
    "mutate_messages": "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "format_attr": "{{ '{0.__class__}'.format(messages) }}",
}
# Templates that would build huge results or loop for long: refused before they do.
HUGE = {
    "repeat": "{{ 'x' * 10**9 }}",
    "range": "{% for i in range(10**9) %}{% endfor %}",
    "nested_range": "{% for a in range(2000) %}{% for b in range(2000) %}{% endfor %}{% endfor %}",
    "percent_width": "{{ '%0999999999d' % 1 }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "center_method": "{{ 'x'.center(10**9) }}",
    "center_filter": "{{ 'x' | center(10**9) }}",
    "power": "{{ 2 ** (10**8) }}",
    "output": "{% for i in range(30000) %}{{ 'abcdefghij' * 100 }}{% endfor %}",
}
# Templates that are merely broken.
BROKEN = {
    "syntax": "{% if %}",
    "raise_exception": "{{ raise_exception('System role not supported') }}",
    "undefined": "{{ x.y.z }}",
    "division": "{{ 1 / 0 }}",
    "type": "{{ messages + 1 }}",
}


# ---- templates, without a model ------------------------------------------------------------------


@pytest.mark.parametrize("gen", [True, False], ids=["generation_prompt", "no_generation_prompt"])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_gemma3_template_renders_like_the_builtin_format(i, gen):
    msgs = CONVERSATIONS[i]
    assert render_jinja(GEMMA3_CHAT_TEMPLATE, msgs, gen) == render(msgs, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback happened
        assert render_chat(msgs, gen, template=GEMMA3_CHAT_TEMPLATE) == render(msgs, gen)


def test_the_template_is_really_used():
    """Gemma 3's template trims each message; the built-in format keeps it as it is."""
    msgs = [{"role": "user", "content": "  padded  "}]
    want = "<start_of_turn>user\npadded<end_of_turn>\n<start_of_turn>model\n"
    assert render_jinja(GEMMA3_CHAT_TEMPLATE, msgs) == want
    assert render(msgs) != render_jinja(GEMMA3_CHAT_TEMPLATE, msgs)
    custom = "{% for m in messages %}[{{ m.role }}] {{ m.content | upper }}\n{% endfor %}{{ eos_token }}"
    assert render_chat(msgs, template=custom, eos_token="</s>") == "[user]   PADDED  \n</s>"


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_template_reaching_python_is_refused(name):
    with pytest.raises(ChatTemplateError, match="SecurityError") as err:
        render_jinja(ESCAPES[name], CONVERSATIONS[2])
    assert isinstance(err.value, GemmaEdgeError) and "unsafe" in str(err.value)
    with pytest.warns(ChatTemplateWarning, match="built-in Gemma chat format"):
        out = render_chat(CONVERSATIONS[2], template=ESCAPES[name] + "{# " + name + " #}")
    assert out == render(CONVERSATIONS[2])


@pytest.mark.parametrize("name", sorted(HUGE))
def test_template_building_huge_results_is_refused(name):
    with pytest.raises(ChatTemplateError, match="refused|passed .* characters"):
        render_jinja(HUGE[name], CONVERSATIONS[2])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_template_falls_back_with_a_warning(name):
    with pytest.raises(ChatTemplateError):
        render_jinja(BROKEN[name], CONVERSATIONS[1])
    with pytest.warns(ChatTemplateWarning) as caught:
        assert render_chat(CONVERSATIONS[1], template=BROKEN[name] + "{# again #}") == render(CONVERSATIONS[1])
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure warns once
        render_chat(CONVERSATIONS[1], template=BROKEN[name] + "{# again #}")


def test_without_jinja2_the_builtin_format_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    assert not chat.jinja_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: the built-in format is every Gemma's format
        assert render_chat(CONVERSATIONS[2], template=GEMMA3_CHAT_TEMPLATE) == render(CONVERSATIONS[2])
    with pytest.raises(ChatTemplateError, match="pip install jinja2"):
        render_jinja(GEMMA3_CHAT_TEMPLATE, CONVERSATIONS[2])


def test_runtime_loads_jinja2_only_to_render_a_template():
    code = ("import sys, gemma_edge.runtime.engine, gemma_edge.runtime.cli\n"
            "from gemma_edge.runtime import chat\n"
            "chat.render_chat([{'role': 'user', 'content': 'x'}])\n"
            "assert 'jinja2' not in sys.modules, 'jinja2 imported'\n"
            "chat.render_chat([{'role': 'user', 'content': 'x'}], template='{{ messages[0].content }}')\n"
            "assert 'jinja2' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- templates, from the model file ----------------------------------------------------------------


def _with_template(tiny, tmp_path_factory, name: str, template: str | None) -> str:
    def edit(meta):
        meta["chat_template"]["jinja"] = template
        return meta

    p = tmp_path_factory.mktemp("templates") / f"{name}.tflite"
    p.write_bytes(with_meta(tiny.model_file.read_bytes(), edit))
    return str(p)


def test_gguf_chat_template_goes_into_the_file(tmp_path):
    """gemma-convert copies GGUF ``tokenizer.chat_template`` into the file's ``chat_template.jinja``
    as it is (untrusted text; only the runtime renders it, in the sandbox)."""
    from gemma_edge.convert.checkpoint import Source

    src = Source(str(write_gemma3_gguf(tmp_path / "templated.gguf", chat_template=GEMMA3_CHAT_TEMPLATE)))
    try:
        assert src.chat_template_jinja == GEMMA3_CHAT_TEMPLATE
    finally:
        src.close()


@pytest.fixture(scope="module")
def gemma3_path(tiny, tmp_path_factory) -> str:
    return _with_template(tiny, tmp_path_factory, "gemma3", GEMMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def evil_path(tiny, tmp_path_factory) -> str:
    return _with_template(tiny, tmp_path_factory, "evil", ESCAPES["subclasses"])


def test_model_renders_its_own_template(tiny, gemma3_path):
    import gemma_edge

    m = gemma_edge.load(gemma3_path)
    assert m.info.meta.chat_template.jinja == GEMMA3_CHAT_TEMPLATE
    for msgs in CONVERSATIONS:
        assert m.render_chat(msgs) == render(msgs)
    assert m.render_chat([{"role": "user", "content": " x "}]).startswith("<start_of_turn>user\nx<end_of_turn>")
    # A chat on the file with the template feeds exactly what the file without one does.
    plain = gemma_edge.load(tiny.model_file)
    a, b = m.chat(system="Be brief."), plain.chat(system="Be brief.")
    for msg in ("the model", "and the cache"):
        assert a.ask(msg, temperature=0, max_tokens=6) == b.ask(msg, temperature=0, max_tokens=6)
        assert a.tokens == b.tokens


def test_model_with_a_malicious_template_uses_the_builtin_format(tiny, evil_path):
    import gemma_edge

    m, plain = gemma_edge.load(evil_path), gemma_edge.load(tiny.model_file)
    with pytest.warns(ChatTemplateWarning, match="SecurityError"):
        text = m.chat().ask("the model", temperature=0, max_tokens=6)
    assert text == plain.chat().ask("the model", temperature=0, max_tokens=6)


# ---- the context policy ------------------------------------------------------------------------


@pytest.fixture
def model(tiny):
    import gemma_edge

    return gemma_edge.load(tiny.model_file)


def test_reply_room(model):
    conv = model.chat()
    assert conv.reply_room(256) == CONTEXT // 2  # the default max_tokens, capped at half the context
    assert conv.reply_room(8) == 8
    assert conv.reply_room(0) == 1


def test_long_chat_drops_old_turns_and_keeps_answering(model, tiny):
    """40 turns through a 64-token context. Each turn either extends the tokens so far (prefix
    reuse) or, when it would not leave the reply room, drops the oldest turns and feeds the
    rest rendered again: the system prompt folded into the first user turn that remains."""
    import gemma_edge

    tok, system = model.tokenizer, "Be brief."
    conv = model.chat(system=system)
    room = conv.reply_room(10)
    before, dropped_before, drops, checked_fresh = [], 0, 0, False
    for turn in range(40):
        message = f"the model and the cache {turn}"
        responses = list(conv.send(message, temperature=0, max_tokens=10))
        assert responses and responses[-1].finish_reason in ("stop", "length")
        prompt = conv.tokens[:responses[-1].prompt_tokens]
        reply = [r.token for r in responses]
        assert conv.tokens == prompt + reply + ([EOT] if reply[-1] != EOT else [])
        assert len(prompt) <= CONTEXT
        if conv.dropped_turns > dropped_before:
            drops += 1
            kept = conv.messages[2 * conv.dropped_turns:-2]
            want = render([{"role": "system", "content": system}, *kept, {"role": "user", "content": message}])
            assert prompt == tok.encode(want, add_bos=True, parse_special=True)
            assert len(prompt) + room <= CONTEXT or len(kept) == 0
            assert tok.decode(prompt).startswith(f"user\n{system}\n\n")  # the system prompt survived
            if not checked_fresh:  # what was left in the cache past the kept prefix does not leak
                fresh = gemma_edge.load(tiny.model_file).generate(prompt, temperature=0, max_tokens=10)
                assert fresh.tokens == reply
                checked_fresh = True
        else:
            assert prompt[:len(before)] == before  # only the new turn was added
        before, dropped_before = conv.tokens, conv.dropped_turns
    assert len(conv.messages) == 80
    assert drops >= 10 and conv.dropped_turns >= 30


def test_a_message_longer_than_the_context_raises_and_changes_nothing(model):
    conv = model.chat(system="Be brief.")
    conv.ask("the model", temperature=0, max_tokens=4)
    state = (list(conv.tokens), list(conv.messages), conv.dropped_turns)
    with pytest.raises(GenerationError, match=rf"takes \d+ tokens .* context of {CONTEXT} tokens .* 1 earlier turn"):
        list(conv.send(" ".join(["model"] * 80), temperature=0))
    assert (conv.tokens, conv.messages, conv.dropped_turns) == state
    assert conv.ask("the cache", temperature=0, max_tokens=4) is not None  # and it goes on
    assert len(conv.messages) == 4


def test_a_message_that_fits_only_without_its_reply_room(model):
    """Every older turn is dropped and the reply gets what is left of the context."""
    conv = model.chat()
    conv.ask("the model", temperature=0, max_tokens=4)
    def tokens(text):
        prompt = render([{"role": "user", "content": text}])
        return len(model.tokenizer.encode(prompt, add_bos=True, parse_special=True))

    long = next(t for t in ("the " * k for k in range(1, 64)) if CONTEXT - conv.reply_room(20) < tokens(t) < CONTEXT)
    n = tokens(long)
    responses = list(conv.send(long, temperature=0, max_tokens=20))
    assert conv.dropped_turns == 1 and responses[-1].prompt_tokens == n
    assert len(responses) <= CONTEXT - n + 1


def test_a_refused_request_is_not_a_turn(model):
    conv = model.chat()
    with pytest.raises(GenerationError, match="temperature"):
        list(conv.send("the model", temperature=-1))
    assert conv.messages == [] and conv.tokens == []
