"""Leaving qcal and coming back: transformers' save_pretrained/from_pretrained (quant_method "qcal"),
quantize on load, compressed-tensors export (read back by transformers + compressed-tensors) and import
(including checkpoints written by llm-compressor itself), and the bad inputs around them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, rel_err
from transformers import AutoModelForCausalLM

import qcal
from qcal.integrations.compressed_tensors import ct_dequantized_weights
from qcal.schemes import apply_scheme, available_schemes, quantize_kwargs

FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]


def _scheme_names() -> list[str]:
    names = [p.replace("<g>", "32") for p in available_schemes() if p not in ("fp32", "bf16")]
    return [n for n in names if not re.match(r"gptq-int(2|3|8)-", n)]  # one bit width of GPTQ is enough here


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _rotary_like(model, ref) -> None:
    """Give ``model`` the rotary buffers' dtype of ``ref`` (non-persistent buffers are recomputed on load)."""
    for name, buf in ref.named_buffers():
        if "rotary" in name:
            mod, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod), attr, model.get_submodule(mod)._buffers[attr].to(buf.dtype))


# ------------------------------------------------------------------------------------ save_pretrained
@pytest.mark.parametrize("scheme", _scheme_names())
def test_save_pretrained_from_pretrained_bit_exact(tmp_path, scheme):
    model = apply_scheme(make_tiny_llama(), scheme, calib=_calib)
    ref = _logits(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qcal" and cfg["format_version"] == 2  # 3 only with an online input transform
    targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(n for n, _ in qcal.quantized_modules(model))
    assert "lm_head" in cfg["modules_to_not_convert"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(loaded), ref)
    for (n, a), (_, b) in zip(qcal.quantized_modules(model), qcal.quantized_modules(loaded), strict=True):
        assert a.frozen and b.frozen and a.kernel.name == b.kernel.name, n
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.weight_scale, b.weight_scale)


def test_fake_quant_round_trip_and_uncalibrated_refused(tmp_path):
    model = make_tiny_llama()
    qcal.quantize(model, weights=qcal.qint8, activations=qcal.qint8, exclude="lm_head")
    out = tmp_path / "m"
    with pytest.raises(ValueError, match="never calibrated"):
        model.save_pretrained(out)
    assert not any(out.iterdir())  # nothing written
    with qcal.Calibration():
        model(IDS)
    ref = _logits(model)
    model.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    q = loaded.model.layers[0].mlp.down_proj
    assert not q.frozen and q.input_scale is not None
    assert torch.equal(_logits(loaded), ref)
    qcal.freeze(loaded)


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_output_layer(tmp_path, tie):
    model = apply_scheme(make_tiny_llama(tie=tie), "int8wo", quantize_lm_head=True)
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.frozen and torch.equal(_logits(loaded), _logits(model))
    qcal.export(model, tmp_path / "ct", format="compressed-tensors")
    back = qcal.load_pretrained(tmp_path / "ct")
    _rotary_like(back, model)
    assert back.lm_head.frozen and torch.equal(_logits(back), _logits(model))


def test_sharded_folder(tmp_path):
    model = apply_scheme(make_tiny_llama(), "int4wo-32")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


# ------------------------------------------------------------------------------------ quantize on load
@pytest.mark.parametrize("scheme", ["int8wo", "int8dq", "int4wo-32", "int4wo-pc", "8da4w-32", "int4wo-32-intzp"])
def test_quantize_on_load_equals_quantize_after_load(tmp_path, scheme):
    make_tiny_llama().save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    qcal.quantize(ref, exclude="lm_head", **quantize_kwargs(scheme))
    qcal.freeze(ref)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                  quantization_config=qcal.QcalConfig(scheme=scheme))
    assert all(m.frozen for _, m in qcal.quantized_modules(loaded))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(ref))
    loaded.save_pretrained(tmp_path / "q")  # and the result saves like any qcal model
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), _logits(ref))


@pytest.mark.parametrize("scheme", ["gptq-int4-64", "w8a8-static", "smoothquant-w8a8", "nope-4"])
def test_quantize_on_load_refuses_calibrated_schemes(scheme):
    with pytest.raises(ValueError, match="calibration data|unknown scheme"):
        qcal.QcalConfig(scheme=scheme)


# ------------------------------------------------------------------------------------ compressed-tensors
CT_SCHEMES = ["int8wo", "int8dq", "8da4w-32", "int4wo-32-intzp", "int4wo-pc-intzp", "gptq-int4-32-actorder-intzp",
              "w8a8-static", "smoothquant-w8a8-static", "8da4w-gptq-32"]


@pytest.mark.parametrize("scheme", CT_SCHEMES)
def test_compressed_tensors_export_exact(tmp_path, scheme):
    model = apply_scheme(make_tiny_llama(), scheme, calib=_calib)
    out = qcal.export(model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    # compressed-tensors' own decompressor gives qcal's dequantized weights bit for bit
    deq = ct_dequantized_weights(out)
    assert sorted(deq) == sorted(n for n, _ in qcal.quantized_modules(model))
    for name, w in deq.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(w.dtype), w), name
    # and qcal reads it back into the same frozen modules (the same logits once the rotary buffers match)
    back = qcal.load_pretrained(out)
    _rotary_like(back, model)
    assert torch.equal(_logits(back), _logits(model))


