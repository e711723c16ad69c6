"""The OpenAI API mapping: requests parsed into jobs for the model, results shaped into
OpenAI's response bodies. Pure functions over dicts, apart from the HTTP transport
(``runtime/server.py``), so every rule here is tested without a socket.

Request fields, mapped to ``Model.stream_generate``:

    model                       any name is accepted and the served name is reported, as
                                llama-server does (clients often send a fixed name); with
                                ``strict_model`` another name is a 404
    max_completion_tokens,      at least 1; default: until the context is full (chat),
      max_tokens                16 (completions, as OpenAI's). Generation also ends
                                with "length" when the context is full.
    temperature                 >= 0, default 1 (OpenAI's); 0 is greedy
    top_p                       in (0, 1], default 1
    stop                        a string or a list of strings
    seed                        an integer >= 0
    top_k, min_p,               extensions (as in llama.cpp and vLLM), default off
      repetition_penalty
    stream, stream_options      {"include_usage": true} adds a last chunk with usage
    response_format             {"type": "text"}, {"type": "json_object"} (any JSON object) or
                                {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}:
                                the output is generated under the schema (runtime/constrained.py)
    grammar                     extension: a Lark or GBNF grammar the output must follow
    tools, tool_choice,         chat only: OpenAI's function tools; ``role: tool`` messages and
      parallel_tool_calls       assistant messages with ``tool_calls`` carry calls and results
                                (runtime/tools.py); calls come back as ``message.tool_calls`` or
                                ``delta.tool_calls`` with finish reason "tool_calls"

A schema, grammar or tool that cannot be compiled, or that no output can satisfy, is a 400
before the request queues. ``n`` other than 1, logprobs, legacy ``functions``, non-zero
frequency/presence penalties and non-text message parts are refused with 400 rather than
ignored.

Chat messages are user text: a control-token string inside one (``<start_of_turn>``,
``<end_of_turn>``, ...) is encoded as the characters it is, never as the control token, so a
client cannot forge a turn (``chat.encode_chat``). A raw ``/v1/completions`` prompt is
encoded with control strings parsed, as llama.cpp does: it is the caller's whole prompt.

A prompt is refused with ``context_length_exceeded`` before any tokenizing when its size in
bytes alone proves it cannot fit (``Model.max_prompt_bytes``), so a huge body costs
milliseconds, not the tokenizer's time.

``/v1/embeddings`` (an embedding model, ``Model.embed``): ``input`` a string or a list of
strings (token ids are refused: the model's task prompt and <bos>/<eos> go around text),
``dimensions`` (Matryoshka truncation, normalised again), ``encoding_format`` "float" or
"base64" (little-endian float32), and the extensions ``task`` (the task prompt's name,
EmbeddingGemma's "query", "document", ...) and ``truncate`` (cut a text over the context
instead of answering ``context_length_exceeded``); ``usage`` counts every token embedded,
prompts included. A generation request to an embedding model, or the reverse, is a 400.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
import secrets
import time
from dataclasses import dataclass, field

from .. import __version__
from .errors import EmbeddingError, GemmaEdgeError, GenerationError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# OpenAI role -> the role chat.render expects (Gemma has no system turn: render folds it
# into the next user turn; "developer" is OpenAI's newer name for "system").
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model"}


# ---- errors ------------------------------------------------------------------------------

class RequestError(Exception):
    """An HTTP error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)



def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _number(body: dict, name: str, default):
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x):
        raise _bad(f"{name} must be a number, got {json.dumps(x)}", param=name)
    return x


def _integer(body: dict, name: str, default):
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise _bad(f"{name} must be an integer, got {json.dumps(x)}", param=name)
    return int(x)


