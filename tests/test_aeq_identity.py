"""Our writer against ai-edge-quantizer (AEQ), the reference dynamic-range quantizer of LiteRT.

For every scheme AEQ also implements, one small random model is written twice: by our
streaming writer at that scheme, and as an fp32 file (same writer) quantized by AEQ's
Python API with the matching recipe. Every weight read by FULLY_CONNECTED or
EMBEDDING_LOOKUP, in every signature, must then hold the same quantized values and the
same scales, and the two files must compute bit-identical logits in LiteRT.

| our scheme | AEQ recipe                                                       |
|------------|------------------------------------------------------------------|
| int8       | recipe.dynamic_wi8_afp32 (int8 channelwise)                      |
| int4       | recipe.dynamic_wi4_afp32 (int4 channelwise)                      |
| int4-b32   | recipe.dynamic_wi4b32_afp32                                      |
| int4-b64   | recipe.dynamic_wi4b64_afp32                                      |
| int4-b128  | no named recipe in AEQ 0.10: RecipeManager.add_dynamic_config(   |
|            | granularity=BLOCKWISE_128), the call its named recipes make      |

The embedding. Our files read the tied table with EMBEDDING_LOOKUP (the writer rewrites
GATHER) and with the LM-head FULLY_CONNECTED. AEQ's dynamic recipes quantize
EMBEDDING_LOOKUP tables in the same scheme as FULLY_CONNECTED weights, so the one table
tensor gets one set of parameters for both readers and is compared like any other
weight. (Given a GATHER instead, AEQ leaves the GATHER reading an fp32 copy of the table,
``..._duplicated_N``, and quantizes a second copy for the LM head: the table is stored
twice. GATHER is only in AEQ's static-quantization policies.)

Where they differ (found here, AEQ 0.10; all on weights a random normal model never has,
so tested on a second weight set with one odd row or block per affected tensor):

- An all-zero row (per-channel): same bytes (all 0); our scale is 1.0, AEQ's is
  1e-9 / qmax (it floors max|w| at ``min_bound = 1e-9``). Both dequantize to 0 and
  both files give identical logits.
- An all-zero (or max|w| < ~2.1e-7) block (blockwise): AEQ's 1e-9/7 underflows fp16 to a
  0.0 scale and XNNPACK refuses the file ("unsupported scale value (0.000000)"); ours
  stores 1.0.
- A tiny block, max|w| < 7 * 2^-14 (about 4.3e-4): we clamp the scale to fp16's smallest
  *normal* value 2^-14; AEQ keeps the subnormal fp16 scale. XNNPACK accepts subnormal
  scales, and below max|w| ~3e-5 AEQ's are the more accurate: measured on one FC row of
  two 32-wide blocks, rows of max|w| 2e-5, 3e-6, 1e-6 are all zeros in our file (output
  relative error 1.0) and give errors 0.70, 0.06, 0.17 in AEQ's. Clamping at fp16's
  smallest subnormal 2^-24 instead would make our bytes and scales equal to AEQ's for
  every block AEQ gives a non-zero scale (checked on 8000 blocks, max|w| spread over
  3e-8 .. 1e3).
- A huge block, max|w| / 7 > 65504: AEQ's scale is fp16 inf (its 65280 * (2^bits - 1)
  clip is only applied when ``clipping_values`` are passed) and XNNPACK refuses the
  file; ours saturates at 65280.
- Rounding (np.rint, half to even, of w / scale in float32), scale = max|w| / qmax in
  float32, and the blockwise scale's float32 -> bf16 (round to nearest even) -> fp16
  rounding are the same in both. Clipping differs on paper (AEQ clips int4 to [-8, 7]
  channelwise too, we clip to [-7, 7]) but |w / scale| <= 7 * (1 + 2^-8) never rounds to
  -8, so it never shows.

And one difference in what AEQ can read: our files keep, in each signature's subgraph, the
weight tensors that signature does not use (prefill never reads the last layer's q/o/FFN),
sharing their buffer with the signature that does. AEQ rewrites the buffer for the
reader and leaves the other tensor FLOAT32 over int8 bytes, and LiteRT refuses the result.
The fp32 file given to AEQ here therefore has those unread tensors detached first
(see ``_aeq_input``); the tensors compared are the ones operators read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("ai_edge_quantizer")

from gemma_edge.quantize.reference import unpack_int4  # noqa: E402
from gemma_edge.quantize.schemes import SCHEMES  # noqa: E402


def _aeq_recipe(name: str):
    from ai_edge_quantizer import qtyping, recipe, recipe_manager

    named = {"int8": recipe.dynamic_wi8_afp32, "int4": recipe.dynamic_wi4_afp32,
             "int4-b32": recipe.dynamic_wi4b32_afp32, "int4-b64": recipe.dynamic_wi4b64_afp32}
    if name in named:
        return named[name]()
    if name == "int4-b128":
        rm = recipe_manager.RecipeManager()
        rm.add_dynamic_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                              num_bits=4, granularity=qtyping.QuantGranularity.BLOCKWISE_128)
        return rm.get_quantization_recipe()
    raise KeyError(name)


AEQ_SCHEMES = ["int8", "int4", "int4-b32", "int4-b64", "int4-b128"]
READERS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")


def test_every_quantized_scheme_is_checked_against_aeq():
    assert sorted(AEQ_SCHEMES) == sorted(n for n, s in SCHEMES.items() if not s.is_float)


# ---- building and reading the two files --------------------------------------------------

@dataclass
class Weight:
    type: int                   # TFLite TensorType
    values: np.ndarray          # int8 [rows, cols] (int4 nibbles unpacked)
    scales: np.ndarray          # float32 [rows] per channel, float16 [rows, cols / B] blockwise
    block_size: int | None
    quantized_dimension: int
    zero_points: object         # per channel: int array; blockwise: tensor index (-1 = none)
    readers: set


def _buffer(data: bytes, model, index: int) -> np.ndarray:
    b = model.buffers[index]
    if b.offset > 1:  # our writer: after the flatbuffer; AEQ: inline
        return np.frombuffer(data, np.uint8, count=b.size, offset=b.offset)
    return np.asarray(b.data, np.uint8)


def _read_weights(data: bytes, shapes: dict) -> dict[tuple[str, str], Weight]:
    """(signature, canonical name) -> Weight, for every 2-D weight an operator of that
    signature reads with FULLY_CONNECTED or EMBEDDING_LOOKUP."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf(data, 0)
    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    out = {}
    for sig in model.signatureDefs:
        key = sig.signatureKey.decode()
        sg = model.subgraphs[sig.subgraphIndex]
        readers: dict[int, set] = {}
        for op in sg.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            name = op_names[max(oc.builtinCode, oc.deprecatedBuiltinCode)]
            for i in op.inputs:
                readers.setdefault(int(i), set()).add(name)
        for ti, t in enumerate(sg.tensors):
            canon = t.name.decode().removesuffix(":0").removeprefix(f"{key}_")
            if canon not in shapes or len(shapes[canon]) != 2 or not readers.get(ti, set()) & set(READERS):
                continue
            rows = shapes[canon][0]
            raw = _buffer(data, model, t.buffer).reshape(rows, -1)
            values = raw.view(np.int8) if t.type == fb.TensorType.INT8 else unpack_int4(raw)
            q = t.quantization
            if q.detailsType == fb.QuantizationDetails.BlockwiseQuantization:
                st = sg.tensors[q.details.scales]
                assert st.type == fb.TensorType.FLOAT16
                scales = _buffer(data, model, st.buffer).view(np.float16).reshape(list(st.shape))
                block, zp = q.details.blockSize, q.details.zeroPoints
            else:
                scales, block, zp = np.asarray(q.scale, np.float32), None, np.asarray(q.zeroPoint)
            out[(key, canon)] = Weight(int(t.type), values, scales, block, int(q.quantizedDimension), zp,
                                       readers[ti])
    return out


