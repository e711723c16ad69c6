"""``gemma-edge serve`` (runtime/server.py) driven by the real ``openai`` client over loopback.

The tiny Gemma 3 of ``test_runtime.py`` is served from a background thread. Every answer is
checked against ``Model.generate`` on a second copy of the same file that the server never
touches (the oracle), and every token count against the tokenizer. Queueing and disconnects
use ``Paced``: the same model with a gate before the first token, or a hold after the first
one with text, so "the model is busy" is a state the test controls instead of a race it hopes
to win. Timeouts are hang guards only, generous for a loaded machine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from gemma_edge.runtime.chat import render
from gemma_edge.runtime.cli import serve
from gemma_edge.runtime.server import make_server
from conftest import CONTEXT

KEY = "sk-test-key"
GREEDY = dict(temperature=0)
PROMPTS = ["the model", "a cache and a layer", "the phone", "gemma on the laptop", "weight of the token",
           "his raspberry cache", "the edge of the model", "quantize the layer"]
LONG = " ".join(["model"] * 100)  # more tokens than the context (64)
HANG = 300  # seconds: a hang guard, never a measure of speed


# ---- fixtures and helpers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref(path):
    """The oracle: its own copy of the model, which the servers never touch."""
    import gemma_edge

    return gemma_edge.load(path)


@contextlib.contextmanager
def running(model, **kwargs):
    """A server on a free loopback port, serving from a background thread."""
    srv = make_server(model, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(path):
    import gemma_edge

    with running(gemma_edge.load(path), api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def name(path) -> str:
    from pathlib import Path

    return Path(path).stem


def make_client(srv, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key=key, max_retries=0, timeout=HANG)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return make_client(server)


def request(srv, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None):
    """One raw HTTP request: (status, headers, parsed JSON body or None)."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=HANG)
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers={**hdrs, **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp.headers, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def assert_error(status: int, body: dict, want_status: int, param: str | None = None,
                 code: str | None = None) -> str:
    """OpenAI's error shape, the status, and (if given) the field and code it names."""
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("server_error" if want_status >= 500 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def chat_expected(ref, messages, **kwargs):
    return ref.generate(render(messages, add_generation_prompt=True), **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Paced:
    """The model behind a server, with an optional ``gate`` that holds the first token back and
    an optional ``hold`` that holds every token after the first one with text; records when its
    generations start, yield that first text (``shown``) and are closed, and counts the tokens
    yielded. EOS is ignored (``stop_tokens=False``) so a generation runs as long as asked."""

    def __init__(self, model, gate: threading.Event | None = None, hold: threading.Event | None = None):
        self._model, self.gate, self.hold = model, gate, hold
        self.started, self.shown, self.closed = threading.Event(), threading.Event(), threading.Event()
        self.yielded = 0

    def __getattr__(self, attr):
        return getattr(self._model, attr)

    def stream_generate(self, prompt, **kwargs):
        inner = self._model.stream_generate(prompt, **{**kwargs, "stop_tokens": False})
        try:
            self.started.set()
            if self.gate is not None:
                assert self.gate.wait(HANG), "the test never opened the gate"
            for r in inner:
                if self.hold is not None and self.shown.is_set():
                    assert self.hold.wait(HANG), "the test never let the tokens go"
                self.yielded += 1
                yield r
                if r.text:
                    self.shown.set()
        finally:
            inner.close()
            self.closed.set()


def wait_for(condition, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---- models and health -----------------------------------------------------------------------

def test_models_and_health(server, client, name):
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "model": name, "busy": False, "waiting": 0}
    assert server.url == f"http://127.0.0.1:{server.server_address[1]}/v1" and server.server_address[1] > 0


# ---- chat --------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the model"},
                {"role": "assistant", "content": "a cache"}, {"role": "user", "content": "the layer"}]


@pytest.mark.parametrize("messages", [user("the model and the cache"), CONVERSATION],
                         ids=["one-turn", "system+multi-turn"])
def test_chat_equals_generate(client, ref, name, messages):
    want = chat_expected(ref, messages, max_tokens=12, **GREEDY)
    prompt_ids = ref.tokenizer.encode(render(messages), add_bos=True, parse_special=True)
    got = client.chat.completions.create(model=name, messages=messages, max_tokens=12, **GREEDY)
    assert got.object == "chat.completion" and got.model == name and got.id.startswith("chatcmpl-")
    (choice,) = got.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(prompt_ids) == want.prompt_tokens
    assert got.usage.completion_tokens == len(want.tokens)
    assert got.usage.total_tokens == len(prompt_ids) + len(want.tokens)


def test_chat_roles_map_to_gemma_turns():
    """assistant -> model, developer -> system (folded into the next user turn)."""
    from gemma_edge.runtime.openai_api import chat_messages

    msgs = chat_messages({"messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "the"},
                                                                    {"type": "text", "text": "model"}]},
                                       {"role": "assistant", "content": "a cache"}]
                          + user("the layer")})
    assert render(msgs) == ("<start_of_turn>user\nBe brief.\n\nthe\nmodel<end_of_turn>\n"
                            "<start_of_turn>model\na cache<end_of_turn>\n"
                            "<start_of_turn>user\nthe layer<end_of_turn>\n<start_of_turn>model\n")