def _stop_strings(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of them, got {json.dumps(stop)}", param="stop")
    return stop or None


def _refuse_unsupported(body: dict, completions: bool) -> None:
    """Fields we cannot honour are refused, not silently ignored."""
    if body.get("n") not in (None, 1):
        raise _bad(f"n must be 1 (one choice per request), got {json.dumps(body['n'])}", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0):
            raise _bad(f"{name} is not supported; use repetition_penalty (> 1 discourages repeats) instead",
                       param=name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs are not supported", param="logprobs")
    if body.get("functions") or body.get("function_call") is not None:
        raise _bad("functions / function_call (OpenAI's legacy API) are not supported; use tools and tool_choice",
                   param="functions")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported", param="logit_bias")
    if completions:
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise _bad(f"{name} are for /v1/chat/completions", param=name)
        if body.get("echo"):
            raise _bad("echo is not supported", param="echo")
        if body.get("best_of") not in (None, 1):
            raise _bad("best_of must be 1", param="best_of")
        if body.get("suffix"):
            raise _bad("suffix (fill-in-the-middle) is not supported", param="suffix")


def _generation_kwargs(body: dict, completions: bool) -> dict:
    """Request fields -> ``stream_generate`` keyword arguments, each checked with its field name."""
    from .sampling import validate_sampling  # numpy: not needed to import the CLI

    if completions:
        max_tokens = _integer(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        max_name = "max_tokens"
    else:
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, max_name, None)
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"{max_name} must be at least 1, got {max_tokens}", param=max_name)
    kwargs = dict(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                  top_k=_integer(body, "top_k", 0), min_p=_number(body, "min_p", 0.0),
                  repetition_penalty=_number(body, "repetition_penalty", 1.0),
                  seed=_integer(body, "seed", None))
    for name, value in kwargs.items():  # one at a time, so the error names its field
        try:
            validate_sampling(**{name: value})
        except GenerationError as e:
            raise _bad(str(e), param=name) from None
    kwargs["max_tokens"] = max_tokens
    kwargs["stop"] = _stop_strings(body)
    return kwargs


def _response_format(body: dict):
    """``response_format`` -> a JSON schema to generate under (None for text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad('response_format.json_schema must be an object {"name", "schema", "strict"}',
                       param="response_format")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad("response_format.json_schema.name must be a string", param="response_format")
        if not isinstance(spec.get("strict", False), bool):
            raise _bad("response_format.json_schema.strict must be true or false", param="response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise _bad(f"response_format.json_schema.schema must be a JSON schema object, got "
                       f"{json.dumps(schema)[:60]}", param="response_format")
        return schema
    raise _bad('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
               f'"json_schema": {{...}}}}, got {json.dumps(fmt)[:80]}', param="response_format")


def _constraint(body: dict):
    """(json_schema, grammar) the output must follow: response_format, or the ``grammar`` extension."""
    schema = _response_format(body)
    grammar = body.get("grammar")
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
        raise _bad("grammar must be a Lark or GBNF grammar's text", param="grammar")
    if grammar is not None and schema is not None:
        raise _bad("give response_format json_schema / json_object or grammar, not both", param="grammar")
    return schema, grammar


def _tool_request(body: dict) -> bool:
    """Does this chat need the tool format: tools, a tool choice, or calls and results in its history?"""
    if body.get("tools") or body.get("tool_choice") is not None:
        return True
    msgs = body.get("messages")
    return isinstance(msgs, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                          for m in msgs)


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                           param=f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {json.dumps(content)}",
               param=f"messages[{i}].content")


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the [{role, content}] that ``chat.render`` takes (roles system/user/model)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not supported; use one of {', '.join(CHAT_ROLES)}",
                       param=f"messages[{i}].role")
        out.append({"role": CHAT_ROLES[role], "content": _message_text(m.get("content"), i)})
    last_system = max((i for i, m in enumerate(out) if m["role"] == "system"), default=-1)
    if last_system >= 0 and not any(m["role"] == "user" for m in out[last_system + 1:]):
        raise _bad(f"messages[{last_system}] is a system message with no user message after it: Gemma has "
                   "no system turn, its text is folded into the next user message", param="messages")
    return out


def completion_prompt(body: dict):
    """The ``prompt`` of /v1/completions: one string, or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [int(t) for t in prompt]
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad(f"one prompt per request, got a batch of {len(prompt)}", param="prompt")
    raise _bad("prompt must be a non-empty string or a non-empty list of token ids", param="prompt")


@dataclass
class Job:
    """One parsed generation request, ready to run."""

    chat: bool
    ids: list[int]  # the whole prompt, <bos> included
    kwargs: dict  # for stream_generate
    stream: bool
    include_usage: bool
    model_name: str = ""  # the served model's name, reported in every response
    reply: object = None  # tools.ReplyParser of a chat with tools: splits the reply into text and calls
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


# ---- requests -> jobs ----------------------------------------------------------------------

def _thinking(body: dict) -> bool:
    """``chat_template_kwargs: {"enable_thinking": true}`` (as llama-server and vLLM take it)
    asks a model that can think (Gemma 4) to; its thoughts come back as ``reasoning_content``."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs must be an object", param="chat_template_kwargs")
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise _bad(f"chat_template_kwargs {unknown} are not supported (enable_thinking is)", param="chat_template_kwargs")
    value = kwargs.get("enable_thinking", False)
    if not isinstance(value, bool):
        raise _bad("chat_template_kwargs.enable_thinking must be true or false", param="chat_template_kwargs")
    return value


def check_model(body: dict, served: str, strict: bool = False) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise _bad(f"model must be a string, got {json.dumps(name)}", param="model")
    if strict and name != served:
        raise RequestError(404, f"the model {name!r} does not exist; this server serves "
                                f"{served!r} (GET /v1/models)", param="model", code="model_not_found")


def _check_size(model, n_bytes: int, param: str) -> None:
    limit = model.max_prompt_bytes
    if n_bytes > limit:
        raise _bad(f"the {param} has {n_bytes} bytes, more than any prompt of the model's context of "
                   f"{model.context_length} tokens can take ({limit} bytes); shorten the {param} (or convert the "
                   "model with a larger --max-context)", param=param, code="context_length_exceeded")


def _check_kind(model, embedding: bool) -> None:
    if model.is_embedding != embedding:
        if embedding:
            raise _bad("the served model generates text; it has no embeddings (serve an embedding model such as "
                       "EmbeddingGemma for /v1/embeddings)", code="model_not_embedding")
        raise _bad("the served model is an embedding model: it makes vectors, not text; use POST /v1/embeddings",
                   code="model_not_generative")


def parse_job(body: dict, chat: bool, model, served: str, strict_model: bool = False) -> "Job":
    """A request body -> a Job for ``model`` (a loaded ``Model``). Raises RequestError."""
    check_model(body, served, strict_model)
    _check_kind(model, embedding=False)
    _refuse_unsupported(body, completions=not chat)
    kwargs = _generation_kwargs(body, completions=not chat)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {json.dumps(stream)}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad('stream_options must be {"include_usage": true|false}', param="stream_options")
    param = "messages" if chat else "prompt"
    schema, grammar = _constraint(body)
    reply, thinking = None, False
    try:
        if chat and _tool_request(body):
            from . import tools  # llguidance: only for requests that need it

            thinking = _thinking(body)
            msgs = body.get("messages")
            if isinstance(msgs, list):
                _check_size(model, sum(len(json.dumps(m, ensure_ascii=False).encode("utf-8", "surrogatepass"))
                                       for m in msgs), param)
            plan = tools.prepare(model, msgs, body.get("tools"), body.get("tool_choice"),
                                 body.get("parallel_tool_calls", True), thinking, json_schema=schema, grammar=grammar)
            ids, reply = plan.ids, plan.parser()
            kwargs.update(plan.kwargs)
        else:
            if chat:
                messages = chat_messages(body)
                thinking = _thinking(body)
                _check_size(model, sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages), param)
                ids = model.encode_chat(messages, thinking=thinking)
            else:
                prompt = completion_prompt(body)
                if isinstance(prompt, str):
                    _check_size(model, len(prompt.encode("utf-8", "surrogatepass")), param)
                ids = model.encode(prompt)
            if schema is not None or grammar is not None:
                kwargs["grammar"] = _checked_grammar(model, schema, grammar, thinking)
    except GemmaEdgeError as e:
        raise _bad(str(e), param=getattr(e, "param", None) or _constraint_param(e, body, param)) from None
    context = model.context_length
    if len(ids) > context:
        raise _bad(f"the prompt has {len(ids)} tokens but the model's context is {context}; shorten the "
                   f"{param} (or convert the model with a larger --max-context)",
                   param=param, code="context_length_exceeded")
    if kwargs["max_tokens"] is None:
        kwargs["max_tokens"] = context  # generation ends with "length" when the context is full
    return Job(chat=chat, ids=ids, kwargs=kwargs, stream=stream,
               include_usage=stream and bool(options.get("include_usage")), model_name=served, reply=reply)


def _checked_grammar(model, schema, grammar, thinking: bool):
    """The output's grammar, checked against the model's vocabulary (a GrammarError is a 400 before
    the request queues); after an optional thinking channel when the model was asked to think."""
    from . import constrained

    g = constrained.make_grammar(schema, grammar)
    if thinking:
        g = constrained.with_thought(g, *constrained.thought_markers(model))
    constrained.check(g, model.tokenizer)
    return g


def _constraint_param(e: Exception, body: dict, default: str) -> str:
    """The field a GrammarError is about."""
    from .constrained import ConstrainedDecodingUnavailable, GrammarError

    if isinstance(e, (GrammarError, ConstrainedDecodingUnavailable)):
        return "grammar" if body.get("grammar") is not None else "response_format"
    return default


# ---- jobs -> response bodies ---------------------------------------------------------------

def _envelope(job: Job, chunk: bool) -> dict:
    kind = ("chat.completion" + (".chunk" if chunk else "")) if job.chat else "text_completion"
    return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind, "created": job.created,
            "model": job.model_name, "system_fingerprint": f"gemma-edge-{__version__}"}


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
            "total_tokens": len(job.ids) + completion_tokens}


def finish_reason(job: Job, reason: str | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" when a reply with tools ended after its calls."""
    return job.reply.finish_reason(reason) if job.reply is not None else reason


def response(job: Job, text: str, finish_reason: str, completion_tokens: int, reasoning: str = "") -> dict:
    """The whole answer of a request that did not stream; a thinking model's thoughts (Gemma 4's
    thought channel) as ``reasoning_content``, apart from the answer; a reply's tool calls as
    ``tool_calls`` (``text`` is then only the text around them)."""
    if job.chat:
        message = {"role": "assistant", "content": text}
        if job.reply is not None and job.reply.calls:
            message["content"] = text or None
            message["tool_calls"] = [c.openai() for c in job.reply.calls]
            finish_reason = job.reply.finish_reason(finish_reason)
        if reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(job, chunk=False), "choices": [choice], "usage": usage(job, completion_tokens)}


