"""AWQ (Lin et al., 2023): scale each input channel of a linear before rounding, by how strongly the calibration
activations drive it, and fold the inverse scale into whatever produces that input.

For linears ``W`` reading ``x`` and a positive vector ``s`` over the input channels, ``W x = (W diag(s))
(x / s)``: rounding ``W diag(s)`` protects the salient channels (large ``s``) at the others' expense. The division
is folded into the producer, so the float model computes the same function:

* q/k/v after the block's input RMSNorm, gate/up after the post-attention RMSNorm: the norm's weight;
* ``down_proj`` after ``up_proj`` (gated MLP): ``up_proj``'s rows;
* ``o_proj`` after ``v_proj`` when they have the same width (no grouped-query sharing): ``v_proj``'s rows.

Per group of linears sharing an input, ``s = rms(x)^α`` (normalised to a geometric mean of 1) with ``α`` on a
grid in ``[0, 1)`` chosen to minimise the output error ``Σ tr(Δ H Δᵀ)`` of round-to-nearest in the target format,
``Δ = W - Q(W diag(s)) diag(s)⁻¹``, ``H = XᵀX / n`` from the calibration inputs; ``α = 0`` (no scaling, plain
round-to-nearest) is a candidate, so the error never grows. Blocks are walked in order
(:mod:`qcal.algorithms.sequential`), each calibrated on the outputs of the blocks before it, already scaled
(float); the result is a float model to quantize next (round-to-nearest or GPTQ). Before GPTQ the search can run on
GPTQ's own pass instead (:func:`awq_block` as ``GPTQQuantizer(prepare_block=...)``, what ``awq-gptq-*`` does): each
block is scaled from the float statistics of its inputs as the quantized blocks before it produce them, then
solved, one forward per block less than two separate passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..granularity import PerAxis, PerGroup
from ..nn import unquantized
from ..nn.hadamard import input_hadamard
from ..primitives import choose_qparams, fake_quantize
from ..qtypes import qtype
from .rotation import _is_rmsnorm
from .sequential import block_grams, run_sequential

__all__ = ["awq_block", "awq_error", "awq_search", "awq_smooth"]

# first consumer -> (producer, the consumers sharing its input): a norm folds 1/s into its weight, a linear
# into its output rows
_GROUPS = {
    "q_proj": ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("post_attention_layernorm", ("gate_proj", "up_proj")),
    "down_proj": ("up_proj", ("down_proj",)),
    "o_proj": ("v_proj", ("o_proj",)),
}


def _rtn(w: torch.Tensor, qt: qtype, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest with min/max qparams, dequantized."""
    scale, zp = choose_qparams(w, qt, PerGroup(group_size) if group_size else PerAxis(0), symmetric,
                               scale_dtype=torch.float32)
    return fake_quantize(w, scale, zp, qt)


def awq_error(weights: Sequence[torch.Tensor], h: torch.Tensor, s: torch.Tensor, qt: qtype,
              group_size: int | None, symmetric: bool) -> float:
    """``Σ tr(Δ H Δᵀ)`` over ``weights`` (each ``(out, in)``), ``Δ = W - Q(W diag(s)) diag(s)⁻¹``."""
    total = 0.0
    for w in weights:
        w = w.detach().float()
        delta = w - _rtn(w * s[None, :], qt, group_size, symmetric) / s[None, :]
        total += float(((delta @ h) * delta).sum())
    return total


