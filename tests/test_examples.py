"""The examples in examples/: each runs, and says what the API says.

- ``minimal.py`` in a subprocess prints exactly ``Model.generate``'s greedy text;
- ``chat_tk.py`` under a real X display (the session's own, or an Xvfb started here)
  streams the same replies as ``Conversation.ask`` over two turns, keeps the Tk event loop
  running while the model generates, and stops a reply on Stop;
- the Android sample is only read (it is not built here): it must load the ``.litertlm``
  that ``gemma-edge pack`` writes, with a pinned LiteRT-LM dependency;
- ``search.py`` over a folder ranks its passages as ``Model.embed``'s cosines do, and reuses
  its index while no file changes (the tiny EmbeddingGemma of ``test_embed.py``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gemma_edge
from gemma_edge.runtime.litertlm import default_output
from conftest import tiny_gemma3

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPT = "the model token"  # words of the tiny model's training corpus


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, sp_model_path) -> str:
    return str(tiny_gemma3(tmp_path_factory, sp_model_path).model_file)


# ---- minimal.py --------------------------------------------------------------------------

def test_minimal_prints_the_greedy_generation(model_path):
    expected = gemma_edge.load(model_path).generate(PROMPT, max_tokens=24, temperature=0).text
    assert expected.strip()
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    run = subprocess.run([sys.executable, str(EXAMPLES / "minimal.py"), model_path, "-p", PROMPT, "-n", "24"],
                         capture_output=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout.decode("utf-8") == expected + "\n"


# ---- chat_tk.py ------------------------------------------------------------------------

def _start_xvfb(exe: str) -> tuple[subprocess.Popen, str]:
    """Start Xvfb on a display number it picks itself (-displayfd); returns (process, ":N")."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([exe, "-displayfd", str(write_fd), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_fd)
    number = b""
    deadline = time.monotonic() + 60  # a hang guard
    while not number.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if ready:
            chunk = os.read(read_fd, 16)
            if not chunk:
                break
            number += chunk
    os.close(read_fd)
    if not number.strip().isdigit():
        proc.kill()
        err = proc.communicate(timeout=60)[1].decode(errors="replace").strip()
        pytest.skip(f"Xvfb ({exe}) did not start: {err[-300:] or 'no display number within 60 s'}")
    return proc, ":" + number.decode().strip()


@pytest.fixture(scope="module")
def tk_root():
    """A Tk root on the session's display, or on an Xvfb started for this module."""
    try:
        import tkinter
    except ImportError as e:
        pytest.skip(f"tkinter does not import ({e}); install the python3-tk package to run the Tk smoke test")
    saved = os.environ.get("DISPLAY")
    xvfb = None
    if not saved:
        exe = shutil.which("Xvfb")
        if exe is None:
            pytest.skip("no display (DISPLAY is unset) and no Xvfb on PATH: apt-get install xvfb "
                        "to run the Tk smoke test")
        xvfb, os.environ["DISPLAY"] = _start_xvfb(exe)
    try:
        try:
            root = tkinter.Tk()
        except tkinter.TclError as e:
            pytest.skip(f"Tk cannot open the display {os.environ['DISPLAY']}: {e}")
        root.withdraw()  # each test opens its own Toplevel
        yield root
        root.destroy()
    finally:
        if saved is None:
            os.environ.pop("DISPLAY", None)
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=60)


