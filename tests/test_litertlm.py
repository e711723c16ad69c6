"""``gemma-edge pack``: a gemma-edge file as a LiteRT-LM ``.litertlm``, run by LiteRT-LM itself.

Fast tier: the tiny Gemma 3 of ``test_runtime.py`` is packed; the container is read back with
litert-lm-builder's own reader (model bytes, tokenizer, ``LlmMetadata``), bad input raises
typed errors and leaves no file behind, and LiteRT-LM's ``Engine`` generates the same greedy
tokens as gemma-edge.

Slow tier (``-m slow``): the real Gemma 3 270M, converted at each of ``REAL_QUANTS``, packed
and run by LiteRT-LM's ``Engine`` greedily on prompts short and longer than the largest
prefill chunk, raw and through the chat template; the text must equal gemma-edge's own
greedy output for the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CONTEXT, MODEL_VOCAB, SP_VOCAB
from test_cli import tiny_tflite
from test_runtime import BOS, EOS, EOT, SOT, prompt_ids

from gemma_edge.runtime.errors import GemmaEdgeError, ModelFileError, OutputExistsError
from gemma_edge.runtime.cli import pack_cmd
from gemma_edge.runtime.chat import GEMMA
from gemma_edge.runtime.litertlm import llm_metadata, pack
from gemma_edge.runtime.modelfile import read_info

CHAT_TEMPLATE = GEMMA.jinja()

NO_LITERT_LM = ("litert-lm (LiteRT-LM's Python Engine, pip install litert-lm) is not installed; "
                "it is the independent runtime these tests run packed files on")

# int4 presets checked against LiteRT-LM on the real model, next to int8. The default int4
# preset is not decided yet: put it here when it is.
REAL_QUANTS = ("int8", "int4", "int4-emb")  # int8, the default int4 preset, and the split embedding
REAL_CONTEXT, REAL_PREFILL = 256, (8, 32, 128)
REAL_NEW_TOKENS = 24
REAL_PROMPTS = {
    "short": "The capital of France is",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    # more tokens than the largest prefill chunk (128): LiteRT-LM must chain prefill calls
    "long": ("The Raspberry Pi is a series of small single-board computers developed in the United "
             "Kingdom by the Raspberry Pi Foundation in association with Broadcom. The project "
             "originally aimed to teach basic computer science in schools. The original model became "
             "more popular than anticipated, selling outside its target market for uses such as "
             "robotics, home automation, industrial automation, and by computer and electronic "
             "hobbyists, because of its low cost, modularity, open design, and its adoption of the "
             "HDMI and USB standards. It is now widely used in many areas, such as for weather "
             "monitoring, because of its low cost, portability and low power consumption. Over the "
             "years the boards gained faster processors, more memory and wireless networking, and "
             "people began to run small language models on them. The main reason is that"),
}
REAL_CHAT = "Write one sentence about the sea."
# A top-1 lead over top-2 below this (in logits) is a near-tie: float rounding in a
# different runtime may flip it, so a divergence there is not a bug.
NEAR_TIE = 0.05


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "tiny.litertlm"
    assert pack(tiny.model_file, out) == out
    return out


def unpacked(path: Path, folder: Path) -> dict:
    """The container read back by litert-lm-builder's own reader (``unpack``)."""
    import litert_lm_builder
    from google.protobuf import text_format
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    toml_path = Path(litert_lm_builder.unpack(str(path), str(folder)))
    toml = tomllib.loads(toml_path.read_text())
    sections = {s["section_type"]: s for s in toml["section"]}
    meta = text_format.Parse((folder / sections["LlmMetadata"]["data_path"]).read_text(),
                             llm_metadata_pb2.LlmMetadata())
    return {"system": {e["key"]: e["value"] for e in toml["system_metadata"]["entries"]},
            "sections": sections, "meta": meta,
            "model": folder / sections["TFLiteModel"]["data_path"],
            "tokenizer": (folder / sections["SP_Tokenizer"]["data_path"]).read_bytes()}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


# ---- the container ------------------------------------------------------------------------------

