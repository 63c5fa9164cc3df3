"""The generation runtime's native operators (the AVX-512 library or its AVX2 build) against references written in
PyTorch: the elementwise steps bit for bit (every bf16 rounding and fp32 operation of the kernels written out, in
their order), attention against float64 within a bound derived from its roundings and against PyTorch's SDPA,
grouped heads, odd lengths and head dimensions, masks, and the argument checks; greedy sampling's argmax against
torch.argmax on hostile rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.native_ops("add_rmsnorm", "rope_store", "silu_mul", "decode_attention",
                                    "decode_step_attention", "prefill_attention")

BF16 = torch.bfloat16
U32 = 2.0 ** -24  # fp32's unit roundoff
HALF_ULP = 2.0 ** -8  # the largest relative error of one rounding to bf16
LOG2E = torch.tensor(1.4426950408889634, dtype=torch.float32)
EXP_POLY = [1.5403530393381606e-4, 1.3333558146428443e-3, 9.6181291076284772e-3, 5.5504108664821580e-2,
            2.4022650695910071e-1, 6.9314718055994531e-1, 1.0]


def _bf16(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0), same shape."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once, through float64: the product of two fp32 values is exact there, and so is the
    sum for the squares of bf16 values that the RMSNorm adds (for the exponential's polynomial the float64 sum can
    round, which changes the fp32 result only when it lands exactly on an fp32 tie)."""
    return (a.double() * b.double() + c.double()).float()


def _exp_nonpos(x: torch.Tensor) -> torch.Tensor:
    """The kernels' e^x for x <= 0 (finite): 2^n 2^f, f in [-0.5, 0.5], a degree-6 polynomial of 2^f by fused
    multiply-adds, the scaling by 2^n rounded once."""
    x = torch.maximum(x, torch.tensor(-100.0))
    t = x * LOG2E
    n = torch.round(t)  # to nearest, ties to even
    f = t - n
    p = torch.full_like(f, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = _fma32(p, f, torch.full_like(f, c))
    return torch.ldexp(p.double(), n.double()).float()


def _rmsnorm_ref(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float):
    """x + delta rounded, then LlamaRMSNorm with the kernels' fp32 order: squares summed in 16 lanes (element j in lane
    j % 16, fused multiply-adds in order of j), the lanes added as _mm512_reduce_add_ps does, then
    1 / sqrt(sum / N + eps), bf16(x * that), bf16(bf16(...) * w)."""
    if delta is not None:
        x = x + delta  # a bf16 op: fp32 sum, one rounding
    m, n = x.shape
    xf = x.float()
    lanes = F.pad(xf, (0, -n % 16)).view(m, -1, 16)
    acc = torch.zeros(m, 16)
    for j in range(lanes.shape[1]):
        acc = _fma32(lanes[:, j], lanes[:, j], acc)
    t = acc[:, 8:] + acc[:, :8]
    t = t[:, 4:] + t[:, :4]
    total = (t[:, 0] + t[:, 2]) + (t[:, 1] + t[:, 3])
    ms = total / torch.full_like(total, float(n)) + torch.tensor(eps, dtype=torch.float32)
    # IEEE sqrt, as vsqrtss: PyTorch's vectorized fp32 sqrt is not always correctly rounded; a float64 sqrt
    # rounded to fp32 is (53 >= 2 * 24 + 2 bits)
    inv = torch.ones_like(ms) / torch.sqrt(ms.double()).float()
    h = (xf * inv[:, None]).to(BF16)
    return x, (h.float() * w.float()).to(BF16)


def _silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(silu(g)) * u), silu(x) = x / (1 + e) for x >= 0 and x e / (1 + e) below, e = e^-|x|."""
    x = g.float()
    e = _exp_nonpos(-x.abs())
    num = torch.where(x < 0, x * e, x)
    s = (num / (1 + e)).to(BF16)
    return (s.float() * u.float()).to(BF16)


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb in bf16 ops: x (M, H, D), cos / sin (M, D)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def _attention64(q, k, v, masks, scale):
    """Float64 attention of query rows q (R, hq, D) over k / v (hkv, L, D), masks (R, L) bool (True = attend).
    Returns the output, the attention-weighted |v| (the scale of the fp32 errors) and a bound on each score's fp32
    error, each (R, hq, D) or (R, hq, 1)."""
    hq, hkv = q.shape[1], k.shape[0]
    kk = k.double().repeat_interleave(hq // hkv, 0)
    vv = v.double().repeat_interleave(hq // hkv, 0)
    sc = float(torch.tensor(scale, dtype=torch.float32))
    s = sc * torch.einsum("rhd,hld->rhl", q.double(), kk)
    s = s.masked_fill(~masks[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
    absdot = sc * torch.einsum("rhd,hld->rhl", q.double().abs(), kk.abs())
    ds = ((q.shape[2] + 2) * U32 * absdot).masked_fill(~masks[:, None, :], 0.0).amax(-1, keepdim=True)
    return (torch.einsum("rhl,hld->rhd", p, vv), torch.einsum("rhl,hld->rhd", p, vv.abs()), ds)


def _within(got, ref, mabs, ds, length, p_rel=0.0):
    """|got - ref| <= one bf16 rounding of the output + the fp32 errors: each weight's relative error (score error ds,
    e^x's ~2e-7, p_rel for weights rounded to bf16) counted twice (numerator and denominator), the sums' (length + 16)
    u, all times the weighted |v|."""
    w = 2 * (torch.expm1(ds) + 4e-7 + p_rel) + 2 * (length + 16) * U32
    tol = HALF_ULP * ref.abs() + 1.01 * w * mabs + 1e-30
    err = (got.double() - ref).abs()
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item():.3g}, worst error {err.max().item():.3g}"


def _sdpa(q, k, v, mask, scale):
    """q (1, hq, 1, D) / k, v (1, hkv, L, D) through PyTorch's fp32 SDPA; (1, 1, hq, D)."""
    m = None if mask is None else mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


