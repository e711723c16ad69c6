"""``gemma-edge serve``: an OpenAI-compatible HTTP server over one loaded model.

Standard library only (``http.server`` + ``json``), so the runtime still installs on a
Raspberry Pi with no web framework, and never imports TensorFlow.

    POST /v1/chat/completions   messages -> the Gemma chat template -> a reply (streamed or not)
    POST /v1/completions        a raw prompt (text or token ids) -> its continuation
    GET  /v1/models             the one model: the file name without .tflite, or --model-name
    GET  /v1/models/{id}
    GET  /health                {"status": "ok", "model", "busy", "waiting"}

The ``/v1`` prefix is optional. Streams are server-sent events (``data: {...}`` ...
``data: [DONE]``), sent with chunked transfer encoding so the connection stays open.

Request fields, mapped to ``Model.stream_generate``:

    model                       must be the served id (404 otherwise); may be left out
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

``n`` other than 1, logprobs, tools, non-zero frequency/presence penalties and
non-text message parts are refused with 400 rather than ignored.

One model, one generation at a time: requests wait in arrival order (``RequestQueue``),
at most ``max_queue`` of them; one more is answered 503 with ``Retry-After`` at once.
A request is checked (JSON, parameter types and ranges, prompt length against the
context) before it queues, so a bad request never waits. A client that goes away
(a failed write, or end-of-file seen on its socket between tokens) ends its
generation at the next token, which frees the model.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 bad JSON or parameter (code ``context_length_exceeded`` for a prompt over the
context), 401 missing or wrong API key, 404 unknown model or route, 405 wrong method,
411/413 body without length or too large, 503 queue full, 500 the model failed.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import numbers
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

import click

from .. import __version__
from .errors import GemmaEdgeError, GenerationError

MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_SECONDS = 1
SOCKET_TIMEOUT_SECONDS = 120  # a client that neither sends nor reads for this long is dropped
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# OpenAI role -> the role chat.render expects (Gemma has no system turn: render folds it
# into the next user turn; "developer" is OpenAI's newer name for "system").
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model"}
ROUTES = {  # path without the /v1 prefix -> allowed methods
    "/chat/completions": ("POST",),
    "/completions": ("POST",),
    "/models": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
}


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


class ClientGone(Exception):
    """The client closed its connection; stop generating for it."""


# ---- the queue ---------------------------------------------------------------------------

class QueueFull(Exception):
    pass


class RequestQueue:
    """One request at a time on the model; up to ``max_waiting`` more wait, first come first served.

    Tickets: ``issued - done`` requests are in the system (one running, the rest waiting),
    and the holder of ticket ``done`` runs. A plain Lock would do for mutual exclusion,
    but it does not serve waiters in order, and one client could be passed over
    indefinitely under load.
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._issued = 0
        self._done = 0

    @property
    def busy(self) -> bool:
        return self._issued > self._done

    @property
    def waiting(self) -> int:
        return max(0, self._issued - self._done - 1)

    @contextlib.contextmanager
    def turn(self):
        """Wait for this request's turn on the model; raise ``QueueFull`` at once if none is free."""
        with self._cv:
            if self._issued - self._done > self.max_waiting:
                raise QueueFull(f"{self.waiting} requests are already waiting (--max-queue {self.max_waiting})")
            ticket = self._issued
            self._issued += 1
            while self._done != ticket:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._done += 1
                self._cv.notify_all()


# ---- parsing requests --------------------------------------------------------------------

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
    for name in ("tools", "functions"):
        if body.get(name):
            raise _bad(f"{name} are not supported: Gemma here has no tool-calling template", param=name)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported", param="logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad('response_format: only {"type": "text"} is supported', param="response_format")
    if completions:
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
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


# ---- the server --------------------------------------------------------------------------

class ModelServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` over one model; ``serve_forever()`` / ``shutdown()`` / ``server_close()``."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of clients is accepted, then queued or refused

    def __init__(self, address, model, api_key: str | None, max_queue: int, model_name: str,
                 log: Callable[[str], None] | None):
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.queue = RequestQueue(max_queue)
        self.log = log
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup that can stall); skip it.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080/v1`` (the bound port)."""
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    # -- requests -> jobs --
    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise _bad(f"model must be a string, got {json.dumps(name)}", param="model")
        if name != self.model_name:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves "
                                    f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")

    def job(self, body: dict, chat: bool) -> Job:
        self.check_model(body)
        _refuse_unsupported(body, completions=not chat)
        kwargs = _generation_kwargs(body, completions=not chat)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _bad(f"stream must be true or false, got {json.dumps(stream)}", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad('stream_options must be {"include_usage": true|false}', param="stream_options")
        param = "messages" if chat else "prompt"
        prompt = self.model.render_chat(chat_messages(body)) if chat else completion_prompt(body)
        try:
            ids = self.model.encode(prompt)
        except GemmaEdgeError as e:
            raise _bad(str(e), param=param) from None
        context = self.model.context_length
        if len(ids) > context:
            raise _bad(f"the prompt has {len(ids)} tokens but the model's context is {context}; shorten the "
                       f"{param} (or convert the model with a larger --max-context)",
                       param=param, code="context_length_exceeded")
        if kwargs["max_tokens"] is None:
            kwargs["max_tokens"] = context  # generation ends with "length" when the context is full
        return Job(chat=chat, ids=ids, kwargs=kwargs, stream=stream,
                   include_usage=stream and bool(options.get("include_usage")))

    # -- jobs -> response bodies --
    def _envelope(self, job: Job, chunk: bool) -> dict:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if job.chat else "text_completion"
        return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind, "created": job.created,
                "model": self.model_name, "system_fingerprint": f"gemma-edge-{__version__}"}

    @staticmethod
    def usage(job: Job, completion_tokens: int) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
                "total_tokens": len(job.ids) + completion_tokens}

    def response(self, job: Job, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(job, chunk=False), "choices": [choice],
                "usage": self.usage(job, completion_tokens)}

    def chunk(self, job: Job, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, usage: dict | None = None) -> dict:
        out = self._envelope(job, chunk=True)
        if usage is not None:
            out["choices"] = []
        elif job.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        if job.include_usage:
            out["usage"] = usage
        return out


def make_server(model, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                max_queue: int = 8, model_name: str | None = None,
                log: Callable[[str], None] | None = None) -> ModelServer:
    """An OpenAI-compatible server over ``model`` (a loaded ``Model``), bound but not yet serving.

    ``port=0`` binds a free port (see ``server.url``). ``log`` receives one line per request.
    Run it with ``serve_forever()`` (in a thread, if need be); stop with ``shutdown()`` then
    ``server_close()``.
    """
    if not _is_int(max_queue) or max_queue < 0:
        raise GemmaEdgeError(f"max_queue must be an integer >= 0 (requests waiting for the model), got {max_queue!r}")
    if api_key is not None and not api_key.strip():
        raise GemmaEdgeError("the API key is empty; give a non-empty --api-key, or none to serve without one")
    name = model_name or Path(model.info.path).stem
    cls = _ModelServer6 if ":" in host else ModelServer
    try:
        return cls((host, port), model, api_key, max_queue, name, log)
    except OSError as e:
        raise GemmaEdgeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                             "(0 picks a free one) or --host") from None


class _ModelServer6(ModelServer):
    address_family = socket.AF_INET6


# ---- the handler -------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = f"gemma-edge/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True  # each token's event leaves at once
    timeout = SOCKET_TIMEOUT_SECONDS
    server: ModelServer

    # -- dispatch --
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # HEAD: a GET without the body

    def version_string(self):
        return self.server_version

    def _dispatch(self):
        t0 = time.perf_counter()
        self._status, self._note, self._body_read = None, "", False
        path = unquote(urlsplit(self.path).path).rstrip("/")
        route = path[3:] if path.startswith("/v1/") else path
        try:
            self._check_key()
            if route.startswith("/models/"):
                self._allow(path, ("GET", "HEAD"))
                self._model(route[len("/models/"):])
            elif route in ROUTES:
                self._allow(path, ROUTES[route])
                if route == "/models":
                    self._send_json(200, {"object": "list", "data": [self._model_card()]})
                elif route == "/health":
                    q = self.server.queue
                    self._send_json(200, {"status": "ok", "model": self.server.model_name, "busy": q.busy,
                                          "waiting": q.waiting})
                else:
                    self._generate(chat=route == "/chat/completions")
            else:
                raise RequestError(404, f"Invalid URL ({self.command} {path or '/'}): the routes are "
                                        "/v1/chat/completions, /v1/completions, /v1/models and /health",
                                   code="unknown_url")
        except RequestError as e:
            self._send_error(e)
        except Exception as e:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            self._log(traceback.format_exc().rstrip())
            self._send_error(RequestError(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            self._log(f'{self.client_address[0]} "{self.command} {path}" {self._status or "-"} '
                      f"{time.perf_counter() - t0:.2f}s{self._note}")

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key was given" if not given else "the API key is wrong"
            raise RequestError(401, f"{what}; send the header 'Authorization: Bearer <key>' with the server's "
                                    "--api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _allow(self, path: str, methods: tuple[str, ...]) -> None:
        if self.command not in methods:
            raise RequestError(405, f"{self.command} is not allowed on {path}; use {' or '.join(methods)}",
                               code="method_not_allowed", headers={"Allow": ", ".join(methods)})

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "gemma-edge"}

    def _model(self, name: str) -> None:
        if name != self.server.model_name:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves "
                                    f"{self.server.model_name!r}", param="model", code="model_not_found")
        self._send_json(200, self._model_card())

    # -- generation --
    def _generate(self, chat: bool) -> None:
        job = self.server.job(self._read_json(), chat=chat)
        try:
            with self.server.queue.turn():
                if self._client_gone():
                    raise ClientGone
                gen = self.server.model.stream_generate(job.ids, **job.kwargs)
                try:
                    try:
                        first = next(gen)
                    except GemmaEdgeError as e:
                        raise _bad(str(e)) from None
                    if job.stream:
                        self._stream(job, first, gen)
                        return
                    parts, last = [first.text], first
                    for r in gen:
                        if self._client_gone():
                            raise ClientGone
                        parts.append(r.text)
                        last = r
                finally:
                    gen.close()  # a client that went away frees the model here
        except QueueFull as e:
            raise RequestError(503, f"the server is busy: {e}; retry after {RETRY_AFTER_SECONDS} s",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ClientGone:
            self.close_connection = True
            self._status = "gone"
            self._note = " (client disconnected; generation stopped)"
            return
        self._note = f" {len(job.ids)}+{last.generation_tokens} tokens"
        self._send_json(200, self.server.response(job, "".join(parts), last.finish_reason, last.generation_tokens))

    def _stream(self, job: Job, first, gen: Iterator) -> None:
        srv = self.server
        self._chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._end_headers()
        if job.chat:
            self._event(srv.chunk(job, role=True))
        last = None
        try:
            for r in _chain(first, gen):
                last = r
                if r.text:
                    self._event(srv.chunk(job, text=r.text))
        except GemmaEdgeError as e:  # headers are sent: the error travels as an event
            self._event(_bad(str(e)).body())
        except ClientGone:
            raise
        except Exception as e:  # noqa: BLE001
            self._log(traceback.format_exc().rstrip())
            self._event(RequestError(500, f"internal error: {type(e).__name__}: {e}").body())
        if last is not None and last.finish_reason is not None:
            self._event(srv.chunk(job, finish_reason=last.finish_reason))
            if job.include_usage:
                self._event(srv.chunk(job, usage=srv.usage(job, last.generation_tokens)))
            self._note = f" {len(job.ids)}+{last.generation_tokens} tokens, streamed"
        self._write(b"data: [DONE]\n\n")
        if self._chunked:
            self._raw_write(b"0\r\n\r\n")

    def _event(self, obj: dict) -> None:
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _write(self, data: bytes) -> None:
        if self._client_gone():
            raise ClientGone
        self._raw_write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _raw_write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError:  # BrokenPipe, ConnectionReset, a write timeout: the client is gone
            raise ClientGone from None

    def _end_headers(self) -> None:
        try:
            self.end_headers()
        except OSError:
            raise ClientGone from None

    def _client_gone(self) -> bool:
        """Has the client closed its side? A readable socket with nothing to read means end-of-file.

        (A write to a closed socket fails only from the second write on; this sees the close
        at once. A pipelined next request is data, not end-of-file.)"""
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- bodies --
    def _read_json(self) -> dict:
        self._body_read = True  # read now, or the connection closes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._read_chunked()
        else:
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError(411, "the request needs a JSON body with a Content-Length header")
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise _bad(f"Content-Length {length!r} is not a byte count") from None
            if n > MAX_BODY_BYTES:
                self.close_connection = True
                raise RequestError(413, f"the body has {n} bytes; the limit is {MAX_BODY_BYTES}")
            raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise _bad("malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(out)
            if len(out) + size > MAX_BODY_BYTES:
                self.close_connection = True
                raise RequestError(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes")
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    # -- answers --
    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_error(self, e: RequestError) -> None:
        if not self._body_read and (self.headers.get("Content-Length", "0").strip() != "0"
                                    or "Transfer-Encoding" in self.headers):
            self.close_connection = True  # the unread body would be taken for the next request
        self._send_json(e.status, e.body(), e.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (malformed request line, unsupported method) in OpenAI's shape."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        self._send_json(code, RequestError(code, message or explain or phrase).body())
        self._log(f"{self.client_address[0]} {self.requestline[:80]!r} {code} {message or phrase}")

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        pass  # _dispatch logs one line per request

    def log_message(self, format, *args):
        self._log(f"{self.address_string()} {format % args}")

    def _log(self, line: str) -> None:
        if self.server.log is not None:
            self.server.log(line)


def _chain(first, rest):
    yield first
    yield from rest


# ---- the command -------------------------------------------------------------------------

@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 (or ::) accepts other machines: then set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port; 0 picks a free one. The URL is printed on stdout.")
@click.option("--api-key", envvar="GEMMA_EDGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (also read from "
                   "GEMMA_EDGE_API_KEY, which keeps it out of the process list).")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait while one generates; one more is answered 503 with Retry-After.")
@click.option("--model-name", default=None,
              help="The model id clients send and /v1/models lists (default: the file name without .tflite).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: cores, up to 4).")
@click.option("-q", "--quiet", is_flag=True, help="No log line per request on stderr.")
def serve(model, host, port, api_key, max_queue, model_name, threads, quiet):
    """Serve MODEL over an OpenAI-compatible HTTP API on this machine.

    \b
    POST /v1/chat/completions   chat (the Gemma template), streamed or not
    POST /v1/completions        raw text continuation
    GET  /v1/models, /health
    \b
    gemma-edge serve model.tflite
    gemma-edge serve model.tflite --port 0 --api-key secret
    \b
    Then, in Python:
      openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="secret")
    or: curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}'

    One request generates at a time; up to --max-queue more wait their turn, in order.
    Ctrl-C stops the server.
    """
    def err(line: str) -> None:
        click.echo(line, err=True)

    try:
        from .engine import load

        m = load(model, threads=threads)
        server = make_server(m, host, port, api_key=api_key, max_queue=max_queue, model_name=model_name,
                             log=None if quiet else err)
    except GemmaEdgeError as e:
        err(f"gemma-edge: error: {e}")
        sys.exit(2)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err(f"gemma-edge serve: warning: listening on {host} without --api-key; anyone who can reach "
            "this machine can use the model")
    err(f"gemma-edge serve: model {server.model_name!r} ({m.info.quant}, context {m.context_length} tokens, "
        f"backend {m.backend.name}), up to {max_queue} waiting requests; Ctrl-C stops")
    click.echo(server.url)  # on stdout alone, for scripts (--port 0)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err("gemma-edge serve: stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    serve()
