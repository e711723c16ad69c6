"""gemma-edge: Gemma checkpoints to one self-describing LiteRT file, and a small runtime for it.

``import gemma_edge`` never imports TensorFlow: the converter lives in
``gemma_edge.convert`` (install extra ``convert``), the runtime in ``gemma_edge.runtime``.
"""

__version__ = "0.1.0"


def load(path, threads=None, backend="auto", draft=None):
    """Load a gemma-edge ``.tflite`` file for generation (see ``gemma_edge.runtime.engine.load``);
    ``draft``, a smaller file with the same tokenizer, turns on speculative decoding."""
    from .runtime.engine import load as _load

    return _load(path, threads=threads, backend=backend, draft=draft)


__all__ = ["load", "__version__"]
