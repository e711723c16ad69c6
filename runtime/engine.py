"""The Python API: ``load()``, ``Model.stream_generate / generate / chat / benchmark``, and for
an embedding model (EmbeddingGemma) ``Model.embed``.

The model keeps track of which tokens its KV cache holds. A new prompt that starts with
those tokens prefills only the rest (llama.cpp-style prefix reuse), which is also how a
chat's second turn prefills only its new tokens.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from . import chat as chat_format
from . import contract, embedding, host_memory, weight_cache
from .backend import common_prefix, decode_hot_signature, make_backend, run_prefill
from .config import from_ranges
from .detokenizer import StreamingDetokenizer
from .errors import DraftError, EmbeddingError, GenerationError, ModelFileError, ModelKindError, TokenizerError
from .modelfile import read_info
from .sampling import REPETITION_WINDOW, apply_repetition_penalty, make_sampler, validate_sampling
from .stopping import StopStringMatcher
from .tokenizer import Tokenizer

# Sliding-layer cache slots more than a window (plus RELEASE_MARGIN) behind the position are
# given back to the OS every RELEASE_STEP slots: a rewind by up to RELEASE_MARGIN tokens (a
# rejected speculative draft, a regenerated reply) still finds its window intact.
RELEASE_MARGIN, RELEASE_STEP = 256, 256


@dataclass(frozen=True)
class GenerationResponse:
    """One step of a stream: the text this token completed, and running statistics."""

    text: str
    token: int | None
    finish_reason: str | None  # None while running; "stop" or "length" at the end
    prompt_tokens: int  # tokens of the prompt (all of them)
    prefilled_tokens: int  # tokens actually run through prefill (the rest came from the cache)
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    reasoning: str = ""  # text of the model's thinking channel (Gemma 4), kept apart from ``text``


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prefilled_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    reasoning: str = ""


def _tokenizer_beside(info, make_backend_):
    """(the file's Tokenizer, ``make_backend_()``), the tokenizer loaded on a thread while LiteRT
    compiles the graph (its vocabulary read from beside the weight cache in a few ms; else derived
    once, or parsed by SentencePiece, which releases the GIL, so it runs while the compile, which
    holds it most of the time, does). The tokenizer's error comes first, as when loaded first, but
    for a damaged file (ModelFileError from the backend: the tokenizer's bytes are checked with the
    weights). A
    vocabulary derived here is kept only once the model has loaded (in this thread: an interrupt
    leaves no part of it)."""
    loaded: list = []

    def load() -> None:
        try:
            vocab, derived = weight_cache.vocab_for(info)
            lazy = vocab is not None and info.tokenizer_region  # the bytes are read only if asked for
            loaded.append(Tokenizer(None if lazy else info.tokenizer_model,
                                    special_ids=from_ranges(info.meta.tokenizer.special_ranges) or None,
                                    model_proto_source=(lambda: info.tokenizer_model) if info.tokenizer_region else None,
                                    vocab=vocab))
            loaded.append(derived)
        except BaseException as e:  # raised on the caller's thread
            loaded.insert(0, e)

    loader = threading.Thread(target=load, name="gemma-edge tokenizer", daemon=True)
    loader.start()
    try:
        made = make_backend_()
    except BaseException as e:
        # Ctrl-C too: an interpreter that exits while the thread is inside SentencePiece's native
        # code (importing it, or parsing the model to derive the vocabulary) can abort (SIGABRT).
        loader.join()
        # a damaged file (its first load checks every weight, the tokenizer's bytes among them in
        # format 3) explains a tokenizer that did not parse too
        if isinstance(e, Exception) and not isinstance(e, ModelFileError) and isinstance(loaded[0], BaseException):
            raise loaded[0] from None
        raise
    loader.join()
    if isinstance(loaded[0], BaseException):
        raise loaded[0]
    if loaded[1] is not None:  # a vocabulary derived by this load: kept once the model has loaded
        weight_cache.keep_vocab(info, loaded[1])
        host_memory.trim()  # the pages of the SentencePiece model it was checked against, freed
    return loaded[0], made


class Model:
    """A loaded gemma-edge file. One generation at a time: a second caller while one runs
    (another thread, or a new stream before the last was finished or closed) gets a
    GenerationError instead of silently sharing the KV cache."""

    def __init__(self, path: str, threads: int | None = None, backend: str = "auto", draft=None):
        """``draft``: a smaller file (path) or loaded Model with the same tokenizer, for speculative
        decoding (``runtime/speculative.py``); None decodes one token per call."""
        t0 = time.perf_counter()
        self.info = read_info(str(path), checked_before=weight_cache.checked_before)
        self.config = self.info.config
        self.tokenizer, self.backend = _tokenizer_beside(self.info, lambda: make_backend(self.info, threads, backend))
        self.info.release_tokenizer()  # the tokenizer holds what it needs now; the bytes are read again if asked
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise TokenizerError(
                f"{path}: the embedded tokenizer has {self.tokenizer.vocab_size} pieces but the model's embedding "
                f"has {self.config.vocab_size} rows; the file is corrupt: convert the checkpoint again")
        self.context_length = self.info.context_length
        tok = self.info.meta.tokenizer
        self.stop_token_ids = frozenset(tok.stop_token_ids or ([tok.eos_id] if tok.eos_id is not None else []))
        self.bos_id = tok.bos_id
        self.add_bos = tok.add_bos
        self.chat_format = chat_format.chat_format(self.info.meta.chat_template.kind)
        fmt = self.chat_format  # a thinking channel's markers, if the model has them as tokens of their own
        self._channel = tuple(self.tokenizer.piece_to_id(p) if p else None for p in (fmt.channel_start, fmt.channel_end))
        self._cached: list[int] = []  # tokens whose K/V sit at positions 0..len-1 of the cache
        self._busy = threading.Lock()
        self.speculator = None
        if draft is not None:
            self.set_draft(draft, threads=threads, backend=backend)
        self.load_seconds = time.perf_counter() - t0

    # ---- the kind of model ---------------------------------------------------------
    @property
    def is_embedding(self) -> bool:
        """An embedding model (``embed``), not a causal LM (``generate``, ``chat``, ...)."""
        return self.info.meta.embedding is not None

    def _require_generative(self) -> None:
        if self.is_embedding:
            raise ModelKindError(
                f"{self.info.path} is an embedding model (no text generation); embed texts with Model.embed, "
                "gemma-edge embed or the server's POST /v1/embeddings")

    @property
    def draft(self) -> "Model | None":
        """The draft model of speculative decoding, if any."""
        return self.speculator.draft if self.speculator else None

    def set_draft(self, draft, threads: int | None = None, backend: str = "auto") -> None:
        """Use ``draft`` (a path or a loaded Model sharing this model's tokenizer) to propose tokens
        that this model checks several at a time; None goes back to one token per call. Greedy
        output stays identical and sampled output keeps its distribution. Not used for requests
        with ``json_schema`` or ``grammar`` (their token masks are computed one token at a time)."""
        from .speculative import Speculator

        with self._exclusive():
            if draft is None:
                self.speculator = None
                return
            if draft is self:
                raise DraftError("a model cannot be its own draft; load the draft file as a second Model "
                                 "(or pass its path)")
            self._require_generative()
            if not isinstance(draft, Model):
                draft = Model(str(draft), threads=threads, backend=backend)
            draft._require_generative()
            self.speculator = Speculator(self, draft)

    def reset(self) -> None:
        """Forget what the KV cache holds: the next prompt is prefilled from the start.

        Call it after driving ``backend`` by hand (``run_prefill`` / ``decode``), which
        changes the cache behind the Model's back. The cache's memory goes back to the OS
        (where the backend can: ``CompiledBackend.clear_cache``)."""
        with self._exclusive():
            self._cached = []
            if hasattr(self.backend, "clear_cache"):
                self.backend.clear_cache()
            if self.speculator is not None:
                self.speculator.draft.reset()

    # ---- prompts ---------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Text -> ids with one <bos> (if the file's tokenizer adds one) and control strings such
        as <start_of_turn> parsed into their tokens: the whole prompt is the caller's. Ids pass
        through. Text from users goes through ``encode_chat``, which never parses them."""
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("the prompt is empty; give some text (or token ids)")
            return self.tokenizer.encode(prompt, add_bos=self.add_bos, parse_special=True)
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("the prompt is empty; give some text (or token ids)")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise GenerationError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.config.vocab_size - 1}")
        return ids

    def _check_fits(self, ids: list[int]) -> None:
        if len(ids) > self.context_length:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens but the model file's context is {self.context_length}; "
                "shorten the prompt or convert with a larger --max-context")

    @contextlib.contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            raise GenerationError(
                "this Model is already generating (another thread, or an unfinished stream); it runs one "
                "generation at a time: finish or close() the other stream, or serialize callers with a lock "
                "(gemma-edge serve queues requests)")
        try:
            yield
        finally:
            self._busy.release()

    # ---- the token loop ----------------------------------------------------------
    def _prefill(self, ids: list[int]) -> int:
        """Bring the cache to hold ids[:-1]; returns how many tokens were prefilled."""
        keep = common_prefix(self._cached, ids[:-1])
        released = getattr(self.backend, "released", 0)
        ring = contract.ring_rewind_limit(self.config)
        if (released and keep < len(self._cached) and keep < released + (self.config.sliding_window or 0)) or (
                ring is not None and keep < getattr(self.backend, "written", 0) - ring):
            # rewound to where sliding layers' keys were already given back, or to before what a
            # ring still holds of the window (contract.ring_rewind_limit): start over
            keep = 0
            self.backend.clear_cache()
        self._cached = self._cached[:keep]
        todo = ids[keep:-1]
        if todo:
            def advanced(pos: int) -> None:
                # the cache holds ids[:pos] after each chunk, so an interrupted prefill leaves
                # ``_cached`` true to it; slots that leave the window go back chunk by chunk, not
                # after the whole prompt (a 32k-token prompt held every sliding slot at its end)
                self._cached = ids[:pos]
                self._release_window()

            run_prefill(self.backend, todo, keep, on_chunk=advanced)
            self._cached = ids[:-1]
        return len(todo)

    def _release_window(self) -> None:
        """Give back sliding-layer cache slots that have left the window (with a margin for
        rewinds such as a speculative draft's), in steps of ``RELEASE_STEP`` slots."""
        W = self.config.sliding_window
        release = getattr(self.backend, "release_window", None)
        if not W or release is None or self.config.kv_ring:  # a ring holds about a window already
            return
        upto = len(self._cached) - W - RELEASE_MARGIN
        if upto - self.backend.released >= RELEASE_STEP:
            release(upto)

    def _decode(self, token: int, full_vocab: bool = False) -> np.ndarray:
        pos = len(self._cached)
        logits = self.backend.decode(token, pos)
        self._cached.append(token)
        self._release_window()
        if full_vocab:  # the model's whole distribution (scoring)
            return logits
        return logits[:self.tokenizer.vocab_size]  # embedding rows past the tokenizer have no text

    def _decode_hot(self, token: int, extra: np.ndarray) -> np.ndarray | None:
        """As ``_decode``, through ``decode_hot`` (or ``decode_hot_s<S'>`` where ``_decode`` would
        run ``decode_s<S'>``): the logits of ``contract.hot_ids``, then of the
        ``contract.HOT_EXTRA`` tokens ``extra`` (int32), only (a draft's step). None, and nothing
        run, where the file has no such signature (``backend.decode_hot_signature``: not a
        --for-draft file, or one converted before decode_hot_s<S'> below its spans)."""
        pos = len(self._cached)
        if decode_hot_signature(self.info, pos) is None:
            return None
        logits = self.backend.decode_hot(token, pos, extra)
        self._cached.append(token)
        self._release_window()
        return logits

    def stream_generate(self, prompt, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                        seed: int | None = None, stop: Sequence[str] | None = None,
                        stop_tokens: bool = True, json_schema=None, grammar=None) -> Iterator[GenerationResponse]:
        """Yield one GenerationResponse per generated token; the last has ``finish_reason``.

        ``json_schema`` (a dict or JSON text) or ``grammar`` (a Lark or GBNF grammar's text, or a
        ``constrained.Grammar``) constrains the output: each token is drawn only from those that
        keep it inside the schema or grammar (``runtime/constrained.py``), after the repetition
        penalty and before every sampler. Generation then ends ("stop") as soon as the output is
        complete; a bad or unsatisfiable schema raises ``constrained.GrammarError`` at once."""
        self._require_generative()
        with self._exclusive():
            yield from self._stream(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                    seed, stop, stop_tokens, json_schema, grammar)

    def _stream(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                stop_tokens, json_schema=None, grammar=None) -> Iterator[GenerationResponse]:
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed)
        if int(max_tokens) < 1:
            raise GenerationError(f"max_tokens must be at least 1, got {max_tokens}")
        constraint = None
        if json_schema is not None or grammar is not None:
            from . import constrained  # llguidance: only when asked for

            constraint = constrained.compile(self.tokenizer, json_schema=json_schema, grammar=grammar)
        ids = self.encode(prompt)
        self._check_fits(ids)
        sample = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        matcher = constraint.matcher(self.stop_token_ids if stop_tokens else ()) if constraint else None
        detok = StreamingDetokenizer(self.tokenizer)
        stops = StopStringMatcher(list(stop)) if stop else None
        channel = _Channel(*self._channel)
        history = list(ids)

        if matcher is None and self.speculator is not None:
            source = self.speculator.tokens(ids, int(max_tokens), history, repetition_penalty, sample,
                                            temperature, top_k, top_p, min_p, seed)
        else:  # a constraint's masks are computed token by token: no draft for those
            source = self._plain_tokens(ids[-1], repetition_penalty, sample, history, matcher)
            if self.speculator is not None:
                self.speculator.stats = type(self.speculator.stats)()  # this generation used no draft
        try:
            yield from self._loop(ids, max_tokens, source, detok, stops, channel, stop_tokens)
        finally:
            source.close()
            if matcher is not None:
                matcher.close()

    def _plain_tokens(self, token, repetition_penalty, sample, history, matcher) -> Iterator[tuple[int, bool]]:
        """(token, the constraint is complete) per generated token, one decode call each; the
        cache holds all but ``token``, the last token so far."""
        while True:
            if matcher is not None:
                matcher.start()  # the next token's mask, computed while the model decodes
            logits = self._decode(token)
            if repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, history[-REPETITION_WINDOW:], repetition_penalty)
            token = sample(logits) if matcher is None else matcher.sample(sample, logits)
            complete = matcher is not None and matcher.consume(token)
            history.append(token)
            yield token, complete

    def _loop(self, ids, max_tokens, source, detok, stops, channel, stop_tokens) -> Iterator[GenerationResponse]:
        """One response per token of ``source`` (``_plain_tokens`` or a ``Speculator``'s), which
        has brought the cache to hold every token before it when it yields one."""
        t0 = time.perf_counter()
        prefilled = self._prefill(ids)
        generated = 0
        t_first = t_gen = None
        for token, complete in source:
            now = time.perf_counter()
            if t_first is None:
                t_first = t_gen = now
            generated += 1
            finish, reasoning = None, ""
            if stop_tokens and token in self.stop_token_ids:
                finish = "stop"
                text = ""
            elif channel.marker(token):
                text = detok.flush()  # what came before the marker belongs where it was
                text, reasoning = channel.route(text, before_switch=True)
            else:
                text, reasoning = channel.route(detok.add(token))
            if finish is None and stops is not None:
                text, hit = stops.feed(text)
                if hit:
                    finish = "stop"
            if finish is None and complete:
                finish = "stop"  # the schema or grammar is complete: nothing more may follow
            if finish is None and (generated >= max_tokens or len(self._cached) >= self.context_length):
                finish = "length"
            if finish is not None:
                tail, tail_reasoning = channel.route(detok.flush())
                reasoning += tail_reasoning
                if stops is not None and not stops.hit:
                    t2, hit = stops.feed(tail)
                    tail = t2 + ("" if hit else stops.flush())
                elif stops is not None:
                    tail = ""
                text += tail
            elapsed_prompt = t_first - t0
            gen_time = now - t_gen
            yield GenerationResponse(
                text=text, token=token, finish_reason=finish, prompt_tokens=len(ids),
                prefilled_tokens=prefilled + 1, generation_tokens=generated,
                prompt_tps=(prefilled + 1) / elapsed_prompt if elapsed_prompt > 0 else 0.0,
                generation_tps=(generated - 1) / gen_time if gen_time > 0 else 0.0,
                time_to_first_token=elapsed_prompt, reasoning=reasoning)
            if finish is not None:
                return

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """``stream_generate`` joined into one result."""
        parts, thoughts, tokens, last = [], [], [], None
        for r in self.stream_generate(prompt, **kwargs):
            parts.append(r.text)
            thoughts.append(r.reasoning)
            tokens.append(r.token)
            last = r
        return GenerationResult("".join(parts), tokens, last.finish_reason, last.prompt_tokens,
                                last.prefilled_tokens, last.prompt_tps, last.generation_tps,
                                last.time_to_first_token, "".join(thoughts))

    def perplexity(self, text: str | Sequence[int], max_tokens: int | None = None, progress=None) -> dict:
        """Perplexity of ``text`` (BOS prepended, one window of up to the context length).

        Mean negative log-likelihood over every predicted token (all but the first), in
        float64 from the exact logits. Files with a ``score_<T>`` signature score T tokens a
        call (2048 tokens of the 270M in 10-15 s here, against 55 s through decode); older
        files, and the last few tokens where a chunk would run past the cache, go one
        ``decode`` call per token.
        ``progress(done, total)`` is called as tokens are scored.
        """
        self._require_generative()
        with self._exclusive():
            return self._perplexity(text, max_tokens, progress)

    def _scored_ids(self, text, max_tokens) -> list[int]:
        ids = self.encode(text) if isinstance(text, str) else self.encode(list(text))
        ids = ids[:min(self.context_length, max_tokens or self.context_length)]
        if len(ids) < 2:
            raise GenerationError("perplexity needs at least 2 tokens of text")
        return ids

    def _log_probs(self, ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(i, log-softmax [count, V] float64 of the logits at positions i .. i+count-1), in
        order over every position that predicts a token (all but the last of ``ids``)."""
        n = len(ids) - 1
        T = max(self.info.score_lengths, default=0)
        self._cached = []
        i = 0
        try:
            while i < n:
                if T and i + T <= self.context_length:  # a chunk never runs past the cache end
                    count = min(T, n - i)
                    tokens = np.zeros((1, T), np.int32)
                    positions = np.zeros((T,), np.int32)
                    tokens[0, :count] = ids[i:i + count]
                    positions[:count] = np.arange(i, i + count, dtype=np.int32)
                    z = self.backend.score(tokens, positions)[:count]  # [count, V]
                else:
                    count = 1
                    z = self.backend.decode(ids[i], i)[None, :]  # [1, V]
                z = z.astype(np.float64)
                m = z.max(axis=1, keepdims=True)
                yield i, z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))
                i += count
        finally:
            self._cached = []

    def _perplexity(self, text, max_tokens, progress) -> dict:
        ids = self._scored_ids(text, max_tokens)
        n = len(ids) - 1  # inputs ids[0..n-1] predict ids[1..n]
        nll = np.empty(n, np.float64)
        t0 = time.perf_counter()
        for i, lp in self._log_probs(ids):
            count = len(lp)
            nll[i:i + count] = -lp[np.arange(count), ids[i + 1:i + 1 + count]]
            if progress:
                progress(i + count, n)
        mean = float(nll.mean())
        T = max(self.info.score_lengths, default=0)
        return {"model": self.info.path, "quant": self.info.quant, "tokens": len(ids),
                "predicted": n, "mean_nll": mean, "perplexity": float(np.exp(mean)),
                "seconds": time.perf_counter() - t0, "scored_with": f"score_{T}" if T else "decode"}

    def compare(self, base: "Model", text: str | Sequence[int], max_tokens: int | None = None, progress=None) -> dict:
        """How far this model's next-token distributions are from ``base``'s on the same tokens
        (what llama.cpp's ``--kl-divergence`` reports): both perplexities and their ratio, the
        mean and 99th-percentile KL divergence KL(base || this) per token, and how often the two
        agree on the most likely token. Both files must share their tokenizer."""
        self._require_generative()
        base._require_generative()
        if base.tokenizer.model_proto != self.tokenizer.model_proto:
            raise GenerationError(f"{base.info.path} and {self.info.path} have different tokenizers; "
                                  "compare files converted from the same checkpoint")
        if base is self:
            raise GenerationError("compare a model with another file (the base), not with itself")
        with self._exclusive(), base._exclusive():
            return self._compare(base, text, max_tokens, progress)

    def _compare(self, base, text, max_tokens, progress) -> dict:
        ids = self._scored_ids(text, max_tokens)[:base.context_length]
        n = len(ids) - 1
        t0 = time.perf_counter()
        nll, base_nll, kl = np.empty(n), np.empty(n), np.empty(n)
        same = np.empty(n, bool)
        pending = []  # base chunks not yet matched: (i, log-probs)
        base_chunks = base._log_probs(ids)
        for i, lp in self._log_probs(ids):
            count = len(lp)
            while sum(len(b) for _, b in pending) < count:  # chunk lengths of the two files may differ
                pending.append(next(base_chunks))
            blp = np.concatenate([b for _, b in pending])
            rest = blp[count:]
            pending = [(i + count, rest)] if len(rest) else []
            blp = blp[:count]
            target = ids[i + 1:i + 1 + count]
            rows = np.arange(count)
            nll[i:i + count] = -lp[rows, target]
            base_nll[i:i + count] = -blp[rows, target]
            kl[i:i + count] = np.sum(np.exp(blp) * (blp - lp), axis=1)
            same[i:i + count] = blp.argmax(axis=1) == lp.argmax(axis=1)
            if progress:
                progress(i + count, n)
        base_chunks.close()
        ppl, base_ppl = float(np.exp(nll.mean())), float(np.exp(base_nll.mean()))
        return {"model": self.info.path, "quant": self.info.quant, "base": base.info.path, "base_quant": base.info.quant,
                "tokens": len(ids), "predicted": n, "perplexity": ppl, "base_perplexity": base_ppl,
                "perplexity_ratio": ppl / base_ppl, "mean_nll": float(nll.mean()),
                "base_mean_nll": float(base_nll.mean()), "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
                "top1_agreement": float(same.mean()), "seconds": time.perf_counter() - t0}

    def chat(self, system: str | None = None, thinking: bool = False) -> "Conversation":
        """A multi-turn chat; ``thinking`` asks a model that can think (Gemma 4) to."""
        self._require_generative()
        return Conversation(self, system, thinking=thinking)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False) -> str:
        """The prompt text (without <bos>) of ``messages`` in this model's chat format: the
        checkpoint's own jinja template (metadata ``chat_template.jinja``) rendered in jinja2's
        sandbox when the file has one and jinja2 is installed; else, or if that template fails
        (a ChatTemplateWarning says why), the file's built-in format (``chat.ChatFormat``).
        Control strings in the messages stay text here; ``encode_chat`` keeps them text.
        ``thinking`` asks a model that can think (Gemma 4) to: its thoughts then come in
        ``GenerationResponse.reasoning``, apart from the answer."""
        return chat_format.render_chat(messages, add_generation_prompt, template=self.info.meta.chat_template.jinja,
                                       fmt=self.chat_format, thinking=thinking, **self._special_strings())

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, add_bos: bool | None = None,
                    thinking: bool = False) -> list[int]:
        """The ids of ``messages`` in the chat format: the template's own markers are control
        tokens, while a control string inside a message's text (``<end_of_turn>``...) is
        encoded as the characters it is, so no message can forge a turn."""
        return chat_format.encode_chat(self.tokenizer, messages, add_generation_prompt,
                                       self.add_bos if add_bos is None else add_bos,
                                       template=self.info.meta.chat_template.jinja, fmt=self.chat_format,
                                       thinking=thinking, **self._special_strings())

    def _special_strings(self) -> dict:
        tok = self.tokenizer
        return {name: tok.id_to_piece(i) for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id))
                if i is not None}

    @property
    def max_prompt_bytes(self) -> int:
        """No text longer than this many UTF-8 bytes fits the context: a token covers at most
        the tokenizer's longest piece. Lets a server refuse a huge prompt before tokenizing it."""
        return self.context_length * self.tokenizer.max_piece_bytes

    # ---- benchmark -------------------------------------------------------------------
    def benchmark(self, prompt_tokens: int = 128, gen_tokens: int = 128, runs: int = 5) -> dict:
        """Prefill and decode speed on a fixed synthetic prompt (the cache restarts each run)."""
        self._require_generative()
        if prompt_tokens + gen_tokens > self.context_length:
            raise GenerationError(f"-p {prompt_tokens} + -n {gen_tokens} exceeds the context {self.context_length}")
        rng = np.random.default_rng(0)
        special = set(self.stop_token_ids) | {self.bos_id}
        lo, hi = min(1000, self.tokenizer.vocab_size // 2), min(self.tokenizer.vocab_size, 30000)
        pool = [t for t in range(lo, hi) if t not in special and not self.tokenizer.is_special(t)]
        ids = [self.bos_id] + [int(t) for t in rng.choice(pool, prompt_tokens - 1)]
        rows, spec = [], []
        for _ in range(runs):
            self._cached = []
            ttft = prefill_tps = None
            t0 = time.perf_counter()
            n = 0
            for r in self.stream_generate(ids, max_tokens=gen_tokens, stop_tokens=False):
                if ttft is None:
                    ttft, prefill_tps, t1 = r.time_to_first_token, r.prompt_tps, time.perf_counter()
                n += 1
            decode_time = time.perf_counter() - t1
            if self.speculator is not None:
                spec.append(self.speculator.stats)
            rows.append({"ttft_s": ttft, "prefill_tps": prefill_tps,
                         "decode_tps": (n - 1) / decode_time if decode_time > 0 else 0.0,
                         "total_s": time.perf_counter() - t0})
        self._cached = []

        import statistics  # only bench uses it: not imported at start-up

        def stat(key):
            vals = [r[key] for r in rows]
            return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

        return {
            "model": self.info.path, "quant": self.info.quant, "backend": self.backend.name,
            "threads": self.backend.threads, "prompt_tokens": len(ids), "gen_tokens": gen_tokens,
            "runs": runs, "load_s": self.load_seconds,
            "ttft_s": stat("ttft_s"), "prefill_tps": stat("prefill_tps"), "decode_tps": stat("decode_tps"),
            "peak_rss_mb": (peak := host_memory.peak_rss_mb()),  # MiB (VmHWM's kB / 1024)
            "rss_over_file": peak * 2**20 / os.path.getsize(self.info.path),
            **({"draft": self._draft_summary(spec)} if spec else {}),
        }

    def _draft_summary(self, stats) -> dict:
        """Speculative decoding over some generations: the draft, its acceptance rate, mean k."""
        from .speculative import SpeculationStats

        total = SpeculationStats()
        for s in stats:
            for f in ("rounds", "drafted", "accepted", "tokens", "plain", "k_total"):
                setattr(total, f, getattr(total, f) + getattr(s, f))
        return {"model": self.draft.info.path, "quant": self.draft.info.quant, **total.to_dict()}


    # ---- embeddings ------------------------------------------------------------------
    def _embedding(self):
        emb = self.info.meta.embedding
        if emb is None:
            raise ModelKindError(
                f"{self.info.path} is a causal LM, not an embedding model; convert an embedding checkpoint "
                "(EmbeddingGemma: its sentence-transformers folder, or a gemma-embedding GGUF) with gemma-convert")
        return emb

    @property
    def tasks(self) -> dict[str, str]:
        """An embedding model's task prompts (name -> the text put before a text), as it was trained."""
        return dict(self._embedding().prompts)

    def embedding_ids(self, text: str, task: str | None = None, truncate: bool = False) -> list[int]:
        """The tokens ``text`` is embedded as: ``task``'s prompt and the text, between <bos> and
        (EmbeddingGemma) <eos>, control strings parsed as the checkpoint's tokenizer parses them.
        A text over the file's context is an EmbeddingError, or with ``truncate`` cut to its first
        tokens, <eos> kept last (what sentence-transformers does at its max_seq_length)."""
        emb = self._embedding()
        if not isinstance(text, str):
            raise EmbeddingError(f"a text to embed must be a string, got {type(text).__name__}")
        if task is None:
            task = emb.default_task
        if task is not None and task not in emb.prompts:
            known = ", ".join(sorted(emb.prompts)) or "none"
            raise EmbeddingError(f"task {task!r} is not one of this model's task prompts ({known})")
        ids = self.tokenizer.encode((emb.prompts[task] if task else "") + text, add_bos=self.add_bos,
                                    parse_special=True)
        eos = self.info.meta.tokenizer.eos_id
        if self.info.meta.tokenizer.add_eos and eos is not None:
            ids.append(eos)
        n = self.context_length
        if len(ids) > n:
            if not truncate:
                raise EmbeddingError(
                    f"a text takes {len(ids)} tokens (with its task prompt), more than the {n} this file embeds at "
                    f"once; split it, or truncate it to its first {n} tokens (truncate=True, --truncate)")
            ids = ids[:n - 1] + ids[-1:] if self.info.meta.tokenizer.add_eos else ids[:n]
        return ids

    def embed(self, texts, dim: int | None = None, task: str | None = None, truncate: bool = False) -> np.ndarray:
        """Vectors of ``texts`` (a string, or a list of them): [dim] for a string, [len(texts), dim]
        for a list, float32, unit length (when the model normalises, as EmbeddingGemma does).

        ``task`` names the prompt put before each text (``Model.tasks``; EmbeddingGemma's "query"
        for search queries, "document" for what they search; None: the model's default, for
        EmbeddingGemma no prompt). ``dim`` keeps the first ``dim`` values and normalises again
        (Matryoshka: EmbeddingGemma was trained for 768, 512, 256 and 128; any size up to the
        full one works). Short texts are packed several to one call (``runtime/embedding.py``);
        ``truncate`` as in ``embedding_ids``."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out = self.embed_ids([self.embedding_ids(t, task, truncate) for t in batch], dim)
        return out[0] if single else out

    def embed_ids(self, texts: list[list[int]], dim: int | None = None) -> np.ndarray:
        """``embed`` for texts already tokenized by ``embedding_ids``: [len(texts), dim]."""
        emb = self._embedding()
        dim = emb.dim if dim is None else dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= emb.dim:
            trained = f" (trained for {', '.join(map(str, (emb.dim, *emb.matryoshka_dims)))})" \
                if emb.matryoshka_dims else ""
            raise EmbeddingError(f"dim must be an integer from 1 to {emb.dim}{trained}, got {dim!r}")
        ids = [[int(t) for t in text] for text in texts]
        for i, text in enumerate(ids):
            if not text or len(text) > self.context_length:
                raise EmbeddingError(f"text {i} has {len(text)} tokens; a text has 1 to {self.context_length}")
            if min(text) < 0 or max(text) >= self.config.vocab_size:
                raise EmbeddingError(f"text {i} has token ids outside the vocabulary 0..{self.config.vocab_size - 1}")
        vectors = np.zeros((len(ids), emb.dim), np.float32)
        with self._exclusive():
            for T, members in embedding.plan([len(t) for t in ids], list(emb.lengths)):
                rows = self.backend.embed(*embedding.chunk_inputs(T, [ids[k] for k in members]))
                vectors[members] = rows[:len(members)]
        return embedding.finish(vectors, int(dim), emb.normalize)


@dataclass
class Conversation:
    """A multi-turn chat that keeps its tokens, so each turn prefills only what is new.

    Turns are rendered by ``Model.render_chat``: the checkpoint's own jinja template when the
    file carries one and jinja2 is installed, else the built-in Gemma format. The system
    prompt has no turn of its own; it is folded into the first user turn in the context.
    ``messages`` is the whole transcript (user and model turns, without the system prompt);
    ``tokens`` is what the model has seen: the context.

    Context policy. A new turn is sent only if the context keeps room for the reply:
    ``reply_room(max_tokens) = min(max_tokens, max(64, context // 4), context // 2)`` tokens.
    When the history plus the new turn leaves less, the oldest whole turns (a user message
    and its reply) are dropped, one at a time, until it fits; the system prompt is never
    dropped (it moves into the first user turn that remains). What remains is rendered and
    tokenized again and prefilled from the start: a KV cache cannot lose turns from its
    middle, so no prefix is reused after a drop (only the part before the first dropped
    turn, <bos> and the system prompt). ``dropped_turns`` counts the turns of ``messages``
    that are no longer in the context. A new turn that does not fit even alone (with the
    system prompt) raises GenerationError with the numbers and changes nothing; one that
    fits alone but leaves less than ``reply_room`` is sent with every older turn dropped,
    and its reply gets the room that is left (finish_reason "length" when it fills it).
    """

    model: Model
    system: str | None = None
    thinking: bool = False
    tokens: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    dropped_turns: int = 0
    _nonce: str = field(default_factory=chat_format.new_nonce, repr=False)  # see chat.protect

    def reply_room(self, max_tokens: int = 256) -> int:
        """Tokens kept free for a reply of up to ``max_tokens`` (see the context policy)."""
        c = self.model.context_length
        return max(1, min(int(max_tokens), max(64, c // 4), c // 2))

    def _in_context(self, dropped: int) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages[2 * dropped:]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat format's text, control strings in the messages as placeholders (chat.protect)."""
        return self.model.render_chat(chat_format.protect(messages, self.model.tokenizer, self._nonce),
                                      add_generation_prompt, self.thinking)

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        return chat_format.encode_protected(self.model.tokenizer, text, self._nonce, add_bos and self.model.add_bos)

    def _next_turn(self, user: dict) -> list[int] | None:
        """The tokens so far plus the new turn's, or None if the template cannot be extended
        (its render of the history is not a prefix of its render with the new turn)."""
        history = self._in_context(self.dropped_turns)
        before = self._render(history, add_generation_prompt=False)
        after = self._render(history + [user], add_generation_prompt=True)
        eot_id = self.model.info.meta.tokenizer.end_of_turn_id
        eot = self.model.tokenizer.id_to_piece(eot_id) if eot_id is not None else None
        cut = before.rfind(eot) if eot else -1
        if not after.startswith(before) or cut < 0:
            return None
        # self.tokens end with the <end_of_turn> closing the last reply; the text after it in
        # the template's render (Gemma: "\n") comes first in the new turn.
        return self.tokens + self._encode(before[cut + len(eot):] + after[len(before):], add_bos=False)

    def _fit(self, user: dict, room: int, dropped: int) -> tuple[list[int], int]:
        """The whole context rendered again from turn ``dropped`` on, dropping more old turns
        until the prompt leaves ``room`` tokens (or none are left to drop)."""
        context, turns = self.model.context_length, len(self.messages) // 2
        while True:
            msgs = self._in_context(dropped) + [user]
            prompt = self._encode(self._render(msgs, add_generation_prompt=True), add_bos=True)
            if len(prompt) + room <= context or dropped >= turns:
                break
            dropped += 1
        if len(prompt) > context:
            with_system = " with the system prompt" if self.system else ""
            dropping = f" even with all {turns} earlier turn(s) dropped" if turns else ""
            raise GenerationError(
                f"this message takes {len(prompt)} tokens in the chat format{with_system}, more than the "
                f"model file's context of {context} tokens{dropping}; shorten the message"
                f"{' or the system prompt' if self.system else ''}, or convert with a larger --max-context")
        return prompt, dropped

    def send(self, message: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the model's reply to ``message``; the reply joins the conversation."""
        if not message:
            raise GenerationError("the message is empty")
        user = {"role": "user", "content": message}
        try:
            room = self.reply_room(kwargs.get("max_tokens", 256))
        except (TypeError, ValueError):
            room = 1  # stream_generate reports the bad max_tokens
        dropped = self.dropped_turns
        prompt = self._next_turn(user) if self.tokens else None
        if prompt is None or len(prompt) + room > self.model.context_length:
            # a prompt that could be extended but does not fit drops at least one turn
            extra = 1 if prompt is not None and dropped < len(self.messages) // 2 else 0
            prompt, dropped = self._fit(user, room, dropped + extra)
        if self.thinking and (kwargs.get("json_schema") is not None or kwargs.get("grammar") is not None):
            from .constrained import allow_thought

            kwargs = allow_thought(self.model, kwargs)  # the thoughts come first, then the constrained answer
        reply_tokens, parts, failed = [], [], False
        try:
            for r in self.model.stream_generate(prompt, **kwargs):
                reply_tokens.append(r.token)
                parts.append(r.text)
                yield r
        except GenerationError:
            failed = True  # a refused request (bad sampling values, ...) is not a turn
            raise
        finally:  # an interrupted reply (Ctrl-C, a closed stream) still joins the conversation
            if not failed:
                eot = self.model.info.meta.tokenizer.end_of_turn_id
                if eot is not None and (not reply_tokens or reply_tokens[-1] != eot):
                    reply_tokens.append(eot)  # a reply cut short still closes its turn
                self.tokens = prompt + reply_tokens
                self.dropped_turns = dropped
                self.messages += [user, {"role": "model", "content": "".join(parts)}]

    def ask(self, message: str, **kwargs) -> str:
        return "".join(r.text for r in self.send(message, **kwargs))


class _Channel:
    """Routes generated text to the answer or to the thinking channel: after the channel's start
    marker (Gemma 4's <|channel>) comes the channel's name on a line of its own ("thought"),
    then its text, until the end marker (<channel|>). Markers are tokens; without them (Gemma
    1-3) everything is answer."""

    def __init__(self, start: int | None, end: int | None):
        self.start, self.end = start, end
        self.inside = self.naming = False

    def marker(self, token: int) -> bool:
        if self.start is not None and token == self.start:
            self._switch = (True, True)
            return True
        if self.end is not None and token == self.end and self.inside:
            self._switch = (False, False)
            return True
        return False

    def route(self, text: str, before_switch: bool = False) -> tuple[str, str]:
        """(answer text, thinking text) of ``text``; a marker switches after the text before it."""
        answer, reasoning = ("", text) if self.inside else (text, "")
        if self.naming and not before_switch:  # the channel's name line is neither
            name, newline, rest = reasoning.partition("\n")
            reasoning = rest if newline else ""
            self.naming = not newline
        if before_switch:
            self.inside, self.naming = self._switch
        return answer, reasoning


def load(path, threads: int | None = None, backend: str = "auto", draft=None) -> Model:
    """Load a gemma-edge .tflite (memory-mapped; weights are not copied). ``draft``: a smaller
    file with the same tokenizer (a path, or a loaded Model) for speculative decoding."""
    return Model(str(path), threads=threads, backend=backend, draft=draft)
