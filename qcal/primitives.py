"""Quantization math as pure functions. No module state lives here.

Conventions
-----------
* A scale (and zero-point) has the same rank as the tensor it quantizes; its shape is the
  tensor's shape divided by the block size, so the block size is implied by the two shapes.
* Integer affine mapping: ``q = clamp(round(x / s + zp), qmin, qmax)`` and ``x ~ (q - zp) * s``.
  ``zp`` is ``None`` for symmetric schemes (0 exact). Asymmetric schemes keep ``zp`` unrounded
  ("float zero-point", as GGUF Q4_1 and tinygemm do), so the range ``[min, max]`` maps exactly
  onto ``[qmin, qmax]``.
* Math runs in float32; results are cast back to the requested dtype.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from .granularity import Granularity, block_size_for
from .qtypes import qtype

__all__ = [
    "FLOAT_DTYPES",
    "scale_dtype_for",
    "check_float",
    "set_finite_checks",
    "block_view",
    "block_minmax",
    "choose_qparams_from_minmax",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_ste",
    "grad_scale",
    "pack",
    "unpack",
    "packed_shape",
    "float_grid",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_FINITE_MODES = ("auto", "always", "never")
_finite_checks = os.environ.get("QCAL_FINITE_CHECKS", "auto")
if _finite_checks not in _FINITE_MODES:
    raise ValueError(f"QCAL_FINITE_CHECKS={_finite_checks!r}; choose one of {', '.join(_FINITE_MODES)}")


def set_finite_checks(mode: str) -> str:
    """Where the ranges qparams are chosen from are checked for NaN/Inf (a ``ValueError`` naming the tensor);
    returns the previous mode. Observers check their calibration data in every mode (calibration is no hot loop);
    this sets the fake-quant forward's own check. ``"auto"`` (the default, also ``$QCAL_FINITE_CHECKS``): on CPU
    tensors only, so a forward on an accelerator never waits for the device (one host-device sync per quantized
    tensor otherwise); ``"always"``: on every device (debugging NaNs on a GPU); ``"never"``: nowhere (NaN ranges
    give NaN scales and outputs)."""
    global _finite_checks
    if mode not in _FINITE_MODES:
        raise ValueError(f"set_finite_checks: mode={mode!r}; choose one of {', '.join(_FINITE_MODES)}")
    previous, _finite_checks = _finite_checks, mode
    return previous


def _check_finite(t: torch.Tensor) -> bool:
    """Whether the current mode checks ``t`` (see :func:`set_finite_checks`)."""
    return _finite_checks == "always" or (_finite_checks == "auto" and t.device.type == "cpu")


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype that holds the scales of a tensor of ``dtype``: float16's range stops at 6.1e-5 (normal) and
    would flush or coarsen the scales of small weights, so its scales are float32; others keep their dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def check_float(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise TypeError (naming ``name``) unless ``x`` is a floating point tensor the math supports."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; qcal quantizes float16, bfloat16, float32 or float64 tensors"
        )


def _block_size(x_shape: torch.Size, s_shape: torch.Size, name: str) -> tuple[int, ...]:
    if len(s_shape) != len(x_shape):
        raise ValueError(f"{name}: scale rank {len(s_shape)} differs from tensor rank {len(x_shape)}")
    out = []
    for n, g in zip(x_shape, s_shape, strict=True):
        if g == 0 or n % g != 0:
            raise ValueError(f"{name}: scale shape {tuple(s_shape)} does not tile tensor shape {tuple(x_shape)}")
        out.append(n // g)
    return tuple(out)


def block_view(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """View ``x`` as ``(n0, b0, n1, b1, ...)``: blocks along the odd dimensions."""
    shape: list[int] = []
    for n, b in zip(x.shape, block_size, strict=True):
        shape += [n // b, b]
    return x.reshape(shape)


def _expand(scale: torch.Tensor) -> torch.Tensor:
    """Give a grid-shaped scale singleton block dims so it broadcasts against ``block_view``."""
    shape: list[int] = []
    for g in scale.shape:
        shape += [g, 1]
    return scale.reshape(shape)


def block_minmax(x: torch.Tensor, block_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block minimum and maximum, shaped like the grid of blocks (same rank as ``x``)."""
    v = block_view(x, block_size)
    grid = v.shape[0::2]
    dims = tuple(d for d in range(1, v.dim(), 2) if v.shape[d] > 1)
    if not dims:
        return v.reshape(grid), v.reshape(grid)
    if len(dims) == 1:
        mn, mx = torch.aminmax(v, dim=dims[0], keepdim=True)
        return mn.reshape(grid), mx.reshape(grid)
    return torch.amin(v, dim=dims).reshape(grid), torch.amax(v, dim=dims).reshape(grid)


