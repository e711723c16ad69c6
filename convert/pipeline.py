"""``convert()``: a Gemma checkpoint to one self-describing .tflite, in bounded memory.

The Python API behind ``gemma-convert``. Steps: open the checkpoint lazily, derive the
config, map the weight names, rebuild or copy the tokenizer, build the weightless
template, then stream every weight through the quantizer into a temporary file that is
renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..quantize.report import role_table
from ..quantize.schemes import SCHEMES, get_scheme, kind_of, parse_recipe, recipe_name
from ..runtime import chat, contract, modelfile
from ..runtime.config import GemmaConfig, to_ranges
from ..runtime.errors import GemmaEdgeError, QuantizationError, SourceError
from ..runtime.fileio import atomic_output, check_output
from ..runtime.tokenizer import Tokenizer
from .checkpoint import Source, ids
from .names import PLE_COLUMNS

DEFAULT_CONTEXT = 2048
# Prefill chunk lengths. Every signature costs ~7 MB at load on the 270M (int8), and a chunk of
# T tokens an arena of T x context attention scores when first run: prefill_512 would add ~50 MB
# at context 2048 (~0.5 GB at 32k) for 7% faster prefill of a 1024-token prompt (measured, the
# 270M, 2 threads). --prefill-lengths 8,32,128,512 brings it back.
DEFAULT_PREFILL = (8, 32, 128)
# score_<T> signatures (logits of every position of a chunk): perplexity scores 32 tokens a call
# instead of one, and speculative decoding checks k drafted tokens in one call of the smallest
# T >= k + 1 (runtime/speculative.py). A short T is what makes that pay: on the fp32 270M a decode
# step took 32 ms, score_4 47, score_8 70, score_32 137 (each signature also costs ~T * 1 MB of
# LiteRT arena for the 270M's logits, so not every T is shipped).
DEFAULT_SCORE = (4, 8, 32)
DEFAULT_EMBED = (32, 128, 512)  # an embedding model's embed_<T> chunk lengths, plus its context


def score_lengths(value, context: int) -> list[int]:
    """``score_length`` as given (one T, several, or 0 / None for none) -> the sorted lengths,
    each at most the context."""
    if not value:
        return []
    values = [value] if isinstance(value, int) else list(value)
    return sorted({min(int(t), context) for t in values if int(t) > 0})


@dataclass(frozen=True)
class ConvertResult:
    path: str
    file_size: int
    seconds: float
    peak_rss_mb: float
    config: GemmaConfig
    quant: str
    context_length: int
    prefill_lengths: tuple[int, ...]
    score_length: int | None  # the longest score_<T> (perplexity's chunk), None without one
    weight_errors: tuple | None = None  # RoleError rows, when convert(report=True)
    lora: str | None = None  # the LoRA adapter merged in, if any
    grid_blocks: dict | None = None  # tensor -> {blocks, imported, clipped}, when convert(report=True)
    score_lengths: tuple[int, ...] = ()  # every score_<T>
    embed_lengths: tuple[int, ...] = ()  # an embedding model's embed_<T> chunk lengths


def special_tokens(tok: Tokenizer, cfg: GemmaConfig, declared_stop_ids=(), add_eos: bool = False) -> modelfile.TokenizerMeta:
    """Special ids, and the stop ids: the checkpoint's own (generation_config.json /
    config.json eos_token_id, GGUF eos/eot ids), the tokenizer's </s>, and the end-of-turn
    marker of its chat format (Gemma 1-3's <end_of_turn>, Gemma 4's <turn|>), which ends every
    turn of the chat template."""
    fmt = chat.format_for(tok)
    sot, eot = tok.piece_to_id(fmt.turn_start), tok.piece_to_id(fmt.turn_end)
    stops = ids(tok.eos_id, *[t for t in declared_stop_ids if t < cfg.vocab_size], eot)
    return modelfile.TokenizerMeta(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, start_of_turn_id=sot,
                                   end_of_turn_id=eot, stop_token_ids=tuple(stops),
                                   declared_stop_ids=tuple(declared_stop_ids), add_bos=True, add_eos=add_eos,
                                   special_ranges=to_ranges(tok.control_ids))


def _quantization(name: str, recipe: dict[str, str], tensors: dict[str, str], hot: int = 0) -> modelfile.Quantization:
    """The file-level entry: the scheme table's row when one scheme covers every kind. ``hot``: the
    rows of a split embedding's first table, which the description counts."""
    schemes = set(recipe.values())
    if len(schemes) == 1:
        row = get_scheme(schemes.pop()).to_dict()
        name, description = row.pop("name"), row.pop("description")
    else:
        spelled = recipe_name(",".join(f"{k}={v}" for k, v in recipe.items()), recipe)
        description, row = "mixed: " + spelled.replace(",", ", ").replace("=", " "), {}
        if hot:
            description = description.replace("embedding_hot ", f"embedding's {hot} frequent-piece rows ")
    return modelfile.Quantization(name=name, description=description, recipe=dict(recipe), tensors=tensors, scheme=row)


