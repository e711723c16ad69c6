"""Chat prompts: the built-in Gemma format, and a checkpoint's own jinja template in a sandbox.

The built-in format (the same for Gemma 1, 2 and 3):

    <bos><start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n

A system prompt has no role of its own in Gemma: it is folded into the first user turn,
followed by a blank line, as Gemma's own template does.

A converted file also carries the checkpoint's jinja chat template (metadata
``chat_template.jinja``, from ``tokenizer_config.json`` or GGUF ``tokenizer.chat_template``).
``render_chat`` renders it when jinja2 is installed; jinja2 is optional for the runtime,
and without it (or without a template) the built-in format is used, silently: it is the
format every Gemma template produces. The template is untrusted input (it comes with the
model file), so it runs in jinja2's ``ImmutableSandboxedEnvironment``: it can read the
messages and call nothing unsafe (``__class__``, ``__globals__``, ``list.append`` ... raise
``SecurityError``). On top of the sandbox, results that would be huge (``'x' * 10**9``,
``'%099999999d'``, ``'x'.center(10**9)``, ``range`` past a budget, output past a limit) are
refused. A template that fails in any way (syntax error, ``raise_exception``, a refused
operation) is reported once with a ``ChatTemplateWarning`` and the built-in format is used.
Strings a template builds are bounded too (``MAX_STRING``: ``~`` and ``+``, ``replace``
predicted before it runs, ``indent``, any call's or filter's result), and so is a render's
time (``TIME_BUDGET``, checked at every operation the sandbox sees).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass

from .errors import GemmaEdgeError

MAX_INT_ARG = 1_000_000  # largest int a template may pass to a call or filter, or use as a repeat count
RANGE_BUDGET = 1_000_000  # range() items one render may create, all loops together
MAX_STRING = 4_000_000  # longest string a template may build (concatenation, replace, indent, ...)
TIME_BUDGET = 5.0  # seconds of work one render may take
_BIG_FORMAT = re.compile(r"\d{7,}|\*")  # a width or precision of a million or more, or taken from the args


class ChatTemplateError(GemmaEdgeError):
    """A checkpoint's jinja chat template cannot be used (no jinja2, bad syntax, refused by the
    sandbox, or it failed on these messages)."""


class ChatTemplateWarning(UserWarning):
    """The checkpoint's chat template failed; the built-in Gemma format was used instead."""


@dataclass(frozen=True)
class ChatFormat:
    """A built-in chat format as data: ``render`` (Python) and ``jinja`` (the same format as a
    jinja template, for LiteRT-LM) both derive from it, so they cannot disagree.

    A turn is ``{turn_start}{role}\n{content}{turn_end}\n``; the prompt ends with
    ``{turn_start}model\n``. ``system_role`` None folds system messages into the next user
    turn, followed by a blank line (Gemma 1-3 have no system turn)."""

    name: str
    turn_start: str
    turn_end: str
    system_role: str | None = None
    # a model that thinks writes {channel_start}thought\n...{channel_end} before its answer;
    # {think} at the start of the system turn asks it to (Gemma 4)
    channel_start: str | None = None
    channel_end: str | None = None
    think: str | None = None

    @property
    def model_prefix(self) -> str:
        return f"{self.turn_start}model\n"

    def turn(self, role: str, content: str) -> str:
        return f"{self.turn_start}{role}\n{content}{self.turn_end}\n"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False) -> str:
        """[{role, content}] (roles: system, user, assistant/model) -> the prompt, without <bos>.
        ``thinking`` asks a model that can think (``think``) to, in the system turn."""
        out, system = [], None
        if thinking and self.think and self.system_role is not None and \
                not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": ""}, *messages]
        first_system = True
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                if self.system_role is not None:
                    if thinking and self.think and first_system:
                        content = self.think + content
                    first_system = False
                    out.append(self.turn(self.system_role, content))
                else:
                    system = content if system is None else system + "\n\n" + content
                continue
            if role == "user" and system is not None:
                content, system = f"{system}\n\n{content}", None
            out.append(self.turn("model" if role in ("assistant", "model") else "user", content))
        if add_generation_prompt:
            out.append(self.model_prefix)
        return "".join(out)

    def jinja(self) -> str:
        """This format as a jinja template over ``messages`` (content a string or a list of
        {"type": "text"} parts) and ``add_generation_prompt``; no <bos> (LiteRT-LM prepends
        its start token itself). ``tests/test_litertlm.py`` renders both and compares."""
        start, end = _jinja_str(self.turn_start), _jinja_str(self.turn_end + "\n")
        system = (
            "{{ " + start + " + '" + self.system_role + "\\n' + ns.content + " + end + " }}"
            if self.system_role is not None else
            "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + ns.content -%}")
        return (
            "{%- set ns = namespace(system='', content='') -%}"
            "{%- for message in messages -%}"
            "{%- if message.content is string -%}{%- set ns.content = message.content -%}"
            "{%- else -%}{%- set ns.content = '' -%}{%- for part in message.content -%}"
            "{%- if part.type == 'text' -%}{%- set ns.content = ns.content + part.text -%}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
            "{%- if message.role == 'system' -%}" + system +
            "{%- else -%}"
            "{%- set role = 'model' if message.role in ['model', 'assistant'] else 'user' -%}"
            "{%- if role == 'user' and ns.system -%}"
            "{%- set ns.content = ns.system + '\\n\\n' + ns.content -%}{%- set ns.system = '' -%}"
            "{%- endif -%}"
            "{{ " + start + " + role + '\\n' + ns.content + " + end + " }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + _jinja_str(self.model_prefix) + " }}{%- endif -%}")