def awq_search(weights: Sequence[torch.Tensor], h: torch.Tensor, qt: qtype, group_size: int | None,
               symmetric: bool, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """``(s, error, error without scaling)``: the best ``s = rms(x)^α`` (``α = i / grid``) for linears sharing
    the input whose Gram matrix is ``h``."""
    rms = h.diagonal().clamp(min=0).sqrt().float()
    rms = torch.where(rms > 0, rms, rms[rms > 0].min() if (rms > 0).any() else torch.ones_like(rms))
    base = awq_error(weights, h, torch.ones_like(rms), qt, group_size, symmetric)
    best_s, best = torch.ones_like(rms), base
    for i in range(1, grid):
        s = rms.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        err = awq_error(weights, h, s, qt, group_size, symmetric)
        if err < best:
            best_s, best = s, err
    return best_s, best, base


def _fold(block: nn.Module, producer: str, consumers: Sequence[str], s: torch.Tensor) -> None:
    prod = block.get_submodule(producer)
    if isinstance(prod, nn.Linear):
        prod.weight.data = (prod.weight.detach().double() / s.double()[:, None]).to(prod.weight.dtype)
        if prod.bias is not None:
            prod.bias.data = (prod.bias.detach().double() / s.double()).to(prod.bias.dtype)
    else:
        prod.weight.data = (prod.weight.detach().double() / s.double()).to(prod.weight.dtype)
    for c in consumers:
        lin = block.get_submodule(c)
        lin.weight.data = (lin.weight.detach().double() * s.double()[None, :]).to(lin.weight.dtype)


@torch.no_grad()
def awq_block(block: nn.Module, states: Sequence, qt: qtype, group_size: int | None, symmetric: bool, *,
              grid: int = 20) -> dict[str, dict]:
    """Search and fold AWQ scales into one decoder ``block`` (float, in place) from its inputs ``states`` (the
    ``(args, kwargs)`` of each batch: one forward over them records each group's ``XᵀX / n``); returns
    ``{producer: {"error", "rtn_error"}}``. Run by :func:`awq_smooth`, or on GPTQ's own pass before it solves the
    block (``GPTQQuantizer(prepare_block=...)``: one forward less per block)."""
    groups = [g for g in (_find_group(block, p, c) for p, c in _GROUPS.values()) if g is not None]
    with unquantized(block):  # on GPTQ's pass the linears are already swapped: record the float function
        grams = block_grams(block, states, {names[0]: block.get_submodule(names[0]) for _, names in groups})
    report: dict[str, dict] = {}
    for prod_name, names in groups:
        if names[0] not in grams:  # the group never ran (e.g. a block that skips its MLP)
            continue
        weights = [block.get_submodule(n).weight for n in names]
        s, err, base = awq_search(weights, grams.pop(names[0]).float(), qt, group_size, symmetric, grid)
        _fold(block, prod_name, names, s)
        report[prod_name] = {"error": err, "rtn_error": base}
    return report


@torch.no_grad()
def awq_smooth(model: nn.Module, inputs: Sequence, qt: qtype, group_size: int | None, symmetric: bool, *,
               grid: int = 20, batch_size: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Search and fold AWQ scales into ``model`` (float, in place) for quantization to ``qt`` with ``group_size``
    (None: per channel) and ``symmetric``; returns ``{"<block>.<producer>": {"error", "rtn_error"}}``. The float
    function is unchanged."""
    report: dict[str, dict] = {}
    blocks = itertools.count()

    def prepare(block: nn.Module, states: Sequence) -> None:
        index = next(blocks)
        for prod, r in awq_block(block, states, qt, group_size, symmetric, grid=grid).items():
            report[f"{index}.{prod}"] = r

    run_sequential(model, inputs, lambda block: {}, lambda *a: 0.0, true_sequential=False, batch_size=batch_size,
                   progress=progress, desc="AWQ", prepare=prepare)
    return report


def _find_group(block: nn.Module, producer: str, consumers: Sequence[str]) -> tuple[str, list[str]] | None:
    """(producer name, consumer names) of a group in ``block``, or None when its shapes do not fold exactly."""
    mods = dict(block.named_modules())
    hits = [n for n in mods if n.rpartition(".")[2] == consumers[0] and isinstance(mods[n], nn.Linear)]
    if not hits:
        return None
    prefix = hits[0][: -len(consumers[0])]  # the group's parent, e.g. "self_attn."
    names = [prefix + c for c in consumers]
    if not all(isinstance(mods.get(n), nn.Linear) and input_hadamard(mods[n]) is None for n in names):
        return None  # a transformed input is not the producer's output: scales would not fold
    if producer.endswith("layernorm"):  # a block-level RMSNorm (weight * x / rms(x))
        prod = mods.get(producer)
        ok = _is_rmsnorm(prod) and prod.weight.shape[0] == mods[names[0]].in_features
        return (producer, names) if ok else None
    prod_name = prefix + producer
    prod = mods.get(prod_name)
    if not isinstance(prod, nn.Linear) or prod.out_features != mods[names[0]].in_features:
        return None
    return prod_name, names
