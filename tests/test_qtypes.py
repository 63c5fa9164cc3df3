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