def _jinja_str(text: str) -> str:
    """A jinja string literal of ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


GEMMA = ChatFormat("gemma", "<start_of_turn>", "<end_of_turn>")  # Gemma 1, 2, 3: no system turn
GEMMA4 = ChatFormat("gemma4", "<|turn>", "<turn|>", system_role="system",
                    channel_start="<|channel>", channel_end="<channel|>", think="<|think|>")
FORMATS = {f.name: f for f in (GEMMA, GEMMA4)}


def chat_format(name: str | None) -> ChatFormat:
    """The built-in format a file names (``FileMeta.chat_template.kind``); Gemma's by default."""
    return FORMATS.get(name or "gemma", GEMMA)


def format_for(tokenizer) -> ChatFormat:
    """The built-in format whose turn markers the tokenizer has as pieces of their own."""
    for fmt in (GEMMA4, GEMMA):
        if tokenizer.piece_to_id(fmt.turn_start) is not None and tokenizer.piece_to_id(fmt.turn_end) is not None:
            return fmt
    return GEMMA


def render(messages: list[dict], add_generation_prompt: bool = True, fmt: ChatFormat = GEMMA) -> str:
    """Render [{role, content}] (roles: system, user, assistant/model) without the <bos>."""
    return fmt.render(messages, add_generation_prompt)


# ---- a checkpoint's jinja template ------------------------------------------------------------

def jinja_available() -> bool:
    try:
        import jinja2.sandbox  # noqa: F401
    except ImportError:
        return False
    return True


def _refuse(what: str):
    from jinja2.exceptions import SecurityError

    raise SecurityError(f"{what} is refused: no chat template needs results that large")