def test_container_reads_back(tiny, packed, tmp_path):
    got = unpacked(packed, tmp_path / "unpacked")
    assert got["sections"]["TFLiteModel"]["model_type"] == "prefill_decode"
    assert got["model"].read_bytes() == tiny.model_file.read_bytes()  # the model, byte for byte
    assert got["system"]["gemma_edge.source"] == tiny.model_file.name
    assert got["system"]["gemma_edge.quantization"] == "fp32"

    m = got["meta"]
    assert list(m.start_token.token_ids.ids) == [BOS]
    assert [list(t.token_ids.ids) for t in m.stop_tokens] == [[EOS], [EOT]]
    assert m.max_num_tokens == CONTEXT
    assert m.llm_model_type.WhichOneof("model_type") == "gemma3"
    assert m.sampler_params.type == m.sampler_params.TOP_P and m.sampler_params.k == 1  # greedy, CPU-safe
    assert m.jinja_prompt_template == CHAT_TEMPLATE
    assert m.prompt_templates.user.prefix == "<start_of_turn>user\n"
    assert m.prompt_templates.model.prefix == "<start_of_turn>model\n"
    assert m.HasField("supports_thinking") and not m.supports_thinking
    # embedding rows past the tokenizer have no text: LiteRT-LM must not sample them either
    assert list(m.suppress_tokens.ids) == list(range(SP_VOCAB, MODEL_VOCAB))


