"""``convert()``: a Gemma checkpoint to one self-describing .tflite, in bounded memory.

The Python API behind ``gemma-convert``. Steps: open the checkpoint lazily, derive the
config, map the weight names, rebuild or copy the tokenizer, build the weightless
template, then stream every weight through the quantizer into a temporary file that is
renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..quantize.report import role_table
from ..quantize.schemes import SCHEMES, get_scheme, kind_of, parse_recipe, recipe_name
from ..runtime import modelfile
from ..runtime.chat import GEMMA_TEMPLATE
from ..runtime.config import GemmaConfig
from ..runtime.errors import (GemmaEdgeError, OutputExistsError, QuantizationError, SourceError,
                              TokenizerError)
from ..runtime.fileio import atomic_output
from ..runtime.tokenizer import Tokenizer
from . import names as namemap
from .checkpoint import GGUFCheckpoint, open_checkpoint

DEFAULT_CONTEXT = 2048
DEFAULT_PREFILL = (8, 32, 128, 512)
DEFAULT_SCORE = 32  # score_<T>: perplexity scores T tokens a call instead of one


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
    score_length: int | None
    weight_errors: tuple | None = None  # RoleError rows, when convert(report=True)
    lora: str | None = None  # the LoRA adapter merged in, if any


class Source:
    """A checkpoint with its config, tokenizer and name map: canonical weights by row range."""

    def __init__(self, path: str, lora: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{path}: no such file or directory. Give a Hugging Face checkpoint "
                              "directory (config.json, *.safetensors, tokenizer.model) or a .gguf file")
        self.ckpt = open_checkpoint(str(self.path))
        infos = self.ckpt.tensors()
        self.chat_template_jinja = None
        self.declared_stop_ids: list[int] = []  # end-of-generation ids the checkpoint itself declares
        if isinstance(self.ckpt, GGUFCheckpoint):
            self.format = "gguf"
            meta = self.ckpt.metadata()
            emb = infos.get("token_embd.weight")
            if emb is None:
                raise SourceError(f"{path}: GGUF has no token_embd.weight; it is not a Gemma model file")
            self.config = GemmaConfig.from_gguf(meta, vocab_size=emb.shape[0])
            from .gguf_tokenizer import sentencepiece_from_gguf

            self.tokenizer_model = sentencepiece_from_gguf(self.ckpt)
            self.chat_template_jinja = meta.get("tokenizer.chat_template")
            self.declared_stop_ids = _ids(meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
        else:
            self.format = "safetensors"
            root = self.path if self.path.is_dir() else self.path.parent
            cfg_path = root / "config.json"
            if not cfg_path.exists():
                raise SourceError(f"{root}: no config.json next to the safetensors; a Hugging Face "
                                  "checkpoint directory needs config.json, *.safetensors and tokenizer.model")
            try:
                hf = json.loads(cfg_path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise SourceError(f"{cfg_path}: not valid JSON ({e}); re-download the checkpoint") from None
            self.config = GemmaConfig.from_hf_config(hf)
            tok_path = root / "tokenizer.model"
            if not tok_path.exists():
                raise TokenizerError(
                    f"{root}: no tokenizer.model. gemma-edge embeds the SentencePiece tokenizer in the "
                    "output file; copy tokenizer.model from the original Gemma checkpoint into this directory")
            self.tokenizer_model = tok_path.read_bytes()
            gen = root / "generation_config.json"
            declared = [hf.get("eos_token_id")]
            if gen.exists():
                try:  # instruction-tuned checkpoints list <end_of_turn> here, e.g. [1, 106]
                    declared.insert(0, json.loads(gen.read_text()).get("eos_token_id"))
                except ValueError:
                    pass
            self.declared_stop_ids = _ids(*declared)
            tc = root / "tokenizer_config.json"
            if tc.exists():
                try:
                    self.chat_template_jinja = json.loads(tc.read_text()).get("chat_template")
                except ValueError:
                    pass
        self.tokenizer = Tokenizer(self.tokenizer_model)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise TokenizerError(
                f"the tokenizer has {self.tokenizer.vocab_size} pieces but the model's embedding has "
                f"{self.config.vocab_size} rows; the tokenizer belongs to another model")
        self.map = namemap.build_map(self.format, self.config, infos)
        self._shift_baked_in = namemap.shift_baked_in(self.format)
        self._infos = infos
        self.lora = None  # what was merged, for the file's metadata
        if lora is not None:
            from .lora import open_with_lora

            try:  # every weight is read through self.ckpt, so wrapping it merges the adapter
                self.ckpt = open_with_lora(self.ckpt, lora)
            except BaseException:
                self.ckpt.close()
                raise
            self.lora = self.ckpt.describe()

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        bad = []
        for canon, want in shapes.items():
            src, _ = self.map[canon]
            got = tuple(self._infos[src].shape)
            if got != want:
                bad.append(f"{src} is {got}, expected {want}")
        if bad:
            raise SourceError(f"{self.path}: tensor shapes disagree with the config: " + "; ".join(bad[:5]) +
                              ". The checkpoint and its config.json come from different models")

    def read_rows(self, canon: str, r0: int, r1: int) -> np.ndarray:
        src, transform = self.map[canon]
        info = self._infos[src]
        if len(info.shape) == 1:
            w = self.ckpt.read(src)[None, :]
        else:
            w = self.ckpt.read(src, rows=(r0, r1))
        if transform == namemap.NORM:
            w = namemap.norm_scale(w, self._shift_baked_in)
        return w

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir()
                      if p.suffix in (".safetensors", ".json", ".model") and p.is_file())

    def sha256(self) -> str:
        h = hashlib.sha256()
        for f in self.files():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
        return h.hexdigest()

    def close(self):
        self.ckpt.close()


def _ids(*values) -> list[int]:
    """Token ids from config values that may be an int, a list of ints, or missing."""
    out = []
    for v in values:
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, int) and not isinstance(t, bool) and t >= 0 and t not in out:
                out.append(t)
    return out


def special_tokens(tok: Tokenizer, cfg: GemmaConfig, declared_stop_ids=()) -> dict:
    """Special ids, and the stop ids: the checkpoint's own (generation_config.json /
    config.json eos_token_id, GGUF eos/eot ids), the tokenizer's </s>, and <end_of_turn>,
    which ends every turn of the Gemma chat template."""
    sot, eot = tok.piece_to_id("<start_of_turn>"), tok.piece_to_id("<end_of_turn>")
    stops = _ids(tok.eos_id, *[t for t in declared_stop_ids if t < cfg.vocab_size], eot)
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "start_of_turn_id": sot, "end_of_turn_id": eot, "stop_token_ids": stops,
            "declared_stop_ids": list(declared_stop_ids)}


def _summary_scheme(name: str, recipe: dict[str, str]) -> dict:
    """The file-level scheme entry: the table's row when one scheme covers every kind."""
    schemes = set(recipe.values())
    if len(schemes) == 1:
        return get_scheme(schemes.pop()).to_dict()
    spelled = recipe_name(",".join(f"{k}={v}" for k, v in recipe.items()))
    return {"name": name, "description": "mixed: " + spelled.replace(",", ", ").replace("=", " ")}


