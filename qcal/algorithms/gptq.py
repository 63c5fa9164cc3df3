"""GPTQ (Frantar et al., 2022): quantize a linear's weight column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's inputs, so that ``‖W X - Q X‖`` stays small on the calibration data.

Layout: :func:`gptq_quantize_weight` is the algorithm on one weight matrix (pure function);
:class:`GPTQQuantizer` is the driver that walks a model block by block
(:mod:`qcal.algorithms.sequential`) and writes the result into qcal ``QLinear`` modules: the
dequantized GPTQ weight goes into ``weight.data`` and the qparams GPTQ used are fixed, so
``qcal.freeze`` re-quantizes to exactly GPTQ's integer codes and save/load/QAT just work.

Group boundaries always stay contiguous in the original column order (the layout every qcal
kernel reads). ``act_order`` only changes the order in which columns are quantized; with groups
it implies static groups (qparams computed from the whole weight up front), so no permutation
is needed at inference. The permutation is recorded in :attr:`GPTQQuantizer.report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..granularity import PerAxis, PerGroup
from ..nn import QLinear
from ..observers import MSEObserver
from ..primitives import choose_qparams, choose_qparams_from_minmax, fake_quantize, quantize
from ..qtypes import qint2, qint3, qint4, qint8, qtype
from ..quantize import freeze, quantized_modules
from ..quantize import quantize as swap_modules
from .inputs import InputRecorder
from .sequential import BlockStates, _distributed, run_sequential

__all__ = ["GPTQResult", "gptq_quantize_weight", "GPTQQuantizer", "Int4WeightOnlyGPTQQuantizer", "InputRecorder"]

log = logging.getLogger(__name__)

_QTYPES = {2: qint2, 3: qint3, 4: qint4, 8: qint8}
_MAX_DAMPING_TRIES = 8


@dataclass
class GPTQResult:
    """What GPTQ produced for one weight matrix ``(out, in)``."""

    weight: torch.Tensor  # dequantized GPTQ weight, dtype of the input weight
    codes: torch.Tensor  # int8 codes, (out, in)
    scale: torch.Tensor  # (out, 1) per channel or (out, in // group_size)
    zero_point: torch.Tensor | None  # float zero-point, same shape as scale; None when symmetric
    perm: torch.Tensor | None  # column processing order (act_order), else None
    error: float  # ‖(W - Q) X‖² / ‖W X‖² on the calibration inputs
    rtn_error: float  # the same for round-to-nearest with min/max qparams
    damping: float  # fraction of mean(diag H) finally added to the diagonal (inf: fell back to RTN)


def _hessian_inverse_cholesky(h: torch.Tensor, percdamp: float, shrink: float = 0.0,
                               perm: torch.Tensor | None = None,
                               dead: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H' + d·mean(diag H')·I)⁻¹``, ``H'`` being ``h`` with its rows and columns in
    the order ``perm``, the diagonal entries ``dead`` set to 1 and shrunk towards its diagonal by ``shrink``.
    ``h`` is never written.

    One ``n x n`` matrix is allocated: it is filled from ``h`` row block by row block, damped, factorised,
    inverted and factorised again in place (a column-major view, the layout LAPACK works in, so no copies).
    If the factorisation fails, the damping ``d`` grows tenfold and the matrix is refilled and retried; as a last
    resort the factor is diagonal, which turns GPTQ into round-to-nearest for this layer (never NaN).
    """
    n = h.shape[0]
    diag = h.diagonal().clone()
    if dead is not None:
        diag[dead] = 1
    if perm is not None:
        diag = diag[perm]
    mean_diag = diag.mean()
    a = torch.empty_like(h)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    col = a.mT  # the same storage read column-major: LAPACK's layout (h is symmetric)
    damp = percdamp
    for _ in range(_MAX_DAMPING_TRIES):
        rows = (1 << 20) // max(n, 1) or 1  # row blocks of ~4 MiB: the permutation needs no second matrix
        for r in range(0, n, rows):
            idx = slice(r, r + rows) if perm is None else perm[r:r + rows]
            a[r:r + rows] = h[idx] if perm is None else h[idx][:, perm]
        if dead is not None:
            a.diagonal()[dead if perm is None else dead[perm]] = 1
        if shrink:  # shrunk towards its diagonal, then damped
            a.mul_(1 - shrink)
        a.diagonal().add_(shrink * diag + damp * mean_diag)
        torch.linalg.cholesky_ex(col, out=(col, info))
        if info == 0:
            torch.cholesky_inverse(col, out=col)
            torch.linalg.cholesky_ex(col, upper=True, out=(col, info))
            if info == 0 and torch.isfinite(col).all():
                return col, damp
        damp = damp * 10 if damp > 0 else 1e-4
        log.warning("GPTQ: Hessian not positive definite, retrying with damping %.3g", damp)
    log.error("GPTQ: Hessian could not be factorised; falling back to round-to-nearest for this layer")
    return torch.diag(diag.clamp(min=1e-8).rsqrt()), float("inf")


QParamsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _group_qparams(block: torch.Tensor, qt: qtype, symmetric: bool, dtype: torch.dtype, mse: bool | str,
                   integer_zp: bool = False, qparams_fn: QParamsFn | None = None,
                   importance: torch.Tensor | None = None):
    """(scale, zero_point) of each row of ``block`` as ``(out,)`` float32 vectors: from the row's
    min/max, with ``mse`` from the shrunk range minimising ``Σ|w - q(w)|^2.4`` (as the
    reference GPTQ's ``mse`` grid search), with ``mse="act"`` minimising ``Σ importance·(w - q(w))²`` (the output
    error on the calibration inputs, their cross terms left out), or from ``qparams_fn(block, importance)``."""
    if qparams_fn is not None:
        scale, zp = qparams_fn(block, importance)
        return scale.float(), None if zp is None else zp.float()
    if mse:
        act = mse == "act" and importance is not None
        obs = MSEObserver(qt, PerAxis(0), symmetric, momentum=None, norm=2.0 if act else 2.4)
        obs.integer_zero_point = integer_zp
        mn, mx = obs.batch_range(block, (1, block.shape[1]), importance[None, :] if act else None)
        mn, mx = mn[:, 0], mx[:, 0]
    else:
        mn, mx = block.amin(1), block.amax(1)
    scale, zp = choose_qparams_from_minmax(mn, mx, qt, symmetric, dtype, integer_zp)
    return scale.float(), None if zp is None else zp.float()


