"""Frozen Conv2d kernels: oneDNN int8 x int8 (dynamic and static activations) and weight-only int8.

The int8 path's integer part is exact, so it is compared with the quantized model's exact value (float64 convolution
of the codes, times the scales): float32 inputs within float32 rounding, bf16 inputs within one bf16 rounding of the
output. The reference path (dequantize to bf16, then a bf16 convolution) rounds twice more, so the fast path must be
at least as close as it is.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import qcal
from qcal.explain import module_rows
from qcal.kernels import derived_bytes
from qcal.kernels.conv import onednn_int8_conv_available

pytestmark = pytest.mark.skipif(not onednn_int8_conv_available(), reason="PyTorch built without oneDNN")


def _conv(cin=32, cout=48, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                   bias=bias))


def _frozen(model, dynamic=True, calib=None, dtype=torch.float32):
    model = copy.deepcopy(model).to(dtype)
    qcal.quantize(model, weights=qcal.qint8, activations=qcal.qint8, dynamic=dynamic)
    if not dynamic:
        with qcal.Calibration():
            model(calib.to(dtype))
    qcal.freeze(model)
    return model


def _exact(m, x, scale):
    """The quantized convolution in float64: symmetric int8 input codes at ``scale`` x the weight codes."""
    xq = torch.round(x.double() / scale).clamp(-128, 127)
    y = F.conv2d(xq, m.int_weight().reshape(m.weight_shape).double(), None, m.stride, m.padding, m.dilation,
                 m.groups) * (scale * m.weight_scale.double().view(1, -1, 1, 1))
    return y if m.bias is None else y + m.bias.double().view(1, -1, 1, 1)


def _dynamic_scale(x):
    return (x.float().abs().amax() / 127).double().item()


SHAPES = {"3x3": {}, "1x1": dict(cin=64, k=1, padding=0),
          "stride2-dilation2": dict(stride=2, dilation=2, padding=(2, 1)),
          "groups": dict(cin=64, groups=2), "no-bias": dict(bias=False)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dynamic_int8_conv_matches_the_exact_quantized_value(native_kernels, shape, dtype):
    model = _conv(**SHAPES[shape])
    cin = model[0].in_channels
    x = torch.randn(2, cin, 13, 11).to(dtype)
    q = _frozen(model, dtype=dtype)
    m = q[0]
    assert m.kernel.name == "cpu_int8_conv2d_onednn"
    with torch.no_grad():
        y = q(x)
        ref = m.frozen_forward_reference(x)
    exact = _exact(m, x, _dynamic_scale(x))
    assert y.dtype == dtype and y.shape == exact.shape
    assert rel_err(y, exact) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert rel_err(y, exact) <= rel_err(ref, exact) * 1.05 + 1e-7


def test_static_int8_conv_matches_the_exact_quantized_value(native_kernels):
    model = _conv()
    calib = torch.randn(4, 32, 16, 16) * 2
    x = torch.randn(2, 32, 16, 16) * 3  # beyond the calibrated range: saturates like the reference
    q = _frozen(model, dynamic=False, calib=calib)
    m = q[0]
    assert m.kernel.name == "cpu_int8_conv2d_onednn"
    with torch.no_grad():
        y = q(x)
        ref = m.frozen_forward_reference(x)
    assert rel_err(y, _exact(m, x, m.input_scale.double().item())) < 1e-6
    assert rel_err(y, ref) < 1e-5


def test_channels_last_and_nchw_inputs_agree(native_kernels):
    q = _frozen(_conv(), dtype=torch.bfloat16)
    x = torch.randn(2, 32, 12, 12).bfloat16()
    with torch.no_grad():
        a = q(x)
        b = q(x.contiguous(memory_format=torch.channels_last))
        c = q(x[:, :, :, ::1].transpose(2, 3).contiguous().transpose(2, 3))  # neither layout: made contiguous
    assert torch.equal(a, b) and torch.equal(a, c)


def test_activation_codes_are_the_reference_quantization(native_kernels):
    torch.manual_seed(0)
    s = 0.05
    ties = (torch.arange(-130, 130, dtype=torch.float32) + 0.5) * s  # halfway values round to even
    x = torch.cat([torch.randn(4000) * 4, ties, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    x = x.reshape(1, 8, 13, 41)
    for xin in (x, x.bfloat16()):
        codes, used = torch.ops.qcal.act_quant_u8(xin, s)
        expect = torch.round(xin.float() / s).clamp(-128, 127).to(torch.int16) + 128
        assert used == pytest.approx(s) and torch.equal(codes.to(torch.int16), expect)
    finite = x.clone()
    finite[~torch.isfinite(finite)] = 1.0
    codes, used = torch.ops.qcal.act_quant_u8(finite, 0.0)
    assert used == pytest.approx(_dynamic_scale(finite), rel=1e-7)
    assert torch.ops.qcal.act_quant_u8(torch.full((1, 2, 3, 4), -2.5), 0.0)[1] == 2.5  # constant: |c|
    assert torch.ops.qcal.act_quant_u8(torch.zeros(1, 2, 3, 4), 0.0)[1] == 1.0
    assert torch.ops.qcal.act_quant_u8(x, 0.0)[1] != torch.ops.qcal.act_quant_u8(x, 0.0)[1]  # Inf, dynamic: NaN


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ops.qcal.act_quant_u8(torch.randn(2, 3, 4), 0.1), "4-D"),
    (lambda: torch.ops.qcal.act_quant_u8(torch.randn(1, 2, 3, 4).half(), 0.1), "bf16 or float32"),
    (lambda: torch.ops.qcal.act_quant_u8(torch.randn(1, 2, 3, 8)[..., ::2], 0.1), "contiguous"),
    (lambda: torch.ops.qcal.act_quant_u8(torch.randn(1, 2, 3, 4), float("inf")), "finite"),
    (lambda: torch.ops.qcal.act_quant_u8(torch.randn(1, 2, 3, 4), 1e-60), "positive float32"),
    (lambda: torch.ops.qcal.dequant_w8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5)), "scale"),
    (lambda: torch.ops.qcal.dequant_w8(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4)), "qweight"),
])
def test_native_conv_ops_refuse_bad_arguments(native_kernels, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_non_finite_inputs_take_the_reference_semantics(native_kernels):
    static = _frozen(_conv(), dynamic=False, calib=torch.randn(2, 32, 8, 8))
    x = torch.randn(1, 32, 8, 8)
    x[0, 3, 4, 4] = float("nan")
    with torch.no_grad():
        y = static(x)
        ref = static[0].frozen_forward_reference(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    assert torch.allclose(torch.nan_to_num(y), torch.nan_to_num(ref), atol=1e-4)
    dynamic = _frozen(_conv())
    with pytest.raises(ValueError, match=r"0 \(input\).*NaN or Inf"):
        dynamic(x)


def test_copies_save_and_load_and_explain(native_kernels, tmp_path):
    model = _conv()
    q = _frozen(model, dtype=torch.bfloat16)
    x = torch.randn(2, 32, 9, 9).bfloat16()
    with torch.no_grad():
        y = q(x)
        twin = copy.deepcopy(q)  # oneDNN's packed weight is not copied: packed again on first use
        assert torch.equal(twin(x), y)
    qcal.save(q, tmp_path)
    loaded = qcal.load(copy.deepcopy(model).bfloat16(), tmp_path)
    assert loaded[0].kernel.name == "cpu_int8_conv2d_onednn"
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    row = module_rows(q)[0]
    assert row["kernel"] == "cpu_int8_conv2d_onednn" and derived_bytes(q[0]) >= q[0].qweight.numel()


def test_small_input_convolutions_stay_on_the_reference(native_kernels):
    q = _frozen(_conv(cin=4))  # 4 x 3 x 3 = 36 inputs per output
    assert q[0].kernel.name == "reference"


@pytest.mark.parametrize("scheme", ["int8", "int4-96", "int4-32-sym"])
def test_weight_only_conv_is_the_reference_bit_for_bit(native_kernels, scheme):
    model = _conv(groups=2, cin=64).bfloat16()  # 32 x 3 x 3 = 288 inputs an output
    bits, *rest = scheme.split("-")
    kw = dict(weights=qcal.qint8) if bits == "int8" else dict(weights=qcal.qint4, group_size=int(rest[0]),
                                                                symmetric="sym" in rest)
    qcal.quantize(model, **kw)
    qcal.freeze(model)
    m = model[0]
    assert m.kernel.name == "cpu_weight_only_conv2d"
    x = torch.randn(2, 64, 10, 10).bfloat16()
    with torch.no_grad():
        assert torch.equal(model(x), m.frozen_forward_reference(x))
        assert torch.equal(model(x.contiguous(memory_format=torch.channels_last)), m.frozen_forward_reference(x))


@pytest.mark.parametrize("scheme", ["int4wo-32", "int8dq", "int8wo", "fp8wo"])
def test_channels_last_cast_keeps_the_kernels_layouts(scheme):
    """model.to(memory_format=torch.channels_last) (the diffusion recipe) re-strides 4-D tensors; kernel-derived
    layouts (a 4-D packed int4 scale block) keep theirs, so the kernels still take them."""
    from qcal.schemes import apply_scheme

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.Conv2d(64, 64, 3, padding=1)).bfloat16()
    q = apply_scheme(model, scheme, quantize_lm_head=True)
    x, img = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(1, 64, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        before = q[0](x), q[1](img)
        q = q.to(memory_format=torch.channels_last)
        after = q[0](x), q[1](img.contiguous(memory_format=torch.channels_last))
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