def _calibration(src: Source, calibrate: str, out, recipe: dict, context: int, progress: bool, lora, stage):
    """The calibration plan for ``src``: statistics gathered layer by layer (quantize/calibrate.py)
    on a text file's tokens, or on sequences the model writes itself from a temporary conversion
    of its weights (fp32 up to 1B parameters, int8 above: bounded disk and time)."""
    import tempfile

    from ..quantize import calibrate as K

    if calibrate != "-":
        try:
            text = open(calibrate, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise GemmaEdgeError(f"{calibrate}: cannot be read as UTF-8 text ({e}); give a text file to calibrate on, "
                                 "or --calibrate without a file to let the model write its own") from None
        seqs = K.text_sequences(src.tokenizer, text)
    else:
        quant = "fp32" if src.config.num_params <= 1_000_000_000 else "int8"
        with tempfile.TemporaryDirectory(prefix="gemma-edge-calibrate-", dir=os.path.dirname(os.path.abspath(out))) as d:
            stage(f"calibrate: temporary {quant} conversion")
            tmp = convert(str(src.path), os.path.join(d, "m.tflite"), quant=quant, max_context=min(context, 512),
                          prefill_lengths=(8, 32, 128), progress=progress, score_length=None, lora=lora)
            stage("calibrate: the model writes its calibration text")
            seqs = K.generated_sequences(tmp.path, progress=progress, cache_dir=os.path.join(d, "cache"))
    search = K.search_alpha(recipe)
    calib = K.Calibration(keep=256 if search else 0)  # input samples only where the strength is searched
    stage("calibrate: statistics, layer by layer")
    K.forward(src.config, src.read_rows, seqs, calib)
    stage("calibrate: plan" + (" (alpha searched)" if search else ""))
    return K.make_plan(src.config, calib, src.read_rows, alpha=K.alpha_for_recipe(recipe),
                       recipe=recipe if search else None)


@contextlib.contextmanager
def _non_finite_names(src: Source):
    """A NaN or an infinity in the weights is an error naming the checkpoint's own tensor."""
    from .tflite_writer import NonFiniteWeights

    try:
        yield
    except NonFiniteWeights as e:
        raise SourceError(f"{src.path}: tensor {src.map[e.name][0]} holds NaN or infinity (rows {e.r0}..{e.r1 - 1}: "
                          f"{e.detail}); the checkpoint is damaged: re-download or re-export it") from None


def convert(source: str, output: str, quant: str = "int8", max_context: int | None = None,
            prefill_lengths=DEFAULT_PREFILL, force: bool = False, progress: bool = True,
            score_length=DEFAULT_SCORE, report: bool = False,
            lora: str | None = None, on_stage=None, notes=None, calibration=None,
            calibrate: str | None = None, embed_lengths=DEFAULT_EMBED, ring_caches: bool = True,
            for_draft: bool = False) -> ConvertResult:
    """Convert ``source`` (HF checkpoint dir or .gguf) to ``output`` (.tflite).

    ``score_length`` (one T or several) adds ``score_<T>`` signatures (logits of every position
    of a chunk) that ``gemma-edge eval`` (the longest) and speculative decoding (the shortest
    that holds the drafted tokens) use; 0 or None leaves them out. ``report`` measures every
    tensor's quantization error as it is written (``ConvertResult.weight_errors``).
    ``lora`` is a peft LoRA adapter directory merged into the weights as they stream
    (``convert.lora``); the file's ``source.lora`` metadata records it.
    ``on_stage(name)`` is called as each stage starts: ``open checkpoint``, ``build template``,
    ``write <weight>`` (every canonical weight, in file order), ``finish`` and ``done``;
    with ``calibrate``, ``calibrate`` and its steps (``calibrate: ...``) come before ``build template``.
    ``notes(line)`` receives one-line remarks for the user (a multimodal checkpoint's towers
    skipped); by default they are warnings. ``calibration`` (a ``quantize.calibrate.Plan``)
    changes values before they are quantized: scales migrated between norms and weights, and
    importance-weighted scale searches; the file's layout and kernels stay the same.
    ``calibrate`` builds that plan: a UTF-8 text file to calibrate on, or ``"-"`` for sequences
    the model writes itself (from a temporary conversion of the same weights); see
    ``quantize/calibrate.py``.
    ``ring_caches`` (default) gives sliding layers caches of about their window, written round
    as a ring, when that is shorter than the context (``contract.ring_length``); False keeps every
    cache at the full context, a slot per position (the layout of earlier files).
    ``for_draft`` makes a faster speculative draft: the tied embedding is stored as two tables
    (its frequent pieces' rows, ``contract.hot_ranges``, and the rest; each keeps the recipe's
    scheme) and a ``decode_hot`` signature computes the logits of the first table's rows and of
    ``contract.HOT_EXTRA`` tokens the caller names, which a draft's step uses
    (``runtime/speculative.py``: the context's latest tokens outside that table), with a
    ``decode_hot_s<S'>`` beside each ``decode_s<S'>`` (a context above 2048), so the step keeps
    to the span below it. The file runs as any other.

    An embedding checkpoint (EmbeddingGemma: a sentence-transformers layout, or a
    gemma-embedding GGUF) gets ``embed_<T>`` signatures for each of ``embed_lengths`` below the
    context and the context itself (the longest text it embeds) instead of prefill, decode and
    score; ``prefill_lengths`` and ``score_length`` are not used, and its context is at most the
    checkpoint's own limit (sentence-transformers' max_seq_length).
    """
    t0 = time.time()
    stage = on_stage or (lambda name: None)
    recipe = parse_recipe(quant)  # kind -> scheme name
    out = check_output(output, force)  # before any work; the source's files are checked once known
    stage("open checkpoint")
    src = Source(source, lora=lora)
    try:
        check_output(out, force, inputs=src.files())  # --force must never replace what it reads
        for line in src.notes:
            (notes or (lambda m: warnings.warn(m, stacklevel=3)))(line)
        from . import template

        cfg = src.config
        limit = min(cfg.max_position, (src.embedding.max_tokens if src.embedding else 0) or cfg.max_position)
        context = min(max_context or DEFAULT_CONTEXT, limit)
        if context < 2:
            given = f"--max-context {max_context}" if max_context else f"the checkpoint's context ({limit})"
            raise GemmaEdgeError(f"{given} is too small; a file needs a context of at least 2 tokens")
        embedding = None
        if src.embedding is not None:  # an embedding model: embed_<T> signatures only
            if calibrate is not None or calibration is not None:
                raise GemmaEdgeError("--calibrate measures a causal LM's activations; it does not apply to an "
                                     "embedding model (convert it without --calibrate)")
            embedding = dataclasses.replace(
                src.embedding, lengths=tuple(sorted({int(t) for t in embed_lengths if 0 < int(t) < context} | {context})))
            prefill_lengths, score_length = (), None
        lengths = sorted({int(t) for t in prefill_lengths if 0 < int(t) <= context})
        if not lengths and embedding is None:
            raise GemmaEdgeError(f"no prefill length in {list(prefill_lengths)} fits the context {context}")
        score = score_lengths(score_length, context)
        shapes = contract.weight_shapes(cfg)
        src.check_shapes(shapes)
        if calibrate is not None and calibration is None:
            stage("calibrate")
            calibration = _calibration(src, calibrate, out, recipe, context, progress, lora, stage)
            for line in calibration.notes:
                (notes or (lambda m: warnings.warn(m, stacklevel=3)))(line)
        # the file's own config: the tied embedding in two tables when its rows of frequent pieces
        # have a scheme of their own (a causal LM's LM head; an embedding model only looks rows up)
        hot = contract.hot_ranges(cfg.vocab_size, src.tokenizer.piece_to_id)
        if for_draft and (embedding is not None or not hot):
            raise GemmaEdgeError(
                "--for-draft makes a speculative draft of a causal language model with a vocabulary to split; "
                + ("this checkpoint is an embedding model" if embedding is not None else
                   f"this one's {cfg.vocab_size} pieces are too few") + " (convert it without --for-draft)")
        if embedding is None and hot and (for_draft or recipe.get("embedding_hot", recipe["embedding"]) !=
                                          recipe["embedding"]):
            cfg = dataclasses.replace(cfg, embed_hot=hot)
            shapes = contract.weight_shapes(cfg)
        present = {kind_of(n) for n in shapes} - {None}
        quant = recipe_name(quant, present)
        recipe = {k: v for k, v in recipe.items() if k in present}
        from .tflite_writer import WeightSlot, write_model

        slots = [WeightSlot(n, s, get_scheme(recipe[kind_of(n)]) if kind_of(n) else SCHEMES["fp32"])
                 for n, s in shapes.items()]
        vocab = set(contract.vocab_tables(cfg))
        for s in slots:  # a quantized vocabulary table's row scales: a tensor, not copied into each signature
            s.row_scales = s.name in vocab and s.scheme.granularity == "channel"
        row_scaled = [s.name for s in slots if s.row_scales]
        for s in slots:  # the per-layer tables are one packed source table: written from one pass over it
            source = contract.source_rows(s.name, cfg, 0, 0)[0]
            if src.map[source][1] == PLE_COLUMNS:
                s.group, s.read_cols = "ple_embed", cfg.ple_dim * cfg.num_layers
            if calibration is not None and not s.scheme.is_float:
                s.importance = calibration.importance.get(source)
        for s in slots:
            if s.scheme.block_size and s.shape[-1] % s.scheme.block_size:
                raise QuantizationError(
                    f"tensor {s.name} of shape {s.shape} cannot be stored as {s.scheme.name}: its rows of "
                    f"{s.shape[-1]} values are not a multiple of the block size {s.scheme.block_size}; "
                    "choose a smaller block (int4-b32) or per-channel int4 for that role")
            if s.scheme.bits < 8 and (s.shape[-1] * s.scheme.bits) % 8:
                raise QuantizationError(
                    f"tensor {s.name} of shape {s.shape} cannot be stored as {s.scheme.name}: its rows of "
                    f"{s.shape[-1]} values do not fill whole bytes; use --quant int8")
        if embedding is None and ring_caches:  # sliding layers' caches as rings of about their window
            cfg = dataclasses.replace(cfg, kv_ring=contract.ring_length(cfg, context, max([*lengths, *score])))
        stage("build template")
        spans = () if embedding else contract.decode_spans(context, cfg)  # no cache, no decode
        hot_spans = spans if for_draft else ()  # a draft's step below a span reads what decode_s<S'> reads
        tpl = template.build_template(cfg, context, lengths, score, spans, progress=progress,  # TF in children
                                      embed_lengths=embedding.lengths if embedding else (), row_scaled=row_scaled,
                                      decode_hot=for_draft, hot_spans=hot_spans)
        meta = modelfile.FileMeta(
            config=cfg, context_length=context, prefill_lengths=tuple(lengths), score_lengths=tuple(score),
            decode_spans=spans, decode_hot=for_draft, decode_hot_spans=hot_spans,
            quantization=_quantization(quant, recipe, {s.name: s.scheme.name for s in slots}, cfg.embed_hot_rows),
            tokenizer=special_tokens(src.tokenizer, cfg, src.declared_stop_ids, src.add_eos),
            chat_template=modelfile.ChatTemplate(kind=chat.format_for(src.tokenizer).name,
                                                 jinja=src.chat_template_jinja),
            source=modelfile.SourceMeta(name=src.path.name, format=src.format, sha256=src.sha256(), lora=src.lora),
            gemma_edge_version=__version__, embedding=embedding)
        bar = None
        errors = {} if report else None
        seen = set()

        def read_rows(name, r0, r1):
            if name not in seen:  # once per weight (grouped weights are read chunk by chunk in turn)
                seen.add(name)
                stage(f"write {name}")
            canon, ranges = contract.source_rows(name, cfg, r0, r1)  # a split embedding's are rows of embed
            parts = [src.read_rows(canon, a, b) if calibration is None
                     else calibration.apply(canon, src.read_rows(canon, a, b), a, b) for a, b in ranges]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        try:
            with atomic_output(out, force, inputs=src.files()) as tmp, _non_finite_names(src):
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=sum(s.nbytes for s in slots), unit="B", unit_scale=True,
                               desc=f"writing {out.name} ({quant})", leave=False)
                size = write_model(tpl, slots, read_rows, modelfile.metadata_entries(meta, src.tokenizer_model),
                                   str(tmp), progress=bar.update if bar is not None else None, errors=errors,
                                   on_finish=lambda: stage("finish"))
        finally:
            if bar is not None:
                bar.close()
    finally:
        src.close()
    stage("done")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return ConvertResult(str(out), size, time.time() - t0, peak, cfg, quant, context, tuple(lengths),
                         score[-1] if score else None,
                         tuple(role_table(errors, meta.quantization.tensors)) if report else None,
                         lora=lora, grid_blocks={s.name: dict(s.grid) for s in slots if s.grid} if report else None,
                         score_lengths=tuple(score),
                         embed_lengths=embedding.lengths if embedding else ())