def _aeq_input(data: bytes) -> bytes:
    """Our fp32 file as given to AEQ: each subgraph's weight tensors that no operator of it
    reads are detached from their (shared) buffer; buffers are inlined to repack."""
    from ai_edge_litert import schema_py_generated as fb

    from gemma_edge.convert.tflite_writer import pack

    model = fb.ModelT.InitFromPackedBuf(data, 0)
    for b in model.buffers:
        if b.offset > 1:
            b.data, b.offset, b.size = np.frombuffer(data, np.uint8, count=b.size, offset=b.offset), 0, 0
    for sg in model.subgraphs:
        read = {int(i) for op in sg.operators for i in op.inputs} | {int(i) for i in sg.outputs}
        for ti, t in enumerate(sg.tensors):
            if ti not in read and t.buffer > 0:
                t.buffer = 0
    return pack(model)


def _aeq_quantize(fp32: bytes, scheme: str) -> bytes:
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(fp32)
    qt.load_quantization_recipe(_aeq_recipe(scheme))
    with np.errstate(invalid="ignore"):  # AEQ computes 0 / 0.0 on an all-zero block (see zero_row)
        return bytes(qt.quantize().quantized_model)


class Models:
    """One template, two weight sets (random normal; and with odd rows/blocks), files cached."""

    def __init__(self, tmp_path):
        from gemma_edge.convert.template import build_template
        from gemma_edge.runtime.contract import weight_shapes
        from gemma_edge.runtime.config import FULL, GemmaConfig

        # every input width (128 or 256) is a multiple of the largest block, 128
        self.cfg = GemmaConfig(family=1, vocab_size=96, hidden_size=128, intermediate_size=256,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64, layer_types=(FULL,))
        self.shapes = weight_shapes(self.cfg)
        self.template = build_template(self.cfg, 16, [4], isolate=False)
        self.tmp = tmp_path
        rng = np.random.default_rng(7)
        normal = {n: rng.standard_normal(s).astype(np.float32) for n, s in self.shapes.items()}
        odd = {n: w.copy() for n, w in normal.items()}
        for case, (name, row, cols, f) in EDGE_CASES.items():
            w = odd[name]
            w[row, cols] = f(w[row, cols])
        self.weights = {"normal": normal, "odd": odd}
        self._cache: dict = {}

    def write(self, weights: str, scheme: str) -> str:
        from gemma_edge.convert import tflite_writer as tw
        from gemma_edge.runtime import modelfile

        path = self.tmp / f"ours-{weights}-{scheme}.tflite"
        w = self.weights[weights]
        tw.write_model(self.template,
                       [tw.WeightSlot(n, s, SCHEMES[scheme if len(s) == 2 else "fp32"])
                        for n, s in self.shapes.items()],
                       lambda n, a, b: w[n].reshape(-1, w[n].shape[-1])[a:b],
                       {modelfile.CONFIG_KEY: json.dumps(self.cfg.to_dict()).encode()}, str(path))
        return str(path)

    def fp32(self, weights: str) -> bytes:
        if weights not in self._cache:
            with open(self.write(weights, "fp32"), "rb") as f:
                self._cache[weights] = f.read()
        return self._cache[weights]

    def pair(self, weights: str, scheme: str) -> tuple[str, str]:
        """Paths of (our file, AEQ's file) of one weight set at one scheme."""
        if (weights, scheme) not in self._cache:
            ours = self.write(weights, scheme)
            aeq = _aeq_quantize(_aeq_input(self.fp32(weights)), scheme)
            aeq_path = self.tmp / f"aeq-{weights}-{scheme}.tflite"
            aeq_path.write_bytes(aeq)
            self._cache[(weights, scheme)] = (ours, str(aeq_path))
        return self._cache[(weights, scheme)]

    def read(self, path: str) -> dict[tuple[str, str], Weight]:
        with open(path, "rb") as f:
            return _read_weights(f.read(), self.shapes)

    def logits(self, path: str) -> np.ndarray:
        """Logits [steps, V] of a prefill of 4 tokens then 3 decode steps (every signature runs)."""
        from gemma_edge.runtime.backend import make_backend
        from gemma_edge.runtime.modelfile import FileMeta, ModelInfo

        b = make_backend(ModelInfo(path, FileMeta(self.cfg, context_length=16, prefill_lengths=(4,)), b"x"))
        b.prefill_chunk(4, np.array([[2, 7, 11, 13]], np.int32), np.arange(4, dtype=np.int32))
        return np.stack([b.decode(t, 4 + i) for i, t in enumerate([17, 19, 23])])


