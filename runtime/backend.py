"""Execution of a gemma-edge file on LiteRT: chunked prefill and one-token decode, or an
embedding model's ``embed_<T>`` chunks (``embed``; no cache).

The KV cache never passes through Python. With ``ai_edge_litert``'s CompiledModel, one
TensorBuffer per cache tensor is bound as *both* the input and the output of every
signature, so DYNAMIC_UPDATE_SLICE updates it in place (how LiteRT-LM runs on CPU).
``tflite_runtime`` (no CompiledModel) falls back to the Interpreter, copying each
signature's cache outputs to its inputs through the interpreter's own tensors.
"""

from __future__ import annotations

import os

import numpy as np

from . import contract, cpu_features, host_memory, litert, native_log
from . import weight_cache as weight_cache_mod
from .errors import GemmaEdgeError, ModelFileError
from .modelfile import ModelInfo


def main_signature(info: ModelInfo) -> str:
    """The signature ``check_graph`` reads: decode, or an embedding model's longest embed_<T>."""
    return contract.embed_name(max(info.embed_lengths)) if info.embed_lengths else contract.DECODE


def check_graph(info: ModelInfo, signatures, decode_inputs: dict, decode_outputs: dict) -> None:
    """The metadata must describe the graph the file holds: the signatures it names, the KV
    caches of the contract (``contract.kv_shapes``), and logits over vocab_size; or, for an
    embedding model, vectors of its size (``decode_*``: then the details of ``main_signature``)."""
    cfg = info.config
    want = contract.signature_names(info.prefill_lengths, info.score_lengths, info.decode_spans, info.embed_lengths,
                                    info.decode_hot, info.decode_hot_spans)
    if info.decode_hot and not cfg.embed_hot_rows:
        raise ModelFileError(f"{info.path}: the metadata names a decode_hot signature but no split embedding "
                             "(config embed_hot) whose rows it returns; the file is corrupt: convert the "
                             "checkpoint again")
    odd = [s for s in info.decode_hot_spans if not info.decode_hot or s not in info.decode_spans]
    if odd:
        raise ModelFileError(f"{info.path}: the metadata names decode_hot_s{odd[0]}, which needs decode_hot and "
                             f"decode_s{odd[0]} (it names decode_hot {info.decode_hot}, spans {info.decode_spans}); "
                             "the file is corrupt: convert the checkpoint again")
    missing = [s for s in want if s not in signatures]
    if missing:
        raise ModelFileError(f"{info.path}: the metadata names signatures {missing} that the graph does not have "
                             f"(it has {sorted(signatures)}); the file is corrupt: convert the checkpoint again")
    if info.embed_lengths:
        shape = list(contract.embeddings_shape(cfg, max(info.embed_lengths)))
        got = list(decode_outputs.get(contract.EMBEDDINGS, {}).get("shape", []))
        if got != shape:
            raise ModelFileError(f"{info.path}: the metadata describes vectors {shape} but the graph's are {got}; "
                                 "the file is corrupt: convert the checkpoint again")
        return
    kv = contract.kv_shapes(cfg, info.context_length)
    got = {n: list(d.get("shape", [])) for n, d in decode_inputs.items() if n.startswith(contract.KV_PREFIX)}
    bad = sorted(set(kv) ^ set(got)) or [n for n in kv if got[n] != list(kv[n])]
    if bad:
        n = bad[0]
        raise ModelFileError(
            f"{info.path}: the metadata describes {len(kv)} KV caches ({n}: {list(kv[n]) if n in kv else 'none'}; "
            f"[1, KV heads, context_length or ring slots, head_dim]) but the graph has {len(got)} ({n}: {got.get(n, 'none')}); "
            "the file is corrupt: convert the checkpoint again")
    logits = list(decode_outputs.get(contract.LOGITS, {}).get("shape", []))
    if not logits or logits[-1] != cfg.vocab_size:
        raise ModelFileError(f"{info.path}: the metadata gives vocab_size {cfg.vocab_size} but the graph's logits "
                             f"are {logits}; the file is corrupt: convert the checkpoint again")


def decode_signatures(info: ModelInfo) -> list[str]:
    return [contract.DECODE] + [contract.decode_span_name(s) for s in info.decode_spans]


