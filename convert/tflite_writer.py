"""Surgery on the weightless template, and the streaming writer of the final .tflite.

1. Surgery: every weight input of every signature becomes a constant tensor backed by
   one buffer shared by all signatures (fp32; int8 or int4 with per-channel scales in
   the header; or blockwise int4, whose fp16 scales are a tensor of each subgraph over
   one more shared buffer); it is removed from the subgraph and signature inputs. A
   vocabulary table with ``row_scales`` keeps its per-row scales as a float32 tensor over a
   buffer of its own (``contract.row_scales_name``, applied by the graph) and a single scale
   of 1 as its quantization: LiteRT copies per-channel parameters into every signature. GATHER on the embedding becomes
   EMBEDDING_LOOKUP, which reads quantized tables, so the tied embedding / LM head is
   stored once.
2. Streaming write: weight and metadata buffers live *after* the flatbuffer header
   (``Buffer.offset`` / ``Buffer.size``, 64-byte aligned), so files over 2 GB work.
   The header is packed with placeholder offsets and scales to learn its size, the
   tensors are quantized in row chunks and ``pwrite``-n into place, then the real
   header (same size: only fixed-width scalars and same-length vectors change) is
   written at the start. Peak memory is one row chunk plus the header.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

from ..quantize.reference import NonFiniteError, dequantize_rows, quantize_rows
from ..quantize.schemes import Scheme
from ..runtime import contract, modelfile

ALIGN = 64
_PLACEHOLDER_OFFSET = 1 << 40  # non-zero, so the field is serialised at its final width
CHUNK_BYTES = 64 << 20  # float32 bytes of one row chunk read from the checkpoint

RowReader = Callable[[str, int, int], np.ndarray]  # (name, row0, row1) -> float32 [rows, cols]


@dataclass
class WeightSlot:
    name: str
    shape: tuple[int, ...]
    scheme: Scheme
    buffer: int = -1
    offset: int = 0
    scales: np.ndarray | None = None  # per-channel scales (they live in the header)
    zero_points: np.ndarray | None = None  # per-channel zero points (0), shared like the scales
    quant_params: list = field(default_factory=list)  # QuantizationParametersT of every signature
    scale_buffer: int = -1  # blockwise: fp16 scales [rows, cols / block] in a buffer of their own
    row_scales: bool = False  # per-channel: float32 scales [rows] in a buffer of their own (see apply_surgery)
    scale_offset: int = 0
    group: str | None = None  # consecutive slots of one group are written row chunk by row chunk together
    read_cols: int = 0  # columns one row of the group's source holds (sizes its row chunks)
    grid: dict = field(default_factory=dict)  # blocks kept on their 4-bit grid (quantize_blockwise's stats)
    importance: np.ndarray | None = None  # per input channel, for a calibrated scale search

    @property
    def rows_cols(self) -> tuple[int, int]:
        return (self.shape[0], int(np.prod(self.shape[1:]))) if len(self.shape) > 1 else (1, self.shape[0])

    @property
    def nbytes(self) -> int:
        rows, cols = self.rows_cols
        return rows * self.scheme.row_bytes(cols)

    @property
    def scale_row_nbytes(self) -> int:
        """Bytes of one row's scales in the scale buffer (0 when they live in the header)."""
        return 4 if self.row_scales else self.scheme.scale_row_bytes(self.rows_cols[1])

    @property
    def scale_nbytes(self) -> int:
        return self.rows_cols[0] * self.scale_row_nbytes