def test_chat_stream_equals_generate(client, ref, name):
    messages = user("the cache of the phone")
    want = chat_expected(ref, messages, max_tokens=16, **GREEDY)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *token_chunks, finish, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in token_chunks) == want.text
    assert all(c.choices[0].finish_reason is None for c in token_chunks)
    assert finish.choices[0].finish_reason == want.finish_reason
    assert usage.choices == [] and usage.usage.completion_tokens == len(want.tokens)
    assert usage.usage.prompt_tokens == want.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(server, name):
    """Server-sent events, each `data: {json}`, ending with `data: [DONE]`; the connection stays usable."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=HANG)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": name, "prompt": "the model", "max_tokens": 5, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers=hdrs)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = resp.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")
    conn.request("GET", "/health", headers=hdrs)  # same connection: keep-alive after a stream
    assert conn.getresponse().status == 200
    conn.close()


# ---- completions -------------------------------------------------------------------------------

def test_completions_equal_generate(client, ref, name):
    want = ref.generate("the model and", max_tokens=10, **GREEDY)
    got = client.completions.create(model=name, prompt="the model and", max_tokens=10, **GREEDY)
    assert got.object == "text_completion" and got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(ref.tokenizer.encode("the model and", add_bos=True))
    assert got.usage.completion_tokens == len(want.tokens)

    streamed = list(client.completions.create(model=name, prompt="the model and", max_tokens=10, stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == want.finish_reason

    ids = ref.encode("the model and")  # token ids pass through as they are
    assert client.completions.create(model=name, prompt=ids, max_tokens=10, **GREEDY).choices[0].text == want.text

    default = client.completions.create(model=name, prompt="the model and", **GREEDY)  # OpenAI's default: 16
    assert default.usage.completion_tokens == len(ref.generate("the model and", max_tokens=16, **GREEDY).tokens)


def test_seeded_sampling_repeats(client, ref, name):
    kw = dict(model=name, prompt="the model", max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text
    assert a == ref.generate("the model", max_tokens=12, temperature=1.0, top_p=0.9, seed=5).text


# ---- stop strings ------------------------------------------------------------------------------

def test_stop_strings(client, ref, name):
    prompt = "the cache and the"
    full = ref.generate(prompt, max_tokens=24, **GREEDY)
    assert len(full.text) > 8, f"the greedy text {full.text!r} is too short to cut: pick another prompt"
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = full.text.find(stop)
    want = ref.generate(prompt, max_tokens=24, stop=[stop], **GREEDY)
    assert want.text == full.text[:cut] and want.finish_reason == "stop"

    for stops in (stop, ["never appears", stop]):
        got = client.completions.create(model=name, prompt=prompt, max_tokens=24, stop=stops, **GREEDY)
        assert (got.choices[0].text, got.choices[0].finish_reason) == (full.text[:cut], "stop")
        assert got.usage.completion_tokens == len(want.tokens)  # up to the token completing the stop
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=24, stop=stop, stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full.text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"

    messages = user(prompt)
    full_chat = chat_expected(ref, messages, max_tokens=24, **GREEDY).text
    if len(full_chat) > 4:
        s = full_chat[2:4]
        got = client.chat.completions.create(model=name, messages=messages, max_tokens=24, stop=[s], **GREEDY)
        assert got.choices[0].message.content == full_chat[:full_chat.find(s)]
        assert got.choices[0].finish_reason == "stop"


# ---- the context -------------------------------------------------------------------------------

def test_generation_ends_at_the_context(client, ref, name):
    """max_tokens past the context is not an error: the answer ends with "length" when the cache is full."""
    ids = ref.encode("the model and the cache")
    got = client.completions.create(model=name, prompt=ids, max_tokens=1000, **GREEDY)
    want = ref.generate(ids, max_tokens=1000, **GREEDY)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert len(ids) + got.usage.completion_tokens - 1 == CONTEXT  # every cache slot used


def test_prompt_over_the_context(server, client, ref, name):
    n = len(ref.encode(render(user(LONG))))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=user(LONG), max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert f"{n} tokens" in e.value.message and str(CONTEXT) in e.value.message
    status, _, body = request(server, "POST", "/v1/completions", {"model": name, "prompt": LONG})
    assert_error(status, body, 400, param="prompt", code="context_length_exceeded")


# ---- bad requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", "hot"), ("temperature", True), ("top_p", 0), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", 2.5), ("max_completion_tokens", -3), ("seed", -1), ("seed", "x"),
    ("stop", 5), ("stop", [""]), ("n", 2), ("top_k", -1), ("presence_penalty", 0.5), ("stream", "yes"),
    ("messages", []), ("messages", "hi"), ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": "hi"}, {"role": "system", "content": "dropped?"}]),
])
def test_bad_parameter_values(server, name, field, value):
    body = {"model": name, "messages": user("the model"), "max_tokens": 4, field: value}
    status, _, err = request(server, "POST", "/v1/chat/completions", body)
    message = assert_error(status, err, 400)
    assert err["error"]["param"].split("[")[0] == field, err
    assert field in message or field == "messages"


def test_bad_requests_via_the_client(client, name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=user("the model"), temperature=-0.5)
    assert e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt=[10**9], max_tokens=2)  # a token id past the vocabulary



def test_any_model_name_is_served_unless_strict(path, ref, name):
    """Many clients send a fixed model name: one model is served under any name, and the response
    names it (as llama-server does); --strict-model answers 404 to another name."""
    import gemma_edge

    want = chat_expected(ref, user("the model"), max_tokens=4, **GREEDY).text
    with running(gemma_edge.load(path)) as srv:
        r = make_client(srv).chat.completions.create(model="gpt-4o", messages=user("the model"), max_tokens=4,
                                                     **GREEDY)
        assert (r.choices[0].message.content, r.model) == (want, name)
    with running(gemma_edge.load(path), strict_model=True) as srv:
        with pytest.raises(openai.NotFoundError) as e:
            make_client(srv).chat.completions.create(model="gpt-4o", messages=user("the model"))
        assert e.value.code == "model_not_found" and name in e.value.message
        r = make_client(srv).chat.completions.create(model=name, messages=user("the model"), max_tokens=4, **GREEDY)
        assert r.choices[0].message.content == want


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_bad_json(server, raw):
    status, _, body = request(server, "POST", "/v1/chat/completions", raw,
                              headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(status, body, 400)


def test_unknown_route_and_wrong_method(server):
    status, _, body = request(server, "GET", "/v1/images/generations")
    assert_error(status, body, 404, code="unknown_url")
    status, _, body = request(server, "POST", "/v2/chat/completions", {"messages": user("x")})
    assert_error(status, body, 404)
    status, headers, body = request(server, "GET", "/v1/chat/completions")
    assert_error(status, body, 405)
    assert headers["Allow"] == "POST"
    status, headers, body = request(server, "POST", "/v1/models", {})
    assert_error(status, body, 405)
    assert headers["Allow"] == "GET, HEAD"
    status, _, _ = request(server, "POST", "/chat/completions", {"messages": user("the model"), "max_tokens": 2})
    assert status == 200  # the /v1 prefix is optional
    status, headers, body = request(server, "HEAD", "/health")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 0


def test_errors_keep_the_connection_usable(server, name):
    """An error answered before the body was read must not leave that body as the next request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=HANG)
    good = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": name, "prompt": "the model", "max_tokens": 2, "temperature": 0})
    for headers, path, want in [({**good, "Authorization": "Bearer wrong"}, "/v1/completions", 401),
                                (good, "/v1/nowhere", 404), (good, "/v1/completions", 200),
                                (good, "/v1/completions", 200)]:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == want
    conn.close()


