"""Calibration (``quantize/calibrate.py``): its layer-by-layer numpy forward against transformers,
for every family, and a calibrated conversion that keeps the model's function in float."""

from __future__ import annotations

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