def choose_qparams_from_minmax(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qt: qtype,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    integer_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero-point (None when symmetric) from per-block ranges.

    A constant block gets the scale ``|c|`` (1 when ``c == 0``) so it reconstructs exactly;
    scales never reach zero. ``integer_zero_point`` (asymmetric only) widens each range to include 0
    and rounds the zero-point to an integer in ``[qmin, qmax]``, the convention of compressed-tensors,
    GPTQ checkpoints and AWQ (exportable to them exactly); the default keeps it unrounded.
    """
    if _check_finite(min_val) and not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("cannot choose quantization parameters: the observed values contain NaN or Inf")
    mn = min_val.float()
    mx = max_val.float()
    if integer_zero_point and not symmetric:
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    constant = mn == mx
    const_scale = torch.where(mx.abs() > 0, mx.abs(), torch.ones_like(mx))
    if symmetric:
        amax = torch.maximum(mn.abs(), mx.abs())
        qmax = qt.qmax if qt.is_floating_point else float(qt.qmax)
        scale = amax / qmax
        zero_point = None
    else:
        if qt.is_floating_point:
            raise ValueError(f"{qt} supports symmetric quantization only")
        scale = (mx - mn) / float(qt.qmax - qt.qmin)
        zero_point = torch.where(constant, torch.zeros_like(mn), qt.qmin - mn / torch.where(
            constant, torch.ones_like(scale), scale))
    scale = torch.where(constant, const_scale, scale)
    tiny = torch.finfo(scale_dtype).tiny
    scale = scale.clamp(min=tiny).to(scale_dtype)
    if zero_point is not None:
        # recompute with the rounded scale so that min maps exactly to qmin
        zero_point = torch.where(constant, torch.zeros_like(mn), qt.qmin - mn / scale.float())
        if integer_zero_point:
            zero_point = zero_point.round().clamp(qt.qmin, qt.qmax)
        zero_point = zero_point.to(scale_dtype)
    return scale, zero_point


def choose_qparams(
    x: torch.Tensor,
    qt: qtype,
    granularity: Granularity,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    name: str = "tensor",
    integer_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max quantization parameters of ``x`` at ``granularity``."""
    check_float(x, name)
    bs = block_size_for(granularity, tuple(x.shape), name)
    mn, mx = block_minmax(x.detach(), bs)
    try:
        return choose_qparams_from_minmax(mn, mx, qt, symmetric, scale_dtype or scale_dtype_for(x.dtype),
                                          integer_zero_point)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def _to_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, name: str):
    bs = _block_size(x.shape, scale.shape, name)
    v = block_view(x.float(), bs) / _expand(scale.float())
    zp = None if zero_point is None else _expand(zero_point.float())
    return v, zp


@cache
def _grid_cpu(e: int, m: int) -> torch.Tensor:
    bias = (1 << (e - 1)) - 1
    values = []
    for code in range(1 << (1 + e + m)):
        sign = -1.0 if code >> (e + m) else 1.0
        exp, man = (code >> m) & ((1 << e) - 1), code & ((1 << m) - 1)
        mag = man / (1 << m) * 2.0 ** (1 - bias) if exp == 0 else (1 + man / (1 << m)) * 2.0 ** (exp - bias)
        values.append(sign * mag)
    return torch.tensor(values, dtype=torch.float32)


def float_grid(qt: qtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The value of every code of the sub-byte float ``qt`` (float32, ``2^bits`` entries): code = sign bit, then the
    exponent bits, then the mantissa bits."""
    if not qt.is_subbyte_float:
        raise ValueError(f"{qt} is not a sub-byte float type")
    return _grid_cpu(qt.exponent_bits, qt.mantissa_bits).to(device)


def _float_codes(v: torch.Tensor, qt: qtype) -> torch.Tensor:
    """uint8 codes of the nearest ``qt`` values to ``v`` (float32, within ``±qt.qmax``), ties to the even code."""
    half = 1 << (qt.exponent_bits + qt.mantissa_bits)
    pos = float_grid(qt, v.device)[:half]  # ascending
    mids = (pos[1:] + pos[:-1]) / 2
    a = v.abs()
    idx = torch.bucketize(a, mids)  # mids[idx - 1] < a <= mids[idx]
    tie = (idx < half - 1) & (a == mids[idx.clamp(max=half - 2)]) & (idx % 2 == 1)  # halfway: the even code
    idx = idx + tie.to(idx.dtype)
    return (idx | (torch.signbit(v) & (idx > 0)).to(idx.dtype) * half).to(torch.uint8)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qt: qtype,
    name: str = "tensor",
) -> torch.Tensor:
    """Quantize ``x`` to ``qt`` (int8 storage for integer types, float8 for float8 types, uint8 codes for sub-byte
    floats), unpacked."""
    check_float(x, name)
    v, zp = _to_grid(x.detach(), scale, zero_point, name)
    if qt.is_subbyte_float:
        q = _float_codes(v.clamp(qt.qmin, qt.qmax), qt)
    elif qt.is_floating_point:
        q = v.clamp(qt.qmin, qt.qmax).to(qt.dtype)
    else:
        if zp is not None:
            v = v + zp
        q = torch.round(v).clamp(qt.qmin, qt.qmax).to(torch.int8)
    return q.reshape(x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    name: str = "tensor",
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(q - zp) * s`` computed in float32, returned as ``dtype``."""
    bs = _block_size(q.shape, scale.shape, name)
    v = block_view(q.float(), bs)
    if zero_point is not None:
        v = v - _expand(zero_point.float())
    return (v * _expand(scale.float())).reshape(q.shape).to(dtype)


class _FakeQuantInt(torch.autograd.Function):
    """Integer fake-quant with fixed qparams: few passes, in place; straight-through backward."""

    @staticmethod
    def forward(ctx, v, s, zp, qmin, qmax):
        q = v / s
        if zp is not None:
            q += zp
        q.round_()
        c = q.clamp(qmin, qmax)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(c == q)
        q = c
        if zp is not None:
            q -= zp
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qt: qtype,
    name: str = "tensor",
) -> torch.Tensor:
    """Quantize then dequantize with a straight-through estimator.

    Gradients reach ``x`` (zero where it was clipped) and, when ``scale`` requires grad,
    the scale (the LSQ gradient falls out of the same expression). Numerically equal to
    ``dequantize(quantize(x))``.
    """
    check_float(x, name)
    bs = _block_size(x.shape, scale.shape, name)
    s = _expand(scale.float())
    xv = block_view(x.float(), bs)
    zp = None if zero_point is None else _expand(zero_point.float())
    if qt.is_subbyte_float:
        c = (xv / s).clamp(qt.qmin, qt.qmax)
        rounded = float_grid(qt, c.device)[_float_codes(c.detach(), qt).long()]
        out = (c + (rounded - c).detach()) * s
    elif qt.is_floating_point:
        c = (xv / s).clamp(qt.qmin, qt.qmax)
        out = (c + (c.to(qt.dtype).float() - c).detach()) * s
    elif s.requires_grad or (zp is not None and zp.requires_grad):
        v = xv / s
        if zp is not None:
            v = v + zp
        q = torch.clamp(round_ste(v), qt.qmin, qt.qmax)
        out = (q - zp if zp is not None else q) * s
    else:
        out = _FakeQuantInt.apply(xv, s, zp, float(qt.qmin), float(qt.qmax))
    return out.reshape(x.shape).to(x.dtype)