def decode_signature(info: ModelInfo, pos: int) -> str:
    """The decode signature for a token at ``pos``: the shortest span that holds it."""
    for span in info.decode_spans:
        if pos < span:
            return contract.decode_span_name(span)
    return contract.DECODE


def decode_hot_signature(info: ModelInfo, pos: int) -> str | None:
    """The decode_hot signature that reads what ``decode_signature`` reads at ``pos``: decode_hot
    where that is decode, decode_hot_s<S'> where it is decode_s<S'>; None where the file has no
    such signature (not converted --for-draft, or an earlier --for-draft file, which has no
    decode_hot_s<S'>: its step there goes through decode_s<S'>)."""
    if not info.decode_hot:
        return None
    span = contract.parse_signature(decode_signature(info, pos))[2]
    if span is None:
        return contract.DECODE_HOT
    return contract.decode_hot_span_name(span) if span in info.decode_hot_spans else None


def _hot_signature(info: ModelInfo, pos: int) -> str:
    sig = decode_hot_signature(info, pos)
    if sig is None:
        raise GemmaEdgeError(f"{info.path} has no decode_hot signature for position {pos}"
                             + ("" if info.decode_hot else " (it was not converted --for-draft)")
                             + "; use decode there (Model._decode_hot returns None where it does not apply)")
    return sig