# ---------------------------------------------------------------- elementwise steps, bit for bit


@pytest.mark.parametrize("n", [1, 7, 9, 16, 100, 576, 1000, 2049])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_bit_for_bit(n, with_delta):
    rows = 400  # enough rows that a different fp32 sum order shows in some bf16 rounding
    x, w = _bf16(rows, n, seed=n, scale=3.0), _bf16(n, seed=n + 1)
    delta = _bf16(rows, n, seed=n + 2) if with_delta else None
    want_x, want = _rmsnorm_ref(x, delta, w, 1e-5)
    got_x, got = x.clone(), torch.full_like(x, float("nan"))
    torch.ops.qcal.add_rmsnorm(got_x, delta, w, got, 1e-5)
    assert _same(got_x, want_x) and _same(got, want)


def test_add_rmsnorm_is_close_to_llama_rmsnorm():
    """Against LlamaRMSNorm's own formula (a different fp32 sum order): a rare 1-ulp difference at most."""
    x, w = _bf16(64, 576, seed=3), _bf16(576, seed=4)
    got = torch.empty_like(x)
    torch.ops.qcal.add_rmsnorm(x.clone(), None, w, got, 1e-6)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16)
    diff = (got.float() - want.float()).abs()
    assert (got != want).float().mean() < 0.01 and (diff <= 2 ** -6 * want.float().abs()).all()


@pytest.mark.parametrize("n", [1, 7, 13, 64, 1536, 1537])
def test_silu_mul_bit_for_bit(n):
    g, u = _bf16(64, n, seed=n, scale=4.0), _bf16(64, n, seed=n + 1)  # many values: any other e^x shows
    special = torch.tensor([0.0, -0.0, 60.0, -60.0, 20.0, -20.0, 1e-20, -1e-20])
    g.view(-1)[: min(8, g.numel())] = special[: min(8, g.numel())].to(BF16)
    want = _silu_mul_ref(g, u)
    got = g.clone()
    torch.ops.qcal.silu_mul(got, u)
    assert _same(got, want)
    assert _rel_err(got, F.silu(g) * u) < 1e-3  # PyTorch's own exp: a rare rounding tie apart