def convert(source: str, output: str, quant: str = "int8", max_context: int | None = None,
            prefill_lengths=DEFAULT_PREFILL, force: bool = False, progress: bool = True,
            score_length: int | None = DEFAULT_SCORE, report: bool = False,
            lora: str | None = None) -> ConvertResult:
    """Convert ``source`` (HF checkpoint dir or .gguf) to ``output`` (.tflite).

    ``score_length`` T adds a ``score_<T>`` signature (logits of every position of a chunk)
    that ``gemma-edge eval`` uses; 0 or None leaves it out. ``report`` measures every
    tensor's quantization error as it is written (``ConvertResult.weight_errors``).
    ``lora`` is a peft LoRA adapter directory merged into the weights as they stream
    (``convert.lora``); the file's ``source.lora`` metadata records it.
    """
    t0 = time.time()
    recipe = parse_recipe(quant)  # kind -> scheme name
    quant = recipe_name(quant)
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force (force=True) to overwrite it, or choose another -o")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name such as {out / 'model.tflite'}")
    if not out.parent.exists():
        raise SourceError(f"the output folder {out.parent} does not exist; create it first")

    src = Source(source, lora=lora)
    try:
        from . import template

        cfg = src.config
        context = min(max_context or DEFAULT_CONTEXT, cfg.max_position)
        if context < 2:
            raise GemmaEdgeError(f"--max-context {context} is too small; use at least 2")
        lengths = sorted({int(t) for t in prefill_lengths if 0 < int(t) <= context})
        if not lengths:
            raise GemmaEdgeError(f"no prefill length in {list(prefill_lengths)} fits the context {context}")
        score = [min(int(score_length), context)] if score_length else []
        shapes = template.weight_shapes(cfg)
        src.check_shapes(shapes)
        from .tflite_writer import WeightSlot, write_model

        slots = [WeightSlot(n, s, get_scheme(recipe[kind_of(n)]) if kind_of(n) else SCHEMES["fp32"])
                 for n, s in shapes.items()]
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
        tpl = template.build_template(cfg, context, lengths, score, progress=progress)  # TF in children; after the checks
        meta = {
            "format": modelfile.FORMAT, "format_version": modelfile.FORMAT_VERSION,
            "gemma_edge_version": __version__,
            "config": cfg.to_dict(),
            "quantization": {"scheme": _summary_scheme(quant, recipe), "recipe": recipe,
                             "tensors": {s.name: s.scheme.name for s in slots}},
            "context_length": context,
            "prefill_lengths": lengths,
            "score_lengths": score,
            "kv_cache": {"layout": "[1, num_kv_heads, context_length, head_dim]", "dtype": "float32"},
            "tokenizer": {"kind": "sentencepiece", "metadata_name": modelfile.TOKENIZER_KEY,
                          "add_bos": True, **special_tokens(src.tokenizer, cfg, src.declared_stop_ids)},
            "chat_template": {"kind": "gemma", "text": GEMMA_TEMPLATE, "jinja": src.chat_template_jinja},
            "source": {"name": src.path.name, "format": src.format, "sha256": src.sha256(),
                       **({"lora": src.lora} if src.lora else {})},
        }
        blobs = {modelfile.CONFIG_KEY: json.dumps(meta, indent=1).encode(),
                 modelfile.TOKENIZER_KEY: src.tokenizer_model,
                 modelfile.CHECKSUM_KEY: bytes(modelfile.CHECKSUM_BYTES)}  # filled in by the writer
        bar = None
        errors = {} if report else None
        try:
            with atomic_output(out) as tmp:
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=sum(s.nbytes for s in slots), unit="B", unit_scale=True,
                               desc=f"writing {out.name} ({quant})", leave=False)
                size = write_model(tpl, slots, src.read_rows, blobs, str(tmp),
                                   progress=bar.update if bar else None, errors=errors)
        finally:
            if bar is not None:
                bar.close()
    finally:
        src.close()
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return ConvertResult(str(out), size, time.time() - t0, peak, cfg, quant, context, tuple(lengths),
                         score[0] if score else None,
                         tuple(role_table(errors, meta["quantization"]["tensors"])) if report else None,
                         lora=lora)