def perplexity_vs_fp32(source: str, result: ConvertResult, text: str, max_tokens: int | None = None,
                       progress: bool = True) -> dict:
    """The converted file against an fp32 conversion of the same source on ``text`` (made in a
    temporary folder with the same context and signatures, then deleted): ``Model.compare``'s
    perplexities, KL divergence and top-1 agreement, as ``{"comparison": ...}``."""
    import tempfile

    from ..runtime.engine import load

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"comparing {result.quant} with fp32", unit="tok", leave=False)

    def tick(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        with tempfile.TemporaryDirectory(prefix="gemma-edge-fp32-", dir=os.path.dirname(os.path.abspath(result.path))) as d:
            if result.quant == "fp32":
                ref_path = result.path
            else:
                ref_path = convert(source, os.path.join(d, "fp32.tflite"), quant="fp32",
                                   max_context=result.context_length, prefill_lengths=result.prefill_lengths,
                                   progress=progress, score_length=result.score_lengths, lora=result.lora).path
            model, base = load(result.path), load(ref_path)  # two instances even of one file
            tick_or_none = tick if bar is not None else None  # a tqdm without a total has no truth value
            return {"comparison": model.compare(base, text, max_tokens=max_tokens, progress=tick_or_none)}
    finally:
        if bar is not None:
            bar.close()


__all__ = ["convert", "ConvertResult", "perplexity_vs_fp32"]
