"""Execution of a gemma-edge file on LiteRT: chunked prefill and one-token decode.

The KV cache never passes through Python. With ``ai_edge_litert``'s CompiledModel, one
TensorBuffer per cache tensor is bound as *both* the input and the output of every
signature, so DYNAMIC_UPDATE_SLICE updates it in place (how LiteRT-LM runs on CPU).
``tflite_runtime`` (no CompiledModel) falls back to the Interpreter, copying each
signature's cache outputs to its inputs through the interpreter's own tensors.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .errors import GemmaEdgeError, ModelFileError
from .modelfile import ModelInfo


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence LiteRT's native INFO/WARNING chatter (accelerator registry, plugins) on fd 2.

    Errors still surface as exceptions. Set GEMMA_EDGE_DEBUG=1 to see the native log.
    """
    if os.environ.get("GEMMA_EDGE_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def weight_cache_path(model_path: str) -> str | None:
    """Where XNNPACK keeps its packed weights for ``model_path``, shared by all signatures.

    Without it every signature packs its own copy (the 270M int8 file: 1165 MB peak RSS,
    1.1 s load); with it one packed copy is written once and then memory-mapped (545 MB,
    0.28 s on later loads; benchmarks/runtime_memory.py). Keyed by path, size and mtime, under $XDG_CACHE_HOME or
    ~/.cache. None if no cache folder can be written.
    """
    try:
        st = os.stat(model_path)
        root = os.environ.get("GEMMA_EDGE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma-edge", "xnnpack")
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            return None
        import hashlib

        key = hashlib.sha256(f"{os.path.realpath(model_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return os.path.join(root, f"{os.path.basename(model_path)}.{key[:16]}.xnnpack")
    except OSError:
        return None


def check_graph(info: ModelInfo, signatures, decode_inputs: dict, decode_outputs: dict, kv_names: list[str]) -> None:
    """The metadata must describe the graph the file holds: the signatures it names, the KV cache
    [1, num_kv_heads, context_length, head_dim] of every layer, and logits over vocab_size."""
    cfg = info.config
    want = ["decode", *(f"prefill_{T}" for T in info.prefill_lengths), *(f"score_{T}" for T in info.score_lengths)]
    missing = [s for s in want if s not in signatures]
    if missing:
        raise ModelFileError(f"{info.path}: the metadata names signatures {missing} that the graph does not have "
                             f"(it has {sorted(signatures)}); the file is corrupt: convert the checkpoint again")
    kv = [1, cfg.num_kv_heads, info.context_length, cfg.head_dim]
    bad = [n for n in kv_names if list(decode_inputs.get(n, {}).get("shape", [])) != kv]
    if bad or len([n for n in decode_inputs if n.startswith("kv_cache_")]) != len(kv_names):
        got = decode_inputs.get(bad[0] if bad else kv_names[0], {}).get("shape")
        raise ModelFileError(
            f"{info.path}: the metadata describes {len(kv_names)} KV caches of shape {kv} (num_kv_heads, "
            f"context_length, head_dim) but the graph's are {got}; the file is corrupt: convert the checkpoint again")
    logits = list(decode_outputs.get("logits", {}).get("shape", []))
    if not logits or logits[-1] != cfg.vocab_size:
        raise ModelFileError(f"{info.path}: the metadata gives vocab_size {cfg.vocab_size} but the graph's logits "
                             f"are {logits}; the file is corrupt: convert the checkpoint again")


def _threads(threads: int | None) -> int:
    return int(threads) if threads else max(1, min(os.cpu_count() or 1, 4))


class CompiledBackend:
    """ai_edge_litert CompiledModel with the same buffer as KV input and output."""

    name = "ai_edge_litert.CompiledModel (in-place KV cache)"

    def __init__(self, info: ModelInfo, threads: int | None = None, weight_cache: bool = True):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        self.info = info
        self.threads = _threads(threads)
        self.weight_cache = weight_cache_path(info.path) if weight_cache else None
        opts = Options(HardwareAccelerator.CPU, cpu_options=CpuOptions(
            num_threads=self.threads, xnnpack_weight_cache_path=self.weight_cache or ""))
        try:
            with quiet_native_stderr():
                self.model = CompiledModel.from_file(info.path, options=opts)
        except Exception as e:  # the native loader reports with RuntimeError/ValueError
            raise ModelFileError(f"{info.path}: LiteRT could not load the model ({e})") from None
        cfg = info.config
        self.kv_names = [f"kv_cache_{c}_{i}" for i in range(cfg.num_layers) for c in "kv"]
        check_graph(info, self.model.get_signature_list(), self.model.get_input_tensor_details("decode"),
                    self.model.get_output_tensor_details("decode"), self.kv_names)
        self.kv = {n: self.model.create_input_buffer_by_name("decode", n) for n in self.kv_names}
        zeros = np.zeros((1, cfg.num_kv_heads, info.context_length, cfg.head_dim), np.float32)
        for buf in self.kv.values():  # fresh buffers hold garbage; 0 * NaN in masked slots is NaN
            buf.write(zeros)
        self.logits = self.model.create_output_buffer_by_name("decode", "logits")
        self.vocab = cfg.vocab_size
        # per signature, built once: (tokens buffer, input_pos buffer, input map, output map)
        self.io = {}
        for T in [*info.prefill_lengths, None]:
            sig = "decode" if T is None else f"prefill_{T}"
            tok = self.model.create_input_buffer_by_name(sig, "tokens")
            pos = self.model.create_input_buffer_by_name(sig, "input_pos")
            outputs = {**self.kv, "logits": self.logits} if T is None else dict(self.kv)
            self.io[sig] = (tok, pos, {"tokens": tok, "input_pos": pos, **self.kv}, outputs)
        self._token = np.zeros((1, 1), np.int32)
        self._pos = np.zeros((1,), np.int32)

    def _run(self, sig: str, tokens: np.ndarray, pos: np.ndarray):
        tok_buf, pos_buf, inputs, outputs = self.io[sig]
        tok_buf.write(tokens)
        pos_buf.write(pos)
        self.model.run_by_name(sig, inputs, outputs)

    def prefill_chunk(self, T: int, tokens: np.ndarray, pos: np.ndarray) -> None:
        self._run(f"prefill_{T}", tokens, pos)

    def decode(self, token: int, pos: int) -> np.ndarray:
        self._token[0, 0], self._pos[0] = token, pos
        self._run("decode", self._token, self._pos)
        return self.logits.read(self.vocab, np.float32)

    def score(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """A prefill chunk through ``score_<T>``: logits [T, V] of every position."""
        T = tokens.shape[1]
        sig = f"score_{T}"
        if sig not in self.io:  # built on first use: its [T, V] output is large
            tok = self.model.create_input_buffer_by_name(sig, "tokens")
            pos_buf = self.model.create_input_buffer_by_name(sig, "input_pos")
            logits = self.model.create_output_buffer_by_name(sig, "logits")
            self.io[sig] = (tok, pos_buf, {"tokens": tok, "input_pos": pos_buf, **self.kv},
                            {**self.kv, "logits": logits})
        self._run(sig, tokens, pos)
        return self.io[sig][3]["logits"].read(T * self.vocab, np.float32).reshape(T, self.vocab)


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
        cfg = info.config
        self.kv_names = [f"kv_cache_{c}_{i}" for i in range(cfg.num_layers) for c in "kv"]
        shape = (1, cfg.num_kv_heads, info.context_length, cfg.head_dim)
        self.kv = {n: np.zeros(shape, np.float32) for n in self.kv_names}
        self.runners = {s: self.interp.get_signature_runner(s) for s in self.interp.get_signature_list()}

    def _run(self, sig, tokens, pos):
        out = self.runners[sig](tokens=tokens, input_pos=pos, **self.kv)
        for n in self.kv_names:
            self.kv[n] = out[n]
        return out

    def prefill_chunk(self, T, tokens, pos):
        self._run(f"prefill_{T}", tokens, pos)

    def decode(self, token, pos):
        return self._run("decode", np.array([[token]], np.int32), np.array([pos], np.int32))["logits"].reshape(-1)

    def score(self, tokens, pos):
        return self._run(f"score_{tokens.shape[1]}", tokens, pos)["logits"].reshape(tokens.shape[1], -1)


def make_backend(info: ModelInfo, threads: int | None = None, kind: str = "auto", weight_cache: bool = True):
    if kind in ("auto", "compiled"):
        try:
            import ai_edge_litert.compiled_model  # noqa: F401  (is CompiledModel available?)
        except ImportError:
            if kind == "compiled":
                raise GemmaEdgeError("the in-place KV cache needs ai-edge-litert's CompiledModel: "
                                     "pip install ai-edge-litert") from None
        else:
            return CompiledBackend(info, threads, weight_cache)
    return InterpreterBackend(info, threads)


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


def run_prefill(backend, token_ids, start: int) -> None:
    """Prefill ``token_ids`` at positions start.. (the caller holds back the last token)."""
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