@pytest.mark.parametrize("d", [2, 6, 16, 40, 48, 64, 100, 128, 256, 510])
def test_rope_store_bit_for_bit_into_a_strided_cache(d):
    m, heads = 3, 5
    src, cos, sin = _bf16(m, heads, d, seed=d), _bf16(m, d, seed=d + 1), _bf16(m, d, seed=d + 2)
    want = _rope_ref(src, cos, sin)
    cache = torch.full((heads, 9, d), float("nan"), dtype=BF16)  # (heads, positions, d), like the KV cache
    torch.ops.qcal.rope_store(src, cache[:, 4:4 + m].transpose(0, 1), cos, sin)
    assert torch.equal(cache[:, 4:4 + m].transpose(0, 1), want)
    assert torch.isnan(cache[:, :4].float()).all() and torch.isnan(cache[:, 4 + m:].float()).all()
    inplace = src.clone()
    torch.ops.qcal.rope_store(inplace, inplace, cos, sin)
    assert torch.equal(inplace, want)
    torch.ops.qcal.rope_store(src, cache[:, :m].transpose(0, 1), None, None)  # a plain copy (the value cache)
    assert _same(cache[:, :m].transpose(0, 1), src)


def test_prefill_sized_steps_split_among_threads_bit_for_bit(threads):
    """Calls of a prefill's size run in ranges of rows on all threads: every value as the one-row references."""
    m, heads, d, n = 300, 9, 64, 576
    src, cos, sin = _bf16(m, heads, d, seed=1), _bf16(m, d, seed=2), _bf16(m, d, seed=3)
    cache = torch.full((heads, m + 5, d), float("nan"), dtype=BF16)
    torch.ops.qcal.rope_store(src, cache[:, 2:2 + m].transpose(0, 1), cos, sin)
    assert torch.equal(cache[:, 2:2 + m].transpose(0, 1), _rope_ref(src, cos, sin))
    assert torch.isnan(cache[:, :2].float()).all() and torch.isnan(cache[:, 2 + m:].float()).all()
    x, w, delta = _bf16(m, n, seed=4, scale=3.0), _bf16(n, seed=5), _bf16(m, n, seed=6)
    want_x, want = _rmsnorm_ref(x, delta, w, 1e-5)
    got = torch.empty_like(x)
    torch.ops.qcal.add_rmsnorm(x, delta, w, got, 1e-5)
    assert _same(x, want_x) and _same(got, want)
    g, u = _bf16(m, 1537, seed=7, scale=4.0), _bf16(m, 1537, seed=8)  # chunks of the split end mid-row
    want = _silu_mul_ref(g, u)
    torch.ops.qcal.silu_mul(g, u)
    assert _same(g, want)


# ---------------------------------------------------------------- decode attention


@pytest.mark.parametrize("hq,hkv,length,d", [(9, 3, 529, 64), (9, 3, 512, 64), (4, 4, 70, 32), (8, 2, 3000, 128),
                                             (12, 4, 1, 256), (16, 1, 200, 16), (6, 2, 17, 48), (2, 1, 143, 80),
                                             (5, 5, 300, 112), (32, 2, 129, 208), (3, 1, 15, 144)])
def test_decode_attention_against_float64(hq, hkv, length, d, threads):
    q, k, v = _bf16(1, hq, 1, d, seed=1), _bf16(1, hkv, length, d, seed=2), _bf16(1, hkv, length, d, seed=3)
    mask = torch.rand(length, generator=torch.Generator().manual_seed(4)) < 0.6
    mask[-1] = True
    for m in (None, mask):
        out = torch.ops.qcal.decode_attention(q, k, v, m, d ** -0.5)
        assert out.shape == (1, 1, hq, d) and out.dtype == BF16
        seen = torch.ones(1, length, dtype=torch.bool) if m is None else m[None]
        ref, mabs, ds = _attention64(q[0].transpose(0, 1), k[0], v[0], seen, d ** -0.5)
        _within(out[0], ref, mabs, ds, length)
        assert _rel_err(out, _sdpa(q, k, v, m, d ** -0.5)) < 5e-3


def test_decode_attention_large_scores_and_a_strided_cache():
    """Scores far apart (e^x underflowing to 0 for most positions) and a cache view with a padded head stride."""
    q, big_k, big_v = _bf16(1, 6, 1, 64, seed=5), _bf16(1, 2, 300, 64, seed=6), _bf16(1, 2, 300, 64, seed=7)
    k, v = big_k[:, :, :257], big_v[:, :, :257]
    out = torch.ops.qcal.decode_attention(q, k, v, None, 4.0)
    ref, mabs, ds = _attention64(q[0].transpose(0, 1), k[0], v[0], torch.ones(1, 257, dtype=torch.bool), 4.0)
    _within(out[0], ref, mabs, ds, 257)
    assert torch.equal(out, torch.ops.qcal.decode_attention(q, k.contiguous(), v.contiguous(), None, 4.0))


