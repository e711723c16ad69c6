"""On-device semantic search over a folder of text files, with an embedding model (EmbeddingGemma).

    python examples/search.py embeddinggemma-int8.tflite ~/notes "how do I reset the router"
    python examples/search.py embeddinggemma-int8.tflite ~/notes --index notes.npz   # a query per line on stdin

Every *.txt and *.md file below the folder is cut into passages (paragraphs, cut after
--words words), each embedded once with the model's "document" task prompt; a query is
embedded with its "query" prompt, and the passages are ranked by cosine similarity (the
vectors are unit length, so a dot product). --index FILE keeps the passages' vectors and
reuses them while no file changed (path, size and modification time), so later searches embed
only the query. Nothing leaves the machine.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

import gemma_edge
from gemma_edge.runtime.fileio import atomic_output

SUFFIXES = (".txt", ".md")


def passages(folder: Path, words: int) -> list[tuple[str, int, str]]:
    """(file, first line, text) of each passage: a paragraph, cut after every ``words`` words."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        name = str(path.relative_to(folder))
        start, chunk = None, []
        for number, line in enumerate(lines + [""], 1):
            if line.strip():
                start = number if start is None else start
                chunk += line.split()
            if chunk and (not line.strip() or len(chunk) >= words):
                for i in range(0, len(chunk), words):
                    out.append((name, start, " ".join(chunk[i:i + words])))
                start, chunk = None, []
    return out


def fingerprint(folder: Path, model_path: str, dim: int | None, words: int) -> str:
    """What the index depends on: every file's path, size and mtime, the model file and the settings."""
    files = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(folder.rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
    model = Path(model_path).stat()
    return json.dumps([files, [os.path.abspath(model_path), model.st_size, model.st_mtime_ns], dim, words])


def index(model, folder: Path, dim: int | None, words: int, cache: str | None):
    """(passages, their vectors [n, dim]), from ``cache`` when nothing changed since it was written."""
    key = fingerprint(folder, model.info.path, dim, words)
    if cache and os.path.exists(cache):
        saved = np.load(cache, allow_pickle=False)
        if str(saved["key"]) == key:
            return [(f, int(n), t) for f, n, t in zip(saved["files"], saved["lines"], saved["texts"])], saved["vectors"]
    found = passages(folder, words)
    if not found:
        sys.exit(f"search.py: no {' or '.join(SUFFIXES)} files with text below {folder}")
    task = "document" if "document" in model.tasks else None
    vectors = []
    for i in range(0, len(found), 64):  # in steps, to show progress
        vectors.append(model.embed([t for _, _, t in found[i:i + 64]], dim=dim, task=task, truncate=True))
        print(f"embedded {min(i + 64, len(found))} of {len(found)} passages", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    vectors = np.concatenate(vectors)
    if cache:
        with atomic_output(cache, force=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=key, files=[f for f, _, _ in found], lines=[n for _, n, _ in found],
                     texts=[t for _, _, t in found], vectors=vectors)
    return found, vectors


def search(model, found, vectors, query: str, dim: int | None, top: int) -> list[tuple[float, str, int, str]]:
    """The ``top`` passages most similar to ``query``: (cosine, file, line, text), best first."""
    q = model.embed(query, dim=dim, task="query" if "query" in model.tasks else None, truncate=True)
    scores = vectors @ q
    best = np.argsort(-scores, kind="stable")[:top]
    return [(float(scores[i]), *found[i]) for i in best]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an embedding model file written by gemma-convert (EmbeddingGemma)")
    parser.add_argument("folder", type=Path, help="the folder of .txt / .md files to search")
    parser.add_argument("query", nargs="?", help="what to look for (default: read a query per line from stdin)")
    parser.add_argument("-k", "--top", type=int, default=5, help="how many passages to show")
    parser.add_argument("--dim", type=int, default=None, help="vector size (Matryoshka: 512, 256, 128 are smaller "
                                                              "and faster to compare; default: the full size)")
    parser.add_argument("--words", type=int, default=120, help="words per passage at most")
    parser.add_argument("--index", default=None, help="an .npz file that keeps the passages' vectors between runs")
    args = parser.parse_args()

    model = gemma_edge.load(args.model)
    found, vectors = index(model, args.folder, args.dim, args.words, args.index)
    queries = [args.query] if args.query else (line.strip() for line in sys.stdin)
    for query in queries:
        if not query:
            continue
        for score, name, line, text in search(model, found, vectors, query, args.dim, args.top):
            print(f"{score:.3f}  {name}:{line}  {text[:100]}")
        print(flush=True)


if __name__ == "__main__":
    main()
