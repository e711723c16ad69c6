"""Pack a gemma-edge .tflite into a LiteRT-LM ``.litertlm`` file (``gemma-edge pack``).

LiteRT-LM, Google's on-device LLM runtime (Android, iOS, desktop, Raspberry Pi), runs a
.tflite that follows its contract once the model, its tokenizer and an ``LlmMetadata``
proto are packed into one ``.litertlm`` container. gemma-edge files follow that contract
(``prefill_<T>`` / ``decode`` signatures, ``tokens`` / ``input_pos`` / ``kv_cache_{k,v}_{i}``),
so packing converts nothing: the model section is the .tflite byte for byte.

The container is written by ``litert_lm_builder.LitertLmFileBuilder``
(``pip install litert-lm-builder``: protobuf, flatbuffers and absl, no TensorFlow). It is
imported only when ``pack`` runs, so importing this module costs nothing.

What goes in, all derived from the file's own metadata (``read_info``):

- the .tflite, as the ``PREFILL_DECODE`` model;
- the SentencePiece model embedded in it, with one change (``litert_tokenizer``): every
  CONTROL piece other than ``<bos>``, ``<eos>`` and ``<pad>`` becomes USER_DEFINED. gemma-edge
  cuts control strings such as ``<start_of_turn>`` out of prompt text itself
  (``Tokenizer.encode(parse_special=True)``); LiteRT-LM hands the whole text to
  SentencePiece, which never produces a CONTROL piece but always matches a USER_DEFINED
  one literally. Without the change a chat turn rendered by LiteRT-LM would reach the
  model as the characters ``<``, ``start``, ``_of``, ... (tokenizers rebuilt from a GGUF
  mark the turn markers CONTROL, as llama.cpp does);
- ``LlmMetadata`` (``llm_metadata``): start token ``<bos>`` (LiteRT-LM prepends it to the
  first turn), one stop token per stop id (``<eos>``, ``<end_of_turn>``), ``max_num_tokens``
  = the file's context, a greedy default sampler (``TOP_P`` with k=1: the only sampler type
  LiteRT-LM 0.18.1 runs on CPU), the model type (``gemma3`` for Gemma 3; 0.18.1 has no type
  for Gemma 1 or 2, which get ``generic_model``), the file's built-in chat format
  (``runtime/chat.ChatFormat``) both as ``prompt_templates`` and as a jinja template, and
  ``suppress_tokens`` for embedding rows past the tokenizer (test models only; gemma-edge
  never samples those either).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .chat import chat_format
from .errors import GemmaEdgeError, ModelFileError, ModelKindError, TokenizerError
from .fileio import atomic_output, check_output
from .modelfile import ModelInfo, read_info

SUFFIX = ".litertlm"

# Gemma family -> LiteRT-LM LlmModelType field (llm_model_type.proto, 0.18.1). Families not
# listed get ``generic_model``: they still run, with the chat template below.
MODEL_TYPES = {3: "gemma3", 4: "gemma4"}

def default_output(tflite_path) -> Path:
    """``model.tflite`` -> ``model.litertlm`` next to it."""
    return Path(tflite_path).with_suffix(SUFFIX)


def litert_tokenizer(info: ModelInfo) -> tuple[bytes, list[str]]:
    """The embedded SentencePiece model with every CONTROL piece but <bos>, <eos> and <pad>
    made USER_DEFINED.

    Returns the serialized model and the pieces changed. Ids, scores and every other piece
    are unchanged, so plain text encodes to the same ids as before.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # protobuf: a litert-lm-builder dependency

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(info.tokenizer_model)
    except Exception as e:  # protobuf's DecodeError
        raise TokenizerError(f"{info.path}: the embedded tokenizer is not a SentencePiece model ({e}); "
                             "convert the checkpoint again") from None
    Piece = sp_pb2.ModelProto.SentencePiece
    spec, tok = proto.trainer_spec, info.meta.tokenizer
    keep = {spec.bos_id, spec.eos_id, spec.pad_id, tok.bos_id, tok.eos_id, tok.pad_id}
    changed = []
    for i, p in enumerate(proto.pieces):
        if p.type == Piece.CONTROL and i not in keep:
            p.type = Piece.USER_DEFINED
            changed.append(p.piece)
    return proto.SerializeToString(), changed


def _piece_count(info: ModelInfo) -> int:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(info.tokenizer_model)
    return len(proto.pieces)


