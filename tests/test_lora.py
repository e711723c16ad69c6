"""LoRA merging (convert/lora.py): peft's own merge_and_unload() is the oracle for every tensor
and row range of tiny Gemma 1/2/3 checkpoints (also through a GGUF base and Gemma 3's
language_model prefixes); an fp32 conversion with the adapter merged is run in LiteRT against
the unmerged PeftModel; and every refusal is a typed error naming what exists."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from conftest import MODEL_VOCAB, corpus_ids, hf_logits, make_hf_checkpoint

from gemma_edge.convert.checkpoint import open_checkpoint
from gemma_edge.convert.gguf_checkpoint import GGUFCheckpoint
from gemma_edge.convert.lora import CONFIG_NAME, WEIGHTS_NAME, LoraCheckpoint, open_with_lora
from gemma_edge.runtime.errors import GemmaEdgeError, SourceError, UnsupportedModelError, WeightMapError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = {1: 2, 2: 3, 3: 4}  # tiny_hf_config's layer counts
TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# peft adapter settings each merge test runs with: scale alpha/r, rsLoRA's alpha/sqrt(r), and
# per-module rank and alpha patterns (matched on the end of the module path, as peft does)
VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"down_proj": 2, "layers.0.self_attn.q_proj": 8},
                 "alpha_pattern": {"v_proj": 3, "layers.1.mlp.up_proj": 32}},
}


# --------------------------------------------------------------------------------------------
# fixtures: tiny base checkpoints and peft adapters with random (non-zero) A and B


@pytest.fixture(scope="module")
def base(tmp_path_factory, sp_model_path):
    """family -> (checkpoint dir, transformers model); built once per family."""
    made = {}

    def get(family: int):
        if family not in made:
            d = tmp_path_factory.mktemp(f"lora_base{family}") / "ckpt"
            made[family] = (d, make_hf_checkpoint(family, d, sp_model_path, seed=family, std=0.1))
        return made[family]

    return get


def make_adapter(model, out_dir: Path, seed: int = 0, targets=TARGETS, **config):
    """A peft LoRA over a copy of ``model`` with random A and B, saved to ``out_dir``; returns the
    PeftModel (unmerged, eval mode)."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **config)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # deltas ~40% of the base weights: impossible to miss
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(out_dir))
    return pm.eval()