def perplexity_vs_fp32(source: str, result: ConvertResult, text: str, max_tokens: int | None = None,
                       progress: bool = True) -> dict:
    """Perplexity of the converted file on ``text`` next to an fp32 conversion of the same
    source (made in a temporary folder with the same context and signatures, then deleted)."""
    import tempfile

    from ..runtime.engine import load

    def score(path: str, label: str) -> dict:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"perplexity ({label})", unit="tok", leave=False)

        def tick(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            return load(path).perplexity(text, max_tokens=max_tokens, progress=tick if bar else None)
        finally:
            if bar is not None:
                bar.close()

    out = {"quantized": score(result.path, result.quant)}
    if result.quant == "fp32":
        out["fp32"] = out["quantized"]
        return out
    with tempfile.TemporaryDirectory(prefix="gemma-edge-fp32-", dir=os.path.dirname(os.path.abspath(result.path))) as d:
        ref = convert(source, os.path.join(d, "fp32.tflite"), quant="fp32", max_context=result.context_length,
                      prefill_lengths=result.prefill_lengths, progress=progress,
                      score_length=result.score_length, lora=result.lora)
        out["fp32"] = score(ref.path, "fp32")
    return out


__all__ = ["convert", "ConvertResult", "Source", "perplexity_vs_fp32"]
