"""Rotations fused into Llama weights: Hadamard constructions, exactness in float, lower quantization error, the
``rot-`` scheme prefix (composes with any scheme; the rotated model saves and loads), and the online Hadamard transform
of ``down_proj``'s input (``had-``: exact in float, recorded by qcal and hf checkpoints, refused by weight-only
formats, skipped by the scale-folding methods whose folding it would break)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, rel_err
from torch import nn

from qcal.algorithms.awq import awq_smooth
from qcal.algorithms.rotation import fuse_norms, hadamard_matrix, hadamard_mlp_inputs, random_hadamard, rotate_model
from qcal.algorithms.smoothquant import smooth_model
from qcal.nn.hadamard import OnlineHadamard, input_hadamard
from qcal.qtypes import qint4
from qcal.schemes import apply_scheme, describe_scheme, streamable_scheme


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 44, 64, 576, 1536])
def test_hadamard_orthonormal(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))
    r = random_hadamard(n, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [6, 10, 0])
def test_hadamard_unknown_order_names_it(n):
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_matrix(n)


def _model_with_norms(seed: int = 0, tie: bool = True) -> nn.Module:
    model = make_tiny_llama(seed=seed, tie=tie)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [True, False])
def test_rotated_float_model_computes_the_same_logits(tie):
    model = _model_with_norms(tie=tie)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    ref = _logits(model, ids)
    fuse_norms(model)
    assert rel_err(_logits(model, ids), ref) < 1e-5
    rotate_model(model, seed=1)
    assert rel_err(_logits(model, ids), ref) < 1e-5
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert all(torch.equal(b.input_layernorm.weight, torch.ones_like(b.input_layernorm.weight))
               for b in model.model.layers)


def test_rotation_lowers_per_channel_rtn_error_with_outlier_channels():
    """A few residual channels 30x larger than the rest (what LLM activations and weights show): rotated, the
    per-channel int4 weights lose much less."""
    def outliers():
        model = make_tiny_llama(seed=2, tie=False)
        with torch.no_grad():
            for block in model.model.layers:
                for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                            block.mlp.gate_proj, block.mlp.up_proj):
                    lin.weight[:, :3] *= 30
        return model

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    ref = _logits(outliers(), ids)
    plain = rel_err(_logits(apply_scheme(outliers(), "int4wo-pc"), ids).float(), ref)
    rotated = rel_err(_logits(apply_scheme(outliers(), "rot-int4wo-pc"), ids).float(), ref)
    assert rotated < 0.7 * plain, (rotated, plain)


def test_rot_prefix_composes_with_gptq_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = apply_scheme(_model_with_norms(), "rot-gptq-int4-32", calib=lambda: calib)
    assert "rotated" in describe_scheme("rot-gptq-int4-32") and "GPTQ" in describe_scheme("rot-gptq-int4-32")
    ids = torch.randint(0, 256, (1, 16))
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_rotation_refuses_what_it_cannot_rotate():
    with pytest.raises(ValueError, match="not a Llama-family"):
        rotate_model(nn.Sequential(nn.Linear(4, 4)))
    model = apply_scheme(make_tiny_llama(), "int8wo")
    with pytest.raises(ValueError, match="no float nn.Linear"):
        rotate_model(model)
    with pytest.raises(ValueError, match="whole model"):
        streamable_scheme("rot-int8wo")
    with pytest.raises(ValueError, match="orthogonal"):
        rotate_model(make_tiny_llama(), residual=torch.ones(64, 64))


def test_failed_rotated_scheme_leaves_the_model_as_it_was():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 10))
    ref = _logits(model, ids)
    with pytest.raises(ValueError, match="no calibration inputs"):
        apply_scheme(model, "rot-gptq-int4-32", calib=lambda: [])
    assert torch.equal(_logits(model, ids), ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


@pytest.mark.parametrize("n", [1, 12, 64, 576, 1536, 5632])
@pytest.mark.parametrize("native", [True, False])
def test_online_hadamard_applies_its_matrix(n, native, monkeypatch):
    if not native:  # PyTorch's path (other devices and dtypes, no native library)
        monkeypatch.setattr("qcal.nn.hadamard._fast", None)
    had = OnlineHadamard(n)
    h = had.matrix()
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    y = had(x.float())
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), x @ h.T, atol=2e-5, rtol=0)
    assert had(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=f"order {n}"):
        had(torch.zeros(2, n + 1))
    with pytest.raises(ValueError, match="positive int"):
        OnlineHadamard(0)


def _down_outliers(seed: int = 3) -> nn.Module:
    """A tiny Llama whose gated-MLP product has a few channels 30x larger than the rest (down_proj's input)."""
    model = _model_with_norms(seed=seed, tie=False)
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[:4] *= 30
            block.mlp.down_proj.weight[:, :4] /= 30
    return model


def test_online_hadamard_is_exact_in_float_and_lowers_w8a8_error():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    model = _down_outliers()
    ref = _logits(model, ids)
    hadamard_mlp_inputs(model)
    assert rel_err(_logits(model, ids), ref) < 1e-5
    assert all(input_hadamard(b.mlp.down_proj) is not None for b in model.model.layers)
    with pytest.raises(ValueError, match="already has"):
        hadamard_mlp_inputs(model)
    plain = rel_err(_logits(apply_scheme(_down_outliers(), "int8dq"), ids).float(), ref)
    had = rel_err(_logits(apply_scheme(_down_outliers(), "had-int8dq"), ids).float(), ref)
    assert had < 0.7 * plain, (had, plain)


def test_had_checkpoints_round_trip_and_weight_only_formats_refuse(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    import qcal

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(8))
    model = apply_scheme(_down_outliers(), "rot-had-int8dq")
    out = _logits(model, ids)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["format_version"] == 3
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids), out)
    qcal.save(model, tmp_path / "q")
    fresh = make_tiny_llama(seed=3, tie=False)
    assert torch.equal(_logits(qcal.load(fresh, tmp_path / "q"), ids), out)
    assert input_hadamard(fresh.model.layers[0].mlp.down_proj) is not None
    for fmt, kw in (("compressed-tensors", {}), ("gguf", {"tokenizer": object()})):
        with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.*online Hadamard"):
            qcal.export(model, tmp_path / fmt, format=fmt, **kw)
    manifest = tmp_path / "q" / "qcal.json"
    m = json.loads(manifest.read_text())
    assert m["format_version"] == 3
    m["format_version"] = 2  # what an older writer could not have written
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="input_transform"):
        qcal.load(make_tiny_llama(seed=3, tie=False), tmp_path / "q")
    plain = apply_scheme(make_tiny_llama(), "int8dq")
    qcal.save(plain, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "qcal.json").read_text())["format_version"] == 2


def test_scale_folding_skips_a_transformed_input_and_stays_exact():
    """AWQ and SmoothQuant fold down_proj's scales into up_proj's rows: with a Hadamard in between that fold would
    change the function, so they leave down_proj alone."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for fold in (lambda m: awq_smooth(m, calib, qint4, 32, False, progress=False), lambda m: smooth_model(m, calib)):
        model = hadamard_mlp_inputs(_down_outliers())
        ref = _logits(model, ids)
        folded = fold(model)
        assert folded and not any(k.endswith("up_proj") for k in folded), sorted(folded)
        assert rel_err(_logits(model, ids), ref) < 1e-5


def test_failed_had_scheme_removes_the_transform():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 10))
    ref = _logits(model, ids)
    with pytest.raises(ValueError, match="no calibration inputs"):
        apply_scheme(model, "had-gptq-int4-32", calib=lambda: [])
    down = model.model.layers[0].mlp.down_proj
    assert input_hadamard(down) is None and not down._forward_pre_hooks
    assert torch.equal(_logits(model, ids), ref)
