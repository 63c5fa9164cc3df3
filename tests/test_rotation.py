"""Rotations fused into Llama weights: Hadamard constructions, exactness in float, lower quantization error, and the
``rot-`` scheme prefix (composes with any scheme; the rotated model saves and loads)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, rel_err
from torch import nn

from qcal.algorithms.rotation import fuse_norms, hadamard_matrix, random_hadamard, rotate_model
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