def test_packed_tokenizer_matches_literally_what_gemma_edge_parses(tiny, packed, tmp_path):
    """Same pieces, ids and scores; the turn markers become USER_DEFINED, so plain
    SentencePiece (what LiteRT-LM calls) finds them in text as gemma-edge's
    ``parse_special`` does, and ordinary text encodes exactly as before."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    info = read_info(str(tiny.model_file))
    packed_bytes = unpacked(packed, tmp_path / "unpacked")["tokenizer"]
    before, after = sp_pb2.ModelProto(), sp_pb2.ModelProto()
    before.ParseFromString(info.tokenizer_model)
    after.ParseFromString(packed_bytes)
    assert [(p.piece, p.score) for p in before.pieces] == [(p.piece, p.score) for p in after.pieces]
    changed = {p.piece for p, q in zip(before.pieces, after.pieces) if p.type != q.type}
    assert changed == {"<start_of_turn>", "<end_of_turn>"}
    assert all(after.pieces[i].type == after.pieces[i].USER_DEFINED for i in (SOT, EOT))
    assert all(after.pieces[i].type == after.pieces[i].CONTROL for i in (0, EOS, BOS))  # <pad>, <eos>, <bos>

    import gemma_edge

    ours = gemma_edge.load(tiny.model_file).tokenizer
    sp = spm.SentencePieceProcessor(model_proto=packed_bytes)
    chat = "<start_of_turn>user\nthe model and the cache<end_of_turn>\n<start_of_turn>model\n"
    assert sp.encode(chat) == ours.encode(chat, add_bos=False, parse_special=True)
    for text in ("the model and the cache", "café naïve 🙂 x = [1, 22, 333]", "  東京\n\n"):
        assert sp.encode(text) == ours.encode(text, add_bos=False)


def test_chat_template_renders_runtime_chat():
    """The jinja template in the container renders what ``runtime/chat.py`` renders."""
    jinja2 = pytest.importorskip("jinja2")
    from gemma_edge.runtime.chat import render

    t = jinja2.Environment().from_string(CHAT_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Two\nlines"}],
        [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
         {"role": "user", "content": "x"}, {"role": "model", "content": "y"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            assert t.render(messages=msgs, add_generation_prompt=gen) == render(msgs, add_generation_prompt=gen)
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
    assert t.render(messages=parts, add_generation_prompt=True) == render(
        [{"role": "user", "content": "xy"}], add_generation_prompt=True)


@pytest.mark.parametrize("family,kind", [(1, "generic_model"), (2, "generic_model"), (3, "gemma3")])
def test_model_type_by_family(tiny, family, kind):
    """LiteRT-LM 0.18.1 has a Gemma 3 type; Gemma 1 and 2 run as generic models with the
    jinja chat template."""
    info = read_info(str(tiny.model_file))
    meta = dataclasses.replace(info.meta, config=dataclasses.replace(info.config, family=family))
    m = llm_metadata(dataclasses.replace(info, meta=meta))
    assert m.llm_model_type.WhichOneof("model_type") == kind
    assert m.jinja_prompt_template == CHAT_TEMPLATE


def test_default_sampler_can_be_set(tiny, tmp_path):
    out = pack(tiny.model_file, tmp_path / "sampled.litertlm", top_k=40, top_p=0.95, temperature=0.8)
    s = unpacked(out, tmp_path / "unpacked")["meta"].sampler_params
    assert (s.type, s.k, round(s.p, 4), round(s.temperature, 4)) == (s.TOP_P, 40, 0.95, 0.8)
    with pytest.raises(GemmaEdgeError, match="top_k"):
        pack(tiny.model_file, tmp_path / "bad.litertlm", top_k=0)
    assert not (tmp_path / "bad.litertlm").exists()


# ---- bad input, no file left behind ----------------------------------------------------------------

def test_refuses_to_overwrite_without_force(tiny, tmp_path):
    out = tmp_path / "m.litertlm"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force") as e:
        pack(tiny.model_file, out)
    assert str(out) in str(e.value)
    assert out.read_bytes() == b"keep me"
    pack(tiny.model_file, out, force=True)
    assert out.read_bytes()[:8] == b"LITERTLM"
    assert temp_files(tmp_path) == []


def test_default_output_is_next_to_the_model(tiny, tmp_path):
    model = tmp_path / "tiny-fp32.tflite"
    model.write_bytes(tiny.model_file.read_bytes())
    assert pack(model) == tmp_path / "tiny-fp32.litertlm"
    with pytest.raises(OutputExistsError, match="is an input of this command"):
        pack(model, model, force=True)
    assert model.read_bytes() == tiny.model_file.read_bytes()


@pytest.mark.parametrize("kind,error,names", [
    ("missing", ModelFileError, ["no such file", "gemma-convert"]),
    ("random", ModelFileError, ["not a TensorFlow Lite"]),
    ("plain", ModelFileError, ["not a gemma-edge model", "gemma-convert"]),
])
def test_not_a_gemma_edge_file(tmp_path, kind, error, names):
    src = tmp_path / f"{kind}.tflite"
    if kind == "random":
        src.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "plain":
        src.write_bytes(tiny_tflite())  # a valid .tflite without gemma-edge metadata
    out = tmp_path / "out.litertlm"
    with pytest.raises(error) as e:
        pack(src, out)
    for name in [str(src), *names]:
        assert name in str(e.value)
    assert not out.exists() and temp_files(tmp_path) == []


def test_bad_output_paths(tiny, tmp_path):
    with pytest.raises(GemmaEdgeError, match="does not exist; create it first"):
        pack(tiny.model_file, tmp_path / "no" / "such" / "m.litertlm")
    with pytest.raises(OutputExistsError, match="is a directory"):
        pack(tiny.model_file, tmp_path, force=True)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_no_file_left_when_writing_fails(tiny, tmp_path, monkeypatch, exc):
    """A failure half way through the container leaves neither a temporary file nor a new
    output, and an existing output (with force) is untouched."""
    import litert_lm_builder

    def half_then_fail(self, stream, **kw):
        stream.write(b"LITERTLM" + b"\0" * 4096)
        raise exc

    monkeypatch.setattr(litert_lm_builder.LitertLmFileBuilder, "build", half_then_fail)
    fresh, existing = tmp_path / "fresh.litertlm", tmp_path / "existing.litertlm"
    existing.write_bytes(b"old")
    for out in (fresh, existing):
        with pytest.raises(type(exc)):
            pack(tiny.model_file, out, force=True)
    assert not fresh.exists() and existing.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


# ---- the click command ------------------------------------------------------------------------

def test_pack_command(tiny, tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    help_text = runner.invoke(pack_cmd, ["--help"]).output
    for word in ("LiteRT-LM", ".litertlm", "--force", "-o", "litert-lm-builder"):
        assert word in help_text
    out = tmp_path / "cli.litertlm"
    r = runner.invoke(pack_cmd, [str(tiny.model_file), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists() and r.stdout == "" and f"wrote {out}" in r.stderr
    r = runner.invoke(pack_cmd, [str(tiny.model_file), "-o", str(out)])
    assert r.exit_code == 2 and r.stderr.startswith("gemma-edge: error: ") and "--force" in r.stderr
    assert "Traceback" not in r.output
    assert runner.invoke(pack_cmd, [str(tiny.model_file), "-o", str(out), "--force"]).exit_code == 0


def test_importing_and_packing_never_import_tensorflow(tiny, tmp_path):
    """The runtime is TF-free: importing the module loads no builder, packing loads no TF."""
    out = tmp_path / "sub.litertlm"
    code = (
        "import json, sys\n"
        "import gemma_edge.runtime.litertlm as L\n"
        "before = sorted(k for k in sys.modules if k.split('.')[0] in ('litert_lm_builder', 'tensorflow'))\n"
        f"L.pack({str(tiny.model_file)!r}, {str(out)!r})\n"
        "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'torch'))\n"
        "print(json.dumps({'before': before, 'heavy': heavy}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"before": [], "heavy": []}
    assert out.exists()


# ---- LiteRT-LM runs the packed file ------------------------------------------------------------------

def litert_engine(path: Path, cache_dir: Path):
    """LiteRT-LM's Python Engine on CPU (2 threads), its native log limited to errors."""
    litert_lm = pytest.importorskip("litert_lm", reason=NO_LITERT_LM)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache_dir.mkdir(exist_ok=True)
    return litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(thread_count=2),
                            cache_dir=str(cache_dir), enable_benchmark=True)


