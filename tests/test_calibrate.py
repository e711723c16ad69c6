"""Calibration (``quantize/calibrate.py``): its layer-by-layer numpy forward against transformers,
for every family, and a calibrated conversion that keeps the model's function in float."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import corpus_ids, hf_logits, make_hf_checkpoint


@pytest.mark.parametrize("family", [1, 2, 3])
def test_numpy_forward_matches_transformers(family, tmp_path, sp_model_path):
    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.quantize.calibrate import Calibration, forward

    model = make_hf_checkpoint(family, tmp_path / "ckpt", sp_model_path, seed=family)
    seqs = [[2] + corpus_ids(sp_model_path, 30, seed=3), [2] + corpus_ids(sp_model_path, 12, seed=4)]
    src = Source(str(tmp_path / "ckpt"))
    cal = Calibration()
    for seq, got in zip(seqs, forward(src.config, src.read_rows, seqs, cal, logits=True)):
        want = hf_logits(model, seq)
        assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want)), family
    assert cal.tokens == sum(map(len, seqs))
    n = src.config.num_layers
    assert {f"l{i}_{k}" for i in range(n) for k in ("q", "k", "v", "o", "gate", "up", "down")} | {"embed"} == set(cal.stats)
    assert np.all(cal.stats["l0_down"].max_abs >= 0) and cal.stats["l0_q"].count == cal.tokens


def test_numpy_forward_matches_transformers_on_gemma4(tmp_path_factory, g4_tokenizer):
    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.quantize.calibrate import Calibration, forward
    from test_gemma4 import gemma4_case

    for variant in ("e2b", "keqv", "wide"):
        case = gemma4_case(variant, tmp_path_factory, g4_tokenizer)
        src = Source(str(case.checkpoint))
        cal = Calibration()
        (got,) = forward(src.config, src.read_rows, [case.seq], cal, logits=True)
        assert np.max(np.abs(got - case.ref)) < 1e-4 * np.max(np.abs(case.ref)), variant
        assert "ple_proj" in cal.stats and "l5_ple_out" in cal.stats and "l5_k" not in cal.stats  # l5 shares a cache


@pytest.mark.parametrize("family,search", [(1, False), (3, False), (3, True)])
def test_calibration_plan_keeps_the_function_in_float(family, search, tmp_path, sp_model_path):
    """The migrations move ranges between norms and weights and between up/v rows and down/o
    columns: an fp32 file written with the plan computes what transformers computes, also when
    each group's strength is searched (o's migration shared per KV head, v's rows to match)."""
    from gemma_edge.convert.checkpoint import Source
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.quantize.calibrate import Calibration, forward, make_plan, text_sequences
    from test_oracle import PREFILL, _run_file

    model = make_hf_checkpoint(family, tmp_path / "ckpt", sp_model_path, seed=family, std=0.1)
    src = Source(str(tmp_path / "ckpt"))
    calib = Calibration()
    forward(src.config, src.read_rows, text_sequences(src.tokenizer, "the model and the cache " * 200), calib)
    plan = make_plan(src.config, calib, src.read_rows, recipe={"attn_o": "int8", "ffn_gate": "int4-b32"} if search else None)
    assert ("alpha searched" in plan.notes[-1]) == search
    assert plan.col_scale["l0_q"] is plan.col_scale["l0_k"] and np.allclose(plan.col_scale["l0_attn_norm"] * plan.col_scale["l0_q"], 1)
    assert not np.allclose(plan.col_scale["l0_q"], 1) and "l0_o" in plan.col_scale and "l0_v" in plan.row_scale
    out = tmp_path / "calibrated.tflite"
    convert(str(tmp_path / "ckpt"), str(out), quant="fp32", max_context=64, prefill_lengths=PREFILL, progress=False,
            calibration=plan)
    seq = [2] + corpus_ids(sp_model_path, 55, seed=9)
    got, want = _run_file(out, seq), hf_logits(model, seq)[39:55]
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))


