"""The int4-weight operators (``w4_fits``, ``w4a16_mm_small``, ``w4a8_mm``) of either native library against
references written in PyTorch: float64 products of the dequantized weight within a bound derived from the kernels'
fp32 roundings, exact integer results, the kernels' fp32 operation order bit for bit (Intel's definition of
vdpbf16ps: per pair, the odd element's product is added first, each step one rounding; the AVX2 build reproduces
it), 8da4w's per-row quantization and integer sums exactly, group sizes 32/64/128 and per channel, with and without
offsets, M = 1..9 and prefill sizes, non-finite rows, threads, and the argument checks."""

from __future__ import annotations

import pytest
import torch

from qcal.kernels import native
from qcal.kernels.common import quantize_per_token

pytestmark = pytest.mark.native_ops("w4_fits", "w4a16_mm_small", "w4a8_mm")
ops = torch.ops.qcal

U32 = 2.0 ** -24  # fp32's unit roundoff
HALF_ULP = 2.0 ** -8  # the largest relative error of one rounding to bf16
K = 384  # 12, 6 or 3 groups, or one (per channel)
N = 48  # three 16-row blocks: a pair and a single one


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once. The product of two fp32 values is exact in float64; the float64 sum is made
    round-to-odd (its error from TwoSum moves an inexact even result one ulp towards it), after which rounding to
    fp32 is the correctly rounded fused result (53 >= 24 + 2 bits)."""
    p, cd = a.double() * b.double(), c.double()
    s = p + cd
    bp = s - p
    e = (p - (s - bp)) + (cd - bp)
    bits = s.view(torch.int64)
    bits = torch.where((e != 0) & (bits & 1 == 0), bits + torch.where((e > 0) == (s > 0), 1, -1), bits)
    return bits.view(torch.float64).float()


def _case(m: int, gs: int, offsets: bool, seed: int, k: int = K, n: int = N, spread: bool = False):
    """Codes u (n, k), bf16 activations (m, k), bf16-valued scales and offsets (n, k // gs) as float32."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    x = torch.randn(m, k, generator=g)
    if spread:  # activations over 20 binades: most fp32 sums round
        x = x * torch.exp2(torch.randint(-14, 6, (m, k), generator=g).float())
    s = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).to(torch.bfloat16).float()
    z = (torch.randn(n, k // gs, generator=g) * 0.01).to(torch.bfloat16).float() if offsets else None
    return u, x.to(torch.bfloat16), s, z


def _dequant64(u: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    n, k = u.shape
    gs = k // s.shape[1]
    w = (u.double().view(n, -1, gs) - 8) * s.double().unsqueeze(-1)
    if z is not None:
        w = w - z.double().unsqueeze(-1)
    return w.view(n, k)


def _w4a16(x, u, s, z, gs):
    return ops.w4a16_mm_small(x, native.pack_int4(u), native.pack_scales(s, z), z is not None, gs)


def _w4a8(x, u, s, gs):
    return ops.w4a8_mm(x, native.pack_int4_vnni(u), native.pack_scales(s, None), gs)


# ---------------------------------------------------------------- shapes


def test_w4_fits_states_the_shape_rules():
    assert ops.w4_fits(16, 64, 64) and ops.w4_fits(1536, 576, 64) and ops.w4_fits(48, 384, 8)
    assert not ops.w4_fits(40, 64, 64)  # rows not a multiple of 16
    assert not ops.w4_fits(0, 64, 64)
    assert not ops.w4_fits(16, 60, 60)  # K not a multiple of 8
    assert not ops.w4_fits(16, 64, 48)  # the group does not divide K
    assert not ops.w4_fits(16, 64, 4)  # groups not a multiple of 8
    assert not ops.w4_fits(16, 64, 0) and not ops.w4_fits(16, 64, -8)
    assert ops.w4_fits(16, 8192, 8) and not ops.w4_fits(16, 8200, 8)  # at most 1024 groups
    assert ops.w4_fits(16, 1 << 26, 1 << 16) and not ops.w4_fits(16, 1 << 27, 1 << 17)  # K at most 2^26


# ---------------------------------------------------------------- w4a16: int4 weight, bf16 activations


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 33])
@pytest.mark.parametrize("gs", [32, 64, 128, K])
@pytest.mark.parametrize("offsets", [False, True])
def test_w4a16_within_the_rounding_bound_of_float64(m, gs, offsets):
    """|y - x W^T| within the kernel's roundings: per group sum_k x (128 + u) in two fp32 chains of gs/2 products,
    the group sum X (gs - 1 additions), 136 X and the difference, the G-term fused accumulation, and one rounding
    to bf16. First order: U32 (gs + G + 2) sum_g (280 |s_g| + |z_g|) sum_{k in g} |x_k|, plus HALF_ULP of the
    result."""
    u, x, s, z = _case(m, gs, offsets, seed=m * 1000 + gs)
    y = _w4a16(x, u, s, z, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (m, N)
    ref = x.double() @ _dequant64(u, s, z).t()
    G = K // gs
    ax = x.double().abs().view(m, G, gs).sum(-1)  # (m, G)
    coef = 280 * s.double().abs() + (z.double().abs() if offsets else 0)  # (N, G)
    err = U32 * (gs + G + 2) * (ax @ coef.t())
    bound = err * (1 + HALF_ULP) + HALF_ULP * ref.abs()
    assert (y.double() - ref).abs().le(bound).all()
    assert (y.double() - ref).abs().max() < 0.02 * ref.abs().max()  # the bound is not vacuous


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 64])
@pytest.mark.parametrize("gs", [32, 64, 128, K])
@pytest.mark.parametrize("offsets", [False, True])
def test_w4a16_exact_on_integers(m, gs, offsets):
    """Integer activations, unit scales, integer offsets: every fp32 product and sum is an exact integer, so the
    output is the integer matmul rounded once to bf16."""
    g = torch.Generator().manual_seed(m + gs)
    u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    x = torch.randint(-127, 128, (m, K), generator=g)
    off = torch.randint(-3, 4, (N, K // gs), generator=g) if offsets else None
    w = (u.long() - 8).view(N, -1, gs) - (off.unsqueeze(-1) if offsets else 0)
    want = (x @ w.view(N, K).t()).float().to(torch.bfloat16)
    y = _w4a16(x.to(torch.bfloat16), u, torch.ones(N, K // gs), None if off is None else off.float(), gs)
    assert _same(y, want)


def _w4a16_emulated(x, u, s, z, gs):
    """The kernels' fp32 operations in their order: per group, chain t0 takes nibble positions 0 and 2 of each octet
    and t1 positions 1 and 3, each pair (k, k + 1) as t = fma(x[k+1], 128 + u[k+1], t); t = fma(x[k], 128 + u[k], t)
    (the products are exact, so an fp32 add rounds as the fused step); X = sequential fp32 sum of the group's x;
    acc = fma(s, (t0 + t1) - 136 X, acc); acc = fma(-z, X, acc); y = bf16(acc)."""
    m, k = x.shape
    xf, wv = x.float(), 128.0 + u.float()
    acc = torch.zeros(m, u.shape[0])
    for g in range(k // gs):
        t = [torch.zeros_like(acc), torch.zeros_like(acc)]
        for kk in range(g * gs, (g + 1) * gs, 2):
            c = (kk % 8) // 2 & 1
            t[c] = t[c] + xf[:, kk + 1, None] * wv[None, :, kk + 1]
            t[c] = t[c] + xf[:, kk, None] * wv[None, :, kk]
        X = torch.zeros(m)
        for kk in range(g * gs, (g + 1) * gs):
            X = X + xf[:, kk]
        d = (t[0] + t[1]) - (X * 136.0)[:, None]
        acc = _fma32(d, s[:, g].expand_as(acc), acc)
        if z is not None:
            acc = _fma32(-z[:, g].expand_as(acc), X[:, None].expand_as(acc), acc)
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("m,gs", [(1, 32), (2, 64), (3, 16), (5, 64), (4, 128)])
@pytest.mark.parametrize("offsets", [False, True])
def test_w4a16_same_fp32_operations_as_the_kernel_definition(m, gs, offsets):
    """Bit for bit against the written-out operation order, on data whose exact result cancels to ~0 (pairs of
    groups with the same activations and scales and negated codes u -> 16 - u, offsets -z and z), so that the
    outputs are made of the fp32 rounding residues alone: another order of the pair, one chain instead of two or an
    unfused scale step each change most outputs. The AVX2 library's contract; the AVX-512 one runs vdpbf16ps."""
    if native.isa() != "avx2":
        pytest.skip("the AVX-512 library runs vdpbf16ps itself")
    pairs, k = 2, 4 * gs
    g = torch.Generator().manual_seed(7 * m + gs)
    u1 = torch.randint(1, 16, (N, pairs, gs), generator=g, dtype=torch.uint8)
    u = torch.stack((u1, 16 - u1), 2).reshape(N, k)
    x1 = torch.randn(m, pairs, gs, generator=g) * torch.exp2(torch.randint(-14, 6, (m, pairs, gs), generator=g).float())
    x = torch.stack((x1, x1), 2).reshape(m, k).to(torch.bfloat16)
    s1 = torch.rand(N, pairs, generator=g) + 0.5
    s = torch.stack((s1, s1), 2).reshape(N, -1).to(torch.bfloat16).float()
    z = None
    if offsets:
        z1 = (torch.randn(N, pairs, generator=g) * 0.01).to(torch.bfloat16).float()
        z = torch.stack((z1, -z1), 2).reshape(N, -1)
    y = _w4a16(x, u, s, z, gs)
    assert (y != 0).float().mean() > 0.5  # residues, not exact zeros
    assert _same(y, _w4a16_emulated(x, u, s, z, gs))


def test_w4a16_non_finite_rows():
    """A row holding NaN or Inf gives a row of NaN (the +128 offset of the codes makes every column meet an Inf - Inf
    or a NaN); the other rows are those of a call without it."""
    u, x, s, z = _case(6, 64, True, seed=3)
    clean = _w4a16(x, u, s, z, 64)
    bad = x.clone()
    bad[1, 10] = float("nan")
    bad[3, 200] = float("inf")
    bad[4, 0] = -float("inf")
    y = _w4a16(bad, u, s, z, 64)
    assert y[[1, 3, 4]].isnan().all()
    assert _same(y[[0, 2, 5]], clean[[0, 2, 5]])


# ---------------------------------------------------------------- w4a8: 8da4w


def _w4a8_reference(x, u, s, gs):
    """quantize_per_token's codes and scales, per-group integer sums sum_k q_k (u_k - 8), the fp32 fused
    accumulation over groups, one multiplication by the row scale, one rounding."""
    codes, xs = quantize_per_token(x)
    q = codes.long()
    acc = torch.zeros(x.shape[0], u.shape[0])
    for g in range(u.shape[1] // gs):
        sl = slice(g * gs, (g + 1) * gs)
        d = (q[:, sl] @ (u[:, sl].long() - 8).t()).float()
        acc = _fma32(d, s[:, g].expand_as(acc), acc)
    return (acc * xs).to(torch.bfloat16)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 300])
@pytest.mark.parametrize("gs", [32, 64, 128, K])
def test_w4a8_exact_integer_parity(m, gs):
    """Unit scales (as the AVX-512 tests): the output is the integer matmul of quantize_per_token's codes with
    u - 8, times the row scale, rounded once."""
    g = torch.Generator().manual_seed(m * 31 + gs)
    u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    x = (torch.randn(m, K, generator=g) * 3).to(torch.bfloat16)
    x[0, :5] = 0
    if m > 2:
        x[2] = 0  # an all-zero row: scale FLT_MIN, codes 0, output 0
        x[1] *= 1e-36  # tiny values: the FLT_MIN term of the scale matters
    codes, xs = quantize_per_token(x)
    exact = (codes.long() @ (u.long() - 8).t()).float()
    y = _w4a8(x, u, torch.ones(N, K // gs), gs)
    assert _same(y, (exact * xs).to(torch.bfloat16))


@pytest.mark.parametrize("gs", [32, 64, K])
def test_w4a8_extreme_codes_do_not_overflow(gs):
    """Codes of +-127 against u = 15 (and 0): the largest partial sums the kernels form (an AVX2 16-bit lane holds up
    to 16 products of 15 * 127 before widening)."""
    u = torch.full((N, K), 15, dtype=torch.uint8)
    u[N // 2:, ::3] = 0
    x = torch.ones(4, K, dtype=torch.bfloat16)
    x[1] = -1
    x[2, ::2] = -1
    x[3, 1::7] = -2  # the others quantize to +-64
    codes, xs = quantize_per_token(x)
    exact = (codes.long() @ (u.long() - 8).t()).float()
    assert codes.abs().max() == 127
    assert _same(_w4a8(x, u, torch.ones(N, K // gs), gs), (exact * xs).to(torch.bfloat16))


@pytest.mark.parametrize("m", [1, 3, 4, 7, 70])
@pytest.mark.parametrize("gs", [32, 64, 128, K])
def test_w4a8_scaled_groups_bit_for_bit(m, gs):
    u, x, s, _ = _case(m, gs, False, seed=500 + m + gs, spread=True)
    y = _w4a8(x, u, s, gs)
    assert _same(y, _w4a8_reference(x, u, s, gs))


def test_w4a8_ignores_offsets_and_non_finite_rows_are_nan():
    u, x, s, z = _case(5, 64, True, seed=11)
    packed = native.pack_int4_vnni(u)
    y = ops.w4a8_mm(x, packed, native.pack_scales(s, z), 64)
    assert _same(y, ops.w4a8_mm(x, packed, native.pack_scales(s, None), 64))  # symmetric: offsets unused
    bad = x.clone()
    bad[0, 7] = float("nan")
    bad[3, 100] = float("inf")
    yb = ops.w4a8_mm(bad, packed, native.pack_scales(s, None), 64)
    assert yb[[0, 3]].isnan().all()
    assert _same(yb[[1, 2, 4]], y[[1, 2, 4]])


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("gs", [32, 64])
def test_scales_alone_read_as_the_two_plane_layout(m, gs):
    """A symmetric weight's scales packed alone (N/16, G, 1, 16) give the bits of the two-plane layout."""
    u, x, s, _ = _case(m, gs, False, seed=700 + m + gs, n=48, spread=True)
    one, two = native.pack_scales(s, None), native.pack_scales(s, torch.zeros_like(s))
    assert one.shape == (3, K // gs, 1, 16) and two.shape == (3, K // gs, 2, 16)
    w16, w8 = native.pack_int4(u), native.pack_int4_vnni(u)
    assert _same(ops.w4a16_mm_small(x, w16, one, False, gs), ops.w4a16_mm_small(x, w16, two, False, gs))
    assert _same(ops.w4a8_mm(x, w8, one, gs), ops.w4a8_mm(x, w8, two, gs))
    with pytest.raises(ValueError, match="qcal::w4a16_mm_small: has_zero needs sz with the offsets"):
        ops.w4a16_mm_small(x, w16, one, True, gs)
    with pytest.raises(ValueError, match="qcal::w4a8_mm: sz must be a contiguous"):
        ops.w4a8_mm(x, w8, torch.cat((two, one), dim=2), gs)  # three planes


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_row_tiles_do_not_change_the_result(threads):
    """Every output element comes from one tile whatever the thread split and the number of rows beside it."""
    u, x, s, z = _case(11, 64, True, seed=21, n=80)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y16, y8 = _w4a16(x, u, s, z, 64), _w4a8(x, u, s, 64)
        for i in range(11):  # each row alone: a one-row tile
            assert _same(_w4a16(x[i:i + 1], u, s, z, 64), y16[i:i + 1])
            assert _same(_w4a8(x[i:i + 1], u, s, 64), y8[i:i + 1])
        assert _same(_w4a16(x[3:9], u, s, z, 64), y16[3:9])  # rows in other tiles
        assert _same(_w4a8(x[3:9], u, s, 64), y8[3:9])
    finally:
        torch.set_num_threads(saved)


def test_empty_input_strided_input_and_meta_shapes():
    u, x, s, z = _case(4, 64, False, seed=5)
    w16, w8, sz = native.pack_int4(u), native.pack_int4_vnni(u), native.pack_scales(s, z)
    assert ops.w4a16_mm_small(x[:0], w16, sz, False, 64).shape == (0, N)
    assert ops.w4a8_mm(x[:0], w8, sz, 64).shape == (0, N)
    wide = torch.zeros(4, 2 * K, dtype=torch.bfloat16)
    wide[:, ::2] = x  # a non-contiguous x is taken
    assert _same(ops.w4a16_mm_small(wide[:, ::2], w16, sz, False, 64), ops.w4a16_mm_small(x, w16, sz, False, 64))
    assert _same(ops.w4a8_mm(wide[:, ::2], w8, sz, 64), ops.w4a8_mm(x, w8, sz, 64))
    meta = ops.w4a16_mm_small(x.to("meta"), w16.to("meta"), sz.to("meta"), False, 64)
    assert meta.shape == (4, N) and meta.dtype == torch.bfloat16
    assert ops.w4a8_mm(x.to("meta"), w8.to("meta"), sz.to("meta"), 64).shape == (4, N)


@pytest.mark.parametrize("name", ["w4a16_mm_small", "w4a8_mm"])
def test_bad_arguments_raise_naming_the_op(name):
    u, x, s, _ = _case(2, 64, False, seed=9)
    w, sz = native.pack_int4(u), native.pack_scales(s, None)

    def call(x_=x, w_=w, sz_=sz, gs=64):
        return ops.w4a16_mm_small(x_, w_, sz_, False, gs) if name == "w4a16_mm_small" else ops.w4a8_mm(x_, w_, sz_, gs)

    op = f"qcal::{name}"
    with pytest.raises(ValueError, match=f"{op}: unsupported shape"):
        call(gs=40)  # does not divide K
    with pytest.raises(ValueError, match=f"{op}: unsupported shape"):
        call(w_=w[:40])  # rows not a multiple of 16
    with pytest.raises(ValueError, match=f"{op}: w must be"):
        call(w_=w.view(-1))
    with pytest.raises(TypeError, match=f"{op}: x must be a bf16"):
        call(x_=x.float())
    with pytest.raises(ValueError, match=f"{op}: x must be"):
        call(x_=x[:, :64])  # K mismatch
    with pytest.raises(ValueError, match=f"{op}: x must be"):
        call(x_=x.view(2, 1, K))
    with pytest.raises(TypeError, match=f"{op}: w must be a Byte"):
        call(w_=w.view(torch.int8))
    with pytest.raises(ValueError, match=f"{op}: w must be a contiguous"):
        call(w_=torch.cat((w, w), 1)[:, : K // 2])
    with pytest.raises(TypeError, match=f"{op}: sz must be a BFloat16"):
        call(sz_=sz.float())
    with pytest.raises(ValueError, match=f"{op}: sz must be a contiguous"):
        call(sz_=native.pack_scales(s[:, :3], None))  # scales for groups of 128
    with pytest.raises(ValueError, match=f"{op}: sz must be a contiguous"):
        call(sz_=sz.transpose(0, 1).contiguous().transpose(0, 1))


@pytest.mark.native_ops("w4a8_mm_multi")
@pytest.mark.parametrize("m,threads", [(1, 1), (9, 2), (40, 3)])
def test_w4a8_several_weights_in_one_call_are_the_one_weight_calls(m, threads):
    """w4a8_mm_multi (q / k / v, gate / up on one input): each output w4a8_mm's for its weight, bit for bit, the
    weights of one to several pairs of blocks, with and without the offsets' plane, whatever the threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = ((16, False), (80, True), (48, False))
        cases = [_case(m, 32, offsets, m + n, n=n, spread=True) for n, offsets in shapes]
        x = cases[0][1]
        w = [native.pack_int4_vnni(u) for u, _, _, _ in cases]
        sz = [native.pack_scales(s, z) for _, _, s, z in cases]
        ys = ops.w4a8_mm_multi(x, w, sz, 32)
        assert [tuple(y.shape) for y in ys] == [(m, 16), (m, 80), (m, 48)]
        for y, wi, szi in zip(ys, w, sz, strict=True):
            assert _same(y, ops.w4a8_mm(x, wi, szi, 32))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.native_ops("w4a8_mm_multi")
def test_w4a8_several_weights_refuse_bad_lists():
    u, x, s, _ = _case(4, 32, False, 0, k=64, n=32)
    w, sz = native.pack_int4_vnni(u), native.pack_scales(s, None)
    with pytest.raises(ValueError, match="w4a8_mm_multi: sz must hold one tensor per weight"):
        ops.w4a8_mm_multi(x, [w, w], [sz], 32)
    with pytest.raises(ValueError, match="w4a8_mm_multi: between 1 and 64 weights, got 0"):
        ops.w4a8_mm_multi(x, [], [], 32)
    with pytest.raises(ValueError, match=r"w4a8_mm_multi \(weight 1\): w must be \(N, K/2\)"):
        ops.w4a8_mm_multi(x, [w, w.flatten()], [sz, sz], 32)
    with pytest.raises(ValueError, match=r"w4a8_mm_multi \(weight 1\): K=128 where weight 0 has K=64"):
        u2, _, s2, _ = _case(4, 32, False, 1, k=128, n=16)
        ops.w4a8_mm_multi(x, [w, native.pack_int4_vnni(u2)], [sz, native.pack_scales(s2, None)], 32)
    with pytest.raises(TypeError, match=r"w4a8_mm_multi \(weight 0\): sz must be a BFloat16"):
        ops.w4a8_mm_multi(x, [w], [sz.float()], 32)
    with pytest.raises(ValueError, match=r"w4a8_mm_multi: x must be \(M, 64\)"):
        ops.w4a8_mm_multi(x[:, :32], [w], [sz], 32)
