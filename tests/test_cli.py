"""The console scripts as a user runs them: ``gemma-edge`` and ``gemma-convert`` in subprocesses.

Successful commands print only their product on stdout; bad input exits with code 2 and one
paragraph on stderr, never a traceback. The tiny Gemma 3 of ``test_runtime.py`` is shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONTEXT

BIN = Path(sys.executable).parent  # the console scripts of this environment
GEMMA_EDGE, GEMMA_CONVERT = str(BIN / "gemma-edge"), str(BIN / "gemma-convert")
PROMPT = "the model and the cache"
LONG_PROMPT = " ".join(["model"] * 100)  # more tokens than the context (64)


def cli(*args, stdin: str | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_user_error(proc: subprocess.CompletedProcess, prog: str, *names: str) -> str:
    """Exit code 2, nothing on stdout, and one paragraph on stderr that names ``names``."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit code {proc.returncode}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith(f"{prog}: error: "), f"stderr is not just the error message:\n{proc.stderr}"
    assert "\n\n" not in err, f"more than one paragraph:\n{proc.stderr}"
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    assert proc.stdout == ""
    return err


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


# ---- gemma-edge run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_greedy_text(path) -> str:
    import gemma_edge

    return gemma_edge.load(path).generate(PROMPT, temperature=0, max_tokens=8).text


