"""Gemma 4 (E2B/E4B text) against transformers' own implementation, on tiny models made here.

Three variants, each a Gemma4ForCausalLM with random norms and layer scales (so a missed
(1 + w) or scale shows) and briefly trained on chat-formatted text with a thinking channel
(so its distributions are peaked and it writes Gemma 4's markers):

* ``e2b``: E2B's switches: per-layer embeddings, KV sharing (the last 2 of 6 layers), sliding
  head dim 16 and global head dim 32, a sliding window (8) shorter than the sequence,
  proportional RoPE on global layers (4 of 16 pairs rotate), the final soft-cap;
* ``keqv``: ``attention_k_eq_v`` with 2 global KV heads (global layers have no V weights);
* ``wide``: ``use_double_wide_mlp`` (the KV-sharing layers' FFN is twice as wide).

The layer pattern [S, S, S, F, S, F] keeps llama.cpp's assumption about which layers the
shared ones read (``first_shared - 1`` global, ``- 2`` sliding), so the GGUF written here in
llama.cpp's Gemma 4 names is one llama.cpp would load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROMPT_LEN, DECODE_STEPS, CONTEXT, PREFILL = 40, 16, 64, (8, 32)
VOCAB, SP_VOCAB = 512, 400
BOS, EOS, TURN, END_TURN, CHANNEL, END_CHANNEL, THINK = 2, 1, 4, 5, 6, 7, 8  # the test tokenizer's ids
TIE_MARGIN = 0.25  # as test_oracle.py: a reference step counts for argmax agreement only past this margin
VARIANTS = {
    "e2b": {},
    "keqv": {"attention_k_eq_v": True, "num_global_key_value_heads": 2},
    "wide": {"use_double_wide_mlp": True},
}


def tiny_config(variant: str = "e2b", **overrides):
    from transformers import Gemma4TextConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=8,
              vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=32, num_kv_shared_layers=2,
              layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"],
              final_logit_softcapping=30.0, max_position_embeddings=256, pad_token_id=0, bos_token_id=BOS,
              eos_token_id=[EOS, END_TURN],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                  "rope_theta": 1000000.0}})
    return Gemma4TextConfig(**{**kw, **VARIANTS[variant], **overrides})


def chat_samples(sp_model_path: str, n: int, seed: int) -> list[list[int]]:
    """Chat turns in Gemma 4's format whose replies think first: <bos><|turn>user\\n..<turn|>\\n
    <|turn>model\\n<|channel>thought\\n..<channel|>..<turn|>"""
    from gemma_edge.runtime.tokenizer import Tokenizer

    from conftest import _corpus

    tok = Tokenizer(Path(sp_model_path).read_bytes())
    lines = _corpus(3 * n, seed=seed)
    out = []
    for k in range(n):  # short thoughts and answers: a tiny model learns to close its channel and turn
        user, thought, answer = (" ".join(lines[3 * k + j].split()[:3]) for j in range(3))
        text = (f"<|turn>user\n{user}<turn|>\n<|turn>model\n<|channel>thought\n{thought}<channel|>"
                f"{answer}<turn|>")
        out.append(tok.encode(text, add_bos=True, parse_special=True))
    return out


def _train(model, sp_model_path: str, steps: int, seq_len: int = 48, batch: int = 16) -> None:
    """Adam on a mix of plain text and chat turns: peaked distributions, and the chat markers."""
    import torch

    from conftest import corpus_ids

    torch.set_num_threads(1)
    plain = torch.tensor(corpus_ids(sp_model_path, 20000, seed=7))
    chats = [torch.tensor(c[:seq_len]) for c in chat_samples(sp_model_path, 400, seed=11)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        if step % 2:
            idx = torch.randint(0, len(chats), (batch,), generator=g)
            x = torch.nn.utils.rnn.pad_sequence([chats[i] for i in idx], batch_first=True, padding_value=0)
            labels = x.masked_fill(x == 0, -100)
        else:
            starts = torch.randint(0, len(plain) - seq_len - 1, (batch,), generator=g)
            x = labels = torch.stack([plain[s:s + seq_len] for s in starts])
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_gemma4(variant: str, out_dir: Path, sp_model_path: str, train_steps: int = 150, seed: int = 4):
    """A transformers Gemma4ForCausalLM saved as a real HF checkpoint; returns the model."""
    import torch
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(variant)
    model = Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma 4 norms multiply by w itself: around 1, not 0
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.normal_(1.0, 0.2)
    if train_steps:
        _train(model, sp_model_path, train_steps)
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy(sp_model_path, Path(out_dir) / "tokenizer.model")
    return model


@dataclasses.dataclass
class Case:
    variant: str
    root: Path
    model: object
    seq: list[int]
    ref: np.ndarray  # transformers' logits of seq [len, V]

    @property
    def checkpoint(self) -> Path:
        return self.root / "ckpt"

    def convert(self, quant: str, source: Path | None = None, name: str | None = None) -> Path:
        from gemma_edge.convert.pipeline import convert

        out = self.root / f"{name or quant}.tflite"
        if not out.exists():
            convert(str(source or self.checkpoint), str(out), quant=quant, max_context=CONTEXT,
                    prefill_lengths=PREFILL, progress=False)
        return out


_CASES: dict[str, Case] = {}


def gemma4_case(variant: str, tmp_path_factory, sp_model_path: str) -> Case:
    """One trained tiny model per variant per session (other modules share the e2b one)."""
    if variant not in _CASES:
        from conftest import corpus_ids, hf_logits

        root = tmp_path_factory.mktemp(f"gemma4_{variant}")
        model = make_gemma4(variant, root / "ckpt", sp_model_path)
        seq = [BOS] + corpus_ids(sp_model_path, PROMPT_LEN + DECODE_STEPS - 1, seed=99)
        _CASES[variant] = Case(variant, root, model, seq, hf_logits(model, seq))
    return _CASES[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory, g4_tokenizer) -> Case:
    return gemma4_case(request.param, tmp_path_factory, g4_tokenizer)


def run_file(path, seq, kind: str = "auto") -> np.ndarray:
    """Prefill seq[:PROMPT_LEN-1] (prefill_32 + prefill_8), then decode the rest; logits per decode step."""
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    backend = make_backend(read_info(str(path)), kind=kind)
    run_prefill(backend, seq[:PROMPT_LEN - 1], 0)
    return np.stack([backend.decode(seq[p], p).copy() for p in range(PROMPT_LEN - 1, PROMPT_LEN - 1 + DECODE_STEPS)])


def _want(case: Case) -> np.ndarray:
    return case.ref[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]


# ---- the oracle -------------------------------------------------------------------------------

def test_fp32_matches_transformers(case):
    from gemma_edge.runtime.modelfile import read_info

    path = case.convert("fp32")
    cfg = read_info(str(path)).config
    # the switches under test are really on in the file
    assert cfg.family == 4 and cfg.ple_dim == 32 and cfg.kv_shared_layers == 2 and cfg.final_softcap == 30.0
    assert (cfg.head_dim_for(0), cfg.head_dim_for(3)) == (16, 32) and cfg.global_rope_fraction == 0.25
    assert cfg.sliding_window < PROMPT_LEN - 1
    assert cfg.k_eq_v == (case.variant == "keqv") and cfg.double_wide_mlp == (case.variant == "wide")
    got, want = run_file(path, case.seq), _want(case)
    rel = [float(np.max(np.abs(got[s] - want[s])) / np.max(np.abs(want[s]))) for s in range(DECODE_STEPS)]
    print(f"gemma4 {case.variant} fp32: worst relative max logit error over {DECODE_STEPS} steps {max(rel):.2e}")
    for step, r in enumerate(rel):
        assert r < 1e-4, f"{case.variant} step {step}: relative max error {r:.2e}"


def test_every_prefill_split_gives_the_same_logits(case):
    """Chunked prefill (32 + 8, or 8s only, or token by token) and decode agree: the cache and
    the shared layers read what was written, wherever a chunk ends."""
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    info = read_info(str(case.convert("fp32")))
    want = _want(case)[0]
    only_8 = make_backend(dataclasses.replace(info, meta=dataclasses.replace(info.meta, prefill_lengths=(8,))))
    run_prefill(only_8, case.seq[:PROMPT_LEN - 1], 0)  # five chunks of 8, the last padded
    by_token = make_backend(info)
    for p in range(PROMPT_LEN - 1):
        by_token.decode(case.seq[p], p)
    for name, backend in (("prefill_8 only", only_8), ("decode only", by_token)):
        got = backend.decode(case.seq[PROMPT_LEN - 1], PROMPT_LEN - 1)
        assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want)), name


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-emb"])
def test_quantized_statistics(case, quant, record_property):
    got, want = run_file(case.convert(quant), case.seq), _want(case)
    same = got.argmax(-1) == want.argmax(-1)
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN
    agree, agree_clear = float(np.mean(same)), float(np.mean(same[clear]))
    mae, scale = float(np.mean(np.abs(got - want))), float(np.mean(np.abs(want)))
    record_property("argmax_agreement", agree)
    print(f"gemma4 {case.variant} {quant}: argmax agreement {agree:.3f} ({agree_clear:.3f} on the "
          f"{int(clear.sum())} clear steps); mean |logit error| {mae:.4f} (mean |logit| {scale:.3f})")
    assert clear.sum() >= DECODE_STEPS // 2
    if quant == "int8":  # the bounds test_oracle.py holds Gemma 1-3 to
        assert agree_clear >= 0.95 and agree >= 0.75 and mae < 0.05 * scale
    else:  # int4 blocks on the FFN (int4) or the embedding (int4-emb, its rows of frequent pieces split
        # off as an int8 table) and the per-layer embeddings: looser, still the same model
        assert agree_clear >= 0.85 and agree >= 0.65 and mae < 0.15 * scale


def _with_config(model, **changes):
    """The same weights under a config with ``changes`` (a transformers model)."""
    from transformers import Gemma4ForCausalLM

    cfg = model.config.to_dict()
    for k in ("per_layer_config", "transformers_version", "architectures"):
        cfg.pop(k, None)
    rope = json.loads(json.dumps(cfg.pop("rope_parameters")))
    if "partial_rotary_factor" in changes:
        rope["full_attention"]["partial_rotary_factor"] = changes.pop("partial_rotary_factor")
    alt = Gemma4ForCausalLM(type(model.config)(**{**cfg, **changes, "rope_parameters": rope, "global_head_dim": 32}))
    alt.load_state_dict(model.state_dict())
    return alt.eval()


def test_the_switches_matter(case):
    """Guard against a vacuous oracle: with a switch off, transformers' own logits change."""
    from conftest import hf_logits

    if case.variant == "keqv":
        pytest.skip("k_eq_v removes the V weights: a file that ignored it could not be built at all")
    if case.variant == "wide":
        alts = {"the wide half of the FFN": _zeroed(case.model, lambda m: [
            layer.mlp.down_proj.weight.data[:, 128:].zero_() for layer in m.model.layers[4:]])}
    else:
        alts = {"per-layer inputs": _zeroed(case.model, lambda m: [
                    layer.per_layer_input_gate.weight.data.zero_() for layer in m.model.layers]),
                "partial RoPE": _with_config(case.model, partial_rotary_factor=1.0),
                "the soft-cap": _with_config(case.model, final_logit_softcapping=None),
                "the sliding window": _with_config(case.model, sliding_window=1000)}
    for what, alt in alts.items():
        diff = np.max(np.abs(hf_logits(alt, case.seq)[PROMPT_LEN:] - case.ref[PROMPT_LEN:]))
        assert diff > 1e-2, f"{what} does not change the logits ({diff:.1e})"