# ---- the API key -------------------------------------------------------------------------------

def test_api_key_is_enforced(server, name):
    with pytest.raises(openai.AuthenticationError) as e:
        make_client(server, key="wrong").chat.completions.create(model=name, messages=user("the model"))
    assert e.value.code == "invalid_api_key"
    for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/completions"),
                         ("GET", "/v1/nowhere")]:
        status, headers, body = request(server, method, path, {"prompt": "x"} if method == "POST" else None,
                                        key=None)
        assert_error(status, body, 401, code="invalid_api_key")
        assert headers["WWW-Authenticate"] == "Bearer"
    status, _, _ = request(server, "GET", "/health", headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert status == 401


def test_no_key_configured_accepts_any(path, name):
    import gemma_edge

    with running(gemma_edge.load(path)) as srv:
        assert make_client(srv, key="anything").models.list().data[0].id == name
        assert request(srv, "GET", "/health", key=None)[0] == 200


# ---- the model is shared: queue, parallel clients, disconnects -----------------------------------

def test_parallel_clients_each_get_their_sequential_answer(server, ref, name):
    want = [chat_expected(ref, user(p), max_tokens=10, **GREEDY).text for p in PROMPTS]
    start = threading.Barrier(len(PROMPTS))
    got, errors = [None] * len(PROMPTS), []

    def ask(i):
        try:
            c = make_client(server)
            start.wait()
            kw = dict(model=name, messages=user(PROMPTS[i]), max_tokens=10, **GREEDY)
            if i % 2:  # half of them stream
                got[i] = "".join(ch.choices[0].delta.content or "" for ch in
                                 c.chat.completions.create(stream=True, **kw))
            else:
                got[i] = c.chat.completions.create(**kw).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert not errors, errors
    assert got == want


def test_full_queue_answers_503_at_once(path, ref, name):
    import gemma_edge

    gate = threading.Event()
    paced = Paced(gemma_edge.load(path), gate=gate)
    kw = dict(model=name, prompt="the model", max_tokens=6, **GREEDY)
    want = ref.generate("the model", max_tokens=6, stop_tokens=False, **GREEDY).text
    results = {}

    def ask(key):
        results[key] = make_client(srv).completions.create(**kw).choices[0].text

    with running(paced, max_queue=1) as srv:
        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert paced.started.wait(HANG)  # the first request holds the model, at the gate
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        wait_for(lambda: srv.queue.waiting == 1)
        # at once: the gate is still shut, so a request that waited for its turn would get no answer
        status, headers, body = request(srv, "POST", "/v1/completions", kw)
        assert_error(status, body, 503, code="queue_full")
        assert headers["Retry-After"] == "1"
        with pytest.raises(openai.InternalServerError) as e:
            make_client(srv).completions.create(**kw)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert request(srv, "GET", "/health")[2] == {"status": "ok", "model": name, "busy": True, "waiting": 1}
        gate.set()
        first.join(HANG)
        second.join(HANG)
    assert results == {"first": want, "second": want}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disconnect_frees_the_model(path, ref, name, stream):
    """A client that hangs up mid-generation stops it within a token; the model is free for the
    next request.

    The generation is held after its first text until the client has hung up; then the other
    49 tokens would come at full speed if the server did not notice."""
    import gemma_edge

    hold = threading.Event()
    paced = Paced(gemma_edge.load(path), hold=hold)
    with running(paced) as srv:
        body = json.dumps({"model": name, "prompt": "the model", "max_tokens": 50, "temperature": 0,
                           "stream": stream}).encode()
        sock = socket.create_connection(srv.server_address[:2], timeout=HANG)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b'"text"' not in received:  # the first token's event
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
        else:
            assert paced.shown.wait(HANG)  # a token into the generation, the next one held
        sock.close()
        at_hangup = paced.yielded
        hold.set()
        assert paced.closed.wait(HANG)
        # the close is seen before the next token is written (a failed write would take two)
        assert paced.yielded - at_hangup <= 1, (
            f"the generation went on for {paced.yielded - at_hangup} tokens after its client left")
        paced.closed.clear()
        wait_for(lambda: not srv.queue.busy)
        got = make_client(srv).completions.create(model=name, prompt="the cache", max_tokens=3, **GREEDY)
    assert got.choices[0].text == ref.generate("the cache", max_tokens=3, stop_tokens=False, **GREEDY).text


# ---- the command and the runtime's imports ---------------------------------------------------

def test_serve_help():
    from click.testing import CliRunner

    out = CliRunner().invoke(serve, ["--help"])
    assert out.exit_code == 0
    for option in ("--host", "--port", "--api-key", "--max-queue", "--threads", "--model-name", "MODEL"):
        assert option in out.output


def test_serve_command_prints_its_url_and_serves(path, name):
    """`serve MODEL --port 0` prints the bound URL on stdout; the server imports no TensorFlow."""
    code = ("import sys; from gemma_edge.runtime.cli import serve\n"
            "import atexit; atexit.register(lambda: print('HEAVY', sorted(k for k in sys.modules if k.split('.')[0] "
            "in ('tensorflow', 'torch', 'transformers')), file=sys.stderr, flush=True))\n"
            "serve()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path, "--port", "0", "--api-key", KEY,
                             "--model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), (url, proc.stderr.read())
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=HANG)
        got = client.completions.create(model="tiny", prompt="the model", max_tokens=4, **GREEDY)
        assert got.usage.completion_tokens >= 1
        # the same keep-alive connection: its handler logged the completion before reading this
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        proc.send_signal(2)  # Ctrl-C
        _, err = proc.communicate(timeout=HANG)
    assert "stopped" in err and "Traceback" not in err, err
    assert "HEAVY []" in err, err
    assert '"POST /v1/completions" 200' in err  # one log line per request


def test_serve_command_bad_input(path, tmp_path):
    from click.testing import CliRunner

    out = CliRunner().invoke(serve, [str(tmp_path / "missing.tflite")])
    assert out.exit_code == 2 and "gemma-edge: error:" in out.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = CliRunner().invoke(serve, [path, "--port", str(taken.getsockname()[1])])
    assert out.exit_code == 2 and "--port" in out.output


# ---- the real Gemma 3 270M ---------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma3_270m(real_gguf, tmp_path_factory):
    """Converted at int8 (about a minute here), served, and asked through the openai client."""
    import gemma_edge
    from gemma_edge.convert.pipeline import convert

    out = tmp_path_factory.mktemp("real_server") / "gemma3-270m-int8.tflite"
    convert(real_gguf, str(out), quant="int8", max_context=256, prefill_lengths=(8, 32, 128), progress=False)
    ref = gemma_edge.load(str(out))
    with running(gemma_edge.load(str(out))) as srv:
        client = make_client(srv)
        got = client.completions.create(model=out.stem, prompt="The capital of France is", max_tokens=16, **GREEDY)
        assert got.choices[0].text.startswith(" the capital of the")
        assert got.choices[0].text == ref.generate("The capital of France is", max_tokens=16, **GREEDY).text
        assert got.usage.prompt_tokens == 6
        messages = user("What is the capital of France? Answer in one word.")
        want = chat_expected(ref, messages, max_tokens=24, **GREEDY)
        chunks = list(client.chat.completions.create(model=out.stem, messages=messages, max_tokens=24,
                                                     stream=True, **GREEDY))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