def test_run_prints_only_generated_text(path, api_greedy_text):
    args = (GEMMA_EDGE, "run", path, "-p", PROMPT, "--temperature", "0", "--max-tokens", "8")
    plain = cli(*args)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == api_greedy_text + "\n"
    assert "tok/s" not in plain.stderr

    verbose = cli(*args, "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout == plain.stdout  # statistics never mix with the text
    stats = [line for line in verbose.stderr.splitlines() if "tok/s" in line]
    assert len(stats) == 1 and "generated 8 tokens" in stats[0], verbose.stderr

    piped = cli(GEMMA_EDGE, "run", path, "-p", "-", "--temperature", "0", "--max-tokens", "8", stdin=PROMPT)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == plain.stdout


def test_run_is_quiet_without_verbose(path):
    """Nothing but the text: LiteRT's native INFO/WARNING log is not for the user."""
    proc = cli(GEMMA_EDGE, "run", path, "-p", PROMPT, "--temperature", "0", "--max-tokens", "4")
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_run_chat_matches_api(path):
    import gemma_edge

    want = gemma_edge.load(path).chat(system="Be brief.").ask("the model", temperature=0, max_tokens=6)
    proc = cli(GEMMA_EDGE, "run", path, "--system", "Be brief.", "-p", "the model", "--temperature", "0",
               "--max-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"


# ---- gemma-edge info and bench ---------------------------------------------------------------

def test_info(path):
    proc = cli(GEMMA_EDGE, "info", path)
    assert proc.returncode == 0, proc.stderr
    for fact in ("Gemma 3: 4 layers, d_model 64", "vocab 512", "fp32", f"context       {CONTEXT} tokens",
                 "prefill chunks 8, 32", "score chunks 4, 8, 32", "3 sliding (window 8) / 1 global"):
        assert fact in proc.stdout, proc.stdout
    as_json = cli(GEMMA_EDGE, "info", path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    meta = json.loads(as_json.stdout)
    assert (meta["format"], meta["context_length"], meta["prefill_lengths"]) == ("gemma-edge", CONTEXT, [8, 32])


def test_bench_json(path):
    proc = cli(GEMMA_EDGE, "bench", path, "-p", "8", "-n", "8", "--runs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["runs"] == 2 and r["gen_tokens"] == 8 and r["prompt_tokens"] == 8
    assert r["decode_tps"]["median"] > 0 and r["prefill_tps"]["median"] > 0
    assert r["decode_tps"]["min"] <= r["decode_tps"]["median"] <= r["decode_tps"]["max"]
    # peak RSS in MiB, over the file's bytes in the same unit
    assert r["rss_over_file"] == pytest.approx(r["peak_rss_mb"] * 2**20 / os.path.getsize(path))


# ---- gemma-edge: bad input -------------------------------------------------------------------

def tiny_tflite() -> bytes:
    """y = x + x: a valid one-op .tflite without gemma-edge metadata (built with the schema)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT()
    m.version = 3
    m.buffers = [fb.BufferT(), fb.BufferT(), fb.BufferT()]
    add = fb.OperatorCodeT()
    add.builtinCode = add.deprecatedBuiltinCode = fb.BuiltinOperator.ADD
    add.version = 1
    m.operatorCodes = [add]
    tensors = []
    for i, name in enumerate([b"x", b"y"]):
        t = fb.TensorT()
        t.shape, t.type, t.buffer, t.name = [1], fb.TensorType.FLOAT32, i + 1, name
        tensors.append(t)
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.AddOptions, fb.AddOptionsT()
    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [1], [op], b"main"
    m.subgraphs = [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    d = tmp_path_factory.mktemp("bad_models")
    rng = np.random.default_rng(0)
    files = {"missing": d / "missing.tflite", "random": d / "random.tflite",
             "corrupt": d / "corrupt.tflite", "plain": d / "plain.tflite"}
    files["random"].write_bytes(rng.bytes(4096))
    corrupt = bytearray(rng.bytes(4096))
    corrupt[4:8] = b"TFL3"  # the identifier is right, the flatbuffer is garbage
    files["corrupt"].write_bytes(bytes(corrupt))
    files["plain"].write_bytes(tiny_tflite())
    interp = Interpreter(model_path=str(files["plain"]))  # it really is a valid model
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], np.array([1.5], np.float32))
    interp.invoke()
    assert interp.get_tensor(interp.get_output_details()[0]["index"])[0] == 3.0
    return files


@pytest.mark.parametrize("command", [["run", "-p", "hello"], ["info"], ["bench", "-p", "4", "-n", "4"]],
                         ids=["run", "info", "bench"])
@pytest.mark.parametrize("kind,names", [("missing", ["no such file", "gemma-convert"]),
                                        ("random", ["not a TensorFlow Lite"]),
                                        ("corrupt", ["corrupt"]),
                                        ("plain", ["not a gemma-edge model", "gemma-convert"])])
def test_not_a_model_file(bad_files, command, kind, names):
    f = bad_files[kind]
    proc = cli(GEMMA_EDGE, command[0], f, *command[1:])
    assert_user_error(proc, "gemma-edge", str(f), *names)


@pytest.mark.parametrize("args,names", [
    (["-p", PROMPT, "--temperature", "-1"], ["temperature", "-1"]),
    (["-p", PROMPT, "--top-p", "0"], ["top_p"]),
    (["-p", ""], ["empty"]),
    (["-p", LONG_PROMPT], [f"context is {CONTEXT}", "--max-context"]),
], ids=["temperature", "top_p", "empty_prompt", "prompt_over_context"])
def test_run_bad_input(path, args, names):
    assert_user_error(cli(GEMMA_EDGE, "run", path, *args), "gemma-edge", *names)


def test_run_prompt_over_context_from_stdin_names_its_length(path):
    import gemma_edge

    n = len(gemma_edge.load(path).encode(LONG_PROMPT))
    proc = cli(GEMMA_EDGE, "run", path, "-p", "-", stdin=LONG_PROMPT)
    assert_user_error(proc, "gemma-edge", f"{n} tokens", str(CONTEXT))


# ---- gemma-convert ---------------------------------------------------------------------------

def convert_cli(source, output, *extra, **kw) -> subprocess.CompletedProcess:
    return cli(GEMMA_CONVERT, source, "-o", output, "--quant", "fp32", "--max-context", "16",
               "--prefill-lengths", "8", "-q", *extra, **kw)


def broken_copy(tiny, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint, d)
    return d


def assert_convert_failed(proc, out: Path, *names: str) -> str:
    err = assert_user_error(proc, "gemma-convert", *names)
    assert not out.exists()
    assert temp_files(out.parent) == []
    return err


def test_convert_missing_source(tmp_path):
    src = tmp_path / "no-such-checkpoint"
    out = tmp_path / "out" / "m.tflite"
    out.parent.mkdir()
    assert_convert_failed(convert_cli(src, out), out, str(src))


def test_convert_directory_without_config(tiny, tmp_path):
    src = broken_copy(tiny, tmp_path)
    (src / "config.json").unlink()
    out = tmp_path / "m.tflite"
    assert_convert_failed(convert_cli(src, out), out, "config.json")


def test_convert_unsupported_model_type(tiny, tmp_path):
    from gemma_edge.convert.hf_checkpoint import HF_MODEL_TYPES

    src = broken_copy(tiny, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    out = tmp_path / "m.tflite"
    assert_convert_failed(convert_cli(src, out), out, "'llama'", *HF_MODEL_TYPES)


def test_convert_checkpoint_missing_a_tensor(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = broken_copy(tiny, tmp_path)
    tensors = load_file(src / "model.safetensors")
    gone = "model.layers.1.mlp.up_proj.weight"
    del tensors[gone]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.tflite"
    assert_convert_failed(convert_cli(src, out), out, gone, "missing")


def test_convert_missing_tokenizer(tiny, tmp_path):
    src = broken_copy(tiny, tmp_path)
    (src / "tokenizer.model").unlink()
    out = tmp_path / "m.tflite"
    assert_convert_failed(convert_cli(src, out), out, "tokenizer.model")


def test_convert_refuses_to_overwrite_then_force_replaces(tiny, tmp_path):
    from gemma_edge.runtime.modelfile import read_info

    out = tmp_path / "m.tflite"
    out.write_bytes(b"precious")
    err = assert_user_error(convert_cli(tiny.checkpoint, out), "gemma-convert", str(out), "--force")
    assert out.read_bytes() == b"precious" and temp_files(tmp_path) == [], err

    forced = convert_cli(tiny.checkpoint, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == "" and "Traceback" not in forced.stderr
    assert f"wrote {out}" in forced.stderr
    assert temp_files(tmp_path) == []
    info = read_info(str(out))
    assert (info.context_length, info.prefill_lengths, info.quant) == (16, [8], "fp32")
    ran = cli(GEMMA_EDGE, "run", out, "-p", PROMPT, "--temperature", "0", "--max-tokens", "4")
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr


def test_convert_write_failure_keeps_old_file_and_leaves_no_temp(tiny, tmp_path):
    """A write that fails half way (here: a file-size limit, as a full disk would) removes
    the temporary file and leaves the existing output as it was."""
    out = tmp_path / "m.tflite"
    out.write_bytes(b"precious")
    # Below the output's size (its fp32 weights are the same as the fixture's file), above
    # what TensorFlow writes while converting the graph (~0.3 MB; the weights are not in it; no
    # score_<T> signatures, each of which adds to the graph).
    limit = int(0.7 * tiny.model_file.stat().st_size)
    # A shell-free wrapper: ignore SIGXFSZ (so writes fail with EFBIG) and cap file sizes, then exec.
    wrapper = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    proc = cli(sys.executable, "-c", wrapper, GEMMA_CONVERT, tiny.checkpoint, "-o", out, "--quant", "fp32",
               "--max-context", "16", "--prefill-lengths", "8", "--score-lengths", "0", "-q", "--force")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"gemma-convert: error: could not write {out}")
    assert out.read_bytes() == b"precious"
    assert temp_files(tmp_path) == []
    assert_user_error(proc, "gemma-convert", str(out))  # and nothing else on stderr (TensorFlow's log)


def test_convert_interrupted_leaves_nothing(tiny, tmp_path):
    """Ctrl-C (SIGINT to the process group) while the output is being written: exit 130, no
    output, no temporary file. The converter is held there, deterministically: its stderr is a
    packet pipe kept full, so each progress line it prints (every update, via tqdm's
    environment) waits until the test has read one packet. The test lets lines through one at
    a time until the temporary file exists; the conversion cannot then finish before the test
    reads again, so SIGINT surely lands while the file is being written."""
    if not hasattr(os, "pipe2") or not hasattr(os, "O_DIRECT"):
        pytest.skip("needs a Linux packet pipe (pipe2 with O_DIRECT) to hold the conversion")
    out = tmp_path / "m.tflite"
    r, w = os.pipe2(os.O_DIRECT)  # one write, one packet, one slot: nothing merges into a free slot
    proc, got, slots = None, [], 0
    try:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"F")
                slots += 1
        os.set_blocking(w, True)  # the child's writes must wait, not fail
        env = {**os.environ, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # a line per update
        proc = subprocess.Popen([GEMMA_CONVERT, str(tiny.checkpoint), "-o", str(out), "--quant", "fp32",
                                 "--max-context", "16", "--prefill-lengths", "8"],
                                stdout=subprocess.PIPE, stderr=w, env=env, start_new_session=True)
        deadline = time.monotonic() + 300  # a hang guard
        while True:
            while select.select([], [w], [], 0)[1]:  # a free slot: the child has not printed into it
                assert proc.poll() is None, "the conversion ended before it could be interrupted"
                assert time.monotonic() < deadline, "the conversion printed nothing for 300 s"
                time.sleep(0.005)
            if temp_files(tmp_path):
                break
            got.append(os.read(r, 65536))  # let one more line through
        os.killpg(proc.pid, signal.SIGINT)
        os.close(w)
        w = -1
        while chunk := os.read(r, 65536):
            got.append(chunk)
        stdout = proc.communicate(timeout=300)[0]
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got[:slots] == [b"F"] * slots
    stderr = b"".join(got[slots:]).decode()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert stdout == b""
    assert not out.exists() and temp_files(tmp_path) == []


def test_eval_reports_the_api_perplexity(path, tmp_path):
    import gemma_edge

    text = tmp_path / "text.txt"
    text.write_text("the model token gemma edge phone laptop raspberry cache layer weight quantize " * 3,
                    encoding="utf-8")
    proc = cli(GEMMA_EDGE, "eval", path, "--text", str(text), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = gemma_edge.load(path).perplexity(text.read_text(encoding="utf-8"))
    assert got["predicted"] == want["predicted"] and abs(got["mean_nll"] - want["mean_nll"]) < 1e-9
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    assert_user_error(cli(GEMMA_EDGE, "eval", path, "--text", str(bad)), "gemma-edge", "UTF-8")


def test_convert_eval_text_with_its_progress_bar(tiny, tmp_path):
    """Without -q the comparison with fp32 shows a progress bar. Its tqdm starts without a total,
    and testing it for truth (``if bar``) raised TypeError: the README's own example crashed."""
    text = tmp_path / "text.txt"
    text.write_text("the model token gemma edge phone laptop raspberry cache layer weight " * 3, encoding="utf-8")
    proc = cli(GEMMA_CONVERT, tiny.checkpoint, "-o", tmp_path / "m.tflite", "--quant", "int4-emb",
               "--max-context", "32", "--prefill-lengths", "8", "--eval-text", text)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "KL divergence from base" in proc.stdout and "comparing int4-emb with fp32" in proc.stderr


def test_convert_report_with_eval_text(tiny, tmp_path):
    """--report prints the per-role error table and the perplexity of the new file next to an
    fp32 conversion's; each figure equals what `gemma-edge eval` says of a file made alone."""
    text = tmp_path / "text.txt"
    text.write_text("the model token gemma edge phone laptop raspberry cache layer weight " * 3, encoding="utf-8")
    out = tmp_path / "m.tflite"
    proc = cli(GEMMA_CONVERT, tiny.checkpoint, "-o", out, "--quant", "int4-b32,embedding=int8",
               "--max-context", "32", "--prefill-lengths", "8", "-q", "--eval-text", text)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = {ln.split()[0]: ln.split() for ln in lines if ln.strip().split()[:1] in (["embedding"], ["attention"], ["ffn"])}
    assert table["embedding"][1] == "int8" and table["attention"][1] == "int4-b32" and table["ffn"][1] == "int4-b32"
    ppl = {ln.split()[0]: float(ln.split()[2]) for ln in lines if " perplexity " in ln}
    kl = next(float(ln.split("mean ")[1].split(",")[0]) for ln in lines if "KL divergence" in ln)
    ref = tmp_path / "ref.tflite"
    assert convert_cli(tiny.checkpoint, ref, "--max-context", "32").returncode == 0
    for key, path in (("fp32", ref), ("embedding=int8,attention=int4-b32,ffn=int4-b32", out)):
        ev = json.loads(cli(GEMMA_EDGE, "eval", path, "--text", text, "--json").stdout)
        assert abs(ppl[key] - ev["perplexity"]) < 1e-3 * ev["perplexity"], (key, ppl, ev)
    # and the KL divergence is what `gemma-edge eval --base` says of the two files
    ev = json.loads(cli(GEMMA_EDGE, "eval", out, "--text", text, "--base", ref, "--json").stdout)
    assert abs(ev["kl_mean"] - kl) < 1e-4 + 1e-3 * kl and ev["kl_mean"] > 0 and 0 < ev["top1_agreement"] <= 1
    assert temp_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite", "ref.tflite", "text.txt"]
