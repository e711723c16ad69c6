"""Pure-numpy reference quantizers. The streaming writer calls these on row chunks.

Per-channel symmetric: for each output row r, scale[r] = max|w[r]| / qmax and
q = round(w / scale) clipped to [-qmax, qmax]. An all-zero row gets scale 1 (q = 0),
so dequantization is exact for it and no division by zero happens.
"""

from __future__ import annotations

import numpy as np

from .schemes import Scheme


def quantize_per_channel(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """w: [rows, cols] float32 -> (q int8 [rows, cols], scales float32 [rows])."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(w), axis=1)  # [rows]
    scales = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    q = np.rint(w / scales[:, None])
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(np.int8), scales


def dequantize_per_channel(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scales[:, None].astype(np.float32)


def quantize_rows(w: np.ndarray, scheme: Scheme) -> tuple[bytes | np.ndarray, np.ndarray | None]:
    """Quantize a [rows, cols] chunk as ``scheme`` stores it: (row-major bytes, per-row scales)."""
    if scheme.is_float:
        return np.ascontiguousarray(w, dtype=np.float32), None
    if scheme.granularity == "channel" and scheme.bits == 8:
        return quantize_per_channel(w, 8)
    raise NotImplementedError(f"scheme {scheme.name}")