def test_calibrate_option_from_a_file_and_from_the_model_itself(tmp_path, sp_model_path):
    """gemma-convert --calibrate FILE / --calibrate: the int4 file keeps the layout of an
    uncalibrated one (same tensors, types and sizes) and says what it did."""
    import subprocess
    import sys

    from gemma_edge.runtime.modelfile import read_info

    make_hf_checkpoint(3, tmp_path / "ckpt", sp_model_path, seed=3, std=0.1, train_steps=30)
    text = tmp_path / "calib.txt"
    text.write_text("the model token gemma edge phone laptop raspberry cache layer weight quantize " * 60)
    outs = {}
    cache = tmp_path / "user-cache"
    for name, extra in (("plain", []), ("file", ["--calibrate", str(text)]), ("self", ["--calibrate"])):
        outs[name] = tmp_path / f"{name}.tflite"
        r = subprocess.run([sys.executable, "-m", "gemma_edge.convert.cli", str(tmp_path / "ckpt"), "-o",
                            str(outs[name]), "--quant", "int4-b32", "--max-context", "64", "-q", *extra],
                           capture_output=True, text=True, timeout=900, env={**os.environ, "GEMMA_EDGE_CACHE": str(cache)})
        assert r.returncode == 0, r.stderr
        # the temporary model that wrote the calibration text leaves nothing: no file beside the
        # output, and no weight cache in the user's cache folder
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tflite" or p.name.startswith("gemma-edge")) \
            == sorted(f"{n}.tflite" for n in outs), list(tmp_path.iterdir())
        assert not (cache.exists() and list(cache.iterdir())), list(cache.iterdir())
        assert ("calibrated on" in r.stderr) == bool(extra), r.stderr
        assert ("alpha 0.5)" in r.stderr) == bool(extra), r.stderr  # int4: the fixed strength
    # an all-int8 recipe searches each layer input's strength
    r = subprocess.run([sys.executable, "-m", "gemma_edge.convert.cli", str(tmp_path / "ckpt"), "-o",
                        str(tmp_path / "int8.tflite"), "--quant", "int8", "--max-context", "64", "-q",
                        "--calibrate", str(text)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "alpha searched per layer input" in r.stderr, r.stderr
    sizes = {n: p.stat().st_size for n, p in outs.items()}
    assert len(set(sizes.values())) == 1, sizes  # values change, not the layout
    assert read_info(str(outs["self"])).quant == read_info(str(outs["plain"])).quant
    assert outs["file"].read_bytes() != outs["plain"].read_bytes()


def test_activations_as_the_kernels_see_them():
    """Per-token asymmetric int8 over the token's range widened to hold 0: zero stays exact, each
    value moves at most half a step, and a token's extremes are on the grid."""
    from gemma_edge.quantize.calibrate import _as_kernels_see

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(8, 64)) * rng.uniform(0.01, 100, size=(8, 1)),
                        np.abs(rng.normal(size=(1, 64))), np.zeros((1, 64))]).astype(np.float32)
    x[:, 0] = 0.0
    q = _as_kernels_see(x)
    step = (np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)) / 255
    assert np.all(np.abs(q - x) <= step[:, None] / 2 + 1e-6 * np.abs(x).max(1, keepdims=True))
    assert np.all(q[:, 0] == 0) and np.all(q[-1] == 0)
    assert len(np.unique(np.round((q[0] - q[0].min()) / step[0]))) <= 256


def test_a_failed_calibration_writer_is_a_clear_error(tmp_path):
    """The child that writes the calibration text failing is a GemmaEdgeError (exit 2 at the
    command line) carrying the child's last lines, not a traceback or a hang."""
    from gemma_edge.quantize.calibrate import generated_sequences
    from gemma_edge.runtime.errors import GemmaEdgeError

    bad = tmp_path / "not-a-model.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(GemmaEdgeError, match="writing the calibration text failed") as e:
        generated_sequences(str(bad), length=8, count=2)
    assert "not-a-model.tflite" in str(e.value) and "give --calibrate a text file" in str(e.value)
