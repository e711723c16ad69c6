"""Embeddings: a tiny random EmbeddingGemma, built here with transformers and
sentence-transformers, against gemma-edge.

The model has EmbeddingGemma's switches at a small size: a Gemma 3 text model with
``use_bidirectional_attention`` (a sliding window of 8, so sliding layers see 4 positions each
way, shorter than the texts), five sliding layers and a global one, mean pooling, two
Dense layers (64 -> 96 -> 64, no bias) and Normalize, saved by sentence-transformers with task
prompts, and a tokenizer.json whose post-processor wraps a text in <bos> ... <eos>, as
EmbeddingGemma's does. The same model is also written as llama.cpp's ``gemma-embedding`` GGUF.

Oracle: ``SentenceTransformer.encode`` (its own tokenizer, prompts and pooling). The guards
at the end show the oracle is not vacuous: causal attention, no window, another pooling or
no Dense layers each move the vectors far past the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

VOCAB, HIDDEN, DENSE = 512, 64, 96
CONTEXT, LENGTHS = 64, (16,)  # embed_16 and embed_64
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
WORDS = ("the of and to in is was for on that with as by at from his her an which or model token gemma edge "
         "phone laptop raspberry cache layer weight quantize").split()
FP32_COSINE = 0.9999


def texts(n: int, seed: int = 0, most: int = 30) -> list[str]:
    """Texts of 1 to ``most`` words of the tokenizer's corpus (up to ~50 tokens with a prompt: the context is 64)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, most + 1))) for _ in range(n)]


def _tokenizer(root: Path) -> None:
    """tokenizer.json (byte-fallback BPE, Gemma's special ids) whose post-processor adds <bos> and
    <eos>, and a tokenizer_config.json, as EmbeddingGemma's checkpoint has them."""
    from conftest import write_bpe_tokenizer_json

    path = write_bpe_tokenizer_json(root / "tokenizer.json", plain=(), merges=240,
                                    specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"))
    doc = json.loads(Path(path).read_text(encoding="utf-8"))

    def special(piece, type_id=0):
        return {"SpecialToken": {"id": piece, "type_id": type_id}}

    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special("<bos>"), {"Sequence": {"id": "A", "type_id": 0}}, special("<eos>")],
        "pair": [special("<bos>"), {"Sequence": {"id": "A", "type_id": 0}}, special("<eos>"),
                 {"Sequence": {"id": "B", "type_id": 1}}, special("<eos>", 1)],
        "special_tokens": {p: {"id": p, "ids": [i], "tokens": [p]} for p, i in (("<bos>", 2), ("<eos>", 1))}}
    Path(path).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": True, "padding_side": "right"}))


def make_embeddinggemma(root: Path, seed: int = 0):
    """A random EmbeddingGemma saved by sentence-transformers in ``root / "st"``; returns the
    SentenceTransformer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, max_position_embeddings=256,
        use_bidirectional_attention=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],  # every 6th global, as llama.cpp reads it
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    model = Gemma3TextModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.2)  # norms around 0: the (1 + w) shift matters
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    _tokenizer(base)
    dense = [Dense(HIDDEN, DENSE, bias=False, activation_function=torch.nn.Identity()),
             Dense(DENSE, HIDDEN, bias=False, activation_function=torch.nn.Identity())]
    for d in dense:
        torch.nn.init.normal_(d.linear.weight, 0.0, 0.2)
    st = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=CONTEXT), Pooling(HIDDEN, "mean"),
                                      *dense, Normalize()], prompts=PROMPTS, device="cpu")
    st.save(str(root / "st"))
    return st


@dataclasses.dataclass
class Case:
    root: Path
    st: object  # the SentenceTransformer

    @property
    def checkpoint(self) -> Path:
        return self.root / "st"

    def convert(self, quant: str = "fp32", source: Path | None = None, name: str | None = None) -> Path:
        from gemma_edge.convert.pipeline import convert

        out = self.root / f"{name or quant}.tflite"
        if not out.exists():
            convert(str(source or self.checkpoint), str(out), quant=quant, max_context=CONTEXT, embed_lengths=LENGTHS,
                    progress=False, notes=lambda line: None)
        return out

    def reference(self, batch: list[str], task: str | None = None, dim: int | None = None) -> np.ndarray:
        """sentence-transformers' vectors (truncated to ``dim`` and normalised again)."""
        v = self.st.encode(batch, prompt_name=task, truncate_dim=dim, convert_to_numpy=True, batch_size=8)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