def litert_greedy(engine, prompt: str, n: int) -> tuple[str, int, int]:
    """LiteRT-LM's raw-text greedy continuation (no chat template; it prepends <bos>):
    (text, prompt tokens incl. <bos>, generated tokens)."""
    import litert_lm

    s = engine.create_session(apply_prompt_template=False, max_output_tokens=n,
                              sampler_config=litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0))
    try:
        s.run_prefill([prompt])
        text = s.run_decode().texts[0]
        b = s.get_benchmark_info()
        return text, b.last_prefill_token_count, b.last_decode_token_count
    finally:
        s.close()  # LiteRT-LM runs one session per engine at a time


def litert_chat(engine, message: str, n: int) -> tuple[str, str, int]:
    """One chat turn through LiteRT-LM's Conversation API (the jinja template in the file)."""
    import litert_lm

    c = engine.create_conversation(sampler_config=litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0))
    try:
        rendered = c.render_message_to_string({"role": "user", "content": message})
        reply = str(c.send_message(message, max_output_tokens=n))
        return rendered, reply, c.get_benchmark_info().last_decode_token_count
    finally:
        c.close()


def greedy_margins(model, ids: list[int], tokens: list[int]) -> list[float]:
    """Top-1 minus top-2 logit of gemma-edge's own decode at each step of its greedy path."""
    from gemma_edge.runtime.backend import run_prefill

    model.reset()
    run_prefill(model.backend, ids[:-1], 0)
    seq = ids + tokens
    out = []
    for pos in range(len(ids) - 1, len(seq) - 1):
        top2 = np.sort(model.backend.decode(seq[pos], pos)[:model.tokenizer.vocab_size])[-2:]
        out.append(float(top2[1] - top2[0]))
    model.reset()  # the cache was driven by hand
    return out


def explain_divergence(model, ids, ours, theirs: str) -> str:
    """Where LiteRT-LM's text leaves gemma-edge's greedy path, and how close that call was."""
    step = 0
    while step < len(ours.tokens) and theirs.startswith(model.tokenizer.decode(ours.tokens[:step + 1])):
        step += 1
    margins = greedy_margins(model, ids, ours.tokens)
    margin = margins[step] if step < len(margins) else float("nan")
    return (f"LiteRT-LM leaves gemma-edge's greedy path at step {step} of {len(ours.tokens)}, where "
            f"gemma-edge's top-1 beats its top-2 by {margin:.4f} "
            f"({'a near-tie: rounding can flip it' if margin < NEAR_TIE else 'a clear choice: a real difference'}).\n"
            f"  gemma-edge: {ours.text!r}\n  LiteRT-LM:  {theirs!r}")


def test_litert_lm_runs_the_tiny_model_like_gemma_edge(tiny, packed, sp_model_path, tmp_path):
    """Greedy continuations of prompts of 3, 11 and 40 tokens (40 = prefill 32 + 8) agree."""
    import gemma_edge

    engine = litert_engine(packed, tmp_path / "cache")
    try:
        assert engine.bos_token_id == BOS and engine.eos_token_ids == [[EOS], [EOT]]
        m = gemma_edge.load(tiny.model_file)
        for n_prompt, seed in ((3, 5), (11, 6), (40, 7)):
            ids = prompt_ids(sp_model_path, n_prompt, seed=seed)
            text = m.tokenizer.decode(ids[1:])
            assert engine.tokenize(text) == m.tokenizer.encode(text, add_bos=False)
            ours = m.generate(text, max_tokens=12, temperature=0)
            theirs, n_in, n_out = litert_greedy(engine, text, 12)
            assert theirs == ours.text, explain_divergence(m, m.encode(text), ours, theirs)
            assert (n_in, n_out) == (ours.prompt_tokens, len(ours.tokens))
    finally:
        engine.close()


