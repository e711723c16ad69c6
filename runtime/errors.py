"""Typed errors. Every message says what is wrong, with the numbers, and what to do next.

The CLIs catch ``GemmaEdgeError`` and print the message with exit code 2, no traceback.
"""


class GemmaEdgeError(Exception):
    """Base class of every error gemma-edge raises for bad input or a bad environment."""


class SourceError(GemmaEdgeError):
    """A checkpoint (HF directory, safetensors, GGUF) is missing, truncated or corrupt."""


class UnsupportedModelError(GemmaEdgeError):
    """The checkpoint is readable but is not a Gemma architecture gemma-edge supports."""


class WeightMapError(GemmaEdgeError):
    """Tensors are missing from, or left over in, a checkpoint after name mapping."""


class TokenizerError(GemmaEdgeError):
    """The tokenizer is missing, unreadable, or disagrees with the model."""


class QuantizationError(GemmaEdgeError):
    """A quantization scheme cannot be applied to a tensor (shape, block size, dtype)."""


class ModelFileError(GemmaEdgeError):
    """A .tflite file is missing, not a gemma-edge file, or its metadata is corrupt."""


class OutputExistsError(GemmaEdgeError):
    """The output file exists and --force was not given."""


class GenerationError(GemmaEdgeError):
    """Bad generation request: empty prompt, prompt over the context, bad sampling values."""


class DraftError(GemmaEdgeError):
    """A draft model cannot draft for this model (another tokenizer, no score_<T> signature)."""


class EmbeddingError(GemmaEdgeError):
    """Bad embedding request: an unknown task, a dimension out of range, a text over the context."""


class ModelKindError(GemmaEdgeError):
    """The file is the other kind of model: an embedding model asked to generate, or the reverse."""