def test_decode_attention_ignores_masked_garbage_and_a_blind_query_gets_zeros():
    q, k, v = _bf16(1, 6, 1, 64, seed=8), _bf16(1, 2, 40, 64, seed=9), _bf16(1, 2, 40, 64, seed=10)
    big_k = torch.zeros(1, 2, 300, 64, dtype=BF16)
    big_v = torch.zeros_like(big_k)
    big_k[:, :, :40], big_v[:, :, :40] = k, v
    big_k[:, :, 40:] = float("inf")  # a static cache's unused tail may hold anything
    big_v[:, :, 40:] = float("nan")
    mask = torch.arange(300) < 40
    mask[7] = False
    big_v[:, :, 7] = float("nan")
    out = torch.ops.qcal.decode_attention(q, big_k, big_v, mask, 0.125)
    assert torch.isfinite(out.float()).all()
    ref, mabs, ds = _attention64(q[0].transpose(0, 1), big_k[0, :, :40], big_v[0, :, :40].nan_to_num(0.0),
                                 mask[None, :40], 0.125)
    _within(out[0], ref, mabs, ds, 40)
    none = torch.ops.qcal.decode_attention(q, k, v, torch.zeros(40, dtype=torch.bool), 0.125)
    assert _same(none, torch.zeros_like(none))
    empty = torch.ops.qcal.decode_attention(q, k[:, :, :0], v[:, :, :0], None, 0.125)
    assert _same(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("hq,hkv,d,pos", [(9, 3, 64, 0), (9, 3, 64, 37), (9, 3, 64, 511), (4, 4, 32, 5),
                                          (8, 2, 128, 200), (16, 1, 16, 300), (6, 3, 256, 130), (4, 2, 48, 16)])
def test_decode_step_attention_is_rope_stores_and_decode_attention(hq, hkv, d, pos, threads):
    """The fused decode step: bit for bit rope_store (query in place, key into the cache, value copy) followed by
    decode_attention over positions 0..pos; the cache past pos (NaN here) is never read or written."""
    length = 512
    q, k, v = _bf16(1, hq * d, seed=1), _bf16(1, hkv * d, seed=2), _bf16(1, hkv * d, seed=3)
    cos, sin = _bf16(length, d, seed=4), _bf16(length, d, seed=5)
    kc, vc = _bf16(hkv, length, d, seed=6), _bf16(hkv, length, d, seed=7)
    kc[:, pos + 1:], vc[:, pos + 1:] = float("nan"), float("nan")
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    out = torch.ops.qcal.decode_step_attention(q, k, v, kc, vc, pos, cos, sin, d ** -0.5)
    qh = q2.view(1, hq, d)
    torch.ops.qcal.rope_store(qh, qh, cos[pos:pos + 1], sin[pos:pos + 1])
    torch.ops.qcal.rope_store(k.view(1, hkv, d), kc2.transpose(0, 1)[pos:pos + 1], cos[pos:pos + 1],
                              sin[pos:pos + 1])
    torch.ops.qcal.rope_store(v.view(1, hkv, d), vc2.transpose(0, 1)[pos:pos + 1], None, None)
    ref = torch.ops.qcal.decode_attention(q2.view(1, hq, 1, d), kc2[None, :, :pos + 1], vc2[None, :, :pos + 1], None,
                                          d ** -0.5)
    assert _same(q, q2) and torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    assert out.shape == (1, hq * d) and _same(out, ref.view(1, hq * d))
    assert torch.equal(q2.view(1, hq, d), _rope_ref(_bf16(1, hq * d, seed=1).view(1, hq, d), cos[pos:pos + 1],
                                                    sin[pos:pos + 1]))
    assert torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- prefill attention


@pytest.mark.parametrize("n,heads,kv_heads,d,start", [(512, 9, 3, 64, 0), (5, 4, 2, 32, 0), (70, 8, 8, 128, 13),
                                                      (1, 9, 3, 64, 40), (33, 16, 1, 16, 100), (7, 3, 3, 256, 3),
                                                      (66, 6, 2, 48, 64), (130, 2, 1, 80, 0), (3, 2, 2, 208, 200)])
def test_prefill_attention_against_float64(n, heads, kv_heads, d, start, threads):
    q = _bf16(n, heads, d, seed=1)
    k, v = _bf16(kv_heads, start + n + 7, d, seed=2), _bf16(kv_heads, start + n + 7, d, seed=3)
    k[:, start + n:], v[:, start + n:] = float("nan"), float("nan")  # positions past the last query are never read
    end = start + n
    got = torch.ops.qcal.prefill_attention(q, k, v, start, d ** -0.5)
    assert got.shape == q.shape and got.dtype == BF16
    masks = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start)
    ref, mabs, ds = _attention64(q, k[:, :end], v[:, :end], masks, d ** -0.5)
    _within(got, ref, mabs, ds, end, p_rel=HALF_ULP)  # the probabilities are rounded to bf16 for P V
    sdpa = F.scaled_dot_product_attention(q.float().transpose(0, 1), k[:, :end].float(), v[:, :end].float(),
                                          attn_mask=masks, scale=d ** -0.5, enable_gqa=True).transpose(0, 1)
    assert _rel_err(got, sdpa) < 5e-3


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (20, 2), (8, 1)])  # 3, 10 (more than 8 at once) and 8 a group
def test_prefill_attention_heads_of_a_group_as_each_alone(heads, kv_heads, threads):
    """The query heads sharing a KV head are attended together, block of keys by block: every head bit for bit as
    when it is the only head of its group."""
    n, d, start = 70, 64, 9
    q = _bf16(n, heads, d, seed=4)
    k, v = _bf16(kv_heads, start + n, d, seed=5), _bf16(kv_heads, start + n, d, seed=6)
    got = torch.ops.qcal.prefill_attention(q, k, v, start, d ** -0.5)
    group = heads // kv_heads
    for h in range(heads):
        g = h // group
        alone = torch.ops.qcal.prefill_attention(q[:, h:h + 1].contiguous(), k[g:g + 1], v[g:g + 1], start, d ** -0.5)
        assert _same(got[:, h:h + 1], alone)


