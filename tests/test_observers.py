import pytest
import torch

from qcal import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PerAxis,
    PercentileObserver,
    PerGroup,
    qint8,
)
from qcal.observers import get_observer
from qcal.primitives import fake_quantize


def test_minmax_keeps_widest_range():
    o = MinMaxObserver(qint8)
    o(torch.tensor([[-1.0, 2.0]]))
    o(torch.tensor([[-3.0, 1.0]]), momentum=0.5)  # momentum is ignored by the plain min/max observer
    assert o.min_val.item() == -3.0 and o.max_val.item() == 2.0
    s, zp = o.calculate_qparams()
    assert zp is None and torch.allclose(s, torch.tensor([[3.0 / 127]]))


def test_moving_average():
    o = MovingAverageMinMaxObserver(qint8, momentum=0.9)
    o(torch.tensor([[-1.0, 1.0]]))
    o(torch.tensor([[-2.0, 3.0]]))
    assert torch.allclose(o.min_val, torch.tensor([[-1.1]])) and torch.allclose(o.max_val, torch.tensor([[1.2]]))


def test_per_channel_statistics_and_state_dict_roundtrip():
    o = MinMaxObserver(qint8, PerAxis(1), symmetric=False)
    x = torch.randn(100, 8)
    o(x)
    assert o.min_val.shape == (1, 8) and torch.equal(o.max_val[0], x.amax(0))
    o2 = MinMaxObserver(qint8, PerAxis(1), symmetric=False)
    o2.load_state_dict(o.state_dict())
    assert torch.equal(o2.calculate_qparams()[0], o.calculate_qparams()[0])


def test_percentile_clips_outliers():
    x = torch.randn(1, 10000)
    x[0, 0] = 1000.0
    p = PercentileObserver(qint8, percentile=99.9)
    p(x)
    assert 2.0 < p.max_val.item() < 5.0


def test_mse_beats_minmax_on_outliers_for_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[:, 0] *= 20  # heavy outliers
    from qcal import qint4
    errs = {}
    for cls in (MinMaxObserver, MSEObserver):
        o = cls(qint4, PerGroup(32), symmetric=True)
        o(w)
        s, zp = o.calculate_qparams()
        errs[cls.__name__] = (fake_quantize(w, s, zp, qint4) - w).pow(2).sum().item()
    assert errs["MSEObserver"] < 0.95 * errs["MinMaxObserver"]


def test_nan_names_observer():
    o = MinMaxObserver(qint8, name="layers.0.q_proj (input)")
    with pytest.raises(ValueError, match=r"layers.0.q_proj \(input\): calibration data contains NaN or Inf"):
        o(torch.tensor([[1.0, float("inf")]]))


def test_unobserved_and_unknown():
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver(qint8).calculate_qparams()
    with pytest.raises(ValueError, match="observer='median'"):
        get_observer("median")
