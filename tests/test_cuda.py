"""The whole workflow on a CUDA GPU: kernels in a model, moves between devices, compile, GPTQ, QAT, eval.

Skipped without a GPU (CI has none); benchmarks/gpu_check.sh runs it on a CUDA machine. Tolerances as in
test_kernels.py: bf16 fast paths against the reference (dequantize, then the float op) within 2e-2 relative L2 on
whole-model logits (rounding in bf16 compounds over layers).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import greedy_reference, make_tiny_llama, rel_err

import qcal
from qcal import Calibration, freeze, qint4, qint8
from qcal.algorithms.gptq import GPTQQuantizer
from qcal.schemes import apply_scheme
from tests.test_qat import _distill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_KERNEL = {"int4wo-64": "cuda_int4wo", "int8wo": "cuda_int8wo", "int8dq": "cuda_int8dq",
               "8da4w-64": "cuda_8da4w"}
MODEL_TOL = 2e-2


def _model(seed: int = 0):
    return make_tiny_llama(seed=seed, hidden=128)  # 128 wide: every CUDA kernel's shape rules hold


def _ids(n: int = 2, t: int = 24, seed: int = 1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def reference_only(monkeypatch):
    import qcal.kernels

    monkeypatch.setattr(qcal.kernels, "KERNELS", [])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("scheme", sorted(CUDA_KERNEL))
def test_frozen_model_on_cuda_uses_cuda_kernels_and_matches_reference(scheme, monkeypatch):
    import qcal.kernels

    base = _model().to(torch.bfloat16).cuda()
    fast = apply_scheme(copy.deepcopy(base), scheme, quantize_lm_head=True)
    kernels = {m.kernel.name for _, m in qcal.quantized_modules(fast)}
    assert kernels == {CUDA_KERNEL[scheme]}, kernels
    monkeypatch.setattr(qcal.kernels, "KERNELS", [])
    ref = apply_scheme(copy.deepcopy(base), scheme, quantize_lm_head=True)
    assert {m.kernel.name for _, m in qcal.quantized_modules(ref)} == {"reference"}
    for t in (1, 24, 80):  # decode-sized and prefill-sized inputs: both M paths
        ids = _ids(1, t)
        assert rel_err(_logits(fast, ids), _logits(ref, ids)) < MODEL_TOL


def test_frozen_on_cpu_then_moved_to_cuda_and_back():
    model = apply_scheme(_model(), "int4wo-64", quantize_lm_head=True)
    ids = _ids()
    cpu_logits = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.cuda()
    gpu_logits = _logits(model, ids)
    assert {m.kernel.name for _, m in qcal.quantized_modules(model)} == {"cuda_int4wo"}
    assert rel_err(gpu_logits, cpu_logits) < MODEL_TOL
    model.cpu()
    assert torch.equal(_logits(model, ids), cpu_logits)
    for k, v in model.state_dict().items():  # canonical state untouched by the CUDA packing
        assert torch.equal(v, state[k]), k


def test_save_on_cuda_load_anywhere(tmp_path):
    model = _model().cuda()
    qcal.quantize(model, weights=qint4, group_size=32, exclude="lm_head")
    qcal.freeze(model)
    qcal.save(model, tmp_path)
    on_cpu = qcal.load(_model(seed=5), tmp_path)
    on_gpu = qcal.load(_model(seed=6), tmp_path, device="cuda")
    for (n, a), (_, b), (_, c) in zip(qcal.quantized_modules(model), qcal.quantized_modules(on_cpu),
                                      qcal.quantized_modules(on_gpu), strict=True):
        assert torch.equal(a.qweight.cpu(), b.qweight) and torch.equal(a.qweight, c.qweight), n
        assert torch.equal(a.weight_scale.cpu(), b.weight_scale), n
    ids = _ids()
    assert torch.equal(_logits(on_gpu, ids), _logits(model, ids))


@pytest.mark.parametrize("scheme", ["int4wo-64", "8da4w-64"])
def test_compiled_frozen_model_on_cuda(scheme):
    model = apply_scheme(_model().to(torch.bfloat16).cuda(), scheme, quantize_lm_head=True)
    ids = _ids(1, 16).cuda()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        for t in (1, 16):
            x = ids[:, :t]
            assert rel_err(compiled(x).logits.float(), model(x).logits.float()) < MODEL_TOL


def test_static_cache_generator_on_cuda_matches_eager_greedy():
    from qcal.runtime import StaticCacheGenerator

    model = apply_scheme(_model().to(torch.bfloat16).cuda(), "int4wo-64", quantize_lm_head=True)
    prompt = _ids(1, 10, seed=4).cuda()
    ref = greedy_reference(model, prompt, 5)
    torch._dynamo.reset()
    gen = StaticCacheGenerator(model, max_cache_len=16)
    got = gen.generate(prompt, 5)
    # greedy tokens of a random tiny model can flip on near-ties in bf16; most must agree
    assert (got == ref).float().mean() >= 0.8


def test_gptq_on_cuda_agrees_with_cpu_and_beats_rtn():
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(32)]  # recorded on the CPU
    test = _ids(4, 32, seed=7)
    cpu_model = _model()
    ref = _logits(cpu_model, test)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    rtn = copy.deepcopy(cpu_model)
    qcal.quantize(rtn, weights=qcal.qint3, group_size=16, symmetric=False, exclude="lm_head")
    GPTQQuantizer(bits=3, groupsize=16, progress=False).quantize(cpu_model, ids)
    GPTQQuantizer(bits=3, groupsize=16, progress=False).quantize(gpu_model, ids)  # moved to the GPU by GPTQ
    assert next(gpu_model.parameters()).is_cuda
    pairs = zip(qcal.quantized_modules(gpu_model), qcal.quantized_modules(cpu_model), strict=True)
    same = [(a.int_weight().cpu() == b.int_weight()).float().mean().item() for (_, a), (_, b) in pairs]
    assert min(same) > 0.98, same  # float summation order differs: a few codes near a rounding edge flip

    def err(m):
        return (_logits(m, test) - ref).pow(2).mean().item()

    assert err(gpu_model) < 0.8 * err(rtn)  # measured on CPU: 0.63
    assert abs(err(gpu_model) - err(cpu_model)) < 0.1 * err(cpu_model)


def test_calibrated_static_int8_on_cuda_freezes_to_the_fake_quant_numbers():
    model = _model().cuda()
    qcal.quantize(model, weights=qint8, activations=qint8, exclude="lm_head")
    with Calibration(momentum=0.9):
        for s in range(3):
            model(_ids(2, 24, seed=10 + s).cuda())
    ids = _ids()
    fake = _logits(model, ids)
    freeze(model)
    assert rel_err(_logits(model, ids), fake) < 1e-4


def test_qat_steps_on_cuda_reduce_error_and_convert_exactly(monkeypatch):
    import qcal.kernels

    teacher = _model().cuda()
    student = copy.deepcopy(teacher)
    qcal.quantize(student, weights=qint4, group_size=32, exclude="lm_head")
    test = _ids(4, 32, seed=7).cuda()

    def err():
        with torch.no_grad():
            return rel_err(student(test).logits, teacher(test).logits)

    before = err()
    _distill(student, teacher, steps=30, params=[m.weight for _, m in qcal.quantized_modules(student)])
    assert err() < 0.95 * before
    with torch.no_grad():
        fq = student(test).logits
        exact = copy.deepcopy(student)
        freeze(student)  # fp32 model, CUDA kernels compute in bf16
        assert {m.kernel.name for _, m in qcal.quantized_modules(student)} == {"cuda_int4wo"}
        assert rel_err(student(test).logits, fq) < MODEL_TOL
        monkeypatch.setattr(qcal.kernels, "KERNELS", [])
        freeze(exact)  # the reference kernel: what QAT trained is exactly what converts
        assert torch.allclose(exact(test).logits, fq, rtol=0, atol=1e-5)


def test_speed_harness_on_cuda_times_and_measures_memory():
    from qcal.eval.speed import PeakMemory, measure_speed

    models = {"bf16": _model().to(torch.bfloat16).cuda()}
    models["int4wo-64"] = apply_scheme(copy.deepcopy(models["bf16"]), "int4wo-64", quantize_lm_head=True)
    with PeakMemory("cuda") as peak:
        res = measure_speed(models, vocab_size=256, prefill_len=32, new_tokens=4, repeats=1)
    assert peak.bytes is not None and peak.bytes > 0
    for r in res.values():
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0


def test_autoquant_on_cuda_times_with_synchronization():
    model = _model().to(torch.bfloat16).cuda()
    ids = _ids(1, 1).cuda()
    qcal.autoquant(model, ids, max_rel_error=0.05, candidates=("int8wo", "int4wo-64"), rounds=3)
    report = model.autoquant_report
    assert report and all(c.times["none"] > 1e-6 for c in report)  # a queued launch alone would read ~0
    assert {type(m).__name__ for _, m in qcal.quantized_modules(model)} <= {"QLinear"}


def test_smoothquant_on_cuda_folds_every_group_and_keeps_the_float_function():
    from qcal.algorithms.smoothquant import smooth_model
    from tests.test_smoothquant import outlier_llama

    model = outlier_llama().cuda()
    calib = [_ids(1, 32, seed=s).clamp_max(127) for s in range(4)]  # recorded on the CPU
    x = _ids(2, 32).clamp_max(127).cuda()
    with torch.no_grad():
        before = model(x).logits
    scales = smooth_model(model, calib, alpha=0.5)
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj")}
    assert set(scales) == expected  # nothing silently left unsmoothed on the GPU
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)


def test_streamed_quantization_on_cuda_matches_cpu(tmp_path):
    """``quantize_pretrained(device="cuda")``: blocks quantized on the GPU, the checkpoint written through the CPU;
    the same codes as on the CPU but for a few near a rounding edge, and ``from_pretrained`` loads it anywhere."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qcal.pretrained import quantize_pretrained

    _model().save_pretrained(tmp_path / "src")
    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    for device in ("cpu", "cuda"):
        quantize_pretrained(tmp_path / "src", tmp_path / device, "gptq-int4-32-actorder", calib=calib,
                            device=device, batch_size=4, max_memory=0, progress=False)
    cpu, gpu = (load_file(tmp_path / d / "model-block00000.safetensors") for d in ("cpu", "cuda"))
    assert sorted(cpu) == sorted(gpu)
    codes = [k for k in cpu if k.endswith("qweight")]
    differ = sum(int((cpu[k] != gpu[k]).sum()) for k in codes) / sum(cpu[k].numel() for k in codes)
    assert differ < 0.02, differ
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda")
    assert torch.isfinite(_logits(model, _ids())).all()


def test_fake_quant_training_step_never_syncs_with_the_host():
    model = _model().cuda()
    qcal.quantize(model, weights=qint4, activations=qint8, group_size=32, dynamic=True, exclude="lm_head")
    ids = _ids().cuda()
    loss = model(ids).logits.float().logsumexp(-1).mean()  # warm-up: caches, lazy inits
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        loss = model(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_quantize_onto_the_gpu_layer_by_layer_keeps_one_float_layer_there():
    """quantize(device="cuda", freeze=True) from a CPU model: the GPU's peak holds the quantized model and about
    one float layer, not the float model; the result equals quantizing on the GPU after moving the model."""
    model = make_tiny_llama(hidden=256, layers=4).to(torch.bfloat16)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = apply_scheme(copy.deepcopy(model).cuda(), "int8wo", quantize_lm_head=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q = qcal.quantize(model, weights=qint8, device="cuda", freeze=True)
    peak = torch.cuda.max_memory_allocated() - base
    assert all(m.qweight.is_cuda for _, m in qcal.quantized_modules(q)) and next(q.parameters()).is_cuda
    assert peak < 0.8 * float_bytes
    ids = _ids()
    assert rel_err(_logits(q, ids), _logits(ref, ids)) < 1e-6
