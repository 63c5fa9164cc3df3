"""save/load: exact round trips, clear errors, untouched model on failure."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

import qcal
from qcal import Calibration, freeze, qint4, qint8
from qcal.serialization import FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, load


def _quantized(tmp_path, frozen=True, **kw):
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    qcal.quantize(model, exclude="lm_head", **kw)
    if kw.get("activations") is not None and not kw.get("dynamic"):
        with Calibration():
            model(ids)
    if frozen:
        freeze(model)
    with torch.no_grad():
        out = model(ids).logits
    qcal.save(model, tmp_path)
    return model, ids, out


@pytest.mark.parametrize("kw", [
    dict(weights=qint4, group_size=32),
    dict(weights=qint8, activations=qint8),
    dict(weights=qint4, group_size=16, activations=qint8, dynamic=True, symmetric=True),
])
def test_roundtrip_bit_identical_into_meta_model(tmp_path, kw):
    _, ids, out = _quantized(tmp_path, **kw)
    with torch.device("meta"):
        fresh = make_tiny_llama(seed=123)
    qcal.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    assert fresh.model.embed_tokens.weight is fresh.lm_head.weight  # tying restored


def test_roundtrip_fake_quant_state(tmp_path):
    model, ids, out = _quantized(tmp_path, frozen=False, weights=qint8, activations=qint8)
    fresh = make_tiny_llama(seed=5)
    load(fresh, tmp_path)
    q = fresh.model.layers[0].self_attn.q_proj
    assert not q.frozen and q.input_scale is not None
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    freeze(fresh)


def test_manifest_contents(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    m = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert m["format"] == "qcal" and m["format_version"] == 2 < FORMAT_VERSION and m["qcal_version"] == qcal.__version__
    e = m["modules"]["model.layers.0.mlp.down_proj"]
    assert e["weights"]["qtype"] == "qint4" and e["weights"]["granularity"] == {"kind": "PerGroup", "group_size": 32}
    assert e["frozen"] is True
    assert m["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def _snapshot(model):
    return {n: (type(m), {k: v.clone() for k, v in m.state_dict().items()}) for n, m in model.named_modules()}


def _assert_untouched(model, snap):
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    for n, (t, sd) in snap.items():
        assert now[n][0] is t
        assert all(torch.equal(sd[k], now[n][1][k]) for k in sd)


def test_truncated_file(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    f = tmp_path / TENSORS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    model = make_tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(model, tmp_path)
    _assert_untouched(model, snap)


def test_other_architecture(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    model = make_tiny_llama(hidden=128)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="another architecture"):
        load(model, tmp_path)
    _assert_untouched(model, snap)
    with pytest.raises(ValueError, match="checkpoint is for a LlamaForCausalLM"):
        load(nn.Sequential(nn.Linear(64, 64)), tmp_path)


def test_missing_tensor(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / TENSORS_FILE)
    t.pop("model.norm.weight")
    save_file(t, tmp_path / TENSORS_FILE)
    m = json.loads((tmp_path / MANIFEST_FILE).read_text())
    m["tensors"].pop("model.norm.weight")
    m["parameters"].remove("model.norm.weight")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(m))
    model = make_tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'model.norm.weight' of the model is missing"):
        load(model, tmp_path)
    _assert_untouched(model, snap)


def test_newer_format_and_corrupt_manifest(tmp_path):
    _quantized(tmp_path, weights=qint8)
    m = json.loads((tmp_path / MANIFEST_FILE).read_text())
    m["format_version"] = 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format_version 99.*upgrade qcal"):
        load(make_tiny_llama(), tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{\"format\": ")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(make_tiny_llama(), tmp_path)


def test_load_into_quantized_model_refused(tmp_path):
    _quantized(tmp_path, weights=qint8)
    model = make_tiny_llama()
    qcal.quantize(model, weights=qint8, exclude="lm_head")
    with pytest.raises(ValueError, match="already quantized"):
        load(model, tmp_path)


def test_kernel_layouts_not_saved(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    m = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert not [n for n in m["tensors"] if "._k_" in n]
    assert "model.rotary_emb.inv_freq" in m["tensors"]  # non-persistent float buffers are kept


def _edit(tmp_path, fn):
    m = json.loads((tmp_path / MANIFEST_FILE).read_text())
    m = fn(m)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(m))


def _refused(tmp_path, match):
    model = make_tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load(model, tmp_path)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("version", [0, -1, True, "2", None])
def test_bad_format_version(tmp_path, version):
    _quantized(tmp_path, weights=qint8)
    _edit(tmp_path, lambda m: {**m, "format_version": version})
    _refused(tmp_path, "format_version")


@pytest.mark.parametrize("edit, match", [
    (lambda m: [m], "not a mapping"),
    (lambda m: {k: v for k, v in m.items() if k != "tensors"}, "'tensors' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "modules"}, "'modules' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "model_class"}, "'model_class' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "parameters"}, "'parameters' is missing"),
    (lambda m: {**m, "parameters": [p for p in m["parameters"] if p != "model.norm.weight"]},
     "does not list 'model.norm.weight'"),
    (lambda m: {**m, "modules": {**m["modules"], "model.layers.0.mlp.up_proj": {"type": "QLinear"}}}, "malformed"),
    (lambda m: {**m, "modules": {n: {**c, "weights": {**c["weights"], "qtype": "qint5"}}
                                 for n, c in m["modules"].items()}}, "invalid spec"),
])
def test_malformed_manifest(tmp_path, edit, match):
    _quantized(tmp_path, weights=qint4, group_size=32)
    _edit(tmp_path, edit)
    _refused(tmp_path, match)


def _rewrite_tensors(tmp_path, fn, manifest_too=True):
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / TENSORS_FILE)
    fn(t)
    save_file(t, tmp_path / TENSORS_FILE)
    if manifest_too:
        def upd(m):
            for n, v in t.items():
                m["tensors"][n].update(shape=list(v.shape), dtype=str(v.dtype).removeprefix("torch."))
            return m
        _edit(tmp_path, upd)


def test_bit_flip_and_swapped_tensors_are_caught(tmp_path):
    _quantized(tmp_path, weights=qint4, group_size=32)
    name = "model.layers.1.mlp.down_proj.qweight"

    def flip(t):
        t[name] = t[name].clone()
        t[name].view(-1)[7] ^= 1
    _rewrite_tensors(tmp_path, flip, manifest_too=False)
    _refused(tmp_path, f"{name}.*sha256")
    _quantized(tmp_path, weights=qint4, group_size=32)

    def swap(t):
        a, b = "model.layers.0.mlp.gate_proj.qweight", "model.layers.0.mlp.up_proj.qweight"
        t[a], t[b] = t[b], t[a]
    _rewrite_tensors(tmp_path, swap, manifest_too=False)
    _refused(tmp_path, "sha256")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"model.layers.1.mlp.down_proj.qweight":
                         t["model.layers.1.mlp.down_proj.qweight"].view(torch.int8)}), "qweight' is torch.int8"),
    (lambda t: t.update({"model.layers.1.mlp.down_proj.qweight":
                         t["model.layers.1.mlp.down_proj.qweight"].float()}), "qweight' is torch.float32"),
    (lambda t: t.update({"model.layers.1.mlp.down_proj.weight_scale":
                         t["model.layers.1.mlp.down_proj.weight_scale"][:, :1].contiguous()}), "weight_scale"),
])
def test_tensors_checked_against_the_spec_before_any_swap(tmp_path, edit, match):
    _quantized(tmp_path, weights=qint4, group_size=32)
    _rewrite_tensors(tmp_path, edit)
    _edit(tmp_path, lambda m: {**m, "tensors": {n: {k: v for k, v in e.items() if k != "sha256"}
                                               for n, e in m["tensors"].items()}, "format_version": 1})
    _refused(tmp_path, match)


def test_version_1_checkpoints_still_load(tmp_path):
    _, ids, out = _quantized(tmp_path, weights=qint4, group_size=32)
    _edit(tmp_path, lambda m: {**m, "format_version": 1, "tensors": {
        n: {k: v for k, v in e.items() if k != "sha256"} for n, e in m["tensors"].items()}})
    fresh = make_tiny_llama(seed=9)
    load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