def test_prefill_attention_rows_are_independent_of_the_batch():
    """A query row's result does not depend on the other rows of the call (the last of a prefill, as one decode
    step would see it) nor on the cache's strides."""
    q, k, v = _bf16(37, 6, 64, seed=11), _bf16(2, 50, 64, seed=12), _bf16(2, 50, 64, seed=13)
    full = torch.ops.qcal.prefill_attention(q, k, v, 0, 0.125)
    for i in (0, 4, 36):
        assert _same(torch.ops.qcal.prefill_attention(q[i:i + 1], k, v, i, 0.125), full[i:i + 1])
    kp = torch.zeros(2, 64, 128, dtype=BF16)[:, :50, :64]  # head stride 64 * 128, position stride 128
    vp = torch.zeros(2, 64, 128, dtype=BF16)[:, :50, :64]
    kp.copy_(k)
    vp.copy_(v)
    assert _same(torch.ops.qcal.prefill_attention(q, kp, vp, 0, 0.125), full)


# ---------------------------------------------------------------- argument checks


def test_elementwise_steps_refuse_bad_arguments():
    x = _bf16(2, 64, seed=0)
    out = torch.empty_like(x)
    with pytest.raises(TypeError, match="add_rmsnorm: x must be a bf16 CPU tensor"):
        torch.ops.qcal.add_rmsnorm(x.float(), None, x[0], out, 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: weight must be"):
        torch.ops.qcal.add_rmsnorm(x, None, x[0, :32].contiguous(), out, 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: x must be a contiguous"):
        torch.ops.qcal.add_rmsnorm(x[:, :0], None, x[0, :0], out[:, :0], 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: delta must be"):
        torch.ops.qcal.add_rmsnorm(x, x[:1].contiguous(), x[0].contiguous(), out, 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: out must be"):
        torch.ops.qcal.add_rmsnorm(x, None, x[0].contiguous(), out[:, :63], 1e-5)
    with pytest.raises(ValueError, match="rope_store: src must be"):
        torch.ops.qcal.rope_store(x.view(2, 1, 64), torch.empty(2, 1, 32, dtype=BF16), x, x)
    with pytest.raises(ValueError, match="rope_store: give both cos and sin"):
        torch.ops.qcal.rope_store(x.view(2, 1, 64), x.view(2, 1, 64).clone(), x, None)
    with pytest.raises(ValueError, match="rope_store: cos must be"):
        torch.ops.qcal.rope_store(x.view(2, 1, 64), x.view(2, 1, 64).clone(), x[:1], x[:1])
    with pytest.raises(ValueError, match="rope_store: the kernel refused"):  # an odd head_dim
        torch.ops.qcal.rope_store(_bf16(2, 3, 5, seed=0), _bf16(2, 3, 5, seed=0), _bf16(2, 5, seed=0),
                                  _bf16(2, 5, seed=0))
    with pytest.raises(ValueError, match="rope_store: the kernel refused"):  # head_dim over 512
        torch.ops.qcal.rope_store(_bf16(1, 1, 514, seed=0), _bf16(1, 1, 514, seed=0), None, None)
    with pytest.raises(TypeError, match="silu_mul: gate must be a bf16"):
        torch.ops.qcal.silu_mul(x.float(), x)
    with pytest.raises(ValueError, match="silu_mul: up must be"):
        torch.ops.qcal.silu_mul(x, x[:1].contiguous())
    with pytest.raises(ValueError, match="silu_mul: gate must be contiguous"):
        torch.ops.qcal.silu_mul(x.t(), x.t().contiguous())


def test_attention_refuses_bad_arguments():
    q, k = _bf16(1, 4, 1, 64, seed=0), _bf16(1, 2, 10, 64, seed=1)
    att = torch.ops.qcal.decode_attention
    with pytest.raises(TypeError, match="decode_attention: q, k and v must be bf16"):
        att(q.float(), k.float(), k.float(), None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: q must be"):
        att(_bf16(1, 4, 2, 64, seed=0), k, k, None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: k and v must be"):
        att(q, k, _bf16(1, 2, 11, 64, seed=0), None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: k and v must be"):
        att(q, _bf16(1, 2, 10, 128, seed=0)[..., ::2], k, None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: unsupported heads 3 over 2"):
        att(_bf16(1, 3, 1, 64, seed=0), k, k, None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: unsupported heads 17 over 1"):
        att(_bf16(1, 17, 1, 64, seed=0), k[:, :1], k[:, :1], None, 0.1)
    for d in (8, 24, 272):
        with pytest.raises(ValueError, match=f"decode_attention: unsupported heads 2 over 2 KV heads, head_dim {d}"):
            att(_bf16(1, 2, 1, d, seed=0), _bf16(1, 2, 3, d, seed=0), _bf16(1, 2, 3, d, seed=0), None, 0.1)
    with pytest.raises(ValueError, match="decode_attention: mask must be a bool CPU tensor"):
        att(q, k, k, torch.ones(10), 0.1)
    with pytest.raises(ValueError, match="decode_attention: mask must be a bool CPU tensor"):
        att(q, k, k, torch.ones(9, dtype=torch.bool), 0.1)

    qs, ks, cs = _bf16(1, 9 * 64, seed=0), _bf16(1, 3 * 64, seed=0), _bf16(16, 64, seed=0)
    kc = torch.zeros(3, 16, 64, dtype=BF16)
    step = torch.ops.qcal.decode_step_attention
    for pos in (16, -1):
        with pytest.raises(ValueError, match=f"decode_step_attention: pos {pos} is outside"):
            step(qs, ks, ks, kc, kc.clone(), pos, cs, cs, 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: k must be"):
        step(qs, ks[:, :96].contiguous(), ks, kc, kc.clone(), 0, cs, cs, 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: q must be"):
        step(qs[:, :100].contiguous(), ks, ks, kc, kc.clone(), 0, cs, cs, 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: q must be"):  # 17 query heads a KV head
        step(_bf16(1, 51 * 64, seed=0), ks, ks, kc, kc.clone(), 0, cs, cs, 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: cos and sin"):
        step(qs, ks, ks, kc, kc.clone(), 3, cs[:3].contiguous(), cs[:3].contiguous(), 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: k_cache and v_cache"):
        step(qs, ks, ks, kc, kc[:, :8].contiguous(), 0, cs, cs, 0.1)
    with pytest.raises(ValueError, match="decode_step_attention: head_dim 8"):
        z = torch.zeros(3, 4, 8, dtype=BF16)
        step(_bf16(1, 24, seed=0), _bf16(1, 24, seed=0), _bf16(1, 24, seed=0), z, z.clone(), 0, cs[:, :8], cs[:, :8],
             0.1)
    with pytest.raises(TypeError, match="decode_step_attention: q, k, v, the caches"):
        step(qs.float(), ks, ks, kc, kc.clone(), 0, cs, cs, 0.1)

    x = _bf16(2, 4, 16, seed=0)
    pre = torch.ops.qcal.prefill_attention
    with pytest.raises(ValueError, match="prefill_attention: unsupported"):  # start + n past the cache
        pre(x, x[:, :1].transpose(0, 1), x[:, :1].transpose(0, 1), 5, 0.25)
    with pytest.raises(ValueError, match="prefill_attention: unsupported"):
        pre(x, _bf16(2, 10, 16, seed=0), _bf16(2, 10, 16, seed=0), -1, 0.25)
    with pytest.raises(ValueError, match="prefill_attention: unsupported"):  # 4 heads over 3 KV heads
        pre(x, _bf16(3, 10, 16, seed=0), _bf16(3, 10, 16, seed=0), 0, 0.25)
    with pytest.raises(ValueError, match="prefill_attention: unsupported"):
        pre(_bf16(2, 2, 272, seed=0), _bf16(2, 10, 272, seed=0), _bf16(2, 10, 272, seed=0), 0, 0.25)
    with pytest.raises(ValueError, match="prefill_attention: q must be"):  # k and v strides differ
        pre(x, _bf16(2, 10, 16, seed=0), _bf16(2, 20, 16, seed=0)[:, :10], 0, 0.25)
    with pytest.raises(TypeError, match="prefill_attention: q, k and v must be bf16"):
        pre(x.float(), _bf16(2, 10, 16, seed=0), _bf16(2, 10, 16, seed=0), 0, 0.25)


def _hostile_logits(kind: int, m: int, v: int, g: torch.Generator) -> torch.Tensor:
    """Rows torch.argmax has rules for: ties, NaNs of both signs, signed zeros, infinities, denormals."""
    t = torch.randn(m, v, generator=g)
    if kind == 1:
        t = torch.randint(-3, 3, (m, v), generator=g).float()  # many ties of the largest
    elif kind == 2:
        t[t > 1.5] = float("nan")
    elif kind == 3:
        t[t > 1.5] = -float("nan")  # a negative NaN is still the argmax
    elif kind == 4:
        t = torch.full((m, v), -float("inf"))
        t[:, 5::7] = 0.0
        t[:, 3::7] = -0.0  # -0 == +0: the first zero wins
    elif kind == 5:
        t = torch.full((m, v), -float("inf"))
    elif kind == 6:
        t = t * 1e-39  # denormal
        t[:, 4::9] = float("inf")
    return t.to(BF16)


@pytest.mark.native_ops("argmax_rows")
@pytest.mark.parametrize("v", [1, 2, 15, 16, 17, 255, 49152])
@pytest.mark.parametrize("kind", range(7))
def test_argmax_rows_is_torch_argmax(v, kind):
    from qcal.runtime.base import argmax_last

    g = torch.Generator().manual_seed(1000 * kind + v)
    x = _hostile_logits(kind, 3, v, g)
    want = x.argmax(-1, keepdim=True)
    got = torch.ops.qcal.argmax_rows(x)
    assert got.dtype == torch.long and torch.equal(got, want)
    assert torch.equal(argmax_last(x), want) and torch.equal(argmax_last(x.float()), want)  # fp32: PyTorch's


@pytest.mark.native_ops("argmax_rows")
def test_argmax_rows_refuses_bad_arguments():
    x = _bf16(2, 64, seed=0)
    with pytest.raises(TypeError, match="argmax_rows: x must be a bf16 CPU tensor"):
        torch.ops.qcal.argmax_rows(x.float())
    with pytest.raises(ValueError, match=r"argmax_rows: x must be a contiguous \(M, V\) with V >= 1"):
        torch.ops.qcal.argmax_rows(x[0])
    with pytest.raises(ValueError, match="V >= 1"):
        torch.ops.qcal.argmax_rows(x[:, :0])
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qcal.argmax_rows(x.t())