def merged_state(pm) -> dict[str, np.ndarray]:
    """peft's merge, the oracle: the base model's weights after merge_and_unload()."""
    merged = copy.deepcopy(pm).merge_and_unload()
    return {k: v.float().numpy() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """(family, variant) -> (base dir, adapter dir, PeftModel, merged weights); built once each."""
    made = {}

    def get(family: int, variant: str = "plain"):
        if (family, variant) not in made:
            d, model = base(family)
            out = tmp_path_factory.mktemp(f"lora{family}_{variant}") / "adapter"
            pm = make_adapter(model, out, seed=10 * family + len(variant), **VARIANTS[variant])
            made[family, variant] = (d, out, pm, merged_state(pm))
        return made[family, variant]

    return get


def _copy_adapter(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    """A copy of adapter ``src`` with settings overridden by ``config`` (None deletes a key) and
    tensors transformed by ``tensors(dict) -> dict``."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / CONFIG_NAME).read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    ts = safetensors.numpy.load_file(str(src / WEIGHTS_NAME))
    if tensors is not None:
        ts = tensors(ts)
    safetensors.numpy.save_file(ts, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    return dst


# --------------------------------------------------------------------------------------------
# (a) reads equal peft's merge


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", [1, 2, 3])
def test_reads_equal_peft_merge(adapter, family, variant):
    d, adir, pm, want = adapter(family, variant)
    with open_with_lora(open_checkpoint(d), adir) as ckpt:
        names = ckpt.tensors()
        adapted = {m.target for m in ckpt.modules}
        assert len(adapted) == len(TARGETS) * LAYERS[family]
        assert {names[t].dtype for t in adapted} == {"F32"}
        for name in names:
            got = ckpt.read(name)
            assert got.dtype == np.float32 and got.shape == want[name].shape, name
            err = float(np.max(np.abs(got - want[name])))
            assert err <= TOL, f"{name}: max |merged - peft| = {err:.2e}"
            if name in adapted:  # the LoRA is really there
                assert float(np.max(np.abs(got - ckpt.base.read(name)))) > 1e-2, name
            else:
                np.testing.assert_array_equal(got, ckpt.base.read(name))
        if variant == "patterns":  # the patterns reached the modules they name, and only those
            by = {m.module: m for m in ckpt.modules}
            assert by["model.layers.0.self_attn.q_proj"].rank == 8
            assert by["model.layers.1.self_attn.q_proj"].rank == 4
            assert by["model.layers.0.mlp.down_proj"].rank == 2
            assert by["model.layers.0.self_attn.v_proj"].scale == 3 / 4
            assert by["model.layers.1.mlp.up_proj"].scale == 32 / 4
            assert by["model.layers.0.mlp.up_proj"].scale == 8 / 4
        if variant == "rslora":
            assert {m.scale for m in ckpt.modules} == {8 / 2.0}


@pytest.mark.parametrize("family", [1, 3])
def test_row_ranges_are_slices_of_the_full_read(adapter, family):
    d, adir, _, _ = adapter(family)
    with open_with_lora(open_checkpoint(d), adir) as ckpt:
        for m in ckpt.modules:
            full = ckpt.read(m.target)
            n = full.shape[0]
            for r0, r1 in [(0, 1), (3, n // 2 + 1), (n - 5, n), (7, 7), (0, n)]:
                part = ckpt.read(m.target, rows=(r0, r1))
                assert part.shape == (r1 - r0, full.shape[1])
                np.testing.assert_allclose(part, full[r0:r1], rtol=0, atol=TOL, err_msg=f"{m.target} {r0}:{r1}")
        with pytest.raises(ValueError, match="outside tensor"):
            ckpt.read(ckpt.modules[0].target, rows=(0, 10_000))


def test_delta_is_computed_for_the_requested_rows_only(adapter):
    """B is read for the requested rows, never whole: no full [out, in] delta is ever built."""
    d, adir, _, _ = adapter(3)
    with open_with_lora(open_checkpoint(d), adir) as ckpt:
        seen = []
        real = ckpt._adapter.read
        ckpt._adapter.read = lambda name, rows=None: (seen.append((name, rows)), real(name, rows))[1]
        m = next(m for m in ckpt.modules if m.target.endswith("mlp.up_proj.weight"))
        out = ckpt.read(m.target, rows=(16, 48))
        assert out.shape == (32, 64)
        assert (m.b_key, (16, 48)) in seen
        assert all(rows is not None for name, rows in seen if name == m.b_key)
        assert all(name in (m.a_key, m.b_key) for name, _ in seen)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_gemma3_language_model_prefixes_map_to_text_names(adapter, tmp_path, prefix):
    """Adapters trained on Gemma 3's multimodal model name the decoder under language_model;
    they apply to the text checkpoint's model.layers.* weights."""
    d, adir, _, want = adapter(3)
    renamed = _copy_adapter(adir, tmp_path / "mm", tensors=lambda ts: {
        k.replace("base_model.model.model.", "base_model.model." + prefix): v for k, v in ts.items()})
    assert any(prefix in k for k in safetensors.numpy.load_file(str(renamed / WEIGHTS_NAME)))
    with open_with_lora(open_checkpoint(d), renamed) as ckpt:
        assert len(ckpt.modules) == len(TARGETS) * LAYERS[3]
        assert all(m.module.startswith(prefix) and m.target.startswith("model.layers.") for m in ckpt.modules)
        for m in ckpt.modules:
            np.testing.assert_allclose(ckpt.read(m.target), want[m.target], rtol=0, atol=TOL)


def test_fan_in_fan_out_is_treated_as_peft_treats_it(adapter, tmp_path):
    """peft forces fan_in_fan_out=False for nn.Linear (Gemma's only targets) on load; so do we."""
    import warnings

    from peft import PeftModel

    d, adir, pm, _ = adapter(1)
    flagged = _copy_adapter(adir, tmp_path / "fifo", config={"fan_in_fan_out": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(pm.get_base_model()), str(flagged))
    want = merged_state(loaded)
    with open_with_lora(open_checkpoint(d), flagged) as ckpt:
        for m in ckpt.modules:
            np.testing.assert_allclose(ckpt.read(m.target), want[m.target], rtol=0, atol=TOL)


def test_bf16_adapter_weights_are_read_exactly(adapter, tmp_path):
    d, adir, _, _ = adapter(1)
    bf16 = _copy_adapter(adir, tmp_path / "bf16")  # rewritten below with torch, which has bfloat16
    import safetensors.torch
    import torch

    ts = safetensors.torch.load_file(str(adir / WEIGHTS_NAME))
    ts = {k: v.to(torch.bfloat16) for k, v in ts.items()}
    safetensors.torch.save_file(ts, str(bf16 / WEIGHTS_NAME))
    with open_checkpoint(d) as base_ckpt, LoraCheckpoint(open_checkpoint(d), bf16) as ckpt:
        m = ckpt.modules[0]
        a, b = ts[m.a_key].float().numpy(), ts[m.b_key].float().numpy()
        want = base_ckpt.read(m.target) + (b @ a) * np.float32(m.scale)
        np.testing.assert_allclose(ckpt.read(m.target), want, rtol=0, atol=TOL)


def _write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    for name, arr in weights.items():
        if qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_base_is_addressed_through_the_name_table(adapter, base, tmp_path, qtype):
    """A GGUF base: the adapter's HF module names reach blk.{i}.* through names.py; the delta is
    added to the dequantized rows."""
    d, adir, pm, want = adapter(3)
    original = {k: v.float().numpy() for k, v in base(3)[1].state_dict().items()}
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    pairs = {}  # gguf name -> HF name
    for i in range(LAYERS[3]):
        for hf, gg in hf_to_gguf.items():
            pairs[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    path = tmp_path / f"base_{qtype}.gguf"
    _write_gguf(path, {g: original[h] for g, h in pairs.items()}, qtype)
    with GGUFCheckpoint(path) as plain, open_with_lora(GGUFCheckpoint(path), adir) as ckpt:
        assert {m.target for m in ckpt.modules} == set(pairs)
        for g, h in pairs.items():
            delta = want[h] - original[h]  # peft's delta
            np.testing.assert_allclose(ckpt.read(g), plain.read(g) + delta, rtol=0, atol=TOL, err_msg=g)
            np.testing.assert_allclose(ckpt.read(g, rows=(5, 9)), (plain.read(g) + delta)[5:9], rtol=0, atol=TOL)


def test_close_closes_the_base_and_describe_names_the_adapter(adapter):
    d, adir, _, _ = adapter(1)
    ckpt = open_with_lora(open_checkpoint(d), adir)
    info = ckpt.describe()
    assert info["name"] == adir.name and info["r"] == 4 and info["lora_alpha"] == 8
    assert info["modules"] == len(TARGETS) * LAYERS[1] and len(info["sha256"]) == 64
    assert "adapter" in repr(ckpt)
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.base.read("model.norm.weight")


# --------------------------------------------------------------------------------------------
# (b) end to end: an fp32 conversion with the adapter merged, run in LiteRT, against the
# unmerged PeftModel's logits

PROMPT_LEN, DECODE_STEPS, CONTEXT, PREFILL = 20, 6, 32, (8,)
# One conversion (~15 s on a busy 2-core machine) for the whole file: the merge is the same code for
# every family (checked exactly above); the pipeline's per-family graphs are test_oracle's business.
E2E_FAMILY = 1


def _check_logits(path: Path, pm, model, seq: list[int]) -> None:
    from gemma_edge.runtime.backend import make_backend, run_prefill
    from gemma_edge.runtime.modelfile import read_info

    backend = make_backend(read_info(str(path)))
    run_prefill(backend, seq[:PROMPT_LEN - 1], 0)  # 19 tokens: 8 + 8 + 3 (padded)
    got = np.stack([backend.decode(seq[p], p).copy() for p in range(PROMPT_LEN - 1, PROMPT_LEN - 1 + DECODE_STEPS)])
    want = hf_logits(pm, seq)[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]  # the unmerged adapter
    assert got.shape == (DECODE_STEPS, MODEL_VOCAB)
    plain = hf_logits(model, seq)[PROMPT_LEN - 1:PROMPT_LEN - 1 + DECODE_STEPS]
    assert np.max(np.abs(plain - want)) > 0.1 * np.max(np.abs(want))  # the adapter changes the logits
    rel = np.max(np.abs(got - want), axis=-1) / np.max(np.abs(want), axis=-1)
    print(f"gemma{E2E_FAMILY} + LoRA fp32: worst relative max logit error over {DECODE_STEPS} steps {rel.max():.2e}")
    assert rel.max() < 1e-4, f"relative max error {rel.max():.2e}"


@pytest.fixture(scope="module")
def e2e(adapter, base, sp_model_path):
    d, adir, pm, _ = adapter(E2E_FAMILY)
    seq = [2] + corpus_ids(sp_model_path, PROMPT_LEN + DECODE_STEPS - 1, seed=123)
    return d, adir, pm, base(E2E_FAMILY)[1], seq


def test_convert_with_lora_matches_peft(e2e, tmp_path):
    from gemma_edge.convert.pipeline import convert
    from gemma_edge.runtime.modelfile import read_info

    d, adir, pm, model, seq = e2e
    out = tmp_path / "lora_fp32.tflite"
    convert(str(d), str(out), quant="fp32", max_context=CONTEXT, prefill_lengths=PREFILL, progress=False,
            lora=str(adir), score_length=0)  # score_<T> only costs time here
    lora_meta = read_info(str(out)).meta.source.lora
    with open_with_lora(open_checkpoint(d), adir) as ckpt:
        assert lora_meta == ckpt.describe()
    _check_logits(out, pm, model, seq)


# --------------------------------------------------------------------------------------------
# (c) refusals: typed errors whose messages name the files, keys and modules that exist


def _refused(base_dir: Path, adapter_dir: Path, error: type[GemmaEdgeError], *needles: str) -> str:
    ckpt = open_checkpoint(base_dir)
    try:
        with pytest.raises(error) as exc:
            open_with_lora(ckpt, adapter_dir)
        msg = str(exc.value)
        for needle in needles:
            assert needle in msg, f"{needle!r} not in: {msg}"
        ckpt.read("model.norm.weight")  # the base is left open and usable
    finally:
        ckpt.close()
    return msg


def test_missing_adapter_files_are_refused(adapter, tmp_path):
    d, adir, _, _ = adapter(1)
    _refused(d, tmp_path / "nope", SourceError, str(tmp_path / "nope"), "no such LoRA adapter directory", CONFIG_NAME)
    (tmp_path / "empty").mkdir()
    _refused(d, tmp_path / "empty", SourceError, str(tmp_path / "empty"), f"no {CONFIG_NAME}")
    (tmp_path / "multi").mkdir()
    shutil.copytree(adir, tmp_path / "multi" / "chat")
    _refused(d, tmp_path / "multi", SourceError, "'chat'", "pass one of those")
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    shutil.copy(adir / CONFIG_NAME, only_cfg)
    _refused(d, only_cfg, SourceError, str(only_cfg), f"no {WEIGHTS_NAME}")
    (only_cfg / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    _refused(d, only_cfg, SourceError, "adapter_model.bin", "pickle", WEIGHTS_NAME, "save_pretrained")
    _refused(d, adir / "README.md", SourceError, "not a single file")
    with open_with_lora(open_checkpoint(d), adir / WEIGHTS_NAME) as ckpt:  # a file of the adapter: its folder
        assert ckpt.adapter_path == adir


def test_corrupt_config_and_weights_are_refused(adapter, tmp_path):
    d, adir, _, _ = adapter(1)
    bad = _copy_adapter(adir, tmp_path / "json")
    (bad / CONFIG_NAME).write_text("{not json")
    _refused(d, bad, SourceError, str(bad / CONFIG_NAME), "not valid JSON")
    _refused(d, _copy_adapter(adir, tmp_path / "ia3", config={"peft_type": "IA3"}), UnsupportedModelError,
             "'IA3'", "LoRA adapters only", "merge_and_unload")
    _refused(d, _copy_adapter(adir, tmp_path / "r0", config={"r": 0}), SourceError, "'r' is 0")
    _refused(d, _copy_adapter(adir, tmp_path / "r8", config={"r": 8}), SourceError,
             "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", "rank 4", "r=8")
    trunc = _copy_adapter(adir, tmp_path / "trunc")
    raw = (trunc / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(raw[:-100])
    _refused(d, trunc, SourceError, str(trunc / WEIGHTS_NAME), "truncated")
    key_b = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    _refused(d, _copy_adapter(adir, tmp_path / "unpaired", tensors=lambda ts: {k: v for k, v in ts.items() if k != key_b}),
             SourceError, "model.layers.1.self_attn.k_proj (no lora_B)")
    _refused(d, _copy_adapter(adir, tmp_path / "other", tensors=lambda ts: {"x": np.zeros(2, np.float32)}),
             UnsupportedModelError, "'x'", "full weight")
    _refused(d, _copy_adapter(adir, tmp_path / "empty", tensors=lambda ts: {}), SourceError,
             str(tmp_path / "empty" / WEIGHTS_NAME), "holds no LoRA weights")


def test_unknown_module_and_shape_mismatch_are_refused(adapter, tmp_path):
    d, adir, _, _ = adapter(1)
    moved = _copy_adapter(adir, tmp_path / "moved", tensors=lambda ts: {
        k.replace("layers.1.", "layers.7."): v for k, v in ts.items()})
    msg = _refused(d, moved, WeightMapError, "'model.layers.7.self_attn.q_proj'", str(d), "does not have")
    assert "layers.1." not in msg
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    narrow = _copy_adapter(adir, tmp_path / "narrow", tensors=lambda ts: {
        k: (v[:, :32].copy() if k == key_a else v) for k, v in ts.items()})
    _refused(d, narrow, WeightMapError, key_a, "(4, 32)", "model.layers.0.self_attn.q_proj.weight", "(64, 64)")


@pytest.mark.parametrize("case", ["dora", "embedding", "lm_head", "modules_to_save", "lora_bias"])
def test_unsupported_peft_features_are_refused(base, tmp_path, case):
    import warnings

    d, model = base(1)
    kwargs, needles = {
        "dora": ({"use_dora": True}, ["use_dora", "DoRA", "merge_and_unload"]),
        "embedding": ({"targets": ["q_proj", "embed_tokens"]}, ["embed_tokens", "ties its output head"]),
        "lm_head": ({"targets": ["q_proj", "lm_head"]}, ["'lm_head'", "ties its output head"]),
        "modules_to_save": ({"modules_to_save": ["norm"]}, ["base_model.model.model.norm.weight", "modules_to_save"]),
        "lora_bias": ({"lora_bias": True}, ["lora_bias"]),
    }[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_adapter(model, tmp_path / case, **kwargs)
    _refused(d, tmp_path / case, UnsupportedModelError, str(tmp_path / case), *needles)


def test_unsupported_settings_and_tensors_are_refused(adapter, tmp_path):
    import peft

    d, adir, _, _ = adapter(1)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = [
        ({"init_lora_weights": "pissa_niter_4"}, None, ["'pissa_niter_4'", "path_initial_model_for_weight_conversion"]),
        ({"init_lora_weights": "loftq"}, None, ["'loftq'"]),
        ({"layer_replication": [[0, 2], [1, 2]]}, None, ["layer_replication"]),
        ({"alora_invocation_tokens": [5, 6]}, None, ["alora_invocation_tokens"]),
        # the message names the peft that saved the adapter (the one installed here)
        ({"shiny_new_variant": {"on": True}}, None, ["shiny_new_variant", "unknown", f"peft {peft.__version__}"]),
        ({}, {f"{q}.lora_magnitude_vector": np.ones(64, np.float32)}, [f"{q}.lora_magnitude_vector", "DoRA"]),
        ({"bias": "all"}, {f"{q}.bias": np.ones(64, np.float32)}, [f"{q}.bias", "bias='all'", "bias='none'"]),
        ({}, {f"{q}.base_layer.weight": np.ones((64, 64), np.float32)}, [f"{q}.base_layer.weight", "not LoRA"]),
    ]
    for i, (config, extra, needles) in enumerate(cases):
        bad = _copy_adapter(adir, tmp_path / f"c{i}", config=config, tensors=lambda ts: {**ts, **(extra or {})})
        _refused(d, bad, UnsupportedModelError, *needles)
    # unknown keys left at a default do not matter, nor does the base model's name
    ok = _copy_adapter(adir, tmp_path / "ok", config={"other_future": False, "future_list": [],
                                                       "base_model_name_or_path": "someone/else", "bias": "all"})
    with open_with_lora(open_checkpoint(d), ok) as ckpt:
        assert len(ckpt.modules) == len(TARGETS) * LAYERS[1]
