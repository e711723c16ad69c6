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
Not bounded: CPU time of a template written to loop over long strings; it comes with
the model file, as the weights do.
"""

from __future__ import annotations

import functools
import json
import re
import warnings

from .errors import GemmaEdgeError

GEMMA_TEMPLATE = "<start_of_turn>{role}\n{content}<end_of_turn>\n"
MODEL_PREFIX = "<start_of_turn>model\n"

MAX_INT_ARG = 1_000_000  # largest int a template may pass to a call or filter, or use as a repeat count
RANGE_BUDGET = 1_000_000  # range() items one render may create, all loops together
_BIG_FORMAT = re.compile(r"\d{7,}|\*")  # a width or precision of a million or more, or taken from the args


class ChatTemplateError(GemmaEdgeError):
    """A checkpoint's jinja chat template cannot be used (no jinja2, bad syntax, refused by the
    sandbox, or it failed on these messages)."""


class ChatTemplateWarning(UserWarning):
    """The checkpoint's chat template failed; the built-in Gemma format was used instead."""


def format_turn(role: str, content: str) -> str:
    return GEMMA_TEMPLATE.format(role=role, content=content)


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render [{role, content}] (roles: system, user, assistant/model) without the <bos>."""
    out, system = [], None
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system = content if system is None else system + "\n\n" + content
            continue
        if role == "user" and system is not None:
            content, system = f"{system}\n\n{content}", None
        out.append(format_turn("model" if role in ("assistant", "model") else "user", content))
    if add_generation_prompt:
        out.append(MODEL_PREFIX)
    return "".join(out)


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


@functools.lru_cache(maxsize=1)
def _sandbox():
    """One environment for every template: an ImmutableSandboxedEnvironment that also refuses
    results that would be huge. Built on first use, so jinja2 loads only when needed."""
    from jinja2 import ext
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
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
            _check_args(args, kwargs, f"calling {getattr(__obj, '__name__', type(__obj).__name__)}")
            fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
            if getattr(__obj, "__name__", "") in ("format", "format_map") and isinstance(fmt, str):
                if _BIG_FORMAT.search("".join(re.findall(r"\{[^{}]*\}", fmt))):
                    _refuse(f"the format {fmt[:40]!r}")
            return super().call(__context, __obj, *args, **kwargs)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])

    def guarded(name, f):
        skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # (context,) value: not arguments

        def filt(*args, **kwargs):
            _check_args(args[skip:], kwargs, f"the filter {name}")
            return f(*args, **kwargs)
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
                 bos_token: str = "<bos>", eos_token: str = "<eos>") -> str:
    """Render a checkpoint's jinja ``source`` in the sandbox; the text without a leading ``bos_token``
    (the tokenizer adds <bos>, as with ``render``). Raises ChatTemplateError for any failure."""
    if not jinja_available():
        raise ChatTemplateError("jinja2 is not installed (pip install jinja2) to render the model's chat template")
    template = _compile(source)
    if isinstance(template, str):
        raise ChatTemplateError(template)
    msgs = [dict(m) for m in messages]
    limit = 16 * sum(len(str(m.get("content", ""))) for m in msgs) + 65536
    parts, size = [], 0
    try:
        for chunk in template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, range=_budgeted_range()):
            size += len(chunk)
            if size > limit:
                raise ChatTemplateError(f"the chat template's output passed {limit:,} characters for "
                                        f"{len(msgs)} messages; it is not a chat template")
            parts.append(chunk)
    except ChatTemplateError:
        raise
    except Exception as e:  # the template is untrusted code: any failure (SecurityError, TypeError, ...) is its own
        raise ChatTemplateError(f"the chat template failed ({type(e).__name__}: {e})") from None
    text = "".join(parts)
    return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text


_warned: set[tuple[int, str]] = set()


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str | None = None,
                bos_token: str = "<bos>", eos_token: str = "<eos>") -> str:
    """The prompt text (without <bos>) of ``messages``: ``template`` (a checkpoint's jinja source)
    rendered in the sandbox when given and jinja2 is installed, else the built-in ``render``.
    A template that fails warns once (``ChatTemplateWarning``) and the built-in format is used."""
    if template and jinja_available():
        try:
            return render_jinja(template, messages, add_generation_prompt, bos_token, eos_token)
        except ChatTemplateError as e:
            key = (hash(template), str(e))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"{e}; using the built-in Gemma chat format instead", ChatTemplateWarning,
                              stacklevel=2)
    return render(messages, add_generation_prompt)
