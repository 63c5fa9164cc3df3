"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then W8A8.

For a linear ``y = W x`` and a positive vector ``s`` over its input channels,
``y = (W diag(s)) (x / s)``. With ``s = max|X|^α / max|W|^(1-α)`` (per input channel) the
activations ``x / s`` lose their outlier channels and the weights absorb them, so both quantize
well to int8. The division is folded into whatever produces ``x``, so the float model computes
exactly the same function and no runtime op is added:

* a RMSNorm/LayerNorm whose output feeds the linears (q/k/v share the input norm, gate/up share
  the post-attention norm): its weight (and bias) are divided by ``s``; found by watching which
  norm output each linear reads during calibration, and checked numerically before it is kept;
* ``up_proj -> down_proj`` (gated MLP: ``down(act(gate x) * up x)``): rows of ``up_proj``;
* ``v_proj -> o_proj``: rows of ``v_proj`` (with grouped-query attention, the query heads that
  share a key/value head share ``s``).

A linear with no producer to fold into stays unsmoothed (it is still quantized). Activation
statistics are recorded by qcal ``MinMaxObserver`` s with one range per input channel.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..calibration import calibrate
from ..granularity import PerAxis
from ..nn.hadamard import input_hadamard
from ..observers import MinMaxObserver
from ..qtypes import qint8
from ..quantize import freeze, match_names, quantize
from .sequential import model_device, to_device

__all__ = ["ActivationStats", "smoothing_scale", "smooth", "smooth_model", "smoothquant_w8a8",
           "swap_linear_with_smooth_fq_linear", "smooth_fq_linear_to_inference"]

log = logging.getLogger(__name__)

# consumer -> producer among sibling linears whose folding is exact (see module docstring)
_LINEAR_PRODUCERS = {"down_proj": "up_proj", "o_proj": "v_proj"}


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()) and isinstance(
        w, torch.Tensor) and w.dim() == 1


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride()