@pytest.fixture(scope="module")
def chat_tk():
    spec = importlib.util.spec_from_file_location("chat_tk", EXAMPLES / "chat_tk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pace(model, before_token):
    """Call ``before_token(response)`` in the worker before the model yields each token, as a slow
    device would pause there: the test decides when each token may come, instead of hoping
    that a sleep is long enough on a loaded machine. The tokens are unchanged."""
    fast = model.stream_generate

    def stream_generate(*args, **kwargs):
        inner = fast(*args, **kwargs)
        try:
            for r in inner:
                before_token(r)
                yield r
        finally:
            inner.close()

    model.stream_generate = stream_generate


def test_chat_tk_streams_the_api_replies_without_freezing(tk_root, chat_tk, model_path):
    import tkinter

    turns = ["the model token", "cache layer weight"]
    ref = gemma_edge.load(model_path).chat()
    expected = [ref.ask(t, max_tokens=16, temperature=0) for t in turns]
    assert all(e.strip() for e in expected)

    model = gemma_edge.load(model_path)
    ticked = threading.Event()

    def after_a_tick(_):  # each token waits until the UI has shown the ones before it
        ticked.clear()
        assert ticked.wait(300), "the Tk event loop stopped running"

    _pace(model, after_a_tick)
    app = chat_tk.ChatApp(tkinter.Toplevel(tk_root), model, max_tokens=16)
    seen = []  # (transcript length) at each tick of our own `after` callback while a reply runs

    def tick():
        if app.busy:
            seen.append(len(app.transcript()))
        if app.events.empty():  # the app's poll took every token so far into the transcript
            ticked.set()
        tick_id[0] = tk_root.after(5, tick)

    tick_id = [tk_root.after(5, tick)]
    try:
        for turn, reply in zip(turns, expected):
            before = len(seen)
            assert app.send(turn)
            assert not app.send("a second message while busy")  # one reply at a time
            app.wait_idle(timeout=300)
            during = seen[before:]
            assert len(during) > 1, "the Tk event loop did not run while the model generated"
            assert len(set(during)) > 1, "the reply did not appear token by token"
            assert f"You: {turn}\nGemma: {reply}\n\n" in app.transcript()
        assert app.conversation.messages == ref.messages  # the same two-turn conversation
        assert not app.worker.is_alive()
    finally:
        tk_root.after_cancel(tick_id[0])
        app.close()


def test_chat_tk_stop_closes_the_stream(tk_root, chat_tk, model_path):
    import tkinter

    model = gemma_edge.load(model_path)
    full = model.chat().ask(PROMPT, max_tokens=40, temperature=0, stop_tokens=False)
    stopped, shown = threading.Event(), []

    def hold_after_the_first_text(r):  # until Stop is pressed: the reply surely stops half way
        if shown:
            assert stopped.wait(300), "Stop was never pressed"
        if r.text:
            shown.append(r.text)

    _pace(model, hold_after_the_first_text)
    app = chat_tk.ChatApp(tkinter.Toplevel(tk_root), model, max_tokens=40)
    app.gen_kwargs["stop_tokens"] = False  # a reply that surely runs long enough to be stopped
    try:
        assert app.send(PROMPT)
        start = len(app.transcript())
        deadline = time.monotonic() + 300  # a hang guard: the first token is held by nothing
        while len(app.transcript()) == start:  # wait for the first streamed text
            assert time.monotonic() < deadline, "no text streamed within 300 s"
            tk_root.update()
            time.sleep(0.002)
        app.stop()
        stopped.set()
        app.wait_idle(timeout=300)
        partial = app.conversation.messages[-1]["content"]
        assert partial and full.startswith(partial) and len(partial) < len(full)
        assert app.transcript().endswith(f"{partial} [stopped]\n\n")
        assert not app.worker.is_alive()
        # the model's stream was closed, so the model is free for the next turn
        assert app.send("cache layer weight")
        app.wait_idle(timeout=300)
        assert len(app.conversation.messages) == 4
    finally:
        app.close()


# ---- examples/android ----------------------------------------------------------------------

def test_android_sample_loads_the_packed_litertlm():
    """A static look only: the Kotlin sample is not built here."""
    android = EXAMPLES / "android"
    kotlin = (android / "MainActivity.kt").read_text()
    gradle = (android / "build.gradle.kts").read_text()
    readme = (android / "README.md").read_text()
    packed = default_output("gemma3-270m-int8.tflite").name  # what `gemma-edge pack` writes
    assert packed.endswith(".litertlm")
    assert f'"{packed}"' in kotlin, "MainActivity.kt should load the file gemma-edge pack writes"
    assert "gemma-edge pack gemma3-270m-int8.tflite" in readme and packed in readme
    for api in ("import com.google.ai.edge.litertlm.", "EngineConfig(", "Backend.CPU(", ".initialize()",
                "createConversation(", "sendMessageAsync(", "cancelProcess()"):
        assert api in kotlin, api
    assert re.search(r'implementation\("com\.google\.ai\.edge\.litertlm:litertlm-android:\d+\.\d+\.\d+"\)', gradle)
    assert "not built here" in readme.lower() and "adb push" in readme


# ---- search.py ---------------------------------------------------------------------------

def test_search_ranks_passages_as_the_api_does(tmp_path_factory, tmp_path):
    import numpy as np

    pytest.importorskip("sentence_transformers")
    from test_embed import embedding_case, texts

    model_path = str(embedding_case(tmp_path_factory).convert("fp32"))
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    words = texts(9, seed=11, most=20)
    (folder / "a.txt").write_text(f"{words[0]}\n{words[1]}\n\n{words[2]}\n", encoding="utf-8")
    (folder / "sub" / "b.md").write_text("\n\n".join(words[3:8]), encoding="utf-8")
    (folder / "skip.bin").write_text(words[8])
    index = tmp_path / "index.npz"

    def run(*query):
        r = subprocess.run([sys.executable, str(EXAMPLES / "search.py"), model_path, str(folder), *query, "-k", "3",
                            "--index", str(index)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    query = "the cache of the phone"
    first = run(query)
    passages = [" ".join((words[0] + " " + words[1]).split()), words[2], *words[3:8]]
    where = ["a.txt:1", "a.txt:4"] + [f"sub/b.md:{1 + 2 * i}" for i in range(5)]
    m = gemma_edge.load(model_path)
    scores = m.embed(passages, task="document") @ m.embed(query, task="query")
    best = np.argsort(-scores, kind="stable")[:3]
    lines = first.stdout.splitlines()[:3]
    assert [line.split()[1] for line in lines] == [where[i] for i in best], (lines, scores)
    assert [float(line.split()[0]) for line in lines] == pytest.approx([float(scores[i]) for i in best], abs=2e-3)
    assert "embedded 7 of 7 passages" in first.stderr
    again = run(query)  # the index is reused: nothing embedded but the query
    assert again.stdout == first.stdout and "embedded" not in again.stderr
    (folder / "a.txt").write_text(words[0], encoding="utf-8")
    assert "embedded 6 of 6 passages" in run(query).stderr
