"""Quantization schemes as data. CLI choices, file metadata and docs derive from this table.

Every scheme is *dynamic range*: weights are stored quantized, activations stay float and
the LiteRT kernels (FULLY_CONNECTED, EMBEDDING_LOOKUP) quantize them on the fly. Small
tensors (norm scales) always stay fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# TFLite TensorType values (schema.fbs)
TFLITE_FLOAT32 = 0
TFLITE_INT8 = 9


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    granularity: str         # "none" (float), "channel" (one scale per output row)
    block_size: int | None   # elements per scale along the input axis, for "block"
    symmetric: bool
    tflite_type: int
    description: str

    @property
    def is_float(self) -> bool:
        return self.granularity == "none"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric, narrow range: [-qmax, qmax]

    def row_bytes(self, cols: int) -> int:
        """Bytes one stored row of ``cols`` values takes."""
        return cols * self.bits // 8

    def to_dict(self) -> dict:
        return asdict(self)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", 32, "none", None, True, TFLITE_FLOAT32,
               "float32 weights: the reference, 4 bytes a weight"),
        Scheme("int8", 8, "channel", None, True, TFLITE_INT8,
               "int8 per output channel, symmetric, dynamic range: 1 byte a weight"),
    )
}


def get_scheme(name: str) -> Scheme:
    from ..runtime.errors import QuantizationError

    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantizationError(
            f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None
