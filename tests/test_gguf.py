"""GGUF export and import: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks hold qcal's weights bit for bit, read back by the
``gguf`` package and by transformers' GGUF loader; bad inputs are refused before a file is written."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama, rel_err

import qcal
from qcal.schemes import apply_scheme

gguf = pytest.importorskip("gguf")

VOCAB = 260  # 256 byte-level symbols, one merge (257), three special tokens


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer built here (no download): the GPT-2 layout llama.cpp's "gpt2" model reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["Ġt"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(fast) == VOCAB
    return fast


def _model(scheme: str, seed: int = 0):
    return apply_scheme(make_tiny_llama(seed=seed, vocab=VOCAB), scheme)


def _linears(model):
    return {n: m for n, m in qcal.quantized_modules(model)}


@pytest.mark.parametrize("scheme,kind", [("gguf-q4_0", "Q4_0"), ("gguf-q4_1", "Q4_1"), ("gguf-q8_0", "Q8_0")])
def test_export_is_bit_exact_and_reads_back(scheme, kind, tokenizer, tmp_path):
    model = _model(scheme)
    path = tmp_path / "m.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scheme that targets GGUF needs no rounding on export
        qcal.export(model, path, format="gguf", tokenizer=tokenizer, embedding_type="bf16")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    layer = model.model.layers[1]
    for name, mod in [("blk.1.ffn_down.weight", layer.mlp.down_proj), ("blk.1.attn_v.weight", layer.self_attn.v_proj),
                      ("blk.1.attn_output.weight", layer.self_attn.o_proj)]:
        t = tensors[name]
        assert t.tensor_type.name == kind
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(got, mod.dequantized_weight(torch.float32)), name
    field = reader.fields["llama.block_count"]
    assert int(field.parts[field.data[0]][0]) == 2
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == getattr(gguf.LlamaFileType, f"MOSTLY_{kind}")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[tokens.data[256]]).decode() == "Ġt" and "output.weight" not in tensors  # tied

    back = qcal.load_pretrained(path)  # import: the file's codes and scales as frozen qcal modules
    mine, theirs = _linears(model), _linears(back)
    assert set(mine) == set(theirs)
    for name, mod in mine.items():
        assert torch.equal(theirs[name].dequantized_weight(torch.float32), mod.dequantized_weight(torch.float32)), name
    assert kind == "Q8_0" or theirs["model.layers.0.mlp.up_proj"].kernel.name != "reference"
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
        assert rel_err(back.to(torch.bfloat16)(ids).logits.float(), ref) < 2e-2


def test_transformers_reads_the_file(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _model("gguf-q4_0", seed=1)
    qcal.export(model, tmp_path / "m.gguf", format="gguf", tokenizer=tokenizer, embedding_type="bf16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")  # dequantized by transformers
    q = model.model.layers[0].self_attn.q_proj  # rows permuted for llama.cpp's rotary and back
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, q.dequantized_weight(torch.float32))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids).logits.float()) < 2e-2
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tok.encode("it talks to them", add_special_tokens=False) == \
        tokenizer.encode("it talks to them", add_special_tokens=False)


def test_gptq_targets_gguf_exactly(tokenizer, tmp_path):
    from qcal.algorithms.gptq import GPTQQuantizer

    model = make_tiny_llama(vocab=VOCAB)
    calib = [torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    GPTQQuantizer(gguf_type="Q4_0", act_order=True, static_groups=True, progress=False).quantize(model, calib)
    qcal.freeze(model)
    for _, m in qcal.quantized_modules(model):
        assert torch.equal(m.weight_scale.to(torch.float16).float(), m.weight_scale)  # float16 scales
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qcal.export(model, tmp_path / "g.gguf", format="gguf", tokenizer=tokenizer)


def test_scales_not_in_float16_are_rounded_with_a_warning(tokenizer, tmp_path):
    model = make_tiny_llama(vocab=VOCAB)
    qcal.freeze(qcal.quantize(model, weights=qcal.qint4, group_size=32, symmetric=True, exclude="lm_head"))
    with pytest.warns(UserWarning, match="largest weight change is"):
        qcal.export(model, tmp_path / "r.gguf", format="gguf", tokenizer=tokenizer)
    t = next(t for t in gguf.GGUFReader(tmp_path / "r.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    ref = model.model.layers[0].mlp.up_proj.dequantized_weight(torch.float32)
    assert rel_err(got, ref) < 1e-3


def test_bad_inputs_are_refused_before_writing(tokenizer, tmp_path):
    path = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj \(qint4 groups of 64.*Q4_0"):
        qcal.export(_model("int4wo-64"), path, format="gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="activations quantized"):
        qcal.export(_model("8da4w-32"), path, format="gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer="):
        qcal.export(_model("gguf-q8_0"), path, format="gguf")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="only Llama-architecture"):
        qcal.export(gpt2, path, format="gguf", tokenizer=tokenizer)
    assert not path.exists() and not list(tmp_path.iterdir())
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        qcal.export(_model("gguf-q8_0"), path, format="gguf", tokenizer=tokenizer)
    assert path.read_bytes() == b"keep"


def test_q4_0_grid_is_llama_cpp_reference():
    """``gguf-q4_0``'s grid is llama-quantize's (``d = m / -8``): the same codes as the ``gguf`` package's reference
    quantizer but for a scale rounded away from zero, and a finer step than ``amax / 7``."""
    from qcal.integrations.gguf import block_qparams

    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    d, zp = block_qparams(x, "Q4_0")
    assert zp is None and torch.equal(d.to(torch.float16).float(), d)
    q = torch.round(x / d[:, None])
    assert (q == -8).any(1).all()  # the largest magnitude lands on -8 (opposite signs up to +8, clamped to 7)
    q = q.clamp(-8, 7)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                                  gguf.GGMLQuantizationType.Q4_0).copy())
    m = x.gather(1, x.abs().argmax(1, keepdim=True))
    d_ref = (m / -8).half().float()  # the reference rounds the scale to nearest, qcal away from zero
    assert (q == torch.round(ref / d_ref)).float().mean() > 0.995
    ours = q * d[:, None]
    assert rel_err(ours, ref) < 1e-2
    amax7 = x.abs().amax(1, keepdim=True) / 7
    assert rel_err(ours, x) < 0.9 * rel_err(torch.round(x / amax7).clamp(-8, 7) * amax7, x)


def test_q4_0_importance_search_lowers_the_weighted_error():
    from qcal.integrations.gguf import block_qparams

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    imp = torch.rand(32, generator=g) ** 4 * 10  # a few columns matter most, as in real activations
    d0, _ = block_qparams(x, "Q4_0")
    d1, _ = block_qparams(x, "Q4_0", imp)
    assert torch.equal(d1.to(torch.float16).float(), d1)

    def err(d):
        q = torch.round(x / d[:, None]).clamp(-8, 7)
        return (imp * (x - q * d[:, None]) ** 2).sum()
    assert err(d1) < 0.8 * err(d0)


def test_gptq_scale_refit_lowers_the_output_error():
    """GPTQ to Q4_0 with the scales refitted to its codes: a lower output error, float16 scales, and the weight
    re-quantizes to the same codes (what freeze and the GGUF writer do)."""
    from qcal.algorithms.gptq import gptq_quantize_weight
    from qcal.integrations.gguf import block_qparams
    from qcal.primitives import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ (0.1 * torch.randn(128, 128, generator=g) + torch.eye(128))
    x = x * torch.rand(128, generator=g) ** 3 * 5
    h = x.T @ x / x.shape[0]
    w = 0.05 * torch.randn(64, 128, generator=g)
    kw = dict(act_order=True, static_groups=True, qparams_fn=lambda b, imp: block_qparams(b, "Q4_0", imp))
    plain = gptq_quantize_weight(w, h, qcal.qint4, 32, True, **kw)
    refit = gptq_quantize_weight(w, h, qcal.qint4, 32, True, refit_scales=lambda s: s.half().float(), **kw)
    assert refit.error < 0.99 * plain.error
    assert torch.equal(refit.scale.half().float(), refit.scale)
    codes = quantize(refit.weight, refit.scale, None, qcal.qint4)
    assert torch.equal(codes, refit.codes)
    assert torch.equal(dequantize(codes, refit.scale, None), refit.weight)


def test_gptq_shrink_spans_gptq_to_importance_rtn():
    """``shrink=1`` propagates no error (diagonal Hessian): round-to-nearest on the importance-searched grid, which
    llama.cpp's importance-matrix quantizer is; ``shrink=0`` is GPTQ, with a lower output error on its data."""
    from qcal.algorithms.gptq import gptq_quantize_weight
    from qcal.integrations.gguf import block_qparams

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 64, generator=g) @ (0.3 * torch.randn(64, 64, generator=g) + torch.eye(64))
    h = x.T @ x / x.shape[0]
    w = 0.05 * torch.randn(32, 64, generator=g)
    kw = dict(act_order=True, static_groups=True, qparams_fn=lambda b, imp: block_qparams(b, "Q4_0", imp))
    rtn = gptq_quantize_weight(w, h, qcal.qint4, 32, True, shrink=1.0, **kw)
    scale, _ = block_qparams(w.reshape(-1, 32), "Q4_0", h.diagonal().reshape(2, 32).repeat(32, 1))
    ref = (torch.round(w.reshape(-1, 32) / scale[:, None]).clamp(-8, 7) * scale[:, None]).reshape(32, 64)
    assert torch.equal(rtn.weight, ref)
    assert gptq_quantize_weight(w, h, qcal.qint4, 32, True, **kw).error < 0.8 * rtn.error