def _zeroed(model, edit):
    import copy

    alt = copy.deepcopy(model)
    edit(alt)
    return alt


def test_interpreter_backend_matches(case):
    """The fallback without CompiledModel (tflite-runtime) runs the same file the same way."""
    got = run_file(case.convert("fp32"), case.seq, kind="interp")
    want = _want(case)
    assert (np.max(np.abs(got - want), axis=-1) / np.max(np.abs(want), axis=-1)).max() < 1e-4


def test_file_holds_caches_only_for_producer_layers(case):
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.modelfile import read_info

    cfg = read_info(str(case.convert("fp32"))).config
    assert contract.kv_layers(cfg) == [0, 1, 2, 3]
    assert [cfg.kv_source(i) for i in (4, 5)] == [2, 3]  # the last sliding and global layer before them
    shapes = contract.kv_shapes(cfg, CONTEXT)
    global_kv = 2 if case.variant == "keqv" else 1
    assert shapes["kv_cache_k_2"] == (1, 1, CONTEXT, 16) and shapes["kv_cache_k_3"] == (1, global_kv, CONTEXT, 32)
    assert "kv_cache_k_4" not in shapes


# ---- GGUF: the same model in llama.cpp's Gemma 4 names -------------------------------------------

def write_gemma4_gguf(model, sp_model_path: str, path: Path, **edit) -> Path:
    """``model`` as llama.cpp's converter writes Gemma 4: its tensor names, no norm shift, no
    transposes, ``layer_scalar`` as ``layer_output_scale.weight``, the proportional RoPE as
    ``rope_freqs.weight``, per-layer sizes as arrays; the SentencePiece vocabulary as a
    ``llama`` tokenizer. ``edit`` overrides metadata values (``{key: value}``, None drops it)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    cfg = model.config
    n = cfg.num_hidden_layers
    types = list(cfg.layer_types)
    hd_f = 32
    by_type = {}  # KV heads per layer type, from the K projections of the layers that have one
    for i, t in enumerate(types):
        k = getattr(model.model.layers[i].self_attn, "k_proj", None)
        if k is not None:
            by_type[t] = k.weight.shape[0] // (16 if t == "sliding_attention" else hd_f)
    heads_kv = [by_type[t] for t in types]
    w = gguf.GGUFWriter(str(path), "gemma4")
    kv = {
        "block_count": n, "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "feed_forward_length": [model.model.layers[i].mlp.gate_proj.weight.shape[0] for i in range(n)],
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": heads_kv if len(set(heads_kv)) > 1 else heads_kv[0],
        "attention.key_length": hd_f, "attention.value_length": hd_f,
        "attention.key_length_swa": 16, "attention.value_length_swa": 16,
        "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "attention.sliding_window": cfg.sliding_window,
        "attention.sliding_window_pattern": [t == "sliding_attention" for t in types],
        "attention.shared_kv_layers": cfg.num_kv_shared_layers,
        "embedding_length_per_layer_input": cfg.hidden_size_per_layer_input,
        "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4, "rope.dimension_count": hd_f,
        "rope.dimension_count_swa": 16, "final_logit_softcapping": cfg.final_logit_softcapping,
    }
    kv.update({k: v for k, v in edit.items() if not k.startswith("tensor:")})
    for key, value in kv.items():
        if value is None:
            continue
        name = f"gemma4.{key}"
        if isinstance(value, list):
            w.add_array(name, value)
        elif isinstance(value, float):
            w.add_float32(name, value)
        else:
            w.add_uint32(name, value)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model_path).read_bytes())
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([{1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}[p.type] for p in proto.pieces])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue
        short = hf_name + ".weight" if hf_name.endswith("layer_scalar") else hf_name  # as llama.cpp does
        gg = names.get_name(short, try_suffixes=(".weight",))
        assert gg, hf_name
        data = t.float().numpy().astype(np.float32)
        w.add_tensor(edit.get(f"tensor:{gg}", gg), data)
    n_rot = int(0.25 * hd_f // 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * n_rot + [1e30] * (hd_f // 2 - n_rot), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_in_llama_cpp_names_converts_to_the_same_logits(case, g4_tokenizer):
    gguf_path = write_gemma4_gguf(case.model, g4_tokenizer, case.root / "model.gguf")
    from_gguf = case.convert("fp32", source=gguf_path, name="fp32-from-gguf")
    from gemma_edge.runtime.modelfile import read_info

    a, b = read_info(str(case.convert("fp32"))), read_info(str(from_gguf))
    # the same model read from two formats (GGUF stores the epsilon as float32)
    assert a.config == dataclasses.replace(b.config, rms_norm_eps=a.config.rms_norm_eps)
    got, want = run_file(from_gguf, case.seq), _want(case)
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert rel < 1e-4, f"{case.variant}: {rel:.2e}"


# ---- the runtime, chat, server and tools on a Gemma 4 file ---------------------------------------

@pytest.fixture(scope="module")
def e2b(tmp_path_factory, g4_tokenizer) -> Case:
    return gemma4_case("e2b", tmp_path_factory, g4_tokenizer)


@pytest.fixture(scope="module")
def e2b_file(e2b) -> Path:
    return e2b.convert("fp32")


def test_a_for_draft_file_gives_transformers_logits_at_the_hot_rows(e2b, tmp_path):
    """decode_hot (``--for-draft``) on Gemma 4: per-layer embeddings and the final softcap are
    applied to the hot table's rows and to ``extra_ids``' rows only, which must be transformers'
    logits at those ids."""
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    out = tmp_path / "draft.tflite"
    convert(str(e2b.checkpoint), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL,
            progress=False, score_length=0, for_draft=True)
    info = read_info(str(out))
    hot = contract.hot_ids(info.config)
    assert info.decode_hot and info.config.final_softcap and 0 < len(hot) < info.config.vocab_size
    extra = np.array([t for t in range(info.config.vocab_size) if t not in set(hot)][-contract.HOT_EXTRA:], np.int32)
    backend = make_backend(info)
    run_prefill(backend, e2b.seq[:PROMPT_LEN - 1], 0)
    got = np.stack([backend.decode_hot(e2b.seq[p], p, extra).copy()
                    for p in range(PROMPT_LEN - 1, PROMPT_LEN - 1 + DECODE_STEPS)])
    want = _want(e2b)[:, hot + extra.tolist()]
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 1e-4


def _hf_greedy(model, ids: list[int], n: int, stops=(EOS, END_TURN)) -> list[int]:
    """transformers' greedy continuation, step by step (no generate(): id 0 is its padding)."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(t)
            if t in stops:
                break
    return out[len(ids):]