# canonical weight, row, columns, transform: one odd spot per tensor, so each case is seen alone
EDGE_CASES = {
    "zero_row": ("l0_q", 3, slice(None), lambda w: np.zeros_like(w)),
    "tiny_block": ("l0_gate", 5, slice(0, 32), lambda w: w * np.float32(1e-4 / np.abs(w).max())),
    "huge_block": ("l0_v", 2, slice(0, 32), lambda w: w * np.float32(1e6)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("aeq"))


# ---- identity on a random model -----------------------------------------------------------

@pytest.mark.parametrize("scheme", AEQ_SCHEMES)
def test_aeq_writes_the_same_weights_and_scales(models, scheme):
    ours_path, aeq_path = models.pair("normal", scheme)
    ours, aeq = models.read(ours_path), models.read(aeq_path)
    s = SCHEMES[scheme]
    # every FC / EMBEDDING_LOOKUP weight of every signature, and no other, in both files
    expect = {("decode", n) for n, sh in models.shapes.items() if len(sh) == 2}
    expect |= {("prefill_4", n) for n in ("embed", "l0_k", "l0_v")}  # prefill only fills the cache
    assert set(ours) == set(aeq) == expect
    # the tied table: one tensor read by the lookup and the LM head, in both files
    assert ours[("decode", "embed")].readers >= set(READERS)
    assert aeq[("decode", "embed")].readers >= set(READERS)
    for key in sorted(expect):
        o, a = ours[key], aeq[key]
        assert o.type == a.type == s.tflite_type, key
        np.testing.assert_array_equal(o.values, a.values, err_msg=str(key))
        assert o.scales.dtype == a.scales.dtype and o.scales.shape == a.scales.shape, key
        np.testing.assert_array_equal(o.scales.view(np.uint8), a.scales.view(np.uint8), err_msg=str(key))
        assert o.quantized_dimension == a.quantized_dimension == 0, key
        if s.granularity == "block":
            assert o.scales.dtype == np.float16 and o.block_size == a.block_size == s.block_size, key
            assert o.zero_points == a.zero_points == -1, key
        else:
            assert o.scales.dtype == np.float32 and o.block_size is a.block_size is None, key
            assert not np.any(o.zero_points) and not np.any(a.zero_points), key


@pytest.mark.parametrize("scheme", AEQ_SCHEMES)
def test_aeq_file_computes_the_same_logits_in_litert(models, scheme):
    ours, aeq = (models.logits(p) for p in models.pair("normal", scheme))
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, aeq)


