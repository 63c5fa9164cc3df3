"""Property tests of the pure quantization math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcal import (
    PerAxis,
    PerGroup,
    PerTensor,
    PerToken,
    qfloat8_e4m3fn,
    qfloat8_e5m2,
    qint2,
    qint3,
    qint4,
    qint8,
)
from qcal.granularity import block_size_for
from qcal.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    quantize,
    unpack,
)

INT_QTYPES = [qint2, qint3, qint4, qint8]
GRANS = [PerTensor(), PerAxis(0), PerGroup(8), PerToken()]

tensors = st.builds(
    lambda seed, rows, groups, scale: torch.randn(rows, 8 * groups, generator=torch.Generator().manual_seed(seed))
    * scale,
    st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 4), st.floats(1e-4, 1e4),
)


@settings(max_examples=60, deadline=None)
@given(x=tensors, qt=st.sampled_from(INT_QTYPES), gran=st.sampled_from(GRANS), sym=st.booleans())
def test_roundtrip_error_at_most_half_scale(x, qt, gran, sym):
    s, zp = choose_qparams(x, qt, gran, symmetric=sym, scale_dtype=torch.float32)
    q = quantize(x, s, zp, qt)
    assert q.dtype == torch.int8 and q.min() >= qt.qmin and q.max() <= qt.qmax
    err = (dequantize(q, s, zp) - x).abs()
    bs = block_size_for(gran, tuple(x.shape))
    s_full = s.repeat_interleave(bs[0], 0).repeat_interleave(bs[1], 1)
    assert (err <= s_full / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all()


@settings(max_examples=40, deadline=None)
@given(x=tensors, qt=st.sampled_from(INT_QTYPES), gran=st.sampled_from(GRANS), sym=st.booleans())
def test_fake_quantize_equals_quantize_dequantize(x, qt, gran, sym):
    s, zp = choose_qparams(x, qt, gran, symmetric=sym)
    assert torch.equal(fake_quantize(x, s, zp, qt), dequantize(quantize(x, s, zp, qt), s, zp, x.dtype))


@pytest.mark.parametrize("qt", INT_QTYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.25, -1e-3, 7e5])
def test_constant_and_zero_tensors_finite_and_exact(qt, sym, value):
    x = torch.full((4, 16), value)
    s, zp = choose_qparams(x, qt, PerGroup(8), symmetric=sym)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dequantize(quantize(x, s, zp, qt), s, zp), x)


@settings(max_examples=40, deadline=None)
@given(x=tensors, qt=st.sampled_from(INT_QTYPES), gran=st.sampled_from(GRANS))
def test_symmetric_represents_zero_exactly(x, qt, gran):
    x = x.clone()
    x[0, 0] = 0.0
    s, zp = choose_qparams(x, qt, gran, symmetric=True)
    assert zp is None
    assert dequantize(quantize(x, s, zp, qt), s, zp)[0, 0].item() == 0.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 8),
       qt=st.sampled_from([qint2, qint4, qint8]))
def test_pack_roundtrip(seed, rows, cols, qt):
    g = torch.Generator().manual_seed(seed)
    n = cols * 4
    q = torch.randint(int(qt.qmin), int(qt.qmax) + 1, (rows, n), generator=g, dtype=torch.int8)
    p = pack(q, qt)
    assert p.shape[-1] == n // qt.packed_per_byte
    assert p.dtype == (torch.uint8 if qt.packed_per_byte > 1 else torch.int8)
    assert torch.equal(unpack(p, qt), q)


@pytest.mark.parametrize("qt,n", [(qint4, 27), (qint2, 27), (qint2, 5)])
def test_pack_odd_width_pads(qt, n):
    q = torch.randint(int(qt.qmin), int(qt.qmax) + 1, (3, n), dtype=torch.int8)
    p = pack(q, qt)
    assert p.shape == (3, -(-n // qt.packed_per_byte))
    assert torch.equal(unpack(p, qt, n), q)


@pytest.mark.parametrize("qt", [qfloat8_e4m3fn, qfloat8_e5m2])
def test_float8_cast_matches_torch(qt):
    x = torch.randn(64, 32) * 10
    one = torch.ones(1, 1)
    q = quantize(x, one, None, qt)
    assert q.dtype == qt.dtype
    assert torch.equal(q.float(), x.to(qt.dtype).float())
    s, _ = choose_qparams(x, qt, PerAxis(0))
    assert torch.equal(fake_quantize(x, s, None, qt), dequantize(quantize(x, s, None, qt), s, None))


def test_ste_gradients_reach_input_and_learnable_scale():
    x = torch.randn(4, 16, requires_grad=True)
    s = torch.full((4, 1), 0.05, requires_grad=True)
    y = fake_quantize(x, s, None, qint8)
    y.sum().backward()
    inside = (x / s).detach().abs() <= 127
    assert torch.equal(x.grad, inside.float())  # identity inside the range, zero where clipped
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_group_size_error_names_tensor():
    with pytest.raises(ValueError, match="my.weight: group_size=128 does not divide the last dimension 576"):
        choose_qparams(torch.randn(4, 576), qint4, PerGroup(128), name="my.weight")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="w has dtype"):
        choose_qparams(torch.zeros(2, 8, dtype=dtype), qint8, PerTensor(), name="w")


def test_nan_rejected():
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="act: .*NaN"):
        choose_qparams(x, qint8, PerTensor(), name="act")


def test_finite_checks_modes():
    from qcal.primitives import set_finite_checks

    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    meta = torch.empty(2, 8, device="meta")  # stands for an accelerator: checking it would read its values
    previous = set_finite_checks("never")
    try:
        s, _ = choose_qparams(x, qint8, PerTensor(), name="act")
        assert torch.isnan(s).all()  # unchecked: NaN scales, no exception
        set_finite_checks("auto")
        with pytest.raises(ValueError, match="act: .*NaN"):
            choose_qparams(x, qint8, PerTensor(), name="act")
        s, _ = choose_qparams(meta, qint8, PerTensor(), name="act")  # not read back: no sync on the device
        assert s.device.type == "meta"
        set_finite_checks("always")
        with pytest.raises((NotImplementedError, RuntimeError)):  # read back, which a meta tensor cannot do
            choose_qparams(meta, qint8, PerTensor(), name="act")
        with pytest.raises(ValueError, match="mode='sometimes'"):
            set_finite_checks("sometimes")
    finally:
        assert set_finite_checks(previous) in ("always", "auto", "never")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs(dtype):
    x = torch.randn(8, 64).to(dtype)
    s, zp = choose_qparams(x, qint4, PerGroup(32), symmetric=False)
    assert s.dtype == (torch.float32 if dtype == torch.float16 else dtype)  # float16 scales would underflow
    y = fake_quantize(x, s, zp, qint4)
    assert y.dtype == dtype
    assert torch.equal(y, dequantize(quantize(x, s, zp, qint4), s, zp, dtype))