def _threads(threads: int | None) -> int:
    """The threads asked for, at most the cores this process may use (more only contend)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not threads:
        return max(1, min(cores, 4))
    if int(threads) > cores:
        weight_cache_mod.note(f"{threads} threads asked for, but this machine gives the process {cores} cores; "
                              f"using {cores}")
        return cores
    return int(threads)


class CompiledBackend:
    """ai_edge_litert CompiledModel with the same buffer as KV input and output."""

    name = "ai_edge_litert.CompiledModel (in-place KV cache)"

    def __init__(self, info: ModelInfo, threads: int | None = None, weight_cache: bool = True):
        self.info = info
        self.threads = _threads(threads)
        self.weight_cache = weight_cache_mod.prepare(info, self.threads) if weight_cache else None
        try:
            with native_log.silenced():
                self.model = litert.compile_file(info.path, self.threads, self.weight_cache or "")
        except Exception as e:  # the native loader reports with RuntimeError/ValueError
            raise ModelFileError(f"{info.path}: LiteRT could not load the model ({e})") from None
        cfg = info.config
        main = main_signature(info)
        check_graph(info, self.model.get_signature_list(), self.model.get_input_tensor_details(main),
                    self.model.get_output_tensor_details(main))
        # what the compile read of the file (an int4 file's block scales, checked in every signature)
        # is in the packed weights now, and LiteRT's code that parsed, delegated and packed the
        # graph (and its GPU plugin, loaded and unused) runs no more: give those pages back (10 MiB
        # of LiteRT's libraries on the 270M, net of what later calls map again); what a call reads maps again
        host_memory.drop_file_pages(info.path, folders=(litert.library_folder(),))
        self.io = {}  # per signature, built once: (tokens buffer, input_pos buffer, input map, output map)
        decode = contract.DECODE
        shapes = {} if info.embed_lengths else contract.kv_shapes(cfg, info.context_length)
        self.kv = {n: self.model.create_input_buffer_by_name(decode, n) for n in shapes}
        self._kv_shapes = shapes
        self.clear_cache()
        if info.embed_lengths:  # an embedding model: no cache, no decode
            return
        self.logits = self.model.create_output_buffer_by_name(decode, contract.LOGITS)
        self.vocab = cfg.vocab_size
        for T in info.prefill_lengths:
            self.io[contract.prefill_name(T)] = self._bind(contract.prefill_name(T), dict(self.kv))
        for sig in decode_signatures(info):
            self.io[sig] = self._bind(sig, {**self.kv, contract.LOGITS: self.logits})
        self._token = np.zeros((1, 1), np.int32)
        self._pos = np.zeros((1,), np.int32)

    def clear_cache(self) -> None:
        """Zero every KV cache and give its memory back (0 * NaN in a masked slot is NaN, so a
        cache starts as zeros). Unwritten pages cost nothing: the graph's reads of empty slots
        map the kernel's zero page, so a cache's resident memory follows the tokens it holds,
        not its length."""
        self._kv_address = {n: host_memory.zero(buf, self._kv_shapes[n]) for n, buf in self.kv.items()}
        self.released = 0
        self.written = 0  # one past the highest slot position any call has written (padding included)

    def release_window(self, upto: int) -> None:
        """Give back the memory of slots ``released`` .. upto-1 of every sliding layer's cache:
        keys that have left the window (the caller keeps ``upto`` at least a window behind the
        position). Those slots read as zeros afterwards, so the cache must not be rewound to
        before ``released + sliding_window`` (``Model._prefill`` starts over instead). Memory
        of sliding layers then stays about a window however long the context."""
        cfg = self.info.config
        if upto <= self.released:
            return
        for i in contract.kv_layers(cfg):
            if not cfg.is_sliding(i) or cfg.kv_ring:  # a ring holds about a window already
                continue
            for kind in "kv":
                n = contract.kv_name(kind, i)
                addr = self._kv_address.get(n)
                if addr is None:
                    continue
                _, K, S, H = self._kv_shapes[n]
                for k in range(K):  # [1, K, S, H]: each head's slots are contiguous
                    base = addr + k * S * H * 4
                    host_memory.release(base + self.released * H * 4, base + upto * H * 4)
        self.released = upto

    def _bind(self, sig: str, outputs: dict):
        tok = self.model.create_input_buffer_by_name(sig, contract.TOKENS)
        pos = self.model.create_input_buffer_by_name(sig, contract.INPUT_POS)
        return tok, pos, {contract.TOKENS: tok, contract.INPUT_POS: pos, **self.kv}, outputs

    def _run(self, sig: str, tokens: np.ndarray, pos: np.ndarray):
        self.released = min(self.released, int(pos[0]))  # slots written again are live again
        self.written = max(self.written, int(pos[0]) + int(tokens.shape[1]))
        tok_buf, pos_buf, inputs, outputs = self.io[sig]
        tok_buf.write(tokens)
        pos_buf.write(pos)
        self.model.run_by_name(sig, inputs, outputs)

    def prefill_chunk(self, T: int, tokens: np.ndarray, pos: np.ndarray) -> None:
        self._run(contract.prefill_name(T), tokens, pos)

    def decode(self, token: int, pos: int) -> np.ndarray:
        self._token[0, 0], self._pos[0] = token, pos
        self._run(decode_signature(self.info, pos), self._token, self._pos)
        return self.logits.read(self.vocab, np.float32)

    def decode_hot(self, token: int, pos: int, extra: np.ndarray) -> np.ndarray:
        """``decode_hot`` (or the ``decode_hot_s<S'>`` that ``decode_hot_signature`` picks at
        ``pos``): the logits [H + E] of the hot rows (``contract.hot_ids``), then of the
        E = ``contract.HOT_EXTRA`` tokens ``extra`` (int32)."""
        sig = _hot_signature(self.info, pos)
        if sig not in self.io:  # built on first use: a file used as a draft
            logits = self.model.create_output_buffer_by_name(sig, contract.LOGITS)
            tok, pos_buf, inputs, outputs = self._bind(sig, {**self.kv, contract.LOGITS: logits})
            inputs[contract.EXTRA_IDS] = self.model.create_input_buffer_by_name(sig, contract.EXTRA_IDS)
            self.io[sig] = tok, pos_buf, inputs, outputs
        self.io[sig][2][contract.EXTRA_IDS].write(extra)
        self._token[0, 0], self._pos[0] = token, pos
        self._run(sig, self._token, self._pos)
        return self.io[sig][3][contract.LOGITS].read(self.info.config.embed_hot_rows + contract.HOT_EXTRA, np.float32)

    def score(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """A prefill chunk through ``score_<T>``: logits [T, V] of every position."""
        T = tokens.shape[1]
        sig = contract.score_name(T)
        if sig not in self.io:  # built on first use: its [T, V] output is large
            logits = self.model.create_output_buffer_by_name(sig, contract.LOGITS)
            self.io[sig] = self._bind(sig, {**self.kv, contract.LOGITS: logits})
        self._run(sig, tokens, pos)
        return self.io[sig][3][contract.LOGITS].read(T * self.vocab, np.float32).reshape(T, self.vocab)

    def embed(self, tokens: np.ndarray, pos: np.ndarray, segments: np.ndarray) -> np.ndarray:
        """One chunk through ``embed_<T>``: the pooled vectors [G, E] of the texts it holds."""
        T = tokens.shape[1]
        sig = contract.embed_name(T)
        if sig not in self.io:
            seg = self.model.create_input_buffer_by_name(sig, contract.SEGMENTS)
            tok, pos_buf, inputs, _ = self._bind(sig, {})
            out = self.model.create_output_buffer_by_name(sig, contract.EMBEDDINGS)
            self.io[sig] = (tok, pos_buf, {**inputs, contract.SEGMENTS: seg}, {contract.EMBEDDINGS: out})
        tok, pos_buf, inputs, outputs = self.io[sig]
        inputs[contract.SEGMENTS].write(segments)
        self._run(sig, tokens, pos)
        _, G, E = contract.embeddings_shape(self.info.config, T)
        return outputs[contract.EMBEDDINGS].read(G * E, np.float32).reshape(G, E)


class InterpreterBackend:
    """Plain Interpreter (ai_edge_litert or tflite_runtime): caches copied between signatures."""

    name = "Interpreter (KV cache copied per call)"

    def __init__(self, info: ModelInfo, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
            except ImportError:
                raise GemmaEdgeError("no LiteRT interpreter installed: pip install ai-edge-litert "
                                     "(or tflite-runtime)") from None
            if info.quant != "fp32":
                # measured with tflite-runtime 2.14.0, its last release: fp32 files run, but the
                # int8 file of the tiny Gemma 3 gave all-zero logits (per-channel int8 tables)
                raise GemmaEdgeError(
                    f"{info.path} holds {info.quant} weights, which tflite-runtime computes wrongly "
                    "(all-zero logits). Install ai-edge-litert (pip install ai-edge-litert), or use an "
                    "fp32 file with tflite-runtime")
        self.info = info
        self.threads = _threads(threads)
        try:
            self.interp = Interpreter(model_path=info.path, num_threads=self.threads)
        except Exception as e:
            raise ModelFileError(f"{info.path}: the LiteRT interpreter could not load it ({e}); "
                                 "files over 2 GB need ai-edge-litert rather than tflite-runtime") from None
        shapes = {} if info.embed_lengths else contract.kv_shapes(info.config, info.context_length)
        self._kv_shapes = shapes
        self.runners = {s: self.interp.get_signature_runner(s) for s in self.interp.get_signature_list()}
        self.clear_cache()

    def clear_cache(self) -> None:
        self.kv = {n: np.zeros(s, np.float32) for n, s in self._kv_shapes.items()}
        self.written = 0  # as CompiledBackend's

    def _run(self, sig, tokens, pos, extra=None):
        self.written = max(self.written, int(pos[0]) + int(tokens.shape[1]))
        out = self.runners[sig](**{contract.TOKENS: tokens, contract.INPUT_POS: pos}, **(extra or {}), **self.kv)
        for n in self.kv:
            self.kv[n] = out[n]
        return out

    def prefill_chunk(self, T, tokens, pos):
        self._run(contract.prefill_name(T), tokens, pos)

    def decode(self, token, pos):
        out = self._run(decode_signature(self.info, pos), np.array([[token]], np.int32), np.array([pos], np.int32))
        return out[contract.LOGITS].reshape(-1)

    def decode_hot(self, token, pos, extra):
        out = self._run(_hot_signature(self.info, pos), np.array([[token]], np.int32), np.array([pos], np.int32),
                        {contract.EXTRA_IDS: extra})
        return out[contract.LOGITS].reshape(-1)

    def score(self, tokens, pos):
        return self._run(contract.score_name(tokens.shape[1]), tokens, pos)[contract.LOGITS].reshape(tokens.shape[1], -1)

    def embed(self, tokens, pos, segments):
        out = self.runners[contract.embed_name(tokens.shape[1])](
            **{contract.TOKENS: tokens, contract.INPUT_POS: pos, contract.SEGMENTS: segments})
        return out[contract.EMBEDDINGS][0]


def _cpu_kind(kind: str) -> str:
    """The backend kind this CPU can run (``cpu_features.plan``). Every CompiledModel loads
    LiteRT's GPU accelerator library, which stops the process with SIGILL on a CPU without
    what it was built for (a Raspberry Pi 4's Cortex-A72: no LSE atomics, no dot product),
    and gemma-edge silences the one line LiteRT prints first. So "auto" becomes the
    Interpreter there, with a note, and "compiled" is refused with the reason."""
    plan = cpu_features.plan().check()  # UnsupportedCpuError when no LiteRT path runs here
    if plan.kind == "auto" or kind == "interpreter":
        return kind
    if kind == "compiled":
        raise GemmaEdgeError(f"the compiled backend cannot run here: {plan.reason}, and would stop the "
                             "process with SIGILL; use backend 'auto' or 'interpreter'")
    weight_cache_mod.note(plan.note)
    return plan.kind


def make_backend(info: ModelInfo, threads: int | None = None, kind: str = "auto", weight_cache: bool = True):
    kind = _cpu_kind(kind)
    if kind in ("auto", "compiled"):
        if litert.available():
            return CompiledBackend(info, threads, weight_cache)
        if kind == "compiled":
            raise GemmaEdgeError("the in-place KV cache needs ai-edge-litert's CompiledModel: "
                                 "pip install ai-edge-litert")
    return InterpreterBackend(info, threads)


def common_prefix(a: list, b: list) -> int:
    """How many leading items ``a`` and ``b`` share: what a cache holding ``a`` keeps of ``b``.

    By list comparisons (C speed) rather than a loop over items: tested on all but the last
    ``_TAIL`` items first, the usual case (a draft's cache after a round differs from the context
    in its last few tokens), else by halving; then item by item over at most ``_TAIL``. A Python
    loop over a 32k-token context took 0.7 ms (this: 0.27 ms), in each speculative round."""
    n = min(len(a), len(b))
    lo, hi = 0, n  # a[:lo] == b[:lo]; they differ before hi, unless hi == n
    tail = n - _TAIL
    if tail > 0:
        if a[:tail] == b[:tail]:
            lo = tail
        else:
            hi = tail
            while hi - lo > _TAIL:
                mid = (lo + hi) // 2
                if a[lo:mid] == b[lo:mid]:
                    lo = mid
                else:
                    hi = mid
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    return lo


_TAIL = 64


def plan_prefill(n: int, start: int, lengths: list[int], context: int) -> list[tuple[int, int]]:
    """Split n tokens starting at position ``start`` into (T, count) chunks.

    Largest chunk that fits first; the last partial chunk uses the smallest T that holds
    it, padded. A chunk never runs past the cache end (DYNAMIC_UPDATE_SLICE would clamp
    its start and overwrite earlier slots), so near the end smaller T's are used, and
    where even the smallest does not fit, T=1 means one ``decode`` call per token.
    """
    lengths = sorted(lengths)
    plan, pos, left = [], start, n
    while left > 0:
        room = context - pos
        fits = [T for T in lengths if T <= room]
        if room < 1:
            raise GemmaEdgeError(f"the cache is full: no room for {left} more tokens at position {pos}")
        if not fits:  # the last slots of the cache: one token at a time through decode
            plan.append((1, 1))
            pos += 1
            left -= 1
            continue
        cover = [T for T in fits if T >= left]
        full = [T for T in fits if T <= left]
        if cover and (not full or cover[0] <= 1.25 * left + 8):
            T = cover[0]  # one padded call beats several small ones when little is wasted
        else:
            T = full[-1] if full else fits[-1]
        count = min(T, left)
        plan.append((T, count))
        pos += count
        left -= count
    return plan


def run_prefill(backend, token_ids, start: int, on_chunk=None) -> None:
    """Prefill ``token_ids`` at positions start.. (the caller holds back the last token).
    ``on_chunk(pos)`` is called after each chunk with the position the cache now holds up to
    (``Model`` gives back sliding-window slots as a long prompt goes by)."""
    info = backend.info
    pos = start
    ids = list(token_ids)
    i = 0
    for T, count in plan_prefill(len(ids), start, info.prefill_lengths, info.context_length):
        if T == 1 and 1 not in info.prefill_lengths:
            backend.decode(ids[i], pos)  # logits unused
            i += 1
            pos += 1
            continue
        tokens = np.zeros((1, T), np.int32)
        positions = np.zeros((T,), np.int32)
        tokens[0, :count] = ids[i:i + count]
        positions[:count] = np.arange(pos, pos + count, dtype=np.int32)
        backend.prefill_chunk(T, tokens, positions)
        i += count
        pos += count
        if on_chunk is not None:
            on_chunk(pos)
