"""The HTTP transport of ``gemma-edge serve``: an OpenAI-compatible server over one loaded model.

Standard library only (``http.server`` + ``json``), so the runtime still installs on a
Raspberry Pi with no web framework, and never imports TensorFlow. What a request means and
what is answered is ``runtime/openai_api.py``; this module reads bodies, queues requests,
streams events and notices clients that go away.

    POST /v1/chat/completions   messages -> the model's chat template -> a reply (streamed or not)
    POST /v1/completions        a raw prompt (text or token ids) -> its continuation
    POST /v1/embeddings         texts -> an embedding model's vectors (EmbeddingGemma)
    GET  /v1/models             the one model: the file name without .tflite, or --model-name
    GET  /v1/models/{id}
    GET  /health                {"status": "ok", "model", "busy", "waiting"}

The ``/v1`` prefix is optional. Streams are server-sent events (``data: {...}`` ...
``data: [DONE]``), sent with chunked transfer encoding so the connection stays open.

One model, one generation at a time: requests wait in arrival order (``RequestQueue``),
at most ``max_queue`` of them; one more is answered 503 with ``Retry-After`` at once.
A request is checked (JSON, parameter types and ranges, prompt length against the
context) before it queues, so a bad request never waits. A client that goes away
(a failed write, or end-of-file seen on its socket between tokens) ends its
generation at the next token, which frees the model.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 bad JSON or parameter (code ``context_length_exceeded`` for a prompt over the
context), 401 missing or wrong API key, 404 unknown route (or model, with strict_model),
405 wrong method, 411/413 body without length or too large, 503 queue full, 500 the model failed.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import select
import socket
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

from .. import __version__
from . import openai_api as api
from .errors import GemmaEdgeError
from .openai_api import RequestError, _bad

MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_SECONDS = 1
SOCKET_TIMEOUT_SECONDS = 120  # a client that neither sends nor reads for this long is dropped
ROUTES = {  # path without the /v1 prefix -> allowed methods
    "/chat/completions": ("POST",),
    "/completions": ("POST",),
    "/embeddings": ("POST",),
    "/models": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
}


# ---- errors ------------------------------------------------------------------------------

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


# ---- the server --------------------------------------------------------------------------

class ModelServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` over one model; ``serve_forever()`` / ``shutdown()`` / ``server_close()``."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of clients is accepted, then queued or refused

    def __init__(self, address, model, api_key: str | None, max_queue: int, model_name: str,
                 log: Callable[[str], None] | None, strict_model: bool = False, max_body: int = MAX_BODY_BYTES):
        self.model = model
        self.model_name = model_name
        self.strict_model = strict_model
        self.max_body = max_body
        self.api_key = api_key
        self.queue = RequestQueue(max_queue)
        # open connections, each a thread: slow clients cannot make threads without bound
        self.max_connections = max(32, 4 * (max_queue + 2))
        self._connections = threading.BoundedSemaphore(self.max_connections)
        self.log = log
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):  # answered at once, without a thread
            body = json.dumps(RequestError(503, f"the server has {self.max_connections} open connections; retry "
                                                f"after {RETRY_AFTER_SECONDS} s", code="too_many_connections").body())
            with contextlib.suppress(OSError):
                request.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                f"Retry-After: {RETRY_AFTER_SECONDS}\r\nConnection: close\r\n"
                                f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            self.shutdown_request(request)
            if self.log:
                self.log(f"{client_address[0]} refused: {self.max_connections} connections open")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

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

def make_server(model, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                max_queue: int = 8, model_name: str | None = None,
                log: Callable[[str], None] | None = None, strict_model: bool = False,
                max_body: int = MAX_BODY_BYTES) -> ModelServer:
    """An OpenAI-compatible server over ``model`` (a loaded ``Model``), bound but not yet serving.

    ``port=0`` binds a free port (see ``server.url``). ``log`` receives one line per request.
    ``strict_model`` answers 404 to a request naming another model (by default any name is
    served). ``max_body`` bytes is the largest request body read. Run it with
    ``serve_forever()`` (in a thread, if need be); stop with ``shutdown()`` then ``server_close()``.
    """
    if not api._is_int(max_queue) or max_queue < 0:
        raise GemmaEdgeError(f"max_queue must be an integer >= 0 (requests waiting for the model), got {max_queue!r}")
    if not api._is_int(max_body) or max_body < 1:
        raise GemmaEdgeError(f"max_body must be a positive number of bytes, got {max_body!r}")
    if api_key is not None and not api_key.strip():
        raise GemmaEdgeError("the API key is empty; give a non-empty --api-key, or none to serve without one")
    name = model_name or Path(model.info.path).stem
    cls = _ModelServer6 if ":" in host else ModelServer
    try:
        return cls((host, port), model, api_key, max_queue, name, log, strict_model, max_body)
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
        self._probed = self._streaming = self._chunked = False
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
                elif route == "/embeddings":
                    self._embeddings()
                else:
                    self._generate(chat=route == "/chat/completions")
            else:
                raise RequestError(404, f"Invalid URL ({self.command} {path or '/'}): the routes are "
                                        "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and "
                                        "/health", code="unknown_url")
        except RequestError as e:
            self._send_error(e)
        except Exception as e:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            self._log(traceback.format_exc().rstrip())
            self._send_error(RequestError(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            self._log(f'{self.client_address[0]} "{self.command} {_printable(path)}" {self._status or "-"} '
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
        return api.model_card(self.server.model_name, self.server.created)

    def _model(self, name: str) -> None:
        if name != self.server.model_name:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves "
                                    f"{self.server.model_name!r}", param="model", code="model_not_found")
        self._send_json(200, self._model_card())

    # -- generation --
    def _generate(self, chat: bool) -> None:
        srv = self.server
        job = api.parse_job(self._read_json(), chat, srv.model, srv.model_name, srv.strict_model)
        try:
            with self._turn():
                gen = self.server.model.stream_generate(job.ids, **job.kwargs)
                try:
                    try:
                        first = next(gen)
                    except GemmaEdgeError as e:
                        raise _bad(str(e)) from None
                    if job.stream:
                        self._stream(job, first, gen)
                        return
                    parts, thoughts, last = [], [], first
                    _collect(job, first, parts, thoughts)
                    for r in gen:
                        if self._client_gone():
                            raise ClientGone
                        _collect(job, r, parts, thoughts)
                        last = r
                finally:
                    gen.close()  # a client that went away frees the model here
        except ClientGone:
            self.close_connection = True
            self._status = "gone"
            self._note = " (client disconnected; generation stopped)"
            return
        self._note = f" {len(job.ids)}+{last.generation_tokens} tokens"
        self._send_json(200, api.response(job, "".join(parts), last.finish_reason, last.generation_tokens,
                                          reasoning="".join(thoughts)))

    @contextlib.contextmanager
    def _turn(self):
        """This request's turn on the model: a 503 at once when the queue is full; ClientGone when
        the client went away while it waited."""
        try:
            with self.server.queue.turn():
                if self._client_gone():
                    raise ClientGone
                yield
        except QueueFull as e:
            raise RequestError(503, f"the server is busy: {e}; retry after {RETRY_AFTER_SECONDS} s",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    def _embeddings(self) -> None:
        srv = self.server
        job = api.parse_embeddings(self._read_json(), srv.model, srv.model_name, srv.strict_model)
        try:
            with self._turn():
                vectors = srv.model.embed_ids(job.ids, dim=job.dim)
        except ClientGone:
            self.close_connection = True
            self._status = "gone"
            self._note = " (client disconnected)"
            return
        except GemmaEdgeError as e:
            raise _bad(str(e)) from None
        self._note = f" {len(job.ids)} texts, {sum(map(len, job.ids))} tokens"
        self._send_json(200, api.embeddings_response(job, vectors))

    def _stream(self, job: api.Job, first, gen: Iterator) -> None:
        self._chunked = self.request_version == "HTTP/1.1"
        self._streaming = True
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
            self._event(api.chunk(job, role=True))
        last = None
        try:
            for r in _chain(first, gen):
                last = r
                text, reasoning = _collect(job, r)
                if text or reasoning:
                    self._event(api.chunk(job, text=text, reasoning=reasoning))
                if job.reply is not None and job.reply.fresh:  # tool calls, each when complete
                    self._event(api.chunk(job, tool_calls=job.reply.fresh))
        except GemmaEdgeError as e:  # headers are sent: the error travels as an event
            self._event(_bad(str(e)).body())
        except ClientGone:
            raise
        except Exception as e:  # noqa: BLE001
            self._log(traceback.format_exc().rstrip())
            self._event(RequestError(500, f"internal error: {type(e).__name__}: {e}").body())
        if last is not None and last.finish_reason is not None:
            self._event(api.chunk(job, finish_reason=api.finish_reason(job, last.finish_reason)))
            if job.include_usage:
                self._event(api.chunk(job, usage=api.usage(job, last.generation_tokens)))
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
        """Has the client gone? End-of-file on its socket means it closed its side: either it went
        away, or it only half-closed (shut down writing) and still waits for the answer. The two
        look alike until something is written: so on the first end-of-file a probe is sent that
        every client ignores (an interim ``100 Continue`` before the answer, an SSE comment line
        in a stream); a client that went away answers it with a reset, seen at the next check.
        (A pipelined next request is data, not end-of-file.)"""
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            if not readable or self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False
            # after end-of-file a reset no longer shows in recv(); it leaves a pending socket error
            if self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return True
        except (OSError, ValueError):
            return True  # reset: the client went away
        if not self._probed:
            self._probed = True
            probe = (b"%x\r\n%s\r\n" % (3, b":\n\n") if self._chunked else b":\n\n") if self._streaming \
                else b"HTTP/1.1 100 Continue\r\n\r\n"
            try:
                self.wfile.write(probe)
                # a client that went away answers with a reset: at once over loopback, within a
                # round trip (the next token's check) over a network
                return bool(self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            except OSError:
                return True
        return False

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
            if n > self.server.max_body:
                self.close_connection = True
                raise RequestError(413, f"the body has {n} bytes; the limit is {self.server.max_body} "
                                        "(gemma-edge serve --max-body)")
            raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise _bad("the body nests JSON arrays or objects too deeply") from None
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
                if size < 0 or not line.split(b";")[0].strip().isalnum():
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise _bad(f"malformed chunked body: chunk size {line[:20]!r} is not a hexadecimal count") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(out)
            if len(out) + size > self.server.max_body:
                self.close_connection = True
                raise RequestError(413, f"the body is over the limit of {self.server.max_body} bytes "
                                        "(gemma-edge serve --max-body)")
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
        self._log(f"{self.client_address[0]} {_printable(self.requestline[:80])} {code} {_printable(message or phrase)}")

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        pass  # _dispatch logs one line per request

    def log_message(self, format, *args):
        self._log(f"{self.address_string()} {_printable(format % args)}")

    def _log(self, line: str) -> None:
        if self.server.log is not None:
            self.server.log(line)


def _printable(text: str) -> str:
    """What a client sent, safe to log: control characters (a %0a in a path) escaped, so no
    request can forge a log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _collect(job: api.Job, r, parts: list | None = None, thoughts: list | None = None) -> tuple[str, str]:
    """(text, reasoning) of one step: a chat keeps the thinking channel apart (and a chat with tools
    its calls: ``job.reply``); a raw completion is the whole continuation."""
    text, reasoning = (r.text, r.reasoning) if job.chat else (r.text + r.reasoning, "")
    if job.reply is not None:
        text = job.reply.feed(r)[0]
    if parts is not None:
        parts.append(text)
        thoughts.append(reasoning)
    return text, reasoning


def _chain(first, rest):
    yield first
    yield from rest