def test_litert_lm_runs_a_for_draft_file_like_gemma_edge(tiny, sp_model_path, tmp_path):
    """A --for-draft file (its embedding split in two tables, and decode_hot, which LiteRT-LM
    ignores) packs and runs under LiteRT-LM like gemma-edge (greedy)."""
    import gemma_edge
    from gemma_edge.convert.pipeline import convert

    model = tmp_path / "tiny-draft.tflite"
    convert(str(tiny.checkpoint), str(model), quant="int8", progress=False, score_length=0, for_draft=True)
    m = gemma_edge.load(str(model))
    assert m.info.decode_hot and m.config.embed_hot_rows
    engine = litert_engine(pack(model), tmp_path / "cache")
    try:
        for n_prompt, seed in ((5, 8), (40, 9)):
            text = m.tokenizer.decode(prompt_ids(sp_model_path, n_prompt, seed=seed)[1:])
            ours = m.generate(text, max_tokens=12, temperature=0)
            theirs, _, n_out = litert_greedy(engine, text, 12)
            assert theirs == ours.text and n_out == len(ours.tokens), explain_divergence(m, m.encode(text), ours, theirs)
    finally:
        engine.close()


# ---- the real Gemma 3 270M (slow) -------------------------------------------------------------------

@pytest.fixture(scope="module", params=REAL_QUANTS)
def real_pair(request, real_gguf, tmp_path_factory) -> tuple[str, Path, Path]:
    pytest.importorskip("litert_lm", reason=NO_LITERT_LM)
    from gemma_edge.convert.pipeline import convert

    d = tmp_path_factory.mktemp(f"litertlm-{request.param}")
    model = d / f"gemma3-270m-{request.param}.tflite"
    convert(real_gguf, str(model), quant=request.param, max_context=REAL_CONTEXT,
            prefill_lengths=REAL_PREFILL, progress=False)
    return request.param, model, pack(model)


@pytest.mark.slow
def test_litert_lm_greedy_matches_gemma_edge_on_the_real_model(real_pair, tmp_path):
    """Converting the 270M takes ~1-2 min per preset here, so the pair is in the slow tier."""
    quant, model_path, packed_path = real_pair
    engine = litert_engine(packed_path, tmp_path / "cache")
    try:
        compare_on_real_model(engine, quant, model_path)
    finally:
        engine.close()


def compare_on_real_model(engine, quant: str, model_path: Path) -> None:
    import gemma_edge

    m = gemma_edge.load(model_path)
    assert len(m.encode(REAL_PROMPTS["long"])) > max(read_info(str(model_path)).prefill_lengths)
    for name, prompt in REAL_PROMPTS.items():
        ours = m.generate(prompt, max_tokens=REAL_NEW_TOKENS, temperature=0)
        theirs, n_in, n_out = litert_greedy(engine, prompt, REAL_NEW_TOKENS)
        print(f"\n{quant} {name}: {ours.prompt_tokens} prompt tokens -> {theirs!r}")
        assert theirs == ours.text, f"{quant}, prompt {name!r}: " + explain_divergence(
            m, m.encode(prompt), ours, theirs)
        assert (n_in, n_out) == (ours.prompt_tokens, len(ours.tokens))

    # a chat turn: LiteRT-LM renders the file's jinja template, gemma-edge runtime/chat.py
    rendered, reply, n_out = litert_chat(engine, REAL_CHAT, REAL_NEW_TOKENS)
    conv = m.chat()
    ours = list(conv.send(REAL_CHAT, max_tokens=REAL_NEW_TOKENS, temperature=0))
    ours_text = "".join(r.text for r in ours)
    assert m.tokenizer.encode(rendered, add_bos=True, parse_special=True) == conv.tokens[:ours[-1].prompt_tokens]
    print(f"{quant} chat: {reply!r}")
    assert reply == ours_text, f"{quant} chat: gemma-edge {ours_text!r}, LiteRT-LM {reply!r}"
    assert n_out == len(ours)
