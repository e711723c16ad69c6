"""Tool calls: OpenAI's ``tools`` / ``tool_choice`` on a Gemma chat, in the model's own format.

Messages are OpenAI's: ``system`` / ``developer``, ``user``, ``assistant`` (with ``tool_calls``,
whose ``arguments`` are JSON text or an object) and ``tool`` (``tool_call_id`` and the result
as ``content``). ``prepare`` renders them with the tools into the prompt and builds the grammar
of the reply; the reply is generated under it, so a call always parses and its arguments
always follow the tool's parameter schema; ``ReplyParser`` turns the reply back into text and
``ToolCall`` s as it streams.

Two formats (``FORMATS``), chosen by the tokenizer (``format_for``):

``gemma4`` (native), for a tokenizer with Gemma 4's tool tokens as control tokens
(``<|tool>``, ``<tool|>``, ``<|tool_call>``, ``<tool_call|>``, ``<|tool_response>``,
``<tool_response|>`` and the string quote ``<|"|>``). Tools are declared in the system turn
as ``<|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>``; the model
calls ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` (keys bare and sorted, strings
between ``<|"|>`` quotes, numbers, ``true`` / ``false`` / ``null``, ``{...}`` and ``[...]``),
possibly several in a row, and may close them with ``<|tool_response>``; results come back in
the same model turn as ``<|tool_response>response:NAME{value:<|"|>...<|"|>}<tool_response|>``
and the model goes on to answer. The checkpoint's own chat template renders the prompt when
it renders tools (Gemma 4's does); otherwise a built-in rendering of the same format is used.

``json`` (built-in), for Gemma 1-3 and any tokenizer without those tokens. The tools are
declared in the system prompt (folded into the first user turn on Gemma 1-3) as JSON, one
per line, after an instruction; the model calls each tool with a fenced block, several in a
row for parallel calls, and nothing else in that reply::

    ```tool_call
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ```

Results come back in a user turn, one block each::

    ```tool_response
    {"name": "get_weather", "content": "18 C, sunny"}
    ```

Either way the reply is text *or* calls (the model cannot half-write a call into its text),
and ``tool_choice`` is enforced by the grammar: ``"auto"`` allows both, ``"none"`` only text,
``"required"`` one call or more, ``{"type": "function", "function": {"name": N}}`` calls of N
only; ``parallel_tool_calls=False`` allows one call at most. Tool parameter schemas support
objects (``properties``, ``required``), arrays (``items``, ``prefixItems``, ``minItems`` /
``maxItems``), strings (``enum``, ``const``, ``minLength`` / ``maxLength``, ``pattern``),
numbers and integers with bounds, booleans, null, ``anyOf`` / ``oneOf`` / ``allOf`` of
objects, ``type`` lists and local ``$ref``; a schema llguidance rejects or proves
unsatisfiable is a ``ToolError`` naming the tool (a 400 in the server). The ``json`` format
compiles the schema with llguidance's JSON compiler (all it supports); Gemma 4's syntax is
compiled here (``_NativeSchema``): only declared properties are written (a subset of what
the schema accepts, in sorted order, as the template writes them), ``format`` is not
enforced, and property names must be writable bare (no spaces or ``: , { } [ ]``).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Iterator

from . import chat as chat_format
from . import constrained
from .constrained import Grammar, GrammarError, lark_string
from .errors import GenerationError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JSON_CALL_OPEN, JSON_CALL_CLOSE = "```tool_call\n", "\n```"
JSON_RESULT_OPEN = "```tool_response\n"
NATIVE_MARKERS = {"tool": "<|tool>", "tool_end": "<tool|>", "call": "<|tool_call>", "call_end": "<tool_call|>",
                  "response": "<|tool_response>", "response_end": "<tool_response|>", "quote": '<|"|>'}
_MAX_RULES = 20000  # a tool schema that needs more grammar rules than this is refused


class ToolError(GenerationError):
    """A bad ``tools``, ``tool_choice`` or tool message; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- the request: tools, tool_choice, messages -------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    spec: dict  # the tool as given (OpenAI's shape), for a chat template

    @property
    def declaration(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` parsed (they follow the tool's schema)."""

    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def openai(self, index: int | None = None) -> dict:
        """OpenAI's ``tool_calls`` entry (``index`` too, for a stream's delta)."""
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}
        return out if index is None else {"index": index, **out}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tools(tools) -> list[Tool]:
    """OpenAI's ``tools`` list -> Tools. Raises ToolError naming the bad field."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError(f"tools must be a list of {{type: function, function: {{name, parameters}}}}, got "
                        f"{type(tools).__name__}", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} (function tools only), "
                            f"got {kind!r}", where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {json.dumps(name)}",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        seen.add(name)
        description = f.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object, got "
                            f"{type(params).__name__}", f"{where}.function.parameters")
        if params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must describe an object (\"type\": \"object\"), got "
                            f"{json.dumps(params.get('type'))}", f"{where}.function.parameters")
        out.append(Tool(name, description, params, {"type": "function", "function": {
            "name": name, "description": description, "parameters": params}}))
    return out


def parse_tool_choice(choice, tools: list[Tool]) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or a tool's name (a named function)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolError(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}, got {choice!r}", "tool_choice")
        if choice == "required" and not tools:
            raise ToolError("tool_choice \"required\" needs tools", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t.name for t in tools}:
            raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(t.name for t in tools) or 'none given'})", "tool_choice")
        return name
    raise ToolError(f"tool_choice must be a string or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                    f"got {json.dumps(choice)}", "tool_choice")


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ToolError(f"{where}.content: only text parts are supported, got {kind!r}", f"{where}.content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ToolError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _arguments(value, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ToolError(f"{where} is not valid JSON ({e})", where) from None
    if not isinstance(value, dict):
        raise ToolError(f"{where} must be a JSON object", where)
    return value


def normalize_messages(messages) -> list[dict]:
    """OpenAI messages -> [{role: system|user|assistant|tool, content, tool_calls?, tool_call_id?, name?}]
    with text content, parsed call arguments, and every tool result's function name."""
    if not isinstance(messages, list) or not messages:
        raise ToolError("messages must be a non-empty list of {role, content} objects", "messages")
    out, calls = [], {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ToolError(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role in ("system", "developer", "user"):
            out.append({"role": "user" if role == "user" else "system", "content": _text(m.get("content"), where)})
        elif role == "assistant":
            msg = {"role": "assistant", "content": _text(m.get("content"), where)}
            tcs = m.get("tool_calls") or []
            if not isinstance(tcs, list):
                raise ToolError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            parsed = []
            for j, tc in enumerate(tcs):
                w = f"{where}.tool_calls[{j}]"
                f = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise ToolError(f"{w} must be {{id, type: function, function: {{name, arguments}}}}", w)
                call = ToolCall(str(tc.get("id") or new_call_id()), f["name"],
                                _arguments(f.get("arguments"), f"{w}.function.arguments"))
                calls[call.id] = call.name
                parsed.append(call)
            if parsed:
                msg["tool_calls"] = parsed
            out.append(msg)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            name = calls.get(call_id) or m.get("name")
            if not isinstance(name, str):
                raise ToolError(f"{where}.tool_call_id {json.dumps(call_id)} matches no earlier assistant tool call",
                                f"{where}.tool_call_id")
            out.append({"role": "tool", "content": _text(m.get("content"), where), "tool_call_id": call_id,
                        "name": name})
        else:
            raise ToolError(f"{where}.role {role!r} is not supported; use system, developer, user, assistant or tool",
                            f"{where}.role")
    if not any(m["role"] in ("user", "tool") for m in out):
        raise ToolError("messages need a user message (or a tool result) to answer", "messages")
    return out


# ---- Gemma 4's value syntax --------------------------------------------------------------------

def native_value(value, quote: str = NATIVE_MARKERS["quote"]) -> str:
    """``value`` in Gemma 4's call syntax (its template's ``format_argument`` with bare keys)."""
    if isinstance(value, str):
        return quote + value + quote
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{native_value(v, quote)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(native_value(v, quote) for v in value) + "]"
    return json.dumps(value)


_QUOTE = object()  # the quote token in a parsed call


class _Scanner:
    """Recursive descent over a call's characters, with the quote token as one item."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def peek(self):
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self, text: str) -> None:
        for c in text:
            if self.peek() != c:
                raise ValueError(f"expected {text!r} at {self.i}")
            self.i += 1

    def until(self, stops: str) -> str:
        out = []
        while (c := self.peek()) is not None and c is not _QUOTE and c not in stops:
            out.append(c)
            self.i += 1
        return "".join(out)

    def value(self):
        c = self.peek()
        if c is _QUOTE:
            self.i += 1
            out = []
            while (c := self.peek()) is not _QUOTE:
                if c is None:
                    raise ValueError("unclosed string")
                out.append(c)
                self.i += 1
            self.i += 1
            return "".join(out)
        if c == "{":
            self.i += 1
            obj = {}
            if self.peek() == "}":
                self.i += 1
                return obj
            while True:
                key = self.until(":")
                self.take(":")
                obj[key] = self.value()
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.take("}")
                return obj
        if c == "[":
            self.i += 1
            arr = []
            if self.peek() == "]":
                self.i += 1
                return arr
            while True:
                arr.append(self.value())
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.take("]")
                return arr
        word = self.until(",}]")
        return json.loads(word)  # numbers, true, false, null


def parse_native_call(items: list) -> tuple[str, dict]:
    """``call:NAME{...}`` (characters, with ``_QUOTE`` for each quote token) -> (name, arguments)."""
    s = _Scanner(items)
    s.take("call:")
    name = s.until("{")
    args = s.value()
    if not isinstance(args, dict) or s.peek() is not None:
        raise ValueError("trailing text after the arguments")
    return name, args


# ---- schema -> grammar of Gemma 4's value syntax --------------------------------------------------

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_KEY_BAD = re.compile(r"[:,{}\[\]\s]")


class _NativeSchema:
    """Lark rules for values of a JSON schema written in Gemma 4's syntax (``native_value``)."""

    def __init__(self, quote_id: int, prefix: str, rules: list[str], shared: dict):
        self.q = f"<[{quote_id}]>"
        self.prefix = prefix
        self.rules = rules  # shared with the other tools' compilers: one grammar
        self.shared = shared  # rules every tool may use (the generic value)
        self.refs: dict[str, str] = {}
        self.root: dict = {}
        self.where = ""
        self.n = 0

    def compile(self, schema: dict, where: str) -> str:
        self.root, self.where = schema, where
        return self.value(schema)

    def _name(self, kind: str) -> str:
        self.n += 1
        if len(self.rules) > _MAX_RULES:
            raise GrammarError(f"{self.where}: the schema needs more than {_MAX_RULES} grammar rules")
        return f"{self.prefix}{kind}_{self.n}"

    def define(self, body: str, kind: str = "v") -> str:
        name = self._name(kind)
        self.rules.append(f"{name}: {body}")
        return name

    def terminal(self, regex: str) -> str:
        name = self._name("T").upper()
        self.rules.append(f"{name}: {regex}")
        return name

    def fail(self, what: str):
        raise GrammarError(f"{self.where}: {what}")

    # -- values --
    def value(self, s) -> str:
        if s is True or s == {}:
            return self.any()
        if s is False:
            self.fail("a schema of false accepts no value")
        if not isinstance(s, dict):
            self.fail(f"a schema must be an object, got {json.dumps(s)[:60]}")
        if "$ref" in s:
            return self.ref(s["$ref"])
        if "allOf" in s:
            s = self.merge_all(s)
        if "const" in s:
            return self.literal(s["const"])
        if "enum" in s:
            values = s["enum"]
            if not isinstance(values, list) or not values:
                self.fail("an enum must be a non-empty list")
            return self.define(" | ".join(self.literal(v) for v in values))
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = s[key]
                if not isinstance(branches, list) or not branches:
                    self.fail(f"{key} must be a non-empty list")
                base = {k: v for k, v in s.items() if k != key}
                return self.define(" | ".join(self.value({**base, **b} if isinstance(b, dict) else b)
                                              for b in branches))
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                self.fail("an empty type list accepts nothing")
            return self.define(" | ".join(self.value({**s, "type": x}) for x in t))
        if t is None:
            t = "object" if "properties" in s else "array" if "items" in s or "prefixItems" in s else None
        if t is None:
            return self.any()
        kind = {"string": self.string, "integer": self.number, "number": self.number, "boolean": self.boolean,
                "null": self.null, "object": self.object, "array": self.array}.get(t)
        if kind is None:
            self.fail(f"unknown type {json.dumps(t)}")
        return kind(s)

    def ref(self, ref) -> str:
        if ref in self.refs:
            return self.refs[ref]
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.fail(f"only local $ref (#/...) is supported, got {json.dumps(ref)}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                self.fail(f"$ref {ref} points nowhere")
        name = self.refs[ref] = self._name("r")
        self.rules.append(f"{name}: {self.value(node)}")
        return name

    def merge_all(self, s: dict) -> dict:
        out = {k: v for k, v in s.items() if k != "allOf"}
        for part in s["allOf"]:
            if isinstance(part, dict) and "$ref" in part:
                part = self.resolve(part["$ref"])
            if not isinstance(part, dict):
                self.fail("allOf must be a list of schema objects")
            for k, v in part.items():
                if k == "properties":
                    out["properties"] = {**out.get("properties", {}), **v}
                elif k == "required":
                    out["required"] = sorted(set(out.get("required", [])) | set(v))
                elif k == "type" and "type" in out and out["type"] != v:
                    self.fail(f"allOf joins the types {out['type']} and {v}: no value has both")
                else:
                    out[k] = v
        return out

    def resolve(self, ref: str):
        node = self.root
        for part in [p for p in ref.lstrip("#").split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                self.fail(f"$ref {ref} points nowhere")
            node = node[part]
        return node

    def literal(self, v) -> str:
        if isinstance(v, str):
            return f"{self.q} {lark_string(v)} {self.q}" if v else f"{self.q} {self.q}"
        if isinstance(v, dict):
            inner = ' "," '.join(f"{lark_string(self.key(k) + ':')} {self.literal(x)}" for k, x in sorted(v.items()))
            return f'"{{" {inner} "}}"' if v else '"{" "}"'
        if isinstance(v, list):
            inner = ' "," '.join(self.literal(x) for x in v)
            return f'"[" {inner} "]"' if v else '"[" "]"'
        return lark_string(native_value(v))

    def key(self, k) -> str:
        if not isinstance(k, str) or not k or _KEY_BAD.search(k) or "<|" in k:
            self.fail(f"property name {json.dumps(k)} cannot be written in Gemma 4's call syntax (no spaces or "
                      ": , {{ }} [ ]; not empty)")
        return k

    def string(self, s: dict) -> str:
        lo, hi = int(s.get("minLength", 0)), s.get("maxLength")
        if hi is not None and int(hi) < lo:
            self.fail(f"minLength {lo} is greater than maxLength {hi}")
        if hi is not None and int(hi) == 0:
            return f"{self.q} {self.q}"
        rx = f"/(.|\\n){{{max(lo, 1)},{'' if hi is None else int(hi)}}}/"
        pattern = s.get("pattern")
        if isinstance(pattern, str):
            p = pattern[1:] if pattern.startswith("^") else "(?s:.*)" + pattern
            p = p[:-1] if p.endswith("$") and not p.endswith("\\$") else p + "(?s:.*)"
            rx += " & /" + constrained._llg().regex_to_lark(p, "dw") + "/"
        body = self.terminal(rx)
        return f"{self.q} {body}{'?' if lo == 0 else ''} {self.q}"

    def number(self, s: dict) -> str:
        bounds = {k: s[k] for k in _BOUNDS if k in s}
        if bounds:
            schema = {"type": s["type"], **bounds, "x-guidance": constrained.JSON_OPTIONS}
            return self.define("%json " + json.dumps(schema))
        return self.shared_rule("INT" if s["type"] == "integer" else "NUMBER")

    def boolean(self, s: dict) -> str:
        return self.define('"true" | "false"')

    def null(self, s: dict) -> str:
        return '"null"'

    def object(self, s: dict) -> str:
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            self.fail("properties must be an object")
        required = s.get("required") or []
        if not isinstance(required, list):
            self.fail("required must be a list of property names")
        props = {**props, **{name: True for name in required if name not in props}}  # required, undescribed
        if not props:
            return self.any_object() if s.get("additionalProperties", True) is not False else '"{" "}"'
        keys = sorted(props)
        kv = [f"{lark_string(self.key(k) + ':')} {self.value(props[k])}" for k in keys]
        req = set(required)
        rest, first = None, None  # rules for keys[i:], after a member / before any
        for i in range(len(keys) - 1, -1, -1):
            tail = f" {rest}" if rest else ""
            if keys[i] in req:
                new_first = f"{kv[i]}{tail}"
                new_rest = self.define(f'"," {kv[i]}{tail}', "m")
            else:
                new_first = f"{kv[i]}{tail} | {first}" if first else f"({kv[i]}{tail})?"
                new_rest = self.define(f'("," {kv[i]})?{tail}', "m")
            first, rest = self.define(new_first, "m"), new_rest
        return self.define(f'"{{" {first} "}}"', "o")

    def array(self, s: dict) -> str:
        prefix = s.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            inner = ' "," '.join(self.value(p) for p in prefix)
            return self.define(f'"[" {inner} "]"', "a")
        item = self.value(s.get("items", True))
        lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
        if hi is not None and int(hi) < lo:
            self.fail(f"minItems {lo} is greater than maxItems {hi}")
        if hi is not None and int(hi) == 0:
            return self.define('"[" "]"', "a")
        more = f'("," {item}){{{max(lo - 1, 0)},{"" if hi is None else int(hi) - 1}}}'
        body = f"{item} {more}"
        return self.define(f'"[" ({body})? "]"' if lo == 0 else f'"[" {body} "]"', "a")

    # -- any value (shared) --
    def shared_rule(self, name: str) -> str:
        if name not in self.shared:
            q = self.q
            defs = {
                "INT": "INT: /-?(0|[1-9][0-9]*)/",
                "NUMBER": "NUMBER: /-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?/",
                "STR": "STR: /(.|\\n)+/",
                "KEY": "KEY: /[A-Za-z_][A-Za-z0-9_]*/",
                "any_value": f'any_value: {q} STR? {q} | NUMBER | "true" | "false" | "null" | any_object | any_array',
                "any_object": 'any_object: "{" (KEY ":" any_value ("," KEY ":" any_value)*)? "}"',
                "any_array": 'any_array: "[" (any_value ("," any_value)*)? "]"',
            }
            deps = {"any_value": ("STR", "NUMBER", "any_object", "any_array"), "any_object": ("KEY", "any_value"),
                    "any_array": ("any_value",)}
            self.shared[name] = defs[name]
            for d in deps.get(name, ()):
                self.shared_rule(d)
        return name

    def any(self) -> str:
        return self.shared_rule("any_value")

    def any_object(self) -> str:
        return self.shared_rule("any_object")


# ---- the two formats -----------------------------------------------------------------------------

@dataclass
class ToolPrompt:
    """A chat with tools, ready to generate: the prompt ids and the reply's grammar (None when the
    reply is free text), and a fresh ``parser()`` for each reply."""

    ids: list[int]
    grammar: Grammar | None
    format: "ToolFormat"
    tools: list[Tool]
    choice: str
    model: object = field(repr=False, default=None)

    @property
    def kwargs(self) -> dict:
        """What ``stream_generate`` needs besides the sampling values."""
        return {"grammar": self.grammar} if self.grammar is not None else {}

    def parser(self) -> "ReplyParser":
        return _TextParser() if self.choice == "none" else self.format.parser(self.model)


class ReplyParser:
    """Splits a reply, response by response, into text and tool calls. ``feed(r)`` returns
    (text to show now, calls completed by this step); ``content`` and ``calls`` hold all."""

    def __init__(self):
        self.content = ""
        self.calls: list[ToolCall] = []
        self.fresh: list[tuple[int, ToolCall]] = []  # the calls the last feed completed, with their index

    def feed(self, r) -> tuple[str, list[ToolCall]]:
        text, calls = self._feed(r)
        self.fresh = [(len(self.calls) + k, c) for k, c in enumerate(calls)]
        self.content += text
        self.calls += calls
        return text, calls

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's finish reason: "tool_calls" when the reply ended after calls."""
        return "tool_calls" if reason == "stop" and self.calls else reason


class _TextParser(ReplyParser):
    """``tool_choice: "none"``: the reply is all text."""

    def _feed(self, r):
        return r.text, []


class ToolFormat:
    name = ""

    @staticmethod
    def applies(tokenizer) -> bool:
        raise NotImplementedError

    def render(self, model, messages: list[dict], tools: list[Tool], thinking: bool) -> list[int]:
        raise NotImplementedError

    def grammar(self, model, tools: list[Tool], choice: str, parallel: bool, text: Grammar | None) -> Grammar | None:
        raise NotImplementedError

    def parser(self, model) -> ReplyParser:
        raise NotImplementedError


def _protect_tree(value, tokenizer, nonce):
    """Every string in ``value`` with its control strings as placeholders (``chat.protect``)."""
    if isinstance(value, str):
        return chat_format.protect([{"content": value}], tokenizer, nonce)[0]["content"]
    if isinstance(value, dict):
        return {k: _protect_tree(v, tokenizer, nonce) for k, v in value.items()}
    if isinstance(value, list):
        return [_protect_tree(v, tokenizer, nonce) for v in value]
    return value


def _special_id(tokenizer, piece: str) -> int | None:
    i = tokenizer.piece_to_id(piece)
    return i if i is not None and tokenizer.is_special(i) else None


class NativeFormat(ToolFormat):
    """Gemma 4's own tool syntax (see the module docstring)."""

    name = "gemma4"

    @staticmethod
    def applies(tokenizer) -> bool:
        return all(_special_id(tokenizer, p) is not None for p in NATIVE_MARKERS.values())

    # -- prompt --
    def render(self, model, messages, tools, thinking):
        tok = model.tokenizer
        nonce = chat_format.new_nonce()
        text = self._render_template(model, messages, tools, thinking, nonce)
        if text is None:
            text = self._render_builtin(messages, tools, thinking, lambda v: _protect_tree(v, tok, nonce))
        return chat_format.encode_protected(tok, text, nonce, model.add_bos)

    def _render_template(self, model, messages, tools, thinking, nonce) -> str | None:
        """The checkpoint's template with ``tools``, if it renders them (and the calls in the history)."""
        source = model.info.meta.chat_template.jinja
        if not source or not chat_format.jinja_available():
            return None
        msgs = []
        for m in messages:
            out = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                                   "arguments": c.arguments}}
                                     for c in m["tool_calls"]]
                out["content"] = m["content"] or None
            if m["role"] == "tool":
                out["tool_call_id"], out["name"] = m.get("tool_call_id"), m["name"]
            msgs.append(out)
        msgs = _protect_tree(msgs, model.tokenizer, nonce)
        specs = _protect_tree([t.spec for t in tools], model.tokenizer, nonce) or None
        try:
            text = chat_format.render_jinja(source, msgs, True, thinking=thinking, tools=specs,
                                            **model._special_strings())
        except chat_format.ChatTemplateError:
            return None
        if any(f"declaration:{t.name}" not in text for t in tools):
            return None  # a template that ignores tools
        if any(m.get("tool_calls") for m in messages) and NATIVE_MARKERS["call"] not in text:
            return None
        return text

    @staticmethod
    def declaration(tool: Tool, quote: str = NATIVE_MARKERS["quote"]) -> str:
        """``declaration:NAME{description:...,parameters:{...}}`` (a simplified form of Gemma 4's)."""
        def schema(s):
            if not isinstance(s, dict):
                return native_value(s, quote)
            parts = []
            for k, v in sorted(s.items()):
                if k == "type" and isinstance(v, str):
                    parts.append(f"type:{quote}{v.upper()}{quote}")
                elif k == "properties" and isinstance(v, dict):
                    parts.append("properties:{" + ",".join(f"{n}:{schema(p)}" for n, p in sorted(v.items())) + "}")
                elif k == "items" and isinstance(v, dict):
                    parts.append(f"items:{schema(v)}")
                else:
                    parts.append(f"{k}:{native_value(v, quote)}")
            return "{" + ",".join(parts) + "}"
        return (f"declaration:{tool.name}{{description:{quote}{tool.description}{quote},"
                f"parameters:{schema(tool.parameters)}}}")

    def _render_builtin(self, messages, tools, thinking, p) -> str:
        m = NATIVE_MARKERS
        out = []
        system = [x for x in messages if x["role"] == "system"]
        if thinking or tools or system:
            out.append("<|turn>system\n" + ("<|think|>" if thinking else ""))
            out.append("\n\n".join(p(x["content"]) for x in system))
            out += [m["tool"] + self.declaration(Tool(t.name, p(t.description), p(t.parameters), t.spec))
                    + m["tool_end"] for t in tools]
            out.append("<turn|>\n")
        rest = [x for x in messages if x["role"] != "system"]
        prev, pending_end = None, ""  # the last non-tool role; what closes an open model turn
        for i, x in enumerate(rest):
            if x["role"] == "tool":
                continue
            if x["role"] == "user":
                out.append(pending_end + "<|turn>user\n" + p(x["content"]) + "<turn|>\n")
                pending_end, prev = "", "user"
                continue
            if prev != "assistant":
                out.append(pending_end + "<|turn>model\n")
            pending_end = ""
            calls = x.get("tool_calls") or []
            for c in calls:
                out.append(m["call"] + f"call:{c.name}" + native_value(p(c.arguments)) + m["call_end"])
            results = []
            for y in rest[i + 1:]:
                if y["role"] != "tool":
                    break
                results.append(y)
            for y in results:
                out.append(m["response"] + f"response:{y['name']}{{value:{native_value(p(y['content']))}}}"
                           + m["response_end"])
            out.append(p(x["content"]))
            if calls and not results:
                out.append(m["response"])
            elif not (results and not x["content"]):
                out.append("<turn|>\n")
            prev = "assistant"
        last = rest[-1]["role"] if rest else None
        if last != "tool":
            out.append("<|turn>model\n")
        return "".join(out)

    # -- reply --
    def grammar(self, model, tools, choice, parallel, text):
        tok = model.tokenizer
        ids = {k: _special_id(tok, v) for k, v in NATIVE_MARKERS.items()}
        rules, shared = [], {}
        fns = []
        for i, t in enumerate(tools):
            if choice == "none" or (choice not in ("auto", "required") and t.name != choice):
                continue
            c = _NativeSchema(ids["quote"], f"t{i}_", rules, shared)
            args = c.compile(t.parameters, f"tools[{i}].function.parameters")
            fns.append(f"{lark_string(t.name)} {args}")
        lines = []
        parts = {}
        if text is not None:
            parts["text"] = text
            text_rule = "@text"
        else:
            text_rule = "TEXT"
            lines.append("TEXT: /(.|\\n)*/")
        if choice == "none" or not fns:
            lines.insert(0, f"reply: {text_rule}")
        else:
            calls = f"call+ <[{ids['response']}]>?" if parallel else f"call <[{ids['response']}]>?"
            reply = f"{text_rule} | calls" if choice == "auto" else "calls"
            lines.insert(0, f"reply: {reply}")
            lines += [f"calls: {calls}", f"call: <[{ids['call']}]> \"call:\" fn <[{ids['call_end']}]>",
                      "fn: " + " | ".join(fns)]
        start = "start: reply"
        top = "\n".join([start] + lines + rules + list(shared.values())) + "\n"
        return constrained.combine(top, parts, "tool-call grammar") if parts else \
            Grammar(json.dumps({"grammars": [{"lark_grammar": top}]}), "tool-call grammar")

    def parser(self, model) -> ReplyParser:
        return _NativeParser(model.tokenizer)


class _NativeParser(ReplyParser):
    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.ids = {k: _special_id(tokenizer, v) for k, v in NATIVE_MARKERS.items()}
        self.inside = False
        self.items: list = []
        self.raw = b""

    def _feed(self, r):
        t = r.token
        if self.inside:
            if t == self.ids["call_end"]:
                self._flush()
                self.inside = False
                try:
                    name, args = parse_native_call(self.items)
                except (ValueError, json.JSONDecodeError) as e:
                    raise GenerationError(f"the model's tool call could not be read ({e}); this is a bug: the "
                                          "grammar should allow only well-formed calls") from None
                return "", [ToolCall(new_call_id(), name, args)]
            if t == self.ids["quote"]:
                self._flush()
                self.items.append(_QUOTE)
            elif not self.tok.is_special(t):
                self.raw += self.tok.token_bytes(t)
            return "", []
        if t == self.ids["call"]:
            self.inside, self.items, self.raw = True, [], b""
            return "", []
        if t == self.ids["response"]:
            return "", []
        return r.text, []

    def _flush(self):
        if self.raw:
            self.items += list(self.raw.decode("utf-8", errors="replace"))
            self.raw = b""


class JsonFormat(ToolFormat):
    """The built-in fenced-JSON tool format (see the module docstring)."""

    name = "json"

    @staticmethod
    def applies(tokenizer) -> bool:
        return True

    @staticmethod
    def instructions(tools: list[Tool]) -> str:
        lines = "\n".join(json.dumps(t.declaration, ensure_ascii=False) for t in tools)
        return ("You can call the tools below. To call tools, reply with one block per call and nothing else:\n"
                f"{JSON_CALL_OPEN}{{\"name\": \"TOOL_NAME\", \"arguments\": {{...}}}}{JSON_CALL_CLOSE}\n"
                "The results come back in ```tool_response blocks. Tools:\n" + lines)

    def render(self, model, messages, tools, thinking):
        plain: list[dict] = []

        def add(role, content):
            if plain and plain[-1]["role"] == role:  # Gemma's turns alternate: merge neighbours
                plain[-1]["content"] += "\n\n" + content
            else:
                plain.append({"role": role, "content": content})

        system = "\n\n".join([m["content"] for m in messages if m["role"] == "system" and m["content"]]
                             + ([self.instructions(tools)] if tools else []))
        if system:
            plain.append({"role": "system", "content": system})
        for m in messages:
            if m["role"] == "system":
                continue
            if m["role"] == "user":
                add("user", m["content"])
            elif m["role"] == "tool":
                add("user", JSON_RESULT_OPEN + json.dumps({"name": m["name"], "content": m["content"]},
                                                          ensure_ascii=False) + JSON_CALL_CLOSE)
            else:
                blocks = [JSON_CALL_OPEN + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
                          + JSON_CALL_CLOSE for c in m.get("tool_calls") or []]
                add("assistant", "\n".join(([m["content"]] if m["content"] else []) + blocks))
        return chat_format.encode_chat(model.tokenizer, plain, True, model.add_bos,
                                       template=model.info.meta.chat_template.jinja, fmt=model.chat_format,
                                       thinking=thinking, **model._special_strings())

    def grammar(self, model, tools, choice, parallel, text):
        parts, fns = {}, []
        for i, t in enumerate(tools):
            if choice == "none" or (choice not in ("auto", "required") and t.name != choice):
                continue
            params = dict(t.parameters)
            call = {"type": "object", "properties": {"name": {"const": t.name}, "arguments": params},
                    "required": ["name", "arguments"], "additionalProperties": False}
            for defs in ("$defs", "definitions"):  # local $refs resolve from the root
                if defs in params:
                    call[defs] = params.pop(defs)
            parts[f"tool_{i}"] = constrained.json_schema_grammar(call)
            fns.append(f"@tool_{i}")
        lines = []
        if text is not None:
            parts["text"] = text
            text_rule = "@text"
        else:
            text_rule = "TEXT"
            lines.append(f"TEXT: /(.|\\n)*/ & ~/{re.escape(JSON_CALL_OPEN.strip())}(.|\\n)*/")
        if choice == "none" or not fns:
            lines.insert(0, f"reply: {text_rule}")
        else:
            calls = 'call ("\\n" call)*' if parallel else "call"
            reply = f"{text_rule} | calls" if choice == "auto" else "calls"
            lines.insert(0, f"reply: {reply}")
            lines += [f"calls: {calls}",
                      f"call: {lark_string(JSON_CALL_OPEN)} fn {lark_string(JSON_CALL_CLOSE)}",
                      "fn: " + " | ".join(fns)]
        top = "\n".join(["start: reply"] + lines) + "\n"
        return constrained.combine(top, parts, "tool-call grammar")

    def parser(self, model) -> ReplyParser:
        return _JsonParser()


class _JsonParser(ReplyParser):
    def __init__(self):
        super().__init__()
        self.mode = None  # None: undecided; "text"; "calls"
        self.buf = ""

    def _feed(self, r):
        self.buf += r.text
        if self.mode is None:
            if JSON_CALL_OPEN.startswith(self.buf) and len(self.buf) < len(JSON_CALL_OPEN) and \
                    r.finish_reason is None:
                return "", []
            self.mode = "calls" if self.buf.startswith(JSON_CALL_OPEN) else "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        calls = []
        while True:
            start = self.buf.find(JSON_CALL_OPEN)
            end = self.buf.find(JSON_CALL_CLOSE, start + len(JSON_CALL_OPEN)) if start >= 0 else -1
            if end < 0:
                return "", calls
            body = self.buf[start + len(JSON_CALL_OPEN):end]
            self.buf = self.buf[end + len(JSON_CALL_CLOSE):]
            try:
                call = json.loads(body)
                calls.append(ToolCall(new_call_id(), call["name"], call["arguments"]))
            except (ValueError, KeyError, TypeError) as e:
                raise GenerationError(f"the model's tool call could not be read ({e}); this is a bug: the "
                                      "grammar should allow only well-formed calls") from None


FORMATS = (NativeFormat(), JsonFormat())  # the first that applies to a tokenizer is used


def format_for(model) -> ToolFormat:
    for f in FORMATS:
        if f.applies(model.tokenizer):
            return f
    return FORMATS[-1]


# ---- the Python API ------------------------------------------------------------------------------

def prepare(model, messages, tools=None, tool_choice=None, parallel_tool_calls: bool = True,
            thinking: bool = False, json_schema=None, grammar=None) -> ToolPrompt:
    """Render ``messages`` (OpenAI's, with tool calls and results) and ``tools`` (OpenAI's list) for
    ``model``, and build the grammar of its reply for ``tool_choice``. ``json_schema`` / ``grammar``
    constrain the reply's text (when it is not a call). Raises ToolError / GrammarError."""
    specs = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, specs)
    msgs = normalize_messages(messages)
    fmt = format_for(model)
    text = constrained.make_grammar(json_schema, grammar)
    if not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    for i, t in enumerate(specs):  # a malformed or unsatisfiable schema, in llguidance's words
        try:
            constrained.check(constrained.json_schema_grammar(t.parameters), model.tokenizer)
        except GrammarError as e:
            raise ToolError(f"tools[{i}].function.parameters ({t.name}): {e}",
                            f"tools[{i}].function.parameters") from None
    g = None
    if specs or text is not None:
        if specs:
            try:
                g = fmt.grammar(model, specs, choice, parallel_tool_calls, text)
            except GrammarError as e:
                raise ToolError(str(e), "tools") from None
        else:
            g = text
        if thinking:
            g = constrained.with_thought(g, *constrained.thought_markers(model))
        constrained.check(g, model.tokenizer)
    ids = fmt.render(model, msgs, specs, thinking)
    return ToolPrompt(ids, g, fmt, specs, choice, model)