def llm_metadata(info: ModelInfo, *, top_k: int = 1, top_p: float = 1.0, temperature: float = 1.0):
    """The ``LlmMetadata`` proto LiteRT-LM reads from the container."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, sampler_params_pb2

    tok = info.meta.tokenizer
    stops = list(tok.stop_token_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
    if tok.bos_id is None or not stops:
        raise ModelFileError(f"{info.path}: the metadata names no <bos> or no stop token "
                             f"(tokenizer: {tok}); convert the checkpoint again")
    m = llm_metadata_pb2.LlmMetadata()
    m.start_token.token_ids.ids.append(int(tok.bos_id))
    for t in stops:
        m.stop_tokens.add().token_ids.ids.append(t)
    m.max_num_tokens = info.context_length
    pieces = _piece_count(info)
    if pieces < info.config.vocab_size:  # embedding rows without text: gemma-edge never samples them
        m.suppress_tokens.ids.extend(range(pieces, info.config.vocab_size))
    s = m.sampler_params
    s.type = sampler_params_pb2.SamplerParameters.TOP_P
    s.k, s.p, s.temperature, s.seed = int(top_k), float(top_p), float(temperature), 0
    kind = MODEL_TYPES.get(info.config.family, "generic_model")
    getattr(m.llm_model_type, kind).SetInParent()
    fmt = chat_format(info.meta.chat_template.kind)
    m.prompt_templates.user.prefix = fmt.turn_start + "user\n"
    m.prompt_templates.user.suffix = fmt.turn_end + "\n"
    m.prompt_templates.model.prefix = fmt.model_prefix
    m.prompt_templates.model.suffix = fmt.turn_end + "\n"
    if fmt.system_role is not None:
        m.prompt_templates.system.prefix = fmt.turn_start + fmt.system_role + "\n"
        m.prompt_templates.system.suffix = fmt.turn_end + "\n"
    m.jinja_prompt_template = fmt.jinja()
    m.supports_thinking = False
    m.supports_function_calling = False
    return m


def pack(tflite_path, out_path=None, *, force: bool = False, top_k: int = 1, top_p: float = 1.0,
         temperature: float = 1.0) -> Path:
    """Write ``out_path`` (default: the .tflite's name with ``.litertlm``): the model, its
    tokenizer and LiteRT-LM metadata in one file. Returns the path written.

    The sampler arguments set the file's default sampler (greedy unless changed); LiteRT-LM
    callers can override it per session. Raises ModelFileError for a file that is not a
    gemma-edge model, OutputExistsError if ``out_path`` exists and not ``force``.
    """
    src = Path(tflite_path)
    info = read_info(str(src))  # ModelFileError: missing, not a .tflite, not gemma-edge
    if info.meta.embedding is not None:
        raise ModelKindError(f"{src} is an embedding model; LiteRT-LM's .litertlm holds a text generator "
                             "(prefill and decode), so there is nothing to pack: ship the .tflite itself")
    out = check_output(out_path if out_path is not None else default_output(src), force, inputs=[src],
                       example=src.stem + SUFFIX)
    if not 1 <= int(top_k) or not 0.0 < float(top_p) <= 1.0 or float(temperature) <= 0.0:
        raise GemmaEdgeError(f"bad default sampler top_k={top_k}, top_p={top_p}, temperature={temperature}: "
                             "need top_k >= 1, 0 < top_p <= 1 and temperature > 0 (top_k=1 is greedy)")
    try:
        import litert_lm_builder as lmb
    except ImportError as e:
        raise GemmaEdgeError(f"packing a .litertlm needs LiteRT-LM's builder ({e}): "
                             "pip install 'gemma-edge[litertlm]' (or pip install litert-lm-builder)") from None

    from .. import __version__

    tokenizer, _ = litert_tokenizer(info)
    meta = llm_metadata(info, top_k=top_k, top_p=top_p, temperature=temperature)
    with atomic_output(out, force, inputs=[src]) as tmp, tempfile.TemporaryDirectory(prefix="gemma-edge-pack-") as work:
        tok_path = os.path.join(work, "tokenizer.model")
        meta_path = os.path.join(work, "llm_metadata.pb")
        with open(tok_path, "wb") as f:
            f.write(tokenizer)
        with open(meta_path, "wb") as f:
            f.write(meta.SerializeToString())
        b = lmb.LitertLmFileBuilder()
        for key, value in (("Authors", f"gemma-edge {__version__}"), ("gemma_edge.source", src.name),
                           ("gemma_edge.quantization", info.quant)):
            b.add_system_metadata(lmb.Metadata(key=key, value=value, dtype=lmb.DType.STRING))
        b.add_tflite_model(str(src), lmb.TfLiteModelType.PREFILL_DECODE)
        b.add_sentencepiece_tokenizer(tok_path)
        b.add_llm_metadata(meta_path)
        try:
            with open(tmp, "wb") as f:
                b.build(f, validate_metadata=True)
        except ValueError as e:  # the builder's own metadata validation
            raise GemmaEdgeError(f"litert-lm-builder refused the metadata for {out}: {e}") from None
    return out


__all__ = ["pack", "llm_metadata", "litert_tokenizer", "MODEL_TYPES"]