def _check_args(args, kwargs, what: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
            _refuse(f"{what} with argument {a}")


_render = threading.local()  # the deadline of the render under way in this thread


def _tick() -> None:
    """Every guarded operation checks the render's time budget."""
    deadline = getattr(_render, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        _refuse(f"a render taking more than {TIME_BUDGET:g} s")


def _check_size(result, what: str):
    if isinstance(result, str) and len(result) > MAX_STRING:
        _refuse(f"{what} making a string of {len(result):,} characters")
    return result


def _predict_replace(text, old, new, count=-1) -> None:
    """str.replace's result length, computed before it is built (it grows multiplicatively)."""
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        n = len(text) + 1 if old == "" else text.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        if len(text) + n * (len(new) - len(old)) > MAX_STRING:
            _refuse(f"replacing {n:,} occurrences in a {len(text):,}-character string")


def _guarded_concat(items):
    """jinja2's ``~`` operator (str_join), with its result's size bounded before it is built."""
    _tick()
    parts = [str(x) for x in items]
    if sum(map(len, parts)) > MAX_STRING:
        _refuse(f"joining {len(parts)} strings into {sum(map(len, parts)):,} characters")
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _sandbox():
    """One environment for every template: an ImmutableSandboxedEnvironment that also refuses
    results that would be huge. Built on first use, so jinja2 loads only when needed."""
    from jinja2 import ext
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GuardedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: through the environment's guarded join
            self.write("environment.guarded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})
        code_generator_class = GuardedCodeGenerator
        guarded_concat = staticmethod(_guarded_concat)

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "+" and isinstance(left, str) and isinstance(right, str) and \
                    len(left) + len(right) > MAX_STRING:
                _refuse(f"adding strings of {len(left):,} and {len(right):,} characters")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_INT_ARG:
                        _refuse(f"repeating a {len(seq)}-item {type(seq).__name__} {n} times")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int):
                if abs(left) > 1 and right > 0 and right * abs(left).bit_length() > 64 * 1024:
                    _refuse(f"{left} ** {right}")
            elif operator == "%" and isinstance(left, str):
                if _BIG_FORMAT.search("".join(re.findall(r"%[^a-zA-Z%]*", left))):
                    _refuse(f"the format {left[:40]!r}")
            return super().call_binop(context, operator, left, right)

        def unsafe_undefined(self, obj, attribute):  # jinja2 renders these as ''; refuse them outright
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            _tick()
            name = getattr(__obj, "__name__", type(__obj).__name__)
            _check_args(args, kwargs, f"calling {name}")
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
            if name in ("format", "format_map") and isinstance(owner, str):
                if _BIG_FORMAT.search("".join(re.findall(r"\{[^{}]*\}", owner))):
                    _refuse(f"the format {owner[:40]!r}")
            if name == "replace" and isinstance(owner, str):
                _predict_replace(owner, *args, **kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs), f"calling {name}")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])

    def guarded(name, f):
        skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # (context,) value: not arguments

        def filt(*args, **kwargs):
            _tick()
            _check_args(args[skip:], kwargs, f"the filter {name}")
            value, rest = args[skip - 1] if len(args) >= skip else None, args[skip:]
            if name == "replace":
                _predict_replace(str(value), *[str(a) if i < 2 else a for i, a in enumerate(rest)])
            elif name == "indent" and isinstance(value, str):
                width = rest[0] if rest else kwargs.get("width", 4)
                width = len(width) if isinstance(width, str) else width
                if isinstance(width, int) and len(value) + (value.count("\n") + 1) * width > MAX_STRING:
                    _refuse(f"indenting {value.count(chr(10)) + 1:,} lines by {width}")
            return _check_size(f(*args, **kwargs), f"the filter {name}")
        if hasattr(f, "jinja_pass_arg"):  # keep the @pass_context / @pass_environment marker
            filt.jinja_pass_arg = f.jinja_pass_arg
        return filt

    env.filters = {name: guarded(name, f) for name, f in env.filters.items()}

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise TemplateError(str(message))

    env.filters["tojson"] = tojson  # as transformers' apply_chat_template: plain JSON, not HTML-escaped
    env.globals["raise_exception"] = raise_exception
    return env


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """The compiled template, or why it cannot be compiled (cached too)."""
    try:
        return _sandbox().from_string(source)
    except Exception as e:  # untrusted source: TemplateSyntaxError, RecursionError, ... are all its own
        return f"the chat template does not compile ({type(e).__name__}: {e})"


