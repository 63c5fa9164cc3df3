"""Clipping search: each weight group's range chosen against the output error its rounding causes on the calibration
inputs, not the group's min/max.

For a linear ``y = W x`` quantized to ``Q(W)``, the rounding error on an input ``x`` is ``(W - Q(W)) x``; its mean
square over the calibration inputs, with the inputs' cross terms left out, is ``Σ_ij E[x_j²] (w_ij - q_ij)²``
(llama.cpp's importance matrix weighs its scale search the same way). Per weight group the min/max range is shrunk
by factors ``1, 0.98, ..., 0.5`` and the factor with the lowest weighted error kept (factor 1 is min/max: never
worse). ``E[x_j²]`` comes from one float forward over the calibration inputs. The ``clip-`` scheme prefix applies it
to round-to-nearest schemes (``clip-int4wo-64``) and inside GPTQ (``clip-gptq-int4-64``: each static group's range
searched the same way before the solve).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..granularity import block_size_for
from ..nn import QLinear, unquantized
from ..observers import MSEObserver
from ..primitives import block_minmax, choose_qparams_from_minmax, fake_quantize, scale_dtype_for

__all__ = ["input_mean_squares", "clip_search", "clip_weights"]


@torch.no_grad()
def input_mean_squares(model: nn.Module, inputs: Sequence, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``E[x_j²]`` of each input channel of ``modules`` (``{name: module}`` inside ``model``) over one float forward
    of ``model`` on each of ``inputs`` (quantized modules run unquantized; under ``torch.distributed`` every process's
    inputs count). A module that never ran is left out."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name].add_(sq)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with unquantized(model):
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import torch.distributed as dist

        for name in modules:  # every rank, same order: a module no rank ran stays out
            total = sums.get(name, torch.zeros(modules[name].in_features))
            n = torch.tensor([float(counts.get(name, 0))])
            dist.all_reduce(total)
            dist.all_reduce(n)
            if n.item() > 0:
                sums[name], counts[name] = total, int(n.item())
    return {n: sums[n] / counts[n] for n in sums}


def clip_search(module: QLinear, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """``(scale, zero_point, error, min/max error)`` for ``module``'s weight spec: each block's range shrunk to
    minimise ``Σ importance_j (w_ij - q_ij)²`` (``importance``: one entry per input channel)."""
    spec = module.weight_spec
    w = module.weight_2d().detach().float()
    if importance.shape != (w.shape[1],):
        raise ValueError(f"clip search: {module.qcal_name} has {w.shape[1]} input channels, the importance "
                         f"{tuple(importance.shape)}")
    obs = MSEObserver(spec.qtype, spec.granularity, spec.symmetric, momentum=None, name=module.qcal_name)
    obs.integer_zero_point = spec.integer_zero_point
    block = block_size_for(spec.granularity, tuple(w.shape), module.qcal_name)
    imp = importance.float().clamp(min=0)[None, :]
    mn, mx = obs.batch_range(w, block, imp)
    dtype = scale_dtype_for(module.weight.dtype)
    scale, zp = choose_qparams_from_minmax(mn, mx, spec.qtype, spec.symmetric, dtype, spec.integer_zero_point)
    base_s, base_zp = choose_qparams_from_minmax(*block_minmax(w, block), spec.qtype, spec.symmetric, dtype,
                                                 spec.integer_zero_point)

    def err(s, z) -> float:
        return float(((fake_quantize(w, s, z, spec.qtype) - w).pow(2) * imp).sum())
    return scale, zp, err(scale, zp), err(base_s, base_zp)


def clip_weights(model: nn.Module, inputs: Sequence, *, progress: bool = True) -> dict[str, dict]:
    """Search the weight range of every quantized, not yet frozen linear in ``model`` with integer weights (in
    place: their weight qparams are fixed) from one float forward over ``inputs``; returns ``{name: {"error",
    "minmax_error"}}`` (the importance-weighted squared error, relative to ``Σ importance_j w_ij²``)."""
    from tqdm.auto import tqdm

    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, QLinear) and not m.frozen and m.weight_spec is not None
               and not m.weight_spec.qtype.is_floating_point}
    if not targets:
        raise ValueError("clip search: the model has no quantized linear with integer weights to search")
    stats = input_mean_squares(model, inputs, targets)
    report: dict[str, dict] = {}
    for name, m in tqdm(targets.items(), desc="clip search", disable=not progress, leave=False):
        if name not in stats:  # never ran: nothing to weigh its error by; min/max stays
            continue
        scale, zp, e, base = clip_search(m, stats[name])
        m.fix_weight_qparams(scale, zp)
        ref = float((m.weight_2d().detach().float().pow(2) * stats[name][None, :]).sum()) or 1.0
        report[name] = {"error": e / ref, "minmax_error": base / ref}
    return report