def packed_shape(shape: tuple[int, ...], qt: qtype) -> tuple[int, ...]:
    """Shape of the packed storage of a tensor of ``shape`` (last dim rounded up to whole bytes)."""
    if qt.is_subbyte_float:  # bit planes over a last dim padded to a multiple of 8
        return tuple(shape[:-1]) + (-(-shape[-1] // 8) * qt.bits,)
    per = qt.packed_per_byte
    return tuple(shape[:-1]) + (-(-shape[-1] // per),)


def _pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-bit unsigned values (last dim a multiple of ``8 // bits``) packed low first into bytes."""
    per = 8 // bits
    u = u.reshape(*u.shape[:-1], u.shape[-1] // per, per)
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8, device=u.device)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out


def _unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(p >> (bits * i)) & mask for i in range(per)], dim=-1).reshape(*p.shape[:-1], -1)


def _pack_float_planes(q: torch.Tensor, qt: qtype) -> torch.Tensor:
    """Sub-byte float codes in bit planes, per row: the low 4 bits two a byte, then the remaining high bits (2 for
    fp6, 1 for fp5, none for fp4) packed the same way; 6 / 5 / 4 bits a value."""
    pad = -q.shape[-1] % 8
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    planes = [_pack_bits(q & 0xF, 4)]
    if qt.bits > 4:
        planes.append(_pack_bits(q >> 4, qt.bits - 4))
    return torch.cat(planes, dim=-1)


def _unpack_float_planes(p: torch.Tensor, qt: qtype, n: int | None) -> torch.Tensor:
    k = p.shape[-1] * 8 // qt.bits
    q = _unpack_bits(p[..., :k // 2], 4)
    if qt.bits > 4:
        q = q | (_unpack_bits(p[..., k // 2:], qt.bits - 4) << 4)
    return q if n is None else q[..., :n]


def pack(q: torch.Tensor, qt: qtype) -> torch.Tensor:
    """Pack int4 two per byte / int2 four per byte along the last dim (low bits first); others as-is.

    A last dim that is not a multiple of the values per byte is padded (pass ``n`` to :func:`unpack`). Sub-byte
    float codes go into bit planes (see ``_pack_float_planes``).
    """
    if qt.is_subbyte_float:
        return _pack_float_planes(q, qt)
    per = qt.packed_per_byte
    if per == 1:
        return q
    pad = -q.shape[-1] % per
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    return _pack_bits((q.to(torch.int16) - int(qt.qmin)).to(torch.uint8), qt.bits)


def unpack(p: torch.Tensor, qt: qtype, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`, returning int8 values in ``[qmin, qmax]`` (uint8 codes for sub-byte floats); ``n``
    trims padding."""
    if qt.is_subbyte_float:
        return _unpack_float_planes(p, qt, n)
    per = qt.packed_per_byte
    if per == 1:
        return p
    u = _unpack_bits(p, qt.bits)
    if n is not None:
        u = u[..., :n]
    return (u.to(torch.int16) + int(qt.qmin)).to(torch.int8)