def _opcode_index(model, builtin: int) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == builtin:
            return i
    oc = fb.OperatorCodeT()
    oc.builtinCode = builtin
    oc.deprecatedBuiltinCode = min(builtin, 127)
    oc.version = 1
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def apply_surgery(template: bytes, slots: list[WeightSlot], metadata: dict[str, bytes]):
    """Return (ModelT, metadata slots) with weights as constants and metadata as buffers."""
    model = fb.ModelT.InitFromPackedBuf(template, 0)
    by_name = {s.name: s for s in slots}
    scale_inputs = {contract.row_scales_name(s.name): s for s in slots if s.row_scales}
    for s in slots:
        model.buffers.append(fb.BufferT(offset=_PLACEHOLDER_OFFSET, size=s.nbytes))
        s.buffer = len(model.buffers) - 1
        if s.row_scales:
            if s.scheme.granularity != "channel":
                raise ValueError(f"{s.name}: row scales need a per-channel scheme, not {s.scheme.name}")
            model.buffers.append(fb.BufferT(offset=_PLACEHOLDER_OFFSET, size=s.scale_nbytes))
            s.scale_buffer = len(model.buffers) - 1
        elif s.scheme.granularity == "channel":
            s.scales = np.ones(s.shape[0], dtype=np.float32)
            s.zero_points = _zeros(s.shape[0])
        elif s.scheme.granularity == "block":
            model.buffers.append(fb.BufferT(offset=_PLACEHOLDER_OFFSET, size=s.scale_nbytes))
            s.scale_buffer = len(model.buffers) - 1
    gather = _opcode_index(model, fb.BuiltinOperator.GATHER)
    lookup = None

    for sig in model.signatureDefs:
        sg = model.subgraphs[sig.subgraphIndex]
        weight_inputs = {t.name.decode(): t.tensorIndex for t in sig.inputs
                         if t.name.decode() in by_name or t.name.decode() in scale_inputs}
        for name, ti in weight_inputs.items():
            t = sg.tensors[ti]
            if name in scale_inputs:  # a table's row scales: float32 [rows], a constant like a weight
                t.buffer = scale_inputs[name].scale_buffer
                continue
            s = by_name[name]
            t.buffer = s.buffer
            t.type = s.scheme.tflite_type
            if s.row_scales:  # one scale of 1: the stored values times the row's scale come after, in the graph
                qp = _SharedQuantization()
                qp.scale, qp.zeroPoint, qp.quantizedDimension = _ONE, _zeros(1), 0
                t.quantization = qp
            elif s.scheme.granularity == "channel":
                qp = _SharedQuantization()  # every signature's tensor points at one scale vector
                qp.scale = s.scales
                qp.zeroPoint = s.zero_points
                qp.quantizedDimension = 0
                t.quantization = qp
                s.quant_params.append(qp)
            elif s.scheme.granularity == "block":
                # BlockwiseQuantization: the scales are an fp16 [rows, cols / B] *tensor* of this
                # subgraph (all subgraphs share its buffer); no zero points (-1); dimension 0
                rows, cols = s.rows_cols
                st = fb.TensorT()
                st.name = f"{name}_scales".encode()
                st.shape = np.array([rows, cols // s.scheme.block_size], dtype=np.int32)
                st.type = fb.TensorType.FLOAT16
                st.buffer = s.scale_buffer
                sg.tensors.append(st)
                qp = fb.QuantizationParametersT()
                qp.quantizedDimension = 0
                qp.detailsType = fb.QuantizationDetails.BlockwiseQuantization
                qp.details = fb.BlockwiseQuantizationT(scales=len(sg.tensors) - 1, zeroPoints=-1,
                                                       blockSize=s.scheme.block_size)
                t.quantization = qp
        constant = set(weight_inputs.values())
        sg.inputs = [i for i in sg.inputs if i not in constant]
        sig.inputs = [t for t in sig.inputs if t.tensorIndex not in constant]
        # GATHER(table, ids) -> EMBEDDING_LOOKUP(ids, table): reads int8/int4 tables (the
        # embedding, Gemma 4's per-layer tables) and touches only the rows it looks up
        tables = {ti for name, ti in weight_inputs.items() if name not in scale_inputs}  # not the 1-D scales
        for op in sg.operators:
            if op.opcodeIndex == gather and op.inputs[0] in tables:
                if lookup is None:
                    lookup = _opcode_index(model, fb.BuiltinOperator.EMBEDDING_LOOKUP)
                op.opcodeIndex = lookup
                op.inputs = [op.inputs[1], op.inputs[0]]
                op.builtinOptionsType = 0
                op.builtinOptions = None

    meta_slots = []
    model.metadata = list(model.metadata or [])
    for name, blob in metadata.items():
        model.buffers.append(fb.BufferT(offset=_PLACEHOLDER_OFFSET, size=len(blob)))
        meta_slots.append((len(model.buffers) - 1, blob))
        m = fb.MetadataT()
        m.name, m.buffer = modelfile.APART.get(name, name), len(model.buffers) - 1
        if name in modelfile.APART:  # a buffer no metadata names, so LiteRT does not read it: its index, inline
            model.buffers.append(fb.BufferT(data=list(struct.pack("<I", m.buffer))))
            m.buffer = len(model.buffers) - 1
        model.metadata.append(m)
    model.description = "gemma-edge"
    return model, meta_slots


class _SharedQuantization(fb.QuantizationParametersT):
    """Per-channel parameters whose scale and zero-point vectors are written once per file and
    pointed at by every signature's tensor (a flatbuffer may share a vector). Written per tensor,
    the 270M int8 file's header held its 262144-row embedding's scales six times: 29 MB of
    header that LiteRT parses and the loader hashes, instead of 6."""

    def Pack(self, builder):
        vectors = _packing.vectors  # set by pack(): one builder's shared vectors
        created = []
        for name in ("scale", "zeroPoint"):
            arr = getattr(self, name)
            key = (name, id(arr))
            if key not in vectors:
                vectors[key] = (builder.CreateNumpyVector(arr), arr)  # arr kept alive: its id stays unique
            created.append(vectors[key][0])
        scale, zero_point = created
        fb.QuantizationParametersStart(builder)
        fb.QuantizationParametersAddScale(builder, scale)
        fb.QuantizationParametersAddZeroPoint(builder, zero_point)
        fb.QuantizationParametersAddDetailsType(builder, self.detailsType)
        fb.QuantizationParametersAddQuantizedDimension(builder, self.quantizedDimension)
        return fb.QuantizationParametersEnd(builder)


_packing = threading.local()
_ONE = np.ones(1, dtype=np.float32)  # the single scale of a table with row scales (one vector per file)


@functools.lru_cache(maxsize=None)
def _zeros(n: int) -> np.ndarray:
    """The all-zero zero-point vector of n channels: one object per length, so one vector in the file."""
    return np.zeros(n, dtype=np.int64)


def pack(model) -> bytes:
    b = flatbuffers.Builder(1 << 20)
    _packing.vectors = {}
    try:
        b.Finish(model.Pack(b), file_identifier=b"TFL3")
    finally:
        _packing.vectors = None
    return bytes(b.Output())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // (4 * max(cols, 1)))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def write_model(template: bytes, slots: list[WeightSlot], read_rows: RowReader,
                metadata: dict[str, bytes], path: str, progress=None, errors: dict | None = None,
                on_finish=None) -> int:
    """Write the final file to ``path`` (the caller owns temp-naming and renaming).

    ``metadata`` are the file's entries (``modelfile.metadata_entries``); a
    ``modelfile.CHECKSUMS_KEY`` entry among them is filled in last, with the digests of the
    header, the metadata and the weights as written.
    ``read_rows(name, r0, r1)`` returns float32 rows of a canonical weight.
    ``progress(nbytes)`` is called as bytes are written. Returns the file size.
    ``errors``, if given, receives name -> (sum of squared quantization error, sum of
    squared weights) for every tensor, from the written values dequantized again.
    ``on_finish()`` is called when the weights are written, before the metadata and header.
    """
    model, meta_slots = apply_surgery(template, slots, metadata)
    header_len = len(pack(model))
    offset = _align(header_len)
    buffers_at = {}
    for s in slots:
        s.offset = offset
        buffers_at[s.buffer] = offset
        offset = _align(offset + s.nbytes)
        if s.scale_buffer >= 0:
            s.scale_offset = offset
            buffers_at[s.scale_buffer] = offset
            offset = _align(offset + s.scale_nbytes)
    for buf, blob in meta_slots:
        buffers_at[buf] = offset
        offset = _align(offset + len(blob))
    total = offset

    digests = []  # sha256 of every weight buffer, in file order
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        for unit in _units(slots):  # a slot, or a group written chunk by chunk together
            hashes = [(hashlib.sha256(), hashlib.sha256() if s.scale_buffer >= 0 else None) for s in unit]
            rows, cols = unit[0].rows_cols
            for r0, r1 in _row_chunks(rows, max(cols, unit[0].read_cols)):
                for s, (data_hash, scale_hash) in zip(unit, hashes):
                    _write_rows(fd, s, read_rows, r0, r1, data_hash, scale_hash, errors)
                    if progress:
                        progress((r1 - r0) * s.scheme.row_bytes(s.rows_cols[1]))
            for data_hash, scale_hash in hashes:
                digests.append(data_hash.digest())
                if scale_hash is not None:
                    digests.append(scale_hash.digest())
        if on_finish:
            on_finish()
        for (buf, blob), name in zip(meta_slots, metadata):
            _pwrite_all(fd, blob, buffers_at[buf])
            if name in modelfile.APART:  # counted with the weights (after them in the file)
                digests.append(hashlib.sha256(blob).digest())
        for i, off in buffers_at.items():
            model.buffers[i].offset = off
        header = pack(model)
        if len(header) != header_len:
            raise RuntimeError(f"header size changed from {header_len} to {len(header)} bytes")
        _pwrite_all(fd, header, 0)
        for name, (buf, blob) in zip(metadata, meta_slots):
            if name == modelfile.CHECKSUMS_KEY:  # a placeholder; filled now that header and weights are final
                _pwrite_all(fd, modelfile.checksums_blob(header, metadata, digests), buffers_at[buf])
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


class NonFiniteWeights(Exception):
    """Rows [r0, r1) of canonical weight ``name`` hold NaN or infinity (the caller names the source)."""

    def __init__(self, name: str, r0: int, r1: int, detail: str):
        super().__init__(f"{name} rows {r0}..{r1 - 1}: {detail}")
        self.name, self.r0, self.r1, self.detail = name, r0, r1, detail


def _units(slots: list[WeightSlot]) -> Iterator[list[WeightSlot]]:
    """Slots in file order, consecutive slots of one group together."""
    unit: list[WeightSlot] = []
    for s in slots:
        if unit and (s.group is None or s.group != unit[0].group):
            yield unit
            unit = []
        unit.append(s)
    if unit:
        yield unit


def _write_rows(fd: int, s: WeightSlot, read_rows: RowReader, r0: int, r1: int, data_hash, scale_hash,
                errors: dict | None) -> None:
    """Quantize rows [r0, r1) of one weight and write them (and scales kept in a buffer) into place."""
    cols = s.rows_cols[1]
    w = read_rows(s.name, r0, r1).reshape(r1 - r0, cols)
    try:
        data, scales = quantize_rows(w, s.scheme, None if errors is None else s.grid, s.importance)
    except NonFiniteError as e:
        raise NonFiniteWeights(s.name, r0, r1, str(e)) from None
    if errors is not None:
        w64 = w.astype(np.float64)
        d = dequantize_rows(data, scales, s.scheme) - w64
        e0, n0 = errors.get(s.name, (0.0, 0.0))
        errors[s.name] = (e0 + float(np.dot(d.ravel(), d.ravel())), n0 + float(np.dot(w64.ravel(), w64.ravel())))
    if scale_hash is not None:
        block = memoryview(np.ascontiguousarray(scales, dtype=np.float32 if s.row_scales else None)).cast("B")
        scale_hash.update(block)
        _pwrite_all(fd, block, s.scale_offset + r0 * s.scale_row_nbytes)
    elif scales is not None:
        s.scales[r0:r1] = scales
    block = memoryview(np.ascontiguousarray(data)).cast("B")
    data_hash.update(block)
    _pwrite_all(fd, block, s.offset + r0 * s.scheme.row_bytes(cols))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