@dataclass(frozen=True)
class ToolStep:
    """One step of ``stream_chat``: the generation response, the text it adds to the reply's
    content, the calls it completed, and (last step) OpenAI's finish reason."""

    response: object
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str | None


@dataclass(frozen=True)
class ChatReply:
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str  # "stop", "length" or "tool_calls"
    reasoning: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def message(self) -> dict:
        """The reply as an OpenAI assistant message, to append to the conversation."""
        out = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out


def stream_chat(model, messages, tools=None, tool_choice=None, parallel_tool_calls: bool = True,
                thinking: bool = False, json_schema=None, grammar=None, **kwargs) -> Iterator[ToolStep]:
    """Stream the model's reply to ``messages`` with ``tools``: text as it comes, each call when it
    is complete. ``kwargs`` are ``stream_generate``'s sampling arguments."""
    prompt = prepare(model, messages, tools, tool_choice, parallel_tool_calls, thinking, json_schema, grammar)
    parser = prompt.parser()
    for r in model.stream_generate(prompt.ids, **kwargs, **prompt.kwargs):
        text, calls = parser.feed(r)
        yield ToolStep(r, text, calls, parser.finish_reason(r.finish_reason))


def chat(model, messages, tools=None, tool_choice=None, **kwargs) -> ChatReply:
    """``stream_chat`` joined: the reply's text, its calls and OpenAI's finish reason."""
    content, calls, thoughts, last = [], [], [], None
    for step in stream_chat(model, messages, tools, tool_choice, **kwargs):
        content.append(step.content)
        calls += step.tool_calls
        thoughts.append(step.response.reasoning)
        last = step
    r = last.response
    return ChatReply("".join(content), calls, last.finish_reason, "".join(thoughts), r.prompt_tokens,
                     r.generation_tokens)
