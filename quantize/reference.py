"""Pure-numpy reference quantizers. The streaming writer calls these on row chunks.

Per-channel symmetric: for each output row r, scale[r] = max|w[r]| / qmax and
q = round(w / scale) clipped to [-qmax, qmax]. An all-zero row gets scale 1 (q = 0),
so dequantization is exact for it and no division by zero happens. Blockwise int4 does
the same per block of B inputs, with fp16 scales (see quantize_blockwise); int4 values
are packed two a byte (pack_int4).
"""

from __future__ import annotations

import numpy as np

from .schemes import Scheme


# Scale factors a calibrated search tries, relative to max|w| / qmax (importance given)
SEARCH_FACTORS = np.linspace(0.70, 1.10, 17, dtype=np.float32)


def _search(wb: np.ndarray, base: np.ndarray, importance: np.ndarray, qmin: int, qmax: int, round_scale) -> np.ndarray:
    """The scale per group (wb [..., group], base [...]) among ``SEARCH_FACTORS * base`` with the
    least importance-weighted squared rounding error sum_j imp_j (w_j - s q_j)^2 (imatrix)."""
    best, best_err = base, None
    for f in SEARCH_FACTORS:
        s = round_scale(base * f)
        sf = s.astype(np.float32)[..., None]
        q = np.clip(np.rint(wb / sf), qmin, qmax)
        err = np.sum(importance * (wb - q * sf) ** 2, axis=-1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = np.where(better, s, best)
            best_err = np.where(better, err, best_err)
    return best


def quantize_per_channel(w: np.ndarray, bits: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w: [rows, cols] float32 -> (q int8 [rows, cols], scales float32 [rows]). With
    ``importance`` [cols] (calibration), each row's scale is searched (``_search``)."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(w), axis=1)  # [rows]
    _check_finite(amax)
    scales = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    if importance is not None:
        scales = _search(w, scales, np.asarray(importance, np.float32), -qmax, qmax, lambda x: x.astype(np.float32))
    q = np.rint(w / scales[:, None])
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(np.int8), scales


def dequantize_per_channel(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scales[:, None].astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [rows, cols] with cols even -> uint8 [rows, cols / 2];
    element 2k in the low nibble, 2k+1 in the high nibble (TFLite's INT4 layout)."""
    q = np.asarray(q, dtype=np.int8)
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even row length, got {q.shape[-1]}")
    lo = q[..., 0::2].view(np.uint8) & 0x0F
    hi = (q[..., 1::2].view(np.uint8) & 0x0F) << 4
    return (lo | hi).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4: uint8 [rows, cols / 2] -> int8 [rows, cols] (sign-extended nibbles)."""
    p = np.asarray(packed, dtype=np.uint8)
    lo = (p & 0x0F).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.int8)
    out[..., 0::2] = np.where(lo > 7, lo - 16, lo)
    out[..., 1::2] = np.where(hi > 7, hi - 16, hi)
    return out


FP16_MIN_SUBNORMAL = 2.0 ** -24  # XNNPACK takes subnormal fp16 scales; only 0 is refused
FP16_SAFE_MAX = 65280.0  # the largest value whose bf16 rounding stays finite in fp16


def round_scale_fp16(s: np.ndarray) -> np.ndarray:
    """float32 -> bf16 precision (round to nearest even) -> fp16. XNNPACK computes with bf16
    scales, so scales rounded this way give identical results on every kernel."""
    u = np.ascontiguousarray(s, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32).astype(np.float16)


GRID_TOLERANCE = 0.06  # |w / d - k| on a 4-bit grid: bf16 rounding of d * k and of d moves k by < 8 * 2 / 512; off-grid
# blocks pass with odds ~0.12 ** 31


def quantize_blockwise(w: np.ndarray, bits: int, block: int, stats: dict | None = None,
                       importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w: [rows, cols], cols a multiple of ``block`` -> (q int8 [rows, cols], fp16 scales [rows, cols/block]).

    scale = max|block| / qmax (ai-edge-quantizer's rule, byte-identical), stored as fp16
    at bf16 precision; q = round(w / stored scale) in [-qmax - 1, qmax]. An all-zero block
    gets scale 1 (XNNPACK refuses a zero scale). A search for the scale with the least
    squared rounding error per block (llama.cpp-style) cut the weights' error by ~10% on
    the real 270M but raised its perplexity (FFN int4: 19.66 against 19.32), so max/qmax
    it is.

    Blocks of 32 that already lie on a 4-bit grid (GGUF Q4_0 weights, QAT checkpoints) keep
    it: see ``_grid_blocks``. ``stats``, if given, counts ``blocks``, ``imported`` (kept on
    their grid) and ``clipped`` (kept, but for one value: see ``_grid_blocks``). With
    ``importance`` [cols] (calibration), the other blocks' scales are searched (``_search``).
    """
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
    qmax = 2 ** (bits - 1) - 1
    wb = w.reshape(rows, cols // block, block)  # [rows, blocks, block]
    amax = np.max(np.abs(wb), axis=2)  # [rows, blocks]
    _check_finite(amax)
    s = np.where(amax > 0, np.minimum(amax, FP16_SAFE_MAX * qmax) / np.float32(qmax), np.float32(1.0))
    scales = round_scale_fp16(np.maximum(s, FP16_MIN_SUBNORMAL).astype(np.float32))
    if importance is not None:
        imp = np.asarray(importance, np.float32).reshape(cols // block, block)
        scales = _search(wb, scales.astype(np.float32), imp, -qmax - 1, qmax,
                         lambda x: round_scale_fp16(np.maximum(x, FP16_MIN_SUBNORMAL).astype(np.float32)))
    q = np.rint(wb / scales.astype(np.float32)[:, :, None])
    np.clip(q, -qmax - 1, qmax, out=q)
    if bits == 4 and block == 32:
        on, k, d = _grid_blocks(wb, amax)
        if on.any():
            negative = d < 0  # LiteRT needs positive scales: the grid's values are -k * |d| there
            q[on] = np.where(negative[on][:, None], np.clip(-k[on], -8, 7), k[on])
            scales[on] = np.abs(d[on]).astype(np.float16)
        if stats is not None:
            stats["imported"] = stats.get("imported", 0) + int(on.sum())
            stats["clipped"] = stats.get("clipped", 0) + int((on & (d < 0)).sum())
    if stats is not None:
        stats["blocks"] = stats.get("blocks", 0) + rows * (cols // block)
    return q.astype(np.int8).reshape(rows, cols), scales


def _grid_blocks(wb: np.ndarray, amax: np.ndarray):
    """Which blocks lie on llama.cpp's Q4_0 grid {d * k : k in -8..7}, d = (the value of largest
    magnitude) / -8, as GGUF Q4_0 tensors do exactly and QAT checkpoints up to bf16 rounding:
    (mask [rows, blocks], k [rows, blocks, 32], d [rows, blocks] refitted by least squares).

    Such a block is stored with its own 4-bit values and its scale |d| as fp16 (not at bf16
    precision: XNNPACK still rounds it to bf16 when it computes, measured, a change of at
    most 2**-8 relative). Q4_0's d is negative when the largest value is positive; LiteRT refuses negative
    scales, so those blocks are stored as -k with scale -d, and their values at +8|d| (the largest,
    and any that Q4_0 rounded to it) are clipped to +7|d|: one step, for ~1.5% of the values of a
    tensor (measured on random weights; "clipped" counts such blocks)."""
    idx = np.argmax(np.abs(wb), axis=2)[..., None]
    d = np.take_along_axis(wb, idx, axis=2)[..., 0] / np.float32(-8.0)  # [rows, blocks]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = wb / d[..., None]
    kr = np.rint(k)
    on = (amax > 0) & np.all(np.abs(k - kr) <= GRID_TOLERANCE, axis=2) & np.all((kr >= -8) & (kr <= 7), axis=2)
    kk = np.where(on[..., None], kr, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = np.sum(wb * kk, axis=2) / np.sum(kk * kk, axis=2)
    return on, kr.astype(np.float32), np.where(on, fit, d).astype(np.float32)


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    rows, cols = q.shape
    nb = scales.shape[1]
    return (q.reshape(rows, nb, cols // nb).astype(np.float32)
            * scales.astype(np.float32)[:, :, None]).reshape(rows, cols)


class NonFiniteError(ValueError):
    """The weights hold NaN or infinity: a damaged checkpoint, not something to quantize."""


def _check_finite(amax: np.ndarray) -> None:
    """NaN and infinity propagate into the max |w| the quantizers compute anyway: no extra pass."""
    if not np.isfinite(amax).all():
        raise NonFiniteError(f"{int(np.size(amax) - np.isfinite(amax).sum())} row(s) or block(s) hold NaN or infinity")


def quantize_rows(w: np.ndarray, scheme: Scheme, stats: dict | None = None,
                  importance: np.ndarray | None = None) -> tuple[bytes | np.ndarray, np.ndarray | None]:
    """Quantize a [rows, cols] chunk as ``scheme`` stores it: (row-major bytes, per-row scales).
    Raises NonFiniteError for NaN or infinite weights. ``stats``: see ``quantize_blockwise``;
    ``importance``: per input channel, for a calibrated scale search."""
    if scheme.is_float:
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not np.isfinite(w).all():  # float weights are copied as they are: this is their only check
            raise NonFiniteError("the values hold NaN or infinity")
        return w, None
    if scheme.granularity == "channel" and scheme.bits == 8:
        return quantize_per_channel(w, 8, importance)
    if scheme.granularity == "channel" and scheme.bits == 4:
        q, scales = quantize_per_channel(w, 4, importance)
        return pack_int4(q), scales
    if scheme.granularity == "block" and scheme.bits == 4:
        q, scales = quantize_blockwise(w, 4, scheme.block_size, stats, importance)
        return pack_int4(q), scales
    raise NotImplementedError(f"scheme {scheme.name}")


def dequantize_rows(data: np.ndarray, scales: np.ndarray | None, scheme: Scheme) -> np.ndarray:
    """Inverse of quantize_rows: what the kernels compute with, as float32 [rows, cols]."""
    if scheme.is_float:
        return np.asarray(data, dtype=np.float32)
    q = unpack_int4(data) if scheme.bits == 4 else np.asarray(data)
    if scheme.granularity == "channel":
        return dequantize_per_channel(q, scales)
    return dequantize_blockwise(q, scales)