def test_chat_thinks_then_answers_apart_like_transformers(e2b, e2b_file):
    """The trained tiny model writes <|channel>thought\\n...<channel|> then its answer: the tokens are
    transformers' greedy ones, the thoughts come as ``reasoning`` and the answer as ``text``."""
    import gemma_edge

    m = gemma_edge.load(str(e2b_file))
    assert m.chat_format.name == "gemma4"
    ids = m.encode_chat([{"role": "user", "content": "the model"}])
    assert ids[:2] == [BOS, TURN] and ids[-3:-1] == [TURN, m.tokenizer.encode("model", add_bos=False)[0]]
    r = list(m.chat().send("the model", max_tokens=30, temperature=0))
    tokens = [x.token for x in r]
    assert tokens == _hf_greedy(e2b.model, ids, 30)
    assert tokens[0] == CHANNEL and END_CHANNEL in tokens and r[-1].finish_reason == "stop"
    end = tokens.index(END_CHANNEL)
    thought = m.tokenizer.decode(tokens[1:end])
    assert thought.startswith("thought\n")
    assert "".join(x.reasoning for x in r) == thought[len("thought\n"):]
    assert "".join(x.text for x in r) == m.tokenizer.decode(tokens[end + 1:-1]) != ""


def test_thinking_is_asked_in_the_system_turn(e2b_file):
    import gemma_edge

    m = gemma_edge.load(str(e2b_file))
    text = m.render_chat([{"role": "user", "content": "hi"}], thinking=True)
    assert text == "<|turn>system\n<|think|><turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"
    assert m.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]) == (
        "<|turn>system\nBe brief.<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")  # Gemma 4 has a system turn