@pytest.mark.parametrize("scheme", ["int8wo", "int8dq", "8da4w-32", "w8a8-static"])
def test_compressed_tensors_export_loads_in_transformers(tmp_path, scheme, reference_kernels):
    """transformers + compressed-tensors load the folder on the CPU; logits within bf16 rounding of qcal's
    reference path (dequantized weights, fake-quantized activations, float op)."""
    model = apply_scheme(make_tiny_llama(), scheme, calib=_calib)
    qcal.export(model, tmp_path, format="compressed-tensors", overwrite=True)
    ct = AutoModelForCausalLM.from_pretrained(tmp_path)
    _rotary_like(ct, model)
    out = _logits(ct)  # the first forward decompresses the weights
    for name, m in qcal.quantized_modules(model):
        assert torch.equal(ct.get_submodule(name).weight, m.dequantized_weight(torch.bfloat16)), name
    assert rel_err(out, _logits(model)) < 2e-2


@pytest.mark.parametrize("name", ["w4a16-asym-g32-gptq", "w4a16-sym-g32-gptq", "w8a8-dynamic"])
def test_import_llmcompressor_checkpoint(name, reference_kernels):
    """Folders written by llm-compressor 0.14 (oneshot + save_pretrained; benchmarks/peers/
    make_llmcompressor_fixture.py) load as frozen qcal modules holding exactly their weights."""
    path = FIXTURES / name
    model = qcal.load_pretrained(path)
    deq = ct_dequantized_weights(path)
    assert len(deq) == 14
    for mname, w in deq.items():
        q = model.get_submodule(mname)
        assert isinstance(q, qcal.QLinear) and q.frozen
        assert torch.equal(q.dequantized_weight(w.dtype), w), mname
    # the same function as the float model with compressed-tensors' weights
    dense = make_tiny_llama()
    for mname, w in deq.items():
        dense.get_submodule(mname).weight.data = w.float()
    dyn = "w8a8" in name
    assert rel_err(_logits(model), _logits(dense)) < (2e-2 if dyn else 1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_import_uses_native_kernels():
    model = qcal.load_pretrained(FIXTURES / "w4a16-sym-g32-gptq", dtype=torch.bfloat16)
    kernel = model.model.layers[0].mlp.down_proj.kernel.name
    assert kernel != "reference" or not qcal.kernels.native.available()


# ------------------------------------------------------------------------------------ bad input
def test_export_bad_inputs(tmp_path):
    model = apply_scheme(make_tiny_llama(), "int4wo-32")
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        qcal.export(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*float\) zero-points"):
        qcal.export(model, tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    ok = apply_scheme(make_tiny_llama(), "int8wo")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        qcal.export(ok, tmp_path / "full", format="compressed-tensors")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    qcal.export(ok, tmp_path / "full", format="compressed-tensors", overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists()
    fp8 = make_tiny_llama()
    qcal.quantize(fp8, weights=qcal.qfloat8, exclude="lm_head")
    qcal.freeze(fp8)
    with pytest.raises(ValueError, match=r"q_proj.*qfloat8_e4m3fn"):
        qcal.export(fp8, tmp_path / "y", format="compressed-tensors")
    unfrozen = make_tiny_llama()
    qcal.quantize(unfrozen, weights=qcal.qint8, exclude="lm_head")
    with pytest.raises(ValueError, match="not frozen"):
        qcal.export(unfrozen, tmp_path / "y", format="compressed-tensors")
    assert not (tmp_path / "y").exists()


def test_truncated_and_tampered_shards(tmp_path):
    model = apply_scheme(make_tiny_llama(), "int8wo")
    model.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    header = 8 + int.from_bytes(data[:8], "little")
    name = "model.layers.1.mlp.down_proj.qweight"
    start, _ = json.loads(data[8:header])[name]["data_offsets"]
    tampered = bytearray(data)
    tampered[header + start] ^= 0x01  # one bit of one int8 code
    shard.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match=f"{re.escape(name)}.*sha256"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_errors(tmp_path):
    model = apply_scheme(make_tiny_llama(), "int8wo")
    model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg["quantization_config"]["format_version"] = 1
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"].append("model.layers.9.mlp.up_proj")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_compressed_tensors_scheme_without_kernel(tmp_path):
    src = FIXTURES / "w8a8-dynamic"
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"]["type"] = "float"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*float8.*no kernel"):
        qcal.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a qcal or compressed-tensors checkpoint"):
        make_tiny_llama().save_pretrained(tmp_path / "plain")
        qcal.load_pretrained(tmp_path / "plain")


def test_without_qcal_transformers_refuses_the_folder(tmp_path):
    """transformers alone warns that it does not know "qcal" and must then stop, not load random weights."""
    import os
    import subprocess
    import sys

    apply_scheme(make_tiny_llama(), "int8wo").save_pretrained(tmp_path)
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "Unknown quantization type, got qcal" in run.stderr and "ignore_mismatched_sizes" in run.stderr