class ActivationStats:
    """Per-input-channel range of the selected ``nn.Linear`` inputs, and the norm each one reads.

    ``with stats: model(x)`` records; outside the context nothing is hooked.
    """

    def __init__(self, model: nn.Module, include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = "lm_head") -> None:
        self.model = model
        self.linears = {n: m for n, m in match_names(model, include, exclude) if type(m) is nn.Linear}
        self.observers = {n: MinMaxObserver(qint8, PerAxis(1), name=f"{n} (smoothquant input)") for n in self.linears}
        self.norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
        self.norm_of: dict[str, str | None] = {}
        self._outputs: dict[tuple, tuple[str, weakref.ref]] = {}
        self._handles: list = []
        self._grad = torch.no_grad()

    def _norm_hook(self, name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self._outputs[_key(out)] = (name, weakref.ref(out))
        return hook

    def _linear_hook(self, name):
        def hook(module, args):
            x = args[0]
            self.observers[name](x.reshape(-1, x.shape[-1]))
            name_ref = self._outputs.get(_key(x))
            # identity, not just the address: a freed norm output's memory may hold another tensor now
            norm = name_ref[0] if name_ref is not None and name_ref[1]() is x else None
            if self.norm_of.get(name, norm) != norm:
                norm = None  # read different tensors on different calls: not foldable
            self.norm_of[name] = norm
        return hook

    def __enter__(self) -> ActivationStats:
        self._handles = [m.register_forward_hook(self._norm_hook(n)) for n, m in self.norms.items()]
        self._handles += [m.register_forward_pre_hook(self._linear_hook(n)) for n, m in self.linears.items()]
        self._grad.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._outputs = [], {}
        self._grad.__exit__(*exc)

    def all_reduce(self) -> None:
        """Under an initialised ``torch.distributed`` process group (each process calibrating on its share of the
        windows), every process's ranges become those of all the windows: minima and maxima do not depend on the
        order, so this equals one process seeing every window."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        import torch.distributed as dist

        for name in sorted(self.observers):  # the same order on every process
            obs = self.observers[name]
            if not obs.observed:
                raise RuntimeError(f"SmoothQuant: linear {name!r} saw no calibration input on process "
                                   f"{dist.get_rank()}")
            dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
            dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)

    def absmax(self, name: str) -> torch.Tensor:
        """max |x| per input channel of linear ``name``."""
        obs = self.observers[name]
        if not obs.observed:
            raise RuntimeError(f"SmoothQuant: linear {name!r} saw no calibration input")
        return torch.maximum(obs.min_val.abs(), obs.max_val.abs()).reshape(-1)


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^α / max|W|^(1-α)`` per channel; 1 where either side is zero."""
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(1e-5, 1e5)


def _channel_map(model: nn.Module, parent: str, producer: nn.Linear, consumer: nn.Linear) -> torch.Tensor | None:
    """For each consumer input channel, the producer output channel that feeds it (None: unknown)."""
    n_in = consumer.in_features
    device = consumer.weight.device
    if producer.out_features == n_in:
        return torch.arange(n_in, device=device)
    attn = model.get_submodule(parent) if parent else model
    head_dim, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not head_dim or not groups or n_in != producer.out_features * groups:
        return None
    c = torch.arange(n_in, device=device)
    return (c // head_dim // groups) * head_dim + c % head_dim


def _reduce(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, device=values.device).scatter_reduce(0, index, values.float(), "amax", include_self=False)


@torch.no_grad()
def _probe_equal(module: nn.Module, before: nn.Module, dim: int, rel: float = 1e-4, strict: bool = True) -> bool:
    """Do ``module`` and ``before`` agree on a random input? Modules that cannot run on a bare
    tensor (attention needs its position embeddings) count as agreeing unless ``strict``."""
    p = next(module.parameters())
    x = torch.randn(2, 3, dim, generator=torch.Generator().manual_seed(0)).to(device=p.device, dtype=p.dtype)
    try:
        a, b = module(x), before(x)
    except Exception:  # noqa: BLE001 - any failure means "cannot probe"
        return not strict
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return bool((a - b).norm() <= rel * b.norm() + 1e-12)


@torch.no_grad()
def smooth(model: nn.Module, stats: ActivationStats, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold smoothing scales into the producers of the recorded linears (in place).

    Returns ``{producer name: s}``; the float function of the model is unchanged.
    """
    groups: dict[str, list[str]] = {}
    for name in stats.linears:
        parent, _, leaf = name.rpartition(".")
        norm = stats.norm_of.get(name)
        producer = f"{parent}.{_LINEAR_PRODUCERS[leaf]}".strip(".") if leaf in _LINEAR_PRODUCERS else None
        if norm is not None:
            groups.setdefault(norm, []).append(name)
        elif producer is not None and producer in stats.linears and \
                input_hadamard(model.get_submodule(name)) is None:  # a transformed input is not the producer's output
            groups.setdefault(producer, []).append(name)
    scales: dict[str, torch.Tensor] = {}
    for prod_name, consumers in groups.items():
        prod = model.get_submodule(prod_name)
        cons = [model.get_submodule(c) for c in consumers]
        act = torch.stack([stats.absmax(c) for c in consumers]).amax(0)
        wmax = torch.stack([m.weight.detach().abs().amax(0).float() for m in cons]).amax(0)
        if isinstance(prod, nn.Linear):
            parent = prod_name.rpartition(".")[0]
            cmap = _channel_map(model, parent, prod, cons[0])
            if cmap is None:
                log.info("SmoothQuant: cannot map %s onto %s; left unsmoothed", consumers, prod_name)
                continue
            s = smoothing_scale(_reduce(act, cmap, prod.out_features), _reduce(wmax, cmap, prod.out_features), alpha)
            snapshot = _snapshot(model, parent)
            _scale_rows(prod, 1 / s)
            for m in cons:
                m.weight.mul_(s[cmap].to(m.weight.dtype))
            if not _probe_equal(model.get_submodule(parent), snapshot[1], prod.in_features, strict=False):
                log.warning("SmoothQuant: folding %s into %s changes %s; left unsmoothed", consumers, prod_name, parent)
                _restore(model, snapshot)
                continue
        else:
            s = smoothing_scale(act, wmax, alpha)
            snapshot = _snapshot(model, prod_name)
            prod.weight.div_(s.to(prod.weight.dtype))
            if getattr(prod, "bias", None) is not None:
                prod.bias.div_(s.to(prod.bias.dtype))
            if not _probe_equal(prod, _ScaledOutput(snapshot[1], s), s.numel()):
                log.warning("SmoothQuant: folding into %s is not exact (not a plain norm); left unsmoothed", prod_name)
                _restore(model, snapshot)
                continue
            for m in cons:
                m.weight.mul_(s.to(m.weight.dtype))
        scales[prod_name] = s
    return scales


def _scale_rows(linear: nn.Linear, factor: torch.Tensor) -> None:
    linear.weight.mul_(factor.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.mul_(factor.to(linear.bias.dtype))


class _ScaledOutput(nn.Module):
    """``module(x) / s``: what a norm with ``1/s`` folded in must compute."""

    def __init__(self, module: nn.Module, s: torch.Tensor) -> None:
        super().__init__()
        self.module, self.s = module, s

    def forward(self, x):
        return self.module(x) / self.s.to(x.dtype)


def _snapshot(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    import copy

    return name, copy.deepcopy(model.get_submodule(name))


def _restore(model: nn.Module, snap: tuple[str, nn.Module]) -> None:
    name, module = snap
    target = model.get_submodule(name)
    for pname, p in module.named_parameters():
        target.get_parameter(pname).data.copy_(p.data)


@torch.no_grad()
def smooth_model(model: nn.Module, inputs: Sequence[torch.Tensor], alpha: float = 0.5,
                 include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = "lm_head") -> dict[str, torch.Tensor]:
    """Calibrate on ``inputs`` (model inputs, e.g. token-id tensors) and fold the smoothing in place."""
    stats = ActivationStats(model, include, exclude)
    device = model_device(model)
    with stats:
        for x in inputs:
            model(to_device(x, device))
    return smooth(model, stats, alpha)


def smoothquant_w8a8(model: nn.Module, inputs: Sequence[torch.Tensor], alpha: float = 0.5, dynamic: bool = True,
                     include: str | Iterable[str] | None = None,
                     exclude: str | Iterable[str] | None = "lm_head") -> nn.Module:
    """Smooth, then W8A8: int8 per-channel weights, int8 activations per-token dynamic or static
    per-tensor (calibrated on ``inputs`` after smoothing). Returned fake-quant; ``qcal.freeze`` it.
    All or nothing: on an error or an interrupt the model is restored as it was."""
    from ..transaction import transaction

    with transaction(model):
        smooth_model(model, inputs, alpha, include, exclude)
        quantize(model, weights=qint8, activations=qint8, dynamic=dynamic, include=include, exclude=exclude)
        if not dynamic:
            calibrate(model, list(inputs))
    return model


# ---------------------------------------------------------------- torchao's API

_PENDING: weakref.WeakKeyDictionary[nn.Module, tuple[ActivationStats, float]] = weakref.WeakKeyDictionary()


def swap_linear_with_smooth_fq_linear(model: nn.Module, alpha: float = 0.5,
                                      skip_fqn_list: Iterable[str] | None = None) -> nn.Module:
    """Start recording activation statistics on every linear (except ``skip_fqn_list``, default
    ``["lm_head"]``); run calibration batches, then call :func:`smooth_fq_linear_to_inference`."""
    stats = ActivationStats(model, exclude=list(skip_fqn_list) if skip_fqn_list is not None else "lm_head")
    stats.__enter__()
    _PENDING[model] = (stats, alpha)
    return model


def smooth_fq_linear_to_inference(model: nn.Module, debug_skip_calibration: bool = False) -> nn.Module:
    """Stop recording, fold the smoothing, quantize W8A8 with dynamic per-token activations, freeze."""
    if model not in _PENDING:
        raise RuntimeError("smooth_fq_linear_to_inference: call swap_linear_with_smooth_fq_linear(model) first")
    from ..transaction import transaction

    stats, alpha = _PENDING.pop(model)
    stats.__exit__(None, None, None)
    names = list(stats.linears)
    if not debug_skip_calibration and not any(o.observed for o in stats.observers.values()):
        raise RuntimeError("smooth_fq_linear_to_inference: no calibration batch was run through the model")
    with transaction(model):
        if not debug_skip_calibration:
            smooth(model, stats, alpha)
        quantize(model, weights=qint8, activations=qint8, dynamic=True, include=names)
        return freeze(model)