def _refit_scales(w0: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, h: torch.Tensor,
                  storage: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric groups: with GPTQ's codes fixed, each row's group scales refitted by least squares to the output
    error ``(w0 - ŵ) H (w0 - ŵ)ᵀ`` (one small ``G x G`` system per row), stored as ``storage`` rounds them; a row
    keeps its old scales unless the new ones lower its error. Returns the new ``(q, scale)``."""
    rows, cols = w0.shape
    n_groups = scale.shape[1]
    g = cols // n_groups
    codes = torch.round(q.reshape(rows, n_groups, g) / scale[:, :, None])
    h4 = h.reshape(n_groups, g, n_groups, g)
    a = torch.einsum("rgi,rgih->rgh", codes, torch.einsum("gihj,rhj->rgih", h4, codes))
    b = torch.einsum("rgi,rgi->rg", codes, (w0 @ h).reshape(rows, n_groups, g))
    empty = (codes == 0).all(2)  # a group of zero codes: any scale, keep the old one
    eye = torch.eye(n_groups, device=w0.device)
    a = torch.where(empty[:, :, None] | empty[:, None, :], eye * 1.0, a)
    b = torch.where(empty, scale, b)
    a = a + eye * (1e-6 * a.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)[:, :, None])
    new, info = torch.linalg.solve_ex(a, b)
    new = storage(new)
    ok = (info == 0)[:, None] & torch.isfinite(new) & (new.abs() >= 2.0 ** -14)
    new = torch.where(ok, new, scale)
    q_new = (codes * new[:, :, None]).reshape(rows, cols)

    def err(x: torch.Tensor) -> torch.Tensor:
        d = w0 - x
        return ((d @ h) * d).sum(1)
    better = err(q_new) < err(q)
    return torch.where(better[:, None], q_new, q), torch.where(better[:, None], new, scale)


def _relative_error(delta: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)``: the output error on the inputs whose Gram matrix is ``h``."""
    den = ((w @ h) * w).sum()
    return float(((delta @ h) * delta).sum() / den) if den > 0 else 0.0


class _OneThread:
    """Run the column loop on one thread: its many small ops are latency-bound, and OpenMP
    synchronisation between threads costs more than it saves (5x on a busy 2-core machine)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qt: qtype,
    group_size: int | None = None,
    symmetric: bool = False,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool | str = False,
    integer_zero_point: bool = False,
    qparams_fn: QParamsFn | None = None,
    refit_scales: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shrink: float = 0.0,
) -> GPTQResult:
    """GPTQ on one ``(out, in)`` weight given ``hessian ∝ XᵀX`` of its inputs ``(in, in)``.

    ``group_size=None`` quantizes per output channel; ``mse`` searches each group's clipping
    range instead of taking its min/max (``"act"``: against the error weighted by the Hessian's diagonal, the
    calibration inputs' mean square per input channel). Quantization follows
    :mod:`qcal.primitives` (float zero-point when asymmetric), so re-quantizing the returned
    ``weight`` with ``scale``/``zero_point`` gives back ``codes`` exactly. ``integer_zero_point`` rounds
    the zero-points (asymmetric), and the error propagation sees the rounded ones. ``qparams_fn(block, importance)``
    replaces the min/max choice of each group's qparams: ``block`` is the group's ``(out, group)`` weights,
    ``importance`` the Hessian's diagonal over its columns (e.g. :func:`qcal.integrations.gguf.block_qparams`, a
    storage format's grid and float16 scales, searched against the importance). ``refit_scales`` (symmetric
    groups): after the propagation, each row's group scales are refitted by least squares against the output error
    with the codes fixed, and rounded by this function (e.g. to float16); rows keep the better of the two.
    ``shrink`` in [0, 1] propagates errors through ``(1 - shrink) H + shrink diag(H)``: 0 is GPTQ, 1 is
    round-to-nearest on the static groups (with ``qparams_fn``'s importance search: llama.cpp's importance-matrix
    quantization), in between trusts the calibration data's correlations less.
    """
    with _OneThread():
        return _gptq(weight, hessian, qt, group_size, symmetric, blocksize, percdamp, act_order, static_groups, mse,
                     integer_zero_point, qparams_fn, refit_scales, shrink)


def _gptq(weight, hessian, qt, group_size, symmetric, blocksize, percdamp, act_order, static_groups, mse,
          izp=False, qparams_fn=None, refit_scales=None, shrink=0.0):
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"GPTQ: shrink must be in [0, 1], got {shrink}")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian contains NaN or Inf; check the calibration inputs")
    dtype = weight.dtype
    w0 = weight.detach().float()
    rows, cols = w0.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"GPTQ: group_size={group_size} does not divide the input size {cols}")
    h = hessian.detach().float()  # the caller's matrix, never written (large for down_proj: no copy)
    w = w0.clone()
    dead = h.diagonal() == 0  # inputs that were always zero: any weight works, use 0 (their diagonal reads 1)
    if dead.any():
        w[:, dead] = 0
    else:
        dead = None
    importance = h.diagonal().clone()
    if dead is not None:
        importance[dead] = 1

    scale = torch.empty(rows, cols // g, device=w.device)
    zero = None if symmetric else torch.empty(rows, cols // g, device=w.device)
    static = static_groups or act_order or group_size is None
    if static:
        for j in range(cols // g):
            s, z = _group_qparams(w[:, j * g:(j + 1) * g], qt, symmetric, dtype, mse, izp, qparams_fn,
                                  importance[j * g:(j + 1) * g])
            scale[:, j] = s
            if zero is not None:
                zero[:, j] = z

    perm = None
    if act_order:  # columns with the largest input energy first
        perm = torch.argsort(importance, descending=True)
        w = w[:, perm]
    order = perm if perm is not None else torch.arange(cols, device=w.device)
    group_of = (order // g).tolist()

    hinv, damping = _hessian_inverse_cholesky(h, percdamp, shrink, perm, dead)
    q = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = group_of[col]
            if not static and col % g == 0:  # a new group: qparams from the updated weights
                s, z = _group_qparams(torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :g], qt, symmetric, dtype, mse, izp,
                                      qparams_fn, importance[col:col + g])
                scale[:, j] = s
                if zero is not None:
                    zero[:, j] = z
            zp = None if zero is None else zero[:, j:j + 1]
            column = w1[:, i:i + 1]
            qcol = fake_quantize(column, scale[:, j:j + 1], zp, qt)
            q[:, col:col + 1] = qcol
            e = (column - qcol) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy batch update of the later columns
    del hinv, w

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if refit_scales:
        if zero is not None or group_size is None:
            raise ValueError("GPTQ: refit_scales needs symmetric groups")
        hs = hessian.detach().float()
        if dead is not None:
            hs = hs.clone()
            hs[dead, dead] = 1
        q, scale = _refit_scales(w0, q, scale, hs, refit_scales)
    if qparams_fn is None:
        scale = scale.to(dtype)
        zero = None if zero is None else zero.to(dtype)
        gran = PerGroup(group_size) if group_size else PerAxis(0)
        rtn_s, rtn_z = choose_qparams(w0, qt, gran, symmetric, scale_dtype=dtype, integer_zero_point=izp)
    else:  # the format's own precision (float32 holds it); round-to-nearest on the format's grid
        rtn = [qparams_fn(w0[:, j * g:(j + 1) * g], None) for j in range(cols // g)]
        rtn_s = torch.stack([r[0] for r in rtn], 1)
        rtn_z = None if zero is None else torch.stack([r[1] for r in rtn], 1)
    codes = quantize(q, scale, zero, qt)
    hs = hessian.detach().float()
    return GPTQResult(
        weight=q.to(dtype),
        codes=codes,
        scale=scale,
        zero_point=zero,
        perm=perm,
        error=_relative_error(w0 - q, w0, hs),
        rtn_error=_relative_error(w0 - fake_quantize(w0, rtn_s, rtn_z, qt), w0, hs),
        damping=damping,
    )


class _FloatReference:
    """The float model's activations next to GPTQ's pass, for the asymmetric objective
    ``‖W X_float - Q X_quant‖²`` (GPTAQ, Li et al., 2025): each decoder block is first run unquantized on the float
    model's hidden states, recording every target linear's input ``X_float`` (and giving the next block's float
    states); as GPTQ's pass reaches a linear, its input ``X_quant`` (from the blocks and linears quantized before it)
    is captured, and :meth:`delta` gives ``(X_float - X_quant)ᵀ X_quant / n``. One batch, one process."""

    def __init__(self, targets: Callable[[nn.Module], dict[str, nn.Module]]) -> None:
        self.targets = targets
        self.states: list | None = None
        self.x_float: dict[str, torch.Tensor] = {}
        self.x_quant: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self._last: tuple | None = None  # (inputs' key, their product) of the last linear

    def prepare(self, block: nn.Module, states: Sequence) -> None:
        from ..nn import unquantized
        from .sequential import _run, _with_hidden

        self.close()
        if len(states) != 1:
            raise ValueError("GPTQ: float_target needs the calibration samples in one batch (equal lengths, "
                             "batch_size=None)")
        if self.states is None:  # the first block: both streams start from the same inputs
            self.states = list(states)
        layers = self.targets(block)
        seen: dict[tuple, torch.Tensor] = {}  # linears reading the same tensor share one record

        def record(name: str):
            def hook(module, args):
                x = args[0].detach()
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                self.x_float[name] = seen.setdefault(key, x.reshape(-1, x.shape[-1]).float())
            return hook

        def capture(name: str):
            def hook(module, args):
                if name not in self.x_quant:
                    self.x_quant[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            return hook

        handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
        try:
            with unquantized(block):
                outs = [_run(block, st) for st in self.states]
        finally:
            for h in handles:
                h.remove()
        self.states = [_with_hidden(st, out) for st, out in zip(self.states, outs, strict=True)]
        self.handles = [m.register_forward_pre_hook(capture(n)) for n, m in layers.items()]

    def delta(self, name: str) -> torch.Tensor | None:
        """``(X_float - X_quant)ᵀ X_quant / n`` of linear ``name`` (None when the two inputs are equal)."""
        xf, xq = self.x_float.pop(name, None), self.x_quant.pop(name, None)
        if xf is None or xq is None or xf.shape != xq.shape:
            raise RuntimeError(f"GPTQ: no float and quantized inputs recorded for {name}")
        key = (xf.data_ptr(), xq.data_ptr(), tuple(xq.shape))
        if self._last is None or self._last[0] != key:  # linears reading the same tensors share one product
            xq = xq.float()
            self._last = (key, None if torch.equal(xf, xq) else (xf - xq).T @ xq / xq.shape[0])
        return self._last[1]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.x_float, self.x_quant = {}, {}
        self._last = None


class GPTQQuantizer:
    """GPTQ for whole models: ``GPTQQuantizer(bits=4, groupsize=64).quantize(model, inputs)``.

    Linears already swapped by :func:`qcal.quantize` keep their weight spec (e.g. 8da4w); if
    the model has no quantized module yet, every ``nn.Linear`` selected by ``include`` /
    ``exclude`` is swapped for a ``QLinear`` with ``bits``/``groupsize``/``symmetric`` first.
    ``groupsize=None`` means per output channel. The result is a fake-quant model whose weight
    qparams are fixed; ``qcal.freeze(model)`` materialises the integers.

    ``batch_size=None`` runs all calibration samples through a block at once (one forward per
    block, the fastest on CPU); an int bounds activation memory at the cost of one forward per
    stage. ``mse=True`` searches each group's clipping range (the reference GPTQ's ``mse`` grid)
    instead of using its min/max; ``mse="act"`` weighs that search by each input channel's mean square.
    ``gguf_type="Q4_0"`` / ``"Q4_1"`` / ``"Q8_0"`` targets llama.cpp's block formats
    (groups of 32, each linear's own type from its spec; Q4_0 / Q8_0 scales searched against the input energy,
    float16 as they are chosen so the error propagation sees them, and refitted to the codes; export with
    ``qcal.export(model, "m.gguf", format="gguf")``). ``shrink`` blends the Hessian with its diagonal (see
    :func:`gptq_quantize_weight`). After :meth:`quantize`, :attr:`report` holds each layer's errors and
    :attr:`quantize_time_s` the time taken. ``prepare_block(block, states)`` runs on each decoder block and its
    calibration inputs before GPTQ solves it: a float transform calibrated on the same pass (e.g.
    :func:`qcal.algorithms.awq.awq_block`, one forward per block less than a separate pass). ``float_target``
    (GPTAQ): each linear is fitted to the float model's output on the float model's inputs rather than to its own
    output on the inputs the quantized layers before it give (``‖W X_float - Q X_quant‖²``), correcting the error
    those layers left; one extra forward per block and the block's float inputs in memory.
    """

    def __init__(
        self,
        bits: int = 4,
        groupsize: int | None = 64,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        true_sequential: bool = True,
        symmetric: bool = False,
        *,
        zero_point: str = "float",
        gguf_type: str | None = None,
        shrink: float = 0.0,
        mse: bool | str = False,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = "lm_head",
        batch_size: int | None = None,
        blocks: str | None = None,
        progress: bool = True,
        prepare_block: Callable[[nn.Module, Sequence], Any] | None = None,
        float_target: bool = False,
    ) -> None:
        self.gguf_type = gguf_type
        if gguf_type is not None:  # GGUF's block formats: groups of 32, float16 scales (see qcal.integrations.gguf)
            from ..integrations.gguf import GGUF_TYPES

            if gguf_type not in GGUF_TYPES:
                raise ValueError(f"GPTQ: gguf_type={gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
            bits, groupsize, symmetric = (8 if gguf_type == "Q8_0" else 4), 32, gguf_type != "Q4_1"
            zero_point = "int" if gguf_type == "Q4_1" else zero_point
        if bits not in _QTYPES:
            raise ValueError(f"GPTQ: bits={bits} is not supported; choose one of {sorted(_QTYPES)}")
        if blocksize <= 0 or percdamp < 0:
            raise ValueError(f"GPTQ: need blocksize > 0 and percdamp >= 0, got {blocksize}, {percdamp}")
        self.qtype = _QTYPES[bits]
        self.groupsize = groupsize
        self.blocksize = blocksize
        self.percdamp = percdamp
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"GPTQ: shrink must be in [0, 1], got {shrink}")
        self.shrink = shrink
        self.act_order = act_order
        self.static_groups = static_groups
        self.true_sequential = true_sequential
        self.symmetric = symmetric
        self.zero_point = zero_point
        self.mse = mse
        self.include = include
        self.exclude = exclude
        self.batch_size = batch_size
        self.blocks = blocks
        self.progress = progress
        self.prepare_block = prepare_block
        self.float_target = float_target
        self._reference: _FloatReference | None = None
        self.report: dict[str, dict] = {}
        self.quantize_time_s: float | None = None

    @staticmethod
    def _targets(block: nn.Module) -> dict[str, QLinear]:
        return {n: m for n, m in block.named_modules()
                if isinstance(m, QLinear) and not m.frozen and m.weight_spec is not None
                and not m.weight_spec.qtype.is_floating_point}

    def _retarget(self, name: str, module: QLinear, hessian: torch.Tensor) -> None:
        """``W ← W + W ΔC (H + λI)⁻¹``: the weight whose output on the quantized inputs best matches the float
        layer's output on the float inputs (least squares), which GPTQ then rounds (GPTAQ's asymmetric target)."""
        dc = self._reference.delta(name) if self._reference is not None else None
        if dc is None:
            return
        h = hessian.float().clone()
        h.diagonal().add_(self.percdamp * h.diagonal().mean() + 1e-12)
        w = module.weight_2d().detach().float()
        fix = torch.linalg.solve(h, (w @ dc).T).T
        if torch.isfinite(fix).all():
            module.weight.data.copy_((w + fix).reshape(module.weight.shape).to(module.weight.dtype))

    def _solve(self, name: str, module: QLinear, hessian: torch.Tensor) -> float:
        self._retarget(name, module, hessian)
        spec = module.weight_spec
        qparams_fn = refit = None
        if self.gguf_type is not None:  # each linear's own GGUF type (a recipe may mix Q4_0 and Q4_1)
            from ..integrations.gguf import block_qparams, gguf_type

            kind = gguf_type(module)
            if kind is None:
                raise ValueError(f"GPTQ: {module.qcal_name} ({spec.qtype}) maps onto no GGUF block type")
            qparams_fn = lambda block, importance: block_qparams(block, kind, importance)  # noqa: E731
            if kind != "Q4_1":  # symmetric: scales refitted to the codes, stored in float16
                refit = lambda s: s.to(torch.float16).float()  # noqa: E731
        res = gptq_quantize_weight(
            module.weight_2d(), hessian, spec.qtype, spec.group_size, spec.symmetric,
            blocksize=self.blocksize, percdamp=self.percdamp, act_order=self.act_order,
            static_groups=self.static_groups, mse=self.mse, integer_zero_point=spec.integer_zero_point,
            qparams_fn=qparams_fn, refit_scales=refit, shrink=self.shrink,
        )
        module.weight.data.copy_(res.weight.reshape(module.weight.shape))
        module.fix_weight_qparams(res.scale, res.zero_point)
        self.report[module.qcal_name] = {"error": res.error, "rtn_error": res.rtn_error,
                                         "damping": res.damping, "perm": res.perm}
        log.info("GPTQ %s: relative output error %.4g (round-to-nearest %.4g)",
                 module.qcal_name, res.error, res.rtn_error)
        return res.error

    @torch.no_grad()
    def quantize(self, model: nn.Module, inputs: Sequence) -> nn.Module:
        """Quantize ``model`` in place from calibration ``inputs`` (token-id tensors for a
        Hugging Face model, see :class:`InputRecorder`); returns the model. All or nothing: on an error or an
        interrupt the model is restored as it was (:mod:`qcal.transaction`)."""
        from ..transaction import transaction

        with transaction(model):
            return self._quantize(model, inputs)

    def _quantize(self, model: nn.Module, inputs: Sequence) -> nn.Module:
        start = time.perf_counter()
        if self.float_target and (isinstance(inputs, BlockStates) or self.batch_size is not None or _distributed()):
            raise ValueError("GPTQ: float_target needs the whole model in memory, batch_size=None and one process "
                             "(the float and the quantized activations of a block side by side)")
        if not any(True for _ in quantized_modules(model)):
            swap_modules(model, weights=self.qtype, group_size=self.groupsize, symmetric=self.symmetric,
                         include=self.include, exclude=self.exclude, zero_point=self.zero_point)
        self.report = {}
        was_training = model.training
        model.eval()
        prepare = self.prepare_block
        if self.float_target:
            self._reference = reference = _FloatReference(self._targets)

            def prepare(block, states):
                if self.prepare_block is not None:
                    self.prepare_block(block, states)
                reference.prepare(block, states)
        try:
            inputs = inputs if isinstance(inputs, BlockStates) else list(inputs)
            run_sequential(model, inputs, self._targets, self._solve, true_sequential=self.true_sequential,
                           batch_size=self.batch_size, blocks=self.blocks, progress=self.progress, desc="GPTQ",
                           prepare=prepare)
        finally:
            model.train(was_training)
            if self._reference is not None:
                self._reference.close()
                self._reference = None
        self.quantize_time_s = time.perf_counter() - start
        left = [n for n, m in quantized_modules(model) if n not in self.report and self._targets(m)]
        if left:
            log.info("GPTQ: %d quantized linears outside the decoder blocks keep round-to-nearest: %s",
                     len(left), ", ".join(left))
        errs = [r["error"] for r in self.report.values()] or [float("nan")]
        rtn = [r["rtn_error"] for r in self.report.values()] or [float("nan")]
        summary = (f"GPTQ: {len(self.report)} linears quantized in {self.quantize_time_s:.1f} s; mean relative "
                   f"output error {sum(errs) / len(errs):.4g} (round-to-nearest {sum(rtn) / len(rtn):.4g})")
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(summary)
        log.info(summary)
        return model


class Int4WeightOnlyGPTQQuantizer(GPTQQuantizer):
    """The torchao-style entry point: int4 asymmetric groups (A16W4), returned frozen.

    ``Int4WeightOnlyGPTQQuantizer(blocksize, percdamp, groupsize).quantize(model, inputs)``;
    other keywords as :class:`GPTQQuantizer`.
    """

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, groupsize: int = 64, **kwargs) -> None:
        super().__init__(bits=4, groupsize=groupsize, blocksize=blocksize, percdamp=percdamp,
                         symmetric=False, **kwargs)

    def quantize(self, model: nn.Module, inputs: Sequence) -> nn.Module:
        return freeze(super().quantize(model, inputs))
