"""Diffusion transformers (diffusers' PixArt and Flux classes, tiny configs, random weights): every calibration-free
scheme and calibrated static W8A8 quantize them, stay near the float model, and save/load bit for bit."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import qcal
from qcal.schemes import apply_scheme

diffusers = pytest.importorskip("diffusers")

SCHEMES = {"int8wo": 0.03, "int8dq": 0.05, "int4wo-16": 0.25, "8da4w-16": 0.25, "fp8wo": 0.1, "fp8dq": 0.12}


def _pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([10, 500]))
    return model, inputs


def _flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    return model, inputs


def _run(model, inputs, dtype=torch.float32):
    cast = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("_ids") else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast).sample.float()


@pytest.mark.parametrize("build", [_pixart, _flux], ids=["pixart", "flux"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_calibration_free_schemes_quantize_and_round_trip(build, scheme, tmp_path):
    float_model, inputs = build()
    ref = _run(float_model, inputs)
    model = apply_scheme(copy.deepcopy(float_model), scheme, quantize_lm_head=True)
    linears = [n for n, m in float_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(n for n, _ in qcal.quantized_modules(model)) == sorted(linears)  # every linear and conv
    out = _run(model, inputs, torch.bfloat16)
    assert rel_err(out, ref) < SCHEMES[scheme]
    qcal.save(model, tmp_path)
    loaded = qcal.load(copy.deepcopy(float_model), tmp_path)
    assert torch.equal(_run(loaded, inputs, torch.bfloat16), out)  # the saved dtypes come back with the tensors


def test_static_w8a8_calibrated_on_denoising_steps(tmp_path):
    float_model, inputs = _pixart()
    ref = _run(float_model, inputs)
    model = copy.deepcopy(float_model)
    qcal.quantize(model, weights=qcal.qint8, activations=qcal.qint8)
    with qcal.Calibration():
        for t in (10, 300, 900):  # several timesteps: the activation ranges move with the noise level
            model(**{**inputs, "timestep": torch.tensor([t, t])})
    qcal.freeze(model)
    out = _run(model, inputs)
    assert rel_err(out, ref) < 0.05
    qcal.save(model, tmp_path)
    assert torch.equal(_run(qcal.load(copy.deepcopy(float_model), tmp_path), inputs), out)


def test_group_size_that_does_not_fit_the_patch_embedding_names_it():
    float_model, _ = _pixart()  # the patch embedding is a Conv2d of 4 channels x 2 x 2 = 16 inputs
    with pytest.raises(ValueError, match=r"pos_embed\.proj .*group_size=32 does not divide"):
        apply_scheme(copy.deepcopy(float_model), "int4wo-32", quantize_lm_head=True)
    model = copy.deepcopy(float_model)
    qcal.quantize(model, weights=qcal.qint4, group_size=32, exclude="pos_embed.proj")
    assert "pos_embed.proj" not in dict(qcal.quantized_modules(model))


def test_benchmark_script_rows(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_diffusion", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_diffusion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    keys = {"model", "scheme", "compile", "model_mib", "inference_mib", "quantize_s", "warmup_s", "compile_s",
            "step_s", "rel_err", "psnr_db", "float_modules", "notes"}
    for name in ("pixart", "sd-unet"):
        out = tmp_path / f"{name}.json"
        bench.main(["--tiny", "--model", name, "--schemes", "bf16,int8wo", "--steps", "1", "--warmup", "0",
                    "--threads", "1", "--json", str(out), "--no-progress"])
        rows = {r["scheme"]: r for r in json.loads(out.read_text())["rows"]}
        assert set(rows) == {"bf16", "int8wo"} and all(keys <= set(r) for r in rows.values())
        bf16, q = rows["bf16"], rows["int8wo"]
        assert q["model_mib"] < bf16["model_mib"] and q["float_modules"] == 0
        assert bf16["rel_err"] == 0 and math.isfinite(q["rel_err"]) and math.isfinite(q["psnr_db"])
        assert q["rel_err"] < 0.05 and q["step_s"] > 0
