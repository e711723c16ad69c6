"""The sentence-transformers layout of an embedding checkpoint (EmbeddingGemma): what comes
after the transformer, read from the files beside its ``config.json``.

    modules.json                        the pipeline: Transformer, Pooling, Dense..., Normalize
    1_Pooling/config.json               mean pooling, prompt tokens included
    2_Dense/, 3_Dense/                  config.json (in/out features, no bias, Identity) and
                                        model.safetensors (``linear.weight`` [out, in])
    config_sentence_transformers.json   ``prompts`` (task name -> prompt text), ``default_prompt_name``
    sentence_bert_config.json           ``max_seq_length`` (sentence-transformers 6: tokenizer_config.json's
                                        ``model_max_length``)

Both spellings sentence-transformers has written are read: module types
``sentence_transformers.models.Dense`` (the hub's EmbeddingGemma) and
``sentence_transformers.base.modules.dense.Dense`` (sentence-transformers 6), Pooling's
``pooling_mode_mean_tokens: true`` and ``pooling_mode: "mean"``. Anything gemma-edge would
compute differently (another pooling, prompts left out of the mean, Dense biases or
activations, other modules) is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import SourceError, UnsupportedModelError

MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
BERT_CONFIG = "sentence_bert_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
NO_LIMIT = 1 << 40  # transformers' "no limit" model_max_length is 1e30
DENSE_WEIGHT = "linear.weight"
MAX_DENSE = 2  # the quantization kinds dense_0, dense_1 (EmbeddingGemma has two; llama.cpp's arch too)

# EmbeddingGemma's task prompts as google/embeddinggemma-300m's config_sentence_transformers.json
# lists them (its model card: "task: {task} | query: " for queries, "title: none | text: " for
# documents). A GGUF file carries none, so a gemma-embedding GGUF gets these.
EMBEDDINGGEMMA_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}
# The smaller sizes EmbeddingGemma was trained to be truncated to (Matryoshka Representation
# Learning; its model card: 768 -> 512, 256 or 128); a file lists those below its own size.
EMBEDDINGGEMMA_MATRYOSHKA = (512, 256, 128)


def matryoshka_dims(dim: int) -> tuple[int, ...]:
    return tuple(d for d in EMBEDDINGGEMMA_MATRYOSHKA if d < dim)


@dataclass(frozen=True)
class Dense:
    path: str  # the module's folder, e.g. "2_Dense"
    in_features: int
    out_features: int

    @property
    def tensor(self) -> str:
        """The name its weight is read under (``SafetensorsCheckpoint.attach``)."""
        return f"{self.path}/{DENSE_WEIGHT}"


@dataclass(frozen=True)
class Layout:
    dense: tuple[Dense, ...]
    normalize: bool
    prompts: dict
    default_task: str | None
    max_seq_length: int  # 0: none given
    files: tuple[Path, ...]  # every file read here (the Dense weights are read by the checkpoint)


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"{path}: not valid JSON ({e}); re-download the checkpoint's sentence-transformers "
                          "files") from None


def _refuse(path: Path, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{path}: {what}; gemma-edge converts EmbeddingGemma's sentence-transformers "
                                 "layout (mean pooling with the prompt, Dense layers without bias or activation, "
                                 "Normalize)")


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling(folder: Path) -> None:
    cfg = _json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise SourceError(f"{folder / 'config.json'}: not a JSON object")
    mode = cfg.get("pooling_mode")
    if mode is None:  # the older spelling: one flag per mode
        on = sorted(k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
        mode = on[0] if len(on) == 1 else "+".join(on) or "none"
    if mode not in ("mean", "mean_tokens"):
        raise _refuse(folder, f"pooling is {mode!r}, not mean")
    if cfg.get("include_prompt", True) is not True:
        raise _refuse(folder, "the prompt's tokens are left out of the mean (include_prompt false)")


def _dense(root: Path, path: str) -> Dense:
    folder = root / path
    cfg = _json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise SourceError(f"{folder / 'config.json'}: not a JSON object")
    if cfg.get("bias", True) is not False:
        raise _refuse(folder, "the Dense layer has a bias")
    act = str(cfg.get("activation_function", ""))
    if act.rsplit(".", 1)[-1] != "Identity":
        raise _refuse(folder, f"the Dense layer's activation is {act!r}, not Identity")
    n_in, n_out = cfg.get("in_features"), cfg.get("out_features")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_in, n_out)):
        raise SourceError(f"{folder / 'config.json'}: in_features {n_in!r} / out_features {n_out!r} are not "
                          "positive integers; re-download the checkpoint")
    if not (folder / "model.safetensors").is_file():
        raise SourceError(f"{folder}: no model.safetensors (the Dense layer's weight); gemma-edge reads "
                          "safetensors: re-save the model with sentence-transformers >= 3, or re-download it")
    return Dense(path, n_in, n_out)


def read(root: Path) -> Layout | None:
    """The layout of the checkpoint folder ``root``, or None without a ``modules.json``."""
    path = root / MODULES
    if not path.is_file():
        return None
    modules = _json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise SourceError(f"{path}: not a list of modules; re-download the checkpoint")
    kinds = [_kind(m) for m in modules]
    n_dense = kinds.count("Dense")
    want = ["Transformer", "Pooling"] + ["Dense"] * n_dense + (["Normalize"] if "Normalize" in kinds else [])
    if kinds != want or str(modules[0].get("path", "")) not in ("", "."):
        raise _refuse(path, f"its modules are {kinds} (Transformer at the top folder, then Pooling, Dense..., "
                            "Normalize expected)")
    if n_dense > MAX_DENSE:
        raise _refuse(path, f"it has {n_dense} Dense layers; gemma-edge reads up to {MAX_DENSE}")
    for m in modules[1:]:
        p = str(m.get("path", ""))
        if not p or Path(p).name != p:
            raise SourceError(f"{path}: module path {p!r} is not a folder name beside it; re-download the checkpoint")
    files = [path]
    _pooling(root / modules[1]["path"])
    files.append(root / modules[1]["path"] / "config.json")
    dense = tuple(_dense(root, m["path"]) for m in modules[2:2 + n_dense])
    for d in dense:
        files.append(root / d.path / "config.json")
    for a, b in zip(dense, dense[1:]):
        if a.out_features != b.in_features:
            raise SourceError(f"{root / b.path}: takes {b.in_features} features but {a.path} gives "
                              f"{a.out_features}; the Dense layers come from different models")
    prompts, default, max_len = {}, None, 0
    if (root / ST_CONFIG).is_file():
        st = _json(root / ST_CONFIG)
        files.append(root / ST_CONFIG)
        prompts = (st.get("prompts") or {}) if isinstance(st, dict) else None
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in prompts.items()):
            raise SourceError(f"{root / ST_CONFIG}: prompts is not an object of task name -> prompt text")
        default = st.get("default_prompt_name") if isinstance(st, dict) else None
        if default is not None and default not in prompts:
            raise SourceError(f"{root / ST_CONFIG}: default_prompt_name {default!r} is not one of its prompts "
                              f"{sorted(prompts)}")
    for name, key in ((BERT_CONFIG, "max_seq_length"), (TOKENIZER_CONFIG, "model_max_length")):
        if max_len or not (root / name).is_file():  # sentence-transformers 6 keeps it in the tokenizer's config
            continue
        doc = _json(root / name)
        files.append(root / name)
        max_len = (doc.get(key) or 0) if isinstance(doc, dict) else None
        if isinstance(max_len, (int, float)) and not isinstance(max_len, bool) and max_len >= NO_LIMIT:
            max_len = 0
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
            raise SourceError(f"{root / name}: {key} {max_len!r} is not a token count")
    return Layout(dense=dense, normalize="Normalize" in kinds, prompts=dict(prompts), default_task=default,
                  max_seq_length=max_len, files=tuple(files))