_CASE: list[Case] = []


def embedding_case(tmp_path_factory) -> Case:
    """The model, built once per session (test_examples.py uses it too)."""
    if not _CASE:
        root = tmp_path_factory.mktemp("embeddinggemma")
        _CASE.append(Case(root, make_embeddinggemma(root)))
    return _CASE[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return embedding_case(tmp_path_factory)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def write_gguf(case: Case, path: Path, **edit) -> Path:
    """The model as llama.cpp's converter writes EmbeddingGemma (``--sentence-transformers-dense-modules``):
    arch ``gemma-embedding``, its tensor names with the norm shift baked in, ``dense_2`` / ``dense_3``,
    the config.json sliding window, mean pooling, and the vocabulary as a ``llama`` tokenizer that adds
    <bos> and <eos>. ``edit`` overrides metadata values (``{key: value}``, None drops it)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from gemma_edge.convert.hf_tokenizer import sentencepiece_from_tokenizer_json

    model = case.st[0].auto_model
    cfg = model.config
    arch = "gemma-embedding"
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "rope.freq_base": 1e6,
        "attention.sliding_window": json.loads((case.checkpoint / "config.json").read_text())["sliding_window"],
        "pooling_type": 1, "dense_2_feat_in": HIDDEN, "dense_2_feat_out": DENSE, "dense_3_feat_in": DENSE,
        "dense_3_feat_out": HIDDEN,
    }
    kv.update({k: v for k, v in edit.items() if not k.startswith("tensor:")})
    for key, value in kv.items():
        if value is not None:
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_from_tokenizer_json(case.checkpoint / "tokenizer.json"))
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA_EMBEDDING, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        gg = names.get_name("model." + hf_name, try_suffixes=(".weight",))
        assert gg, hf_name
        data = t.float().numpy().astype(np.float32)
        w.add_tensor(edit.get(f"tensor:{gg}", gg), data + 1.0 if hf_name.endswith("norm.weight") else data)
    for k, name in ((2, "dense_2.weight"), (3, "dense_3.weight")):
        w.add_tensor(name, case.st[k].linear.weight.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the oracle -------------------------------------------------------------------------------

def test_fp32_matches_sentence_transformers(case):
    import gemma_edge

    m = gemma_edge.load(str(case.convert("fp32")))
    cfg, emb = m.config, m.info.meta.embedding
    # EmbeddingGemma's switches are really on in the file, and the texts are longer than the window
    assert cfg.bidirectional and cfg.dense_dims == (DENSE, HIDDEN) and cfg.sliding_window == 8
    assert emb.prompts == PROMPTS and emb.normalize and emb.dim == HIDDEN and emb.lengths == (16, CONTEXT)
    assert m.info.meta.tokenizer.add_eos
    batch = texts(24, seed=1)
    # the checkpoint's own tokenizer (tokenizer.json, its post-processor's <bos> and <eos>) gives the same ids
    st_ids = case.st.preprocess([PROMPTS["query"] + t for t in batch[:6]])["input_ids"].tolist()
    assert [m.embedding_ids(t, "query") for t in batch[:6]] == [[i for i in ids if i != 0] for ids in st_ids]
    assert max(len(m.embedding_ids(t, "query")) for t in batch) > 2 * cfg.sliding_window
    for task in (None, "query", "document"):
        got, want = m.embed(batch, task=task), case.reference(batch, task)
        c = cosines(got, want)
        print(f"fp32 task {task}: cosine min {c.min():.7f} mean {c.mean():.7f}")
        assert c.min() > FP32_COSINE, (task, c.min())
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    one = m.embed(batch[0], task="query")
    assert one.shape == (HIDDEN,) and np.allclose(one, m.embed(batch[:1], task="query")[0], atol=1e-6)


@pytest.mark.parametrize("dim", [32, 8])
def test_matryoshka_truncation_normalises_again(case, dim):
    import gemma_edge

    m = gemma_edge.load(str(case.convert("fp32")))
    batch = texts(6, seed=2)
    got = m.embed(batch, dim=dim, task="document")
    assert got.shape == (6, dim) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, case.reference(batch, "document", dim=dim)).min() > FP32_COSINE
    full = m.embed(batch, task="document")
    assert np.allclose(got, full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True), atol=1e-5)


def test_packed_chunks_give_each_text_its_own_vector(case):
    """Several texts share one embed_<T> call (each attends only to itself): the vectors equal those of
    each text embedded alone, and fewer calls were made than texts."""
    import gemma_edge

    m = gemma_edge.load(str(case.convert("fp32")))
    batch = texts(20, seed=3, most=5)
    calls = []
    run = m.backend.embed
    m.backend.embed = lambda *a: calls.append(a[0].shape[1]) or run(*a)
    together = m.embed(batch)
    assert len(calls) <= len(batch) // 4, calls
    m.backend.embed = run
    alone = np.stack([m.embed(t) for t in batch])
    assert np.max(np.abs(together - alone)) < 1e-5


def test_interpreter_backend_gives_the_same_vectors(case):
    """The plain Interpreter (a Raspberry Pi 4's path, and tflite-runtime's) runs embed_<T> too."""
    import gemma_edge

    path = str(case.convert("fp32"))
    batch = texts(10, seed=9)
    a, b = gemma_edge.load(path, backend="interpreter"), gemma_edge.load(path)
    assert "Interpreter" in a.backend.name
    assert np.max(np.abs(a.embed(batch, task="query") - b.embed(batch, task="query"))) < 1e-5


def test_calibration_is_refused_for_an_embedding_model(case, tmp_path):
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.errors import GemmaEdgeError

    with pytest.raises(GemmaEdgeError, match="embedding model"):
        convert(str(case.checkpoint), str(tmp_path / "x.tflite"), quant="int8", calibrate="-", progress=False,
                notes=lambda line: None)
    assert not list(tmp_path.iterdir())


def test_for_draft_is_refused_for_an_embedding_model(case, tmp_path):
    """--for-draft adds a decode step over the frequent pieces; an embedding model has no decode."""
    proc = subprocess.run([str(Path(sys.executable).with_name("gemma-convert")), str(case.checkpoint), "-o",
                           str(tmp_path / "x.tflite"), "--for-draft", "-q"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--for-draft" in proc.stderr and "embedding model" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, reads", [(None, 0), (0, 0), (300, 300), (False, None), (0.0, None), (-1, None)])
def test_metadata_max_tokens(case, value, reads):
    """The checkpoint's own limit: absent, null or 0 is none; anything but a positive integer is refused."""
    from gemma_edge.runtime.modelfile import FileMeta, read_info

    d = json.loads(read_info(str(case.convert("fp32"))).meta.to_json())
    d["embedding"]["max_tokens"] = value
    if reads is None:
        with pytest.raises(ValueError, match="embedding max_tokens"):
            FileMeta.from_dict(d)
    else:
        assert FileMeta.from_dict(d).embedding.max_tokens == reads


def test_int8_cosine(case, record_property):
    import gemma_edge

    m = gemma_edge.load(str(case.convert("int8")))
    assert m.info.quant == "int8" and m.info.meta.quantization.tensors["dense_0"] == "int8"
    batch = texts(24, seed=4)
    c = cosines(m.embed(batch, task="query"), case.reference(batch, "query"))
    record_property("int8_cosine_min", float(c.min()))
    record_property("int8_cosine_mean", float(c.mean()))
    print(f"int8 against sentence-transformers: cosine min {c.min():.5f}, mean {c.mean():.5f} over {len(batch)} texts")
    assert c.min() > 0.995 and c.mean() > 0.998


def test_gemma_embedding_gguf_converts_to_the_same_vectors(case):
    import gemma_edge
    from gemma_edge.convert.st_layout import EMBEDDINGGEMMA_PROMPTS

    path = case.convert("fp32", source=write_gguf(case, case.root / "model.gguf"), name="fp32-from-gguf")
    m, hf = gemma_edge.load(str(path)), gemma_edge.load(str(case.convert("fp32")))
    # the same model read from two formats (GGUF stores the epsilon as float32; it has no max_position
    # of its own but the context_length key, and no prompts: EmbeddingGemma's published ones are stored)
    assert m.config == dataclasses.replace(hf.config, rms_norm_eps=m.config.rms_norm_eps)
    assert m.info.meta.embedding.prompts == EMBEDDINGGEMMA_PROMPTS and m.info.meta.tokenizer.add_eos
    batch = texts(16, seed=5)
    c = cosines(m.embed(batch, task="query"), case.reference(batch, "query"))
    assert c.min() > FP32_COSINE, c.min()


# ---- the oracle can fail ----------------------------------------------------------------------

def _variant(case: Case, **change):
    """A copy of the sentence-transformers model with one thing computed differently."""
    import copy

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    st = copy.deepcopy(case.st)
    model = st[0].auto_model
    if change.get("causal"):
        model.config.use_bidirectional_attention = False
        for layer in model.layers:
            layer.self_attn.is_causal = True
    if change.get("no_window"):
        model.config.sliding_window = 10_000
        for layer in model.layers:
            layer.self_attn.sliding_window = None
    modules = list(st)
    if "pooling" in change:
        modules[1] = Pooling(HIDDEN, change["pooling"])
    if change.get("no_dense"):
        modules = [modules[0], modules[1], modules[4]]
    return SentenceTransformer(modules=modules, prompts=PROMPTS, device="cpu")


@pytest.mark.parametrize("change", [{"causal": True}, {"no_window": True}, {"pooling": "cls"}, {"pooling": "lasttoken"},
                                    {"no_dense": True}], ids=lambda c: next(iter(c)) + ("=" + str(c.get("pooling", ""))).rstrip("="))
def test_the_oracle_sees_what_the_vectors_depend_on(case, change):
    """Guards against a vacuous oracle: had gemma-edge attended causally, ignored the window, pooled
    another way or skipped the Dense layers, its vectors would miss FP32_COSINE by far."""
    batch = texts(12, seed=6)
    other = _variant(case, **change).encode(batch, prompt_name="query", convert_to_numpy=True)
    c = cosines(other, case.reference(batch, "query"))
    print(f"{change}: cosine to the reference min {c.min():.4f}")
    assert c.min() < 0.999


# ---- long texts ---------------------------------------------------------------------------------

def test_a_text_over_the_context_is_refused_or_truncated_as_sentence_transformers_does(case):
    import gemma_edge
    from gemma_edge.runtime.errors import EmbeddingError

    m = gemma_edge.load(str(case.convert("fp32")))
    long = " ".join(["model cache"] * 40)
    with pytest.raises(EmbeddingError, match=r"takes \d+ tokens .* 64 .*truncate"):
        m.embed([texts(1)[0], long], task="query")
    ids = m.embedding_ids(long, task="query", truncate=True)
    assert len(ids) == CONTEXT and ids[0] == 2 and ids[-1] == 1
    got = m.embed([long, "the model"], task="query", truncate=True)
    # sentence-transformers cuts at its max_seq_length (64 here) and keeps <eos> last, as gemma-edge does
    assert cosines(got, case.reference([long, "the model"], "query")).min() > FP32_COSINE


def test_bad_requests(case):
    import gemma_edge
    from gemma_edge.runtime.errors import EmbeddingError

    m = gemma_edge.load(str(case.convert("fp32")))
    for kwargs, says in (({"task": "Clustering"}, "document, query"), ({"dim": 0}, "from 1 to 64"),
                         ({"dim": 65}, "from 1 to 64"), ({"dim": 2.5}, "integer")):
        with pytest.raises(EmbeddingError, match=says):
            m.embed(["the model"], **kwargs)
    with pytest.raises(EmbeddingError, match="string"):
        m.embed([b"bytes"])
    with pytest.raises(EmbeddingError, match="outside the vocabulary"):
        m.embed_ids([[2, VOCAB, 1]])
    assert m.embed([]).shape == (0, HIDDEN)


def test_the_file_has_only_cache_free_signatures(case):
    """No KV cache, so no decode: not the long-context decode_s<S'> either, whatever the context."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma_edge.runtime import contract
    from gemma_edge.runtime.modelfile import read_info

    path = str(case.convert("fp32"))
    info = read_info(path)
    sigs = Interpreter(model_path=path).get_signature_list()
    assert sorted(sigs) == sorted(contract.embed_name(T) for T in info.embed_lengths) and not info.decode_spans
    assert not [n for sig in sigs.values() for n in sig["inputs"] if contract.parse_kv_name(n)]
    assert contract.signature_names([8], [32], contract.decode_spans(32768), [32, 128]) == ["embed_32", "embed_128"]
    assert contract.parse_signature("embed_128") == (128, contract.POOLED, None)


def test_packing_plan():
    from gemma_edge.runtime.contract import embed_slots
    from gemma_edge.runtime.embedding import plan

    rng = np.random.default_rng(0)
    for sizes in ([16, 64], [32, 128, 512, 2048], [2048]):
        lengths = [int(n) for n in rng.integers(2, max(sizes) + 1, 300)] + [2] * 50
        chunks = plan(lengths, sizes)
        assert sorted(i for _, members in chunks for i in members) == list(range(len(lengths)))
        for T, members in chunks:
            assert T in sizes and sum(lengths[i] for i in members) <= T and len(members) <= embed_slots(T)
            smaller = [t for t in sizes if t < T]
            if len(members) == 1 and smaller:  # a text alone runs through the smallest signature that holds it
                assert lengths[members[0]] > smaller[-1]
    # short texts share chunks of up to 512 tokens, a text per 8 tokens at most
    assert [(T, len(m)) for T, m in plan([10] * 100, [32, 128, 512, 2048])] == [(512, 51), (512, 49)]
    assert [(T, len(m)) for T, m in plan([3] * 5, [32, 128])] == [(128, 5)]  # embed_32 holds 4 texts


# ---- the CLI, the server, and the other kind of model -----------------------------------------

@pytest.fixture(scope="module")
def fp32(case) -> Path:
    return case.convert("fp32")


@pytest.fixture(scope="module")
def generative(tmp_path_factory, sp_model_path) -> Path:
    from conftest import tiny_gemma3

    return tiny_gemma3(tmp_path_factory, sp_model_path).model_file


def test_cli_embed_prints_json_lines(fp32, tmp_path):
    import gemma_edge
    from test_cli import GEMMA_EDGE, cli

    batch = texts(5, seed=7)
    (tmp_path / "texts.txt").write_text("\n".join(batch[1:3]) + "\n\n", encoding="utf-8")
    r = cli(GEMMA_EDGE, "embed", fp32, batch[0], "-f", tmp_path / "texts.txt", "--task", "document", "--dim", "16")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    m = gemma_edge.load(str(fp32))
    want = m.embed(batch[:3], task="document", dim=16)
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert [row["tokens"] for row in rows] == [len(m.embedding_ids(t, "document")) for t in batch[:3]]
    assert np.allclose(np.array([row["embedding"] for row in rows]), want, atol=1e-6)
    r = cli(GEMMA_EDGE, "embed", fp32, "-f", "-", stdin="\n".join(batch[3:]))
    assert r.returncode == 0 and np.allclose([json.loads(x)["embedding"] for x in r.stdout.splitlines()],
                                             m.embed(batch[3:]), atol=1e-6)


def test_cli_embed_bad_input(fp32, generative, tmp_path):
    from test_cli import GEMMA_EDGE, assert_user_error, cli

    long = " ".join(["model cache"] * 40)
    assert_user_error(cli(GEMMA_EDGE, "embed", fp32), "gemma-edge", "nothing to embed")
    assert_user_error(cli(GEMMA_EDGE, "embed", fp32, "x", "--task", "nope"), "gemma-edge", "nope", "document, query")
    assert_user_error(cli(GEMMA_EDGE, "embed", fp32, "x", "--dim", "65"), "gemma-edge", "from 1 to 64")
    assert_user_error(cli(GEMMA_EDGE, "embed", fp32, long), "gemma-edge", "tokens", "--truncate")
    assert cli(GEMMA_EDGE, "embed", fp32, long, "--truncate").returncode == 0
    assert_user_error(cli(GEMMA_EDGE, "embed", fp32, "-f", str(tmp_path / "texts.txt")), "gemma-edge", "texts.txt")
    assert_user_error(cli(GEMMA_EDGE, "embed", generative, "x"), "gemma-edge", "not an embedding model")
    # an embedding file given to the generative commands
    assert_user_error(cli(GEMMA_EDGE, "run", fp32, "-p", "hi"), "gemma-edge", "embedding model", "gemma-edge embed")
    assert_user_error(cli(GEMMA_EDGE, "bench", fp32, "--runs", "1"), "gemma-edge", "embedding model")
    assert_user_error(cli(GEMMA_EDGE, "pack", fp32), "gemma-edge", "embedding model")
    r = cli(GEMMA_EDGE, "info", fp32)
    assert r.returncode == 0 and "bidirectional attention, mean pooling, Dense 64 -> 96 -> 64" in r.stdout
    assert "tasks         document, query" in r.stdout and "embed chunks 16, 64" in r.stdout


def test_api_refuses_the_other_kind(fp32, generative):
    import gemma_edge
    from gemma_edge.runtime.errors import ModelKindError

    emb, gen = gemma_edge.load(str(fp32)), gemma_edge.load(str(generative))
    with pytest.raises(ModelKindError, match="embedding model"):
        emb.generate("the model", max_tokens=2)
    for call in (lambda: emb.chat(), lambda: emb.perplexity("the model"), lambda: emb.benchmark(4, 4, 1)):
        with pytest.raises(ModelKindError):
            call()
    with pytest.raises(ModelKindError, match="not an embedding model"):
        gen.embed("the model")
    for model, draft in ((emb, generative), (gen, fp32)):  # speculative decoding: both must generate
        with pytest.raises(ModelKindError, match=f"{emb.info.path} is an embedding model"):
            model.set_draft(str(draft))
    assert gen.draft is None


@pytest.fixture(scope="module")
def server(fp32):
    import gemma_edge
    from test_server import running

    with running(gemma_edge.load(str(fp32))) as srv:
        yield srv


def test_server_embeddings_with_the_openai_client(server, fp32):
    import base64

    import openai

    import gemma_edge

    m = gemma_edge.load(str(fp32))
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    batch = texts(6, seed=8)
    r = client.embeddings.create(model="text-embedding-3-small", input=batch, encoding_format="float")
    assert r.model == fp32.stem and [d.index for d in r.data] == list(range(6))
    assert np.allclose([d.embedding for d in r.data], m.embed(batch), atol=1e-6)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(m.embedding_ids(t)) for t in batch)
    r = client.embeddings.create(model="x", input=batch[0], dimensions=16, extra_body={"task": "query"})
    assert np.allclose(r.data[0].embedding, m.embed(batch[0], dim=16, task="query"), atol=1e-6)
    from test_server import request

    status, _, body = request(server, "POST", "/v1/embeddings", {"input": batch[:2], "encoding_format": "base64"})
    assert status == 200
    got = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]]
    assert np.allclose(got, m.embed(batch[:2]), atol=1e-7)


@pytest.mark.parametrize("body,param,says", [
    ({"input": []}, "input", "non-empty"),
    ({"input": [1, 2, 3]}, "input", "token ids"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": "x", "dimensions": 0}, "dimensions", "1 to 64"),
    ({"input": "x", "dimensions": 65}, "dimensions", "1 to 64"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "base64"),
    ({"input": "x", "task": "Clustering"}, "task", "document, query"),
    ({"input": "x", "truncate": "yes"}, "truncate", "true or false"),
    ({"input": ["x", " ".join(["model cache"] * 40)]}, "input[1]", "truncate"),
    ({"input": ["x", "bad \ud800 text"]}, "input[1]", "not valid UTF-8"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_server_embeddings_bad_requests(server, body, param, says):
    from test_server import assert_error, request

    status, _, answer = request(server, "POST", "/v1/embeddings", body)
    assert says in assert_error(status, answer, 400, param=param)


def test_server_long_input_code_and_truncation(server):
    from test_server import assert_error, request

    long = " ".join(["model cache"] * 40)
    status, _, answer = request(server, "POST", "/v1/embeddings", {"input": long})
    assert_error(status, answer, 400, code="context_length_exceeded")
    status, _, answer = request(server, "POST", "/v1/embeddings", {"input": long, "truncate": True})
    assert status == 200 and answer["usage"]["prompt_tokens"] == CONTEXT


def test_server_kinds(server, generative):
    import gemma_edge
    from test_server import assert_error, request, running

    for route in ("/v1/chat/completions", "/v1/completions"):
        status, _, answer = request(server, "POST", route, {"messages": [{"role": "user", "content": "hi"}],
                                                            "prompt": "hi"})
        assert "/v1/embeddings" in assert_error(status, answer, 400, code="model_not_generative")
    with running(gemma_edge.load(str(generative))) as srv:
        status, _, answer = request(srv, "POST", "/v1/embeddings", {"input": "hi"})
        assert_error(status, answer, 400, code="model_not_embedding")


# ---- checkpoints gemma-edge refuses, with the reason --------------------------------------------

def _edited(case: Case, tmp_path: Path, edit) -> Path:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(case.checkpoint, ckpt)
    edit(ckpt)
    return ckpt


def _json_edit(file: str, change: dict):
    def edit(ckpt: Path):
        doc = json.loads((ckpt / file).read_text())
        doc.update(change)
        (ckpt / file).write_text(json.dumps(doc))
    return edit


@pytest.mark.parametrize("what,edit,says", [
    ("no sentence-transformers files", lambda c: (c / "modules.json").unlink(), "modules.json"),
    ("CLS pooling", _json_edit("1_Pooling/config.json", {"pooling_mode": "cls"}), "pooling is 'cls'"),
    ("the prompt left out of the mean", _json_edit("1_Pooling/config.json", {"include_prompt": False}),
     "include_prompt"),
    ("a Dense bias", _json_edit("2_Dense/config.json", {"bias": True}), "bias"),
    ("a Dense activation", _json_edit("3_Dense/config.json", {"activation_function": "torch.nn.modules.activation.Tanh"}),
     "Tanh"),
    ("a Dense layer of another model", _json_edit("2_Dense/config.json", {"in_features": 32}), "32 features"),
    ("a missing Dense weight", lambda c: (c / "3_Dense" / "model.safetensors").unlink(), "3_Dense"),
    ("a default prompt it does not have", _json_edit("config_sentence_transformers.json",
                                                     {"default_prompt_name": "nope"}), "nope"),
    ("a module gemma-edge does not compute", lambda c: (c / "modules.json").write_text(json.dumps(
        json.loads((c / "modules.json").read_text())[:4] + [{"idx": 4, "name": "4", "path": "4_LayerNorm",
                                                             "type": "sentence_transformers.models.LayerNorm"}])),
     "LayerNorm"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_bad_embedding_checkpoints_exit_2(case, tmp_path, what, edit, says):
    from test_cli import GEMMA_CONVERT, cli

    r = cli(GEMMA_CONVERT, _edited(case, tmp_path, edit), "-o", tmp_path / "out.tflite", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr and says in r.stderr, (what, r.stderr)
    assert not list(tmp_path.glob("*.tflite"))


def test_gguf_with_another_pooling_exits_2(case, tmp_path):
    from test_cli import GEMMA_CONVERT, cli

    path = write_gguf(case, tmp_path / "cls.gguf", pooling_type=2)
    r = cli(GEMMA_CONVERT, path, "-o", tmp_path / "out.tflite", "-q")
    assert r.returncode == 2 and "pooling_type is 2" in r.stderr, r.stderr