def chunk(job: Job, text: str | None = None, finish_reason: str | None = None,
          role: bool = False, usage: dict | None = None, reasoning: str | None = None,
          tool_calls: list | None = None) -> dict:
    """One server-sent event of a stream: the role, a piece of text (or of the thoughts, as
    ``delta.reasoning_content``), tool calls (``delta.tool_calls``: [(index, tools.ToolCall)], each
    sent whole when the model has finished it), the finish reason, or usage."""
    out = _envelope(job, chunk=True)
    if usage is not None:
        out["choices"] = []
    elif job.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = [c.openai(index) for index, c in tool_calls]
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    if job.include_usage:
        out["usage"] = usage
    return out


# ---- embeddings --------------------------------------------------------------------------------

@dataclass
class EmbeddingJob:
    """One parsed /v1/embeddings request: the texts' tokens, ready for ``Model.embed_ids``."""

    ids: list[list[int]]
    dim: int | None
    base64: bool
    model_name: str = ""


def parse_embeddings(body: dict, model, served: str, strict_model: bool = False) -> EmbeddingJob:
    """A /v1/embeddings body -> an EmbeddingJob for ``model``. Raises RequestError."""
    check_model(body, served, strict_model)
    _check_kind(model, embedding=True)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        ids = isinstance(texts, list) and texts and all(_is_int(t) or isinstance(t, list) for t in texts)
        raise _bad("input must be a non-empty string or a list of them" +
                   ("; token ids are not taken (the model's task prompt and <bos>/<eos> go around the text): send "
                    "the text" if ids else f", got {json.dumps(texts)[:60]}"), param="input")
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise _bad(f"input[{empty[0]}] is an empty string; every input must have text", param="input")
    dim = body.get("dimensions")
    if dim is not None and (not _is_int(dim) or not 1 <= dim <= model.info.meta.embedding.dim):
        raise _bad(f"dimensions must be an integer from 1 to {model.info.meta.embedding.dim}, got {json.dumps(dim)}",
                   param="dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f'encoding_format must be "float" or "base64", got {json.dumps(fmt)}', param="encoding_format")
    task, truncate = body.get("task"), body.get("truncate", False)
    if task is not None and (not isinstance(task, str) or task not in model.tasks):
        raise _bad(f"task must name one of the model's task prompts ({', '.join(sorted(model.tasks)) or 'none'}), "
                   f"got {json.dumps(task)}", param="task")
    if not isinstance(truncate, bool):
        raise _bad(f"truncate must be true or false, got {json.dumps(truncate)}", param="truncate")
    ids = []
    for i, t in enumerate(texts):
        if not truncate:  # a text whose bytes alone cannot fit is refused before tokenizing
            _check_size(model, len(t.encode("utf-8", "surrogatepass")), f"input[{i}]")
        try:
            ids.append(model.embedding_ids(t, task=task, truncate=truncate))
        except EmbeddingError as e:  # with the task checked, only a text over the context is left to fail so
            raise _bad(f"input[{i}]: {e}", param=f"input[{i}]", code="context_length_exceeded") from None
        except GemmaEdgeError as e:  # text the tokenizer refuses (not UTF-8)
            raise _bad(f"input[{i}]: {e}", param=f"input[{i}]") from None
    return EmbeddingJob(ids=ids, dim=dim, base64=fmt == "base64", model_name=served)


def embeddings_response(job: EmbeddingJob, vectors) -> dict:
    """OpenAI's answer: a list of {"object": "embedding", "index", "embedding"}, and usage."""
    data = []
    for i, v in enumerate(vectors):
        if job.base64:  # what OpenAI's clients decode: the little-endian float32 bytes
            value = base64.b64encode(v.astype("<f4").tobytes()).decode()
        else:
            value = [float(x) for x in v.tolist()]
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(t) for t in job.ids)
    return {"object": "list", "data": data, "model": job.model_name, "usage": {"prompt_tokens": n, "total_tokens": n}}


def model_card(served: str, created: int) -> dict:
    return {"id": served, "object": "model", "created": created, "owned_by": "gemma-edge"}