# ---- where they differ --------------------------------------------------------------------

_PER_CHANNEL_ZERO_ROW = ("all-zero row: same bytes (0), but our scale is 1.0 and AEQ's is 1e-9/qmax "
                         "(AEQ floors max|w| at min_bound=1e-9); both dequantize to 0")
_BLOCK_ZERO = ("all-zero block: AEQ's scale 1e-9/7 underflows fp16 to 0.0, which XNNPACK refuses; "
               "ours is 1.0")
_BLOCK_HUGE = ("max|block|/7 > 65504: AEQ's fp16 scale is inf (its 65280 clip applies only with "
               "clipping_values), which XNNPACK refuses; ours saturates at 65280")
_DIFFERS = {("zero_row", "int8"): _PER_CHANNEL_ZERO_ROW, ("zero_row", "int4"): _PER_CHANNEL_ZERO_ROW,
            ("zero_row", "int4-b32"): _BLOCK_ZERO,
            ("huge_block", "int4-b32"): _BLOCK_HUGE}


@pytest.mark.parametrize("case,scheme", [
    pytest.param(c, s, marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=_DIFFERS[c, s])]
                 if (c, s) in _DIFFERS else [])
    for c in EDGE_CASES for s in ("int8", "int4", "int4-b32")])
def test_aeq_same_weights_and_scales_on_odd_rows_and_blocks(models, case, scheme):
    name = EDGE_CASES[case][0]
    ours, aeq = (models.read(p)[("decode", name)] for p in models.pair("odd", scheme))
    np.testing.assert_array_equal(ours.values, aeq.values)
    np.testing.assert_array_equal(ours.scales.view(np.uint8), aeq.scales.view(np.uint8))


