import pickle

import pytest
import torch

import qcal
from qcal.qtypes import get_qtype, qtypes


def test_ranges_and_storage():
    assert (qcal.qint8.qmin, qcal.qint8.qmax, qcal.qint8.bits) == (-128, 127, 8)
    assert (qcal.qint4.qmin, qcal.qint4.qmax) == (-8, 7)
    assert (qcal.qint2.qmin, qcal.qint2.qmax) == (-2, 1)
    assert qcal.qint4.packed_per_byte == 2 and qcal.qint2.packed_per_byte == 4 and qcal.qint8.packed_per_byte == 1
    assert qcal.qfloat8 is qcal.qfloat8_e4m3fn
    assert qcal.qfloat8_e4m3fn.qmax == 448.0 and qcal.qfloat8_e5m2.qmax == 57344.0
    assert qcal.qfloat8.dtype == torch.float8_e4m3fn and qcal.qfloat8.is_floating_point


def test_printable_comparable_serializable():
    assert str(qcal.qint4) == "qint4" and repr(qcal.qint4) == "qcal.qint4"
    assert qcal.qint4 == get_qtype("qint4") and qcal.qint4 != qcal.qint8
    assert pickle.loads(pickle.dumps(qcal.qint8)) == qcal.qint8
    assert all(get_qtype(n).name in qtypes for n in qtypes)


def test_unknown_qtype_names_argument():
    with pytest.raises(TypeError, match="weights='int5'"):
        get_qtype("int5", "weights")


@pytest.mark.parametrize("qt,top,positive", [
    (qcal.qfloat6_e3m2, 28.0, 32), (qcal.qfloat5_e2m2, 7.0, 16), (qcal.qfloat4_e2m1, 6.0, 8)])
def test_subbyte_float_grids_rounding_and_planes(qt, top, positive):
    from qcal.primitives import float_grid, pack, packed_shape, quantize, unpack

    grid = float_grid(qt)
    assert qt.is_subbyte_float and qt.qmax == top and grid.max() == top and len(grid) == 2 * positive
    assert torch.equal(grid[positive:], -grid[:positive]) and (grid[:positive].diff() > 0).all()
    if qt is qcal.qfloat4_e2m1:  # the OCP FP4 values
        assert grid[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(4000, generator=g) * 2 - 1) * top * 1.2  # some beyond the range: saturate
    codes = quantize(v.view(1, -1), torch.ones(1, 1), None, qt)
    got = grid[codes.long()].view(-1)
    best = grid[(grid[None, :] - v.clamp(-top, top)[:, None]).abs().argmin(1)]
    assert torch.equal(got.abs(), best.abs()) and ((got == 0) | (got.sign() == v.sign())).all()
    mids = (grid[1:positive] + grid[:positive - 1]) / 2  # halfway: the even code, as float rounding does
    assert (quantize(mids.view(1, -1), torch.ones(1, 1), None, qt) % 2 == 0).all()
    q = torch.randint(0, 2 * positive, (3, 45), generator=g, dtype=torch.uint8)
    packed = pack(q, qt)
    assert packed.dtype == torch.uint8 and packed.shape == packed_shape((3, 45), qt) == (3, 6 * qt.bits)
    assert torch.equal(unpack(packed, qt, 45), q)