def _budgeted_range():
    left = [RANGE_BUDGET]

    def range_(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            _refuse(f"range() past {RANGE_BUDGET:,} items in one render")
        return r
    range_.__name__ = "range"
    return range_


def render_jinja(source: str, messages: list[dict], add_generation_prompt: bool = True,
                 bos_token: str = "<bos>", eos_token: str = "<eos>", thinking: bool = False,
                 tools: list[dict] | None = None) -> str:
    """Render a checkpoint's jinja ``source`` in the sandbox; the text without a leading ``bos_token``
    (the tokenizer adds <bos>, as with ``render``). ``tools`` (OpenAI's tool list) is passed to the
    template as ``tools``, as transformers' apply_chat_template does (``runtime/tools.py``).
    Raises ChatTemplateError for any failure."""
    if not jinja_available():
        raise ChatTemplateError("jinja2 is not installed (pip install jinja2) to render the model's chat template")
    template = _compile(source)
    if isinstance(template, str):
        raise ChatTemplateError(template)
    msgs = [dict(m) for m in messages]
    limit = 16 * sum(len(str(m.get("content", ""))) + len(str(m.get("tool_calls", ""))) for m in msgs) + 65536
    limit += 16 * len(json.dumps(tools)) if tools else 0
    parts, size = [], 0
    _render.deadline = time.monotonic() + TIME_BUDGET
    try:
        for chunk in template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, enable_thinking=thinking,
                                       tools=tools, range=_budgeted_range()):
            size += len(chunk)
            if size > limit:
                raise ChatTemplateError(f"the chat template's output passed {limit:,} characters for "
                                        f"{len(msgs)} messages; it is not a chat template")
            parts.append(chunk)
    except ChatTemplateError:
        raise
    except Exception as e:  # the template is untrusted code: any failure (SecurityError, TypeError, ...) is its own
        raise ChatTemplateError(f"the chat template failed ({type(e).__name__}: {e})") from None
    finally:
        _render.deadline = None
    text = "".join(parts)
    return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text


_warned: set[tuple[int, str]] = set()


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str | None = None,
                bos_token: str = "<bos>", eos_token: str = "<eos>", fmt: ChatFormat = GEMMA,
                thinking: bool = False) -> str:
    """The prompt text (without <bos>) of ``messages``: ``template`` (a checkpoint's jinja source)
    rendered in the sandbox when given and jinja2 is installed, else the built-in ``fmt``.
    A template that fails warns once (``ChatTemplateWarning``) and the built-in format is used."""
    if template and jinja_available():
        try:
            return render_jinja(template, messages, add_generation_prompt, bos_token, eos_token, thinking)
        except ChatTemplateError as e:
            key = (hash(template), str(e))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"{e}; using the built-in Gemma chat format instead", ChatTemplateWarning,
                              stacklevel=2)
    return fmt.render(messages, add_generation_prompt, thinking)


# ---- user text stays text ---------------------------------------------------------------------
#
# A chat prompt is the template's markup around the users' text. The markup's control strings
# (<start_of_turn>, <end_of_turn>, ...) must become control tokens; the same strings typed by a
# user must not, or a message could close its own turn and forge a model or system turn. So each
# control string inside a message is swapped for a placeholder before rendering (the template
# sees ordinary text), and the placeholder is encoded afterwards as the plain characters it
# stands for. The nonce makes a placeholder no user text can contain by chance.

def new_nonce() -> str:
    import secrets

    return secrets.token_hex(8)


def protect(messages: list[dict], tokenizer, nonce: str) -> list[dict]:
    """``messages`` with every control string in a text content replaced by a placeholder."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts = tokenizer.split_special(content)
            if any(isinstance(p, int) for p in parts):
                content = "".join(p if isinstance(p, str) else f"\ue000{nonce}:{p}\ue001" for p in parts)
        out.append({**m, "content": content})
    return out


def encode_protected(tokenizer, text: str, nonce: str, add_bos: bool = False) -> list[int]:
    """Encode rendered ``text``: the template's control strings as control tokens, placeholders
    (``protect``) as the plain text of the control string they stand for."""
    ids = tokenizer.encode("", add_bos=add_bos) if add_bos else []
    pos = 0
    for m in re.finditer(f"\ue000{re.escape(nonce)}:([0-9]+)\ue001", text):
        ids += tokenizer.encode(text[pos:m.start()], add_bos=False, parse_special=True)
        ids += tokenizer.encode(tokenizer.id_to_piece(int(m.group(1))), add_bos=False, parse_special=False)
        pos = m.end()
    ids += tokenizer.encode(text[pos:], add_bos=False, parse_special=True)
    return ids


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, add_bos: bool = True,
                template: str | None = None, fmt: ChatFormat = GEMMA, nonce: str | None = None,
                thinking: bool = False, **special) -> list[int]:
    """The ids of ``messages`` rendered by ``render_chat``, the users' text kept text."""
    nonce = nonce or new_nonce()
    text = render_chat(protect(messages, tokenizer, nonce), add_generation_prompt, template, fmt=fmt,
                       thinking=thinking, **special)
    return encode_protected(tokenizer, text, nonce, add_bos)