def test_where_aeq_differs_it_is_as_documented(models):
    """The exact values behind each xfail above, and what LiteRT makes of them."""
    import ml_dtypes
    from ai_edge_litert.interpreter import Interpreter

    w = models.weights["odd"]
    for scheme, qmax in (("int8", 127), ("int4", 7)):  # zero row, per channel
        o, a = (models.read(p)[("decode", "l0_q")] for p in models.pair("odd", scheme))
        assert o.scales[3] == 1.0 and a.scales[3] == np.float32(1e-9) / np.float32(qmax)
        assert not o.values[3].any() and not a.values[3].any()
    ours_path, aeq_path = models.pair("odd", "int4-b32")
    ours, aeq = models.read(ours_path), models.read(aeq_path)
    o, a = ours[("decode", "l0_q")], aeq[("decode", "l0_q")]  # zero row: four zero blocks
    assert (o.scales[3] == 1.0).all() and (a.scales[3] == 0.0).all()
    o, a = ours[("decode", "l0_gate")], aeq[("decode", "l0_gate")]  # tiny block: both keep a subnormal scale
    s = np.float32(np.abs(w["l0_gate"][5, :32]).max()) / np.float32(7)
    assert o.scales[5, 0] == a.scales[5, 0] == s.astype(ml_dtypes.bfloat16).astype(np.float16) < 2.0 ** -14
    np.testing.assert_array_equal(
        o.values[5, :32], np.clip(np.rint(w["l0_gate"][5, :32] / np.float32(o.scales[5, 0])), -8, 7))
    o, a = ours[("decode", "l0_v")], aeq[("decode", "l0_v")]  # huge block
    assert o.scales[2, 0] == 65280.0 and np.isposinf(a.scales[2, 0]) and not a.values[2, :32].any()
    # every other block of these tensors is the same
    for n in ("l0_q", "l0_gate", "l0_v"):
        same = ours[("decode", n)].scales == aeq[("decode", n)].scales
        assert same.sum() == same.size - {"l0_q": 4, "l0_gate": 0, "l0_v": 1}[n], n

    # LiteRT: our files run; AEQ's blockwise file with a 0.0 and an inf scale is refused
    # by XNNPACK; the per-channel scale difference of a zero row changes nothing
    assert np.isfinite(models.logits(ours_path)).all()
    with pytest.raises(RuntimeError, match="unsupported scale value") as e:
        runner = Interpreter(model_path=aeq_path).get_signature_runner("decode")
        runner(**{k: np.zeros(v["shape"], v["dtype"]) for k, v in runner.get_input_details().items()})
    assert "(0.000000)" in str(e.value) and "(inf)" in str(e.value)
    np.testing.assert_array_equal(*(models.logits(p) for p in models.pair("odd", "int8")))


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="our files keep unread weight tensors in each signature's subgraph, sharing "
                          "the buffer of the signature that reads them; AEQ rewrites that buffer for the "
                          "reader only and LiteRT refuses the other, still FLOAT32, tensor "
                          "('required_bytes <= bytes ... is invalidly specified in schema')")
def test_aeq_reads_our_fp32_file_as_written(models):
    from ai_edge_litert.interpreter import Interpreter

    aeq = _aeq_quantize(models.fp32("normal"), "int8")
    Interpreter(model_content=aeq).get_signature_runner("decode")