def _cli(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_edge.runtime.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_run_hides_the_thoughts_unless_asked(e2b_file):
    import gemma_edge

    want = gemma_edge.load(str(e2b_file)).chat().send("the model", max_tokens=30, temperature=0)
    want = list(want)
    answer, thought = "".join(x.text for x in want), "".join(x.reasoning for x in want)
    r = _cli("run", e2b_file, "--chat", "-p", "the model", "-t", "0", "-n", "30")
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer + "\n" and thought not in r.stderr
    r = _cli("run", e2b_file, "--chat", "-p", "the model", "-t", "0", "-n", "30", "--show-thinking")
    assert r.returncode == 0 and r.stdout == answer + "\n" and thought in r.stderr


def test_info_eval_bench_on_a_gemma4_file(e2b_file, tmp_path):
    r = _cli("info", e2b_file)
    assert r.returncode == 0, r.stderr
    assert "Gemma 4" in r.stdout and "last 2 layers share earlier caches (4 caches)" in r.stdout
    assert "0.25 of the pairs rotate" in r.stdout and "chat template gemma4" in r.stdout
    r = _cli("info", e2b_file, "--verify")
    assert r.returncode == 0 and "every weight byte matches" in r.stdout
    text = tmp_path / "t.txt"
    text.write_text("the model of the cache and the layer " * 5)
    r = _cli("eval", e2b_file, "--text", text, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"] > 1
    r = _cli("bench", e2b_file, "-p", "16", "-n", "8", "--runs", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decode_tps"]["median"] > 0


def test_perplexity_matches_transformers(e2b, e2b_file):
    """``eval``'s score_<T> signature (every position's logits) on Gemma 4, against transformers."""
    import torch

    import gemma_edge

    seq = e2b.seq
    got = gemma_edge.load(str(e2b_file)).perplexity(seq)
    with torch.no_grad():
        logits = e2b.model(torch.tensor([seq])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(seq[1:]))
    assert abs(got["mean_nll"] - float(nll)) < 1e-4


def test_server_returns_the_thoughts_as_reasoning_content(e2b_file):
    import threading

    import openai

    import gemma_edge
    from gemma_edge.runtime.server import make_server

    want = list(gemma_edge.load(str(e2b_file)).chat().send("the model", max_tokens=30, temperature=0))
    answer, thought = "".join(x.text for x in want), "".join(x.reasoning for x in want)
    srv = make_server(gemma_edge.load(str(e2b_file)), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": "the model"}]
        r = client.chat.completions.create(model="any-name", messages=msgs, max_tokens=30, temperature=0)
        msg = r.choices[0].message
        assert (msg.content, msg.model_extra.get("reasoning_content")) == (answer, thought)
        assert r.model == Path(e2b_file).stem  # any name is served; the response names the model
        parts, thoughts = [], []
        for chunk in client.chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0,
                                                    stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                thoughts.append((chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or "")
        assert ("".join(parts), "".join(thoughts)) == (answer, thought)
    finally:
        srv.shutdown()
        srv.server_close()


def test_lora_merge_on_gemma4(e2b, g4_tokenizer, tmp_path):
    """A peft LoRA on a Gemma 4's attention and FFN merges as it streams; logits match peft's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from conftest import hf_logits

    base = make_gemma4("e2b", tmp_path / "base", g4_tokenizer, train_steps=0, seed=9)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    from gemma_edge.convert.pipeline import convert

    out = tmp_path / "merged.tflite"
    convert(str(tmp_path / "base"), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL,
            progress=False, lora=str(tmp_path / "adapter"))
    ref = hf_logits(peft_model.eval(), e2b.seq)[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]
    got = run_file(out, e2b.seq)
    assert np.max(np.abs(got - ref)) < 1e-4 * np.max(np.abs(ref))


def test_litert_lm_runs_a_packed_gemma4_like_gemma_edge(e2b_file, tmp_path):
    """LiteRT-LM's Engine on the .litertlm of a Gemma 4 file (gemma4 model type, caches only for the
    layers that own one, head dims 16 and 32): the same greedy tokens as gemma-edge."""
    import gemma_edge
    from gemma_edge.runtime.litertlm import llm_metadata, pack
    from gemma_edge.runtime.modelfile import read_info
    from test_litertlm import litert_engine, litert_greedy

    assert llm_metadata(read_info(str(e2b_file))).llm_model_type.WhichOneof("model_type") == "gemma4"
    packed = pack(e2b_file, tmp_path / "m.litertlm")
    engine = litert_engine(packed, tmp_path / "cache")
    try:
        m = gemma_edge.load(str(e2b_file))
        for text in ("the model", "a cache and a layer of the phone and the laptop " * 2):  # 6 and 42 tokens
            ours = m.generate(text, max_tokens=12, temperature=0)
            theirs, n_in, n_out = litert_greedy(engine, text, 12)
            assert theirs == ours.text + ours.reasoning
            assert (n_in, n_out) == (ours.prompt_tokens, len(ours.tokens))
    finally:
        engine.close()


RING_CONTEXT = 256  # the tiny models' limit; rings would be 2R - W = 70 slots (R = 8 + 32 - 1)


def test_a_gemma4_file_keeps_full_caches_that_litert_lm_reads_whole(e2b, g4_tokenizer, tmp_path):
    """Gemma 4 files keep full-length caches even where a Gemma 3 file would get rings:
    LiteRT-LM 0.18.1 takes a gemma4 file's token limit from its sliding caches' length (a ring
    file of this model refused a 120-token prompt: "120 >= 70"). At context 256, LiteRT-LM
    continues a 120-token text with gemma-edge's greedy tokens."""
    from conftest import corpus_ids

    import gemma_edge
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime import contract
    from gemma_edge.runtime.litertlm import pack
    from gemma_edge.runtime.modelfile import read_info
    from test_litertlm import litert_engine, litert_greedy

    path = tmp_path / "g4.tflite"
    convert(str(e2b.checkpoint), str(path), quant="fp32", max_context=RING_CONTEXT, prefill_lengths=PREFILL,
            progress=False)
    cfg = read_info(str(path)).config
    assert cfg.kv_ring == 0 and contract.ring_length(dataclasses.replace(cfg, family=3), RING_CONTEXT, 32) == 39
    engine = litert_engine(pack(path, tmp_path / "g4.litertlm"), tmp_path / "cache")
    try:
        m = gemma_edge.load(str(path))
        text = m.tokenizer.decode(corpus_ids(g4_tokenizer, 160, seed=17)[:120])
        ours = m.generate(text, max_tokens=12, temperature=0)
        assert ours.prompt_tokens > 70
        theirs, n_in, _ = litert_greedy(engine, text, 12)
        assert theirs == ours.text + ours.reasoning and n_in == ours.prompt_tokens
    finally:
        engine.close()


# ---- multimodal checkpoints: the text decoder, the towers skipped -----------------------------------

def test_gemma4_multimodal_checkpoint_converts_its_text_decoder(e2b, g4_tokenizer, tmp_path):
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    text = e2b.model.config.to_dict()
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    mm = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision.to_dict(),
                                                     audio_config=None)).eval()
    missing, unexpected = mm.model.language_model.load_state_dict(e2b.model.model.state_dict(), strict=False)
    assert not missing and not unexpected
    ckpt = tmp_path / "mm"
    mm.save_pretrained(ckpt, safe_serialization=True)
    shutil.copy(g4_tokenizer, ckpt / "tokenizer.model")
    out = tmp_path / "mm.tflite"
    r = subprocess.run([sys.executable, "-m", "gemma_edge.convert.cli", str(ckpt), "-o", str(out), "--quant", "fp32",
                        "--max-context", str(CONTEXT), "--prefill-lengths", "8,32", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "vision/audio towers were skipped" in notes[0], r.stderr
    with torch.no_grad():
        ref = mm(input_ids=torch.tensor([e2b.seq])).logits[0].float().numpy()
    got = run_file(out, e2b.seq)
    want = ref[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))


def test_gemma3_multimodal_checkpoint_converts_its_text_decoder(sp_model_path, tmp_path):
    """Gemma 3 4B/12B ship as Gemma3ForConditionalGeneration: the text decoder converts."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from conftest import corpus_ids, tiny_hf_config

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    mm = Gemma3ForConditionalGeneration(Gemma3Config(text_config=tiny_hf_config(3).to_dict(),
                                                     vision_config=vision.to_dict(), mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for name, p in mm.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
    ckpt = tmp_path / "g3mm"
    mm.save_pretrained(ckpt, safe_serialization=True)
    shutil.copy(sp_model_path, ckpt / "tokenizer.model")
    from gemma_edge.convert.pipeline import convert

    notes = []
    convert(str(ckpt), str(tmp_path / "g3.tflite"), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL,
            progress=False, notes=notes.append)
    assert len(notes) == 1 and "skipped" in notes[0]
    seq = [BOS] + corpus_ids(sp_model_path, PROMPT_LEN + DECODE_STEPS - 1, seed=5)
    with torch.no_grad():
        ref = mm(input_ids=torch.tensor([seq])).logits[0].float().numpy()
    got = run_file(tmp_path / "g3.tflite", seq)
    want = ref[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))


# ---- bad input: refused like Gemma 1-3's, exit code 2 and one paragraph ------------------------------

def _convert_cli(src, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_edge.convert.cli", str(src), "-o", str(out), "--quant",
                           "int8", "--max-context", str(CONTEXT), "-q"], capture_output=True, text=True, timeout=600)


def _edited_checkpoint(e2b, tmp_path, config=None, tensors=None) -> Path:
    """A copy of the e2b checkpoint with config.json keys set and tensors changed (name -> array or None)."""
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "edited"
    shutil.copytree(e2b.checkpoint, ckpt)
    if config:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(config)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    if tensors:
        weights = load_file(str(ckpt / "model.safetensors"))
        for name, value in tensors.items():
            if value is None:
                weights.pop(name)
            else:
                weights[name] = value
        save_file(weights, str(ckpt / "model.safetensors"))
    return ckpt


@pytest.mark.parametrize("what,config,tensors,says", [
    ("a PLE table of the wrong shape", None,
     {"model.embed_tokens_per_layer.weight": np.zeros((512, 6 * 32 - 1), np.float32)}, "embed_tokens_per_layer"),
    ("a KV-sharing layer with its own K/V", None,
     {"model.layers.5.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}, "layers.5.self_attn.k_proj"),
    ("an MoE checkpoint", {"enable_moe_block": True}, None, "mixture-of-experts"),
    ("a bidirectional (embedding) model", {"use_bidirectional_attention": "all"}, None, "bidirectional"),
    ("sharing with no producer", {"num_kv_shared_layers": 6}, None, "first layer"),
    ("a NaN RoPE base", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": "nan"},
                                             "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                                                "partial_rotary_factor": 0.25}}}, None, "rope"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_bad_gemma4_checkpoints_exit_2(e2b, tmp_path, what, config, tensors, says):
    r = _convert_cli(_edited_checkpoint(e2b, tmp_path, config, tensors), tmp_path / "out.tflite")
    assert r.returncode == 2, (what, r.stderr)
    assert "Traceback" not in r.stderr and says in r.stderr, (what, r.stderr)
    assert not list(tmp_path.glob("*.tflite")) and not list(tmp_path.glob(".*tmp*"))


def test_checkpoint_with_tokenizer_json_and_chat_template_jinja(e2b, tmp_path):
    """Gemma 4's hub checkpoints ship tokenizer.json (no tokenizer.model) and chat_template.jinja:
    the file's tokenizer encodes as the ``tokenizers`` library does, and its template is the jinja file's."""
    from tokenizers import Tokenizer as HFTokenizer

    import gemma_edge
    from conftest import write_bpe_tokenizer_json

    ckpt = tmp_path / "hub"
    shutil.copytree(e2b.checkpoint, ckpt)
    (ckpt / "tokenizer.model").unlink()
    write_bpe_tokenizer_json(ckpt / "tokenizer.json", merges=240)
    template = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
    (ckpt / "chat_template.jinja").write_text(template)
    out = e2b.convert("fp32", source=ckpt, name="fp32-hub")
    m = gemma_edge.load(str(out))
    hf = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in ("the model of the cache", "  spaces\tand tabs ☃", "<|turn>user\nhi<turn|>"):
        assert m.tokenizer.encode(text, add_bos=False, parse_special=True) == hf.encode(text, add_special_tokens=False).ids
    assert m.info.meta.chat_template.jinja == template
    msgs = [{"role": "user", "content": "  hi  "}]
    assert m.render_chat(msgs) == "<|turn>user\nhi<turn|>\n<|turn>model\n"  # the template's trim, not the built-in
    assert m.encode_chat(msgs)[:2] == [BOS, m.tokenizer.piece_to_id("<|turn>")]
