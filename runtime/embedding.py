"""Embeddings without LiteRT: texts packed into ``embed_<T>`` chunks, and vectors finished.

``Model.embed`` (engine.py) tokenizes, asks ``plan`` how to pack the texts, runs each chunk
(``chunk_inputs``) through the backend's ``embed_<T>`` signature and ``finish``-es the rows.

Packing ("batching by chunk"): one ``embed_<T>`` call holds up to ``contract.embed_slots(T)``
texts side by side, each attending only to itself (``segments``), so many short texts cost one
call instead of one padded call each. Texts are packed longest first into chunks of up to
``PACK_TO`` tokens (the attention of a chunk grows with T squared while its useful work grows
with T: at 512 it is a few percent of EmbeddingGemma's work per token); a longer text gets a
chunk of its own. Each chunk then runs through the smallest signature that holds it.
"""

from __future__ import annotations

import numpy as np

from .contract import embed_slots

PACK_TO = 512  # tokens of a chunk that several texts share


def plan(lengths: list[int], chunk_lengths: list[int]) -> list[tuple[int, list[int]]]:
    """[(T, indices of the texts the embed_<T> call holds)], every text once; ``lengths`` are
    the texts' token counts, each at most max(chunk_lengths)."""
    sizes = sorted(set(chunk_lengths))
    cap = max([T for T in sizes if T <= PACK_TO] or sizes[:1])
    bins: list[list[int]] = []  # text indices per chunk
    used: list[int] = []  # tokens per chunk
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):  # longest first
        n = lengths[i]
        fit = next((b for b, members in enumerate(bins)
                    if n <= cap and used[b] + n <= cap and len(members) < embed_slots(cap)), None)
        if fit is None:
            bins.append([i])
            used.append(n)
        else:
            bins[fit].append(i)
            used[fit] += n
    return [(next(T for T in sizes if T >= total and embed_slots(T) >= len(members)), members)
            for members, total in zip(bins, used)]


def chunk_inputs(T: int, texts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [1, T], input_pos [T], segments [T]) of texts laid side by side from slot 0:
    each text's positions start at 0; padding is token 0 in segment -1."""
    tokens = np.zeros((1, T), np.int32)
    pos = np.zeros((T,), np.int32)
    segments = np.full((T,), -1, np.int32)
    at = 0
    for g, ids in enumerate(texts):
        n = len(ids)
        tokens[0, at:at + n] = ids
        pos[at:at + n] = np.arange(n, dtype=np.int32)
        segments[at:at + n] = g
        at += n
    return tokens, pos, segments


def finish(vectors: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """The first ``dim`` values of each row (Matryoshka truncation), scaled to unit length when
    the model normalises (sentence-transformers' Normalize, then again after truncating)."""
    v = np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)
    if normalize:
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.float32(1e-12))
    return v
