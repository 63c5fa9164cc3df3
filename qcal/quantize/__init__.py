"""``quantize`` (swap float modules for quantized twins) and ``freeze`` (materialise integers)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..granularity import PerAxis, PerGroup
from ..nn import QMODULE_FOR, QModuleMixin
from ..observers import get_observer
from ..qtypes import get_qtype, qtype
from ..spec import ActivationSpec, WeightSpec

__all__ = ["quantize", "freeze", "quantized_modules", "set_module", "match_names", "cast_model"]

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)
_GLOB = set("*?[")


def _patterns(value: str | Iterable[str] | None, argument: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"{argument} must be a module-name glob or a list of them, got {value!r}")
    return out


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def match_names(model: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """Named submodules selected by ``include``/``exclude`` globs (all when include is None)."""
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude") or []
    return [(n, m) for n, m in model.named_modules() if n
            and (inc is None or _matches(n, inc)) and not _matches(n, exc)]


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QModuleMixin]]:
    """``(name, module)`` for every qcal quantized module in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            yield n, m


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _weight_spec(weights, group_size, symmetric, weight_observer, zero_point="float") -> WeightSpec | None:
    if zero_point not in ("float", "int"):
        raise ValueError(f"zero_point must be 'float' or 'int', got {zero_point!r}")
    if weights is None:
        if group_size is not None:
            raise ValueError("group_size given but weights=None")
        return None
    qt: qtype = get_qtype(weights, "weights")
    if not qt.is_floating_point and qt.bits not in SUPPORTED_WEIGHT_BITS:
        raise TypeError(f"weights={qt} is not supported")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    sym = (qt.bits == 8 or qt.is_floating_point) if symmetric is None else bool(symmetric)
    if qt.is_floating_point and not sym:
        raise ValueError(f"weights={qt} supports symmetric quantization only")
    get_observer(weight_observer)
    if zero_point == "int" and (sym or qt.is_floating_point):
        raise ValueError("zero_point='int' applies to asymmetric integer weights (symmetric=False)")
    gran = PerGroup(group_size) if group_size else PerAxis(0)
    return WeightSpec(qt, gran, sym, weight_observer if isinstance(weight_observer, str) else "minmax",
                      zero_point == "int")


def _act_spec(activations, dynamic, act_symmetric, observer, per_token=True) -> ActivationSpec | None:
    if activations is None:
        return None
    if not per_token and not dynamic:
        raise ValueError("quantize: act_per_token=False applies to dynamic activations (static ones are per tensor)")
    qt = get_qtype(activations, "activations")
    if qt.bits != 8:
        raise TypeError(f"activations={qt} is not supported: use qint8, qfloat8_e4m3fn or qfloat8_e5m2")
    if qt.is_floating_point and not act_symmetric:
        raise ValueError(f"activations={qt} supports symmetric quantization only")
    get_observer(observer)
    return ActivationSpec(qt, bool(dynamic), bool(act_symmetric), observer, bool(per_token))


def quantize(
    model: nn.Module,
    weights: qtype | str | None = None,
    activations: qtype | str | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    dynamic: bool = False,
    act_symmetric: bool = True,
    act_per_token: bool = True,
    observer: str = "moving_average",
    weight_observer: str = "minmax",
    zero_point: str = "float",
    device: str | torch.device | None = None,
    freeze: bool = False,
) -> nn.Module:
    """Swap every selected ``nn.Linear``/``nn.Conv2d`` for its quantized twin, in place.

    Args:
        model: the float model.
        weights: weight qtype (``qint2/3/4/8``, ``qfloat8*``) or None.
        activations: input-activation qtype (``qint8``, ``qfloat8*``) or None.
        include / exclude: module-name globs (or lists); ``"lm_head"`` also matches ``*.lm_head``.
        group_size: per-group weight scales along the input dim; None = per output channel.
        symmetric: symmetric weights; default True for 8-bit and float types, False (asymmetric) for int4 and below.
        dynamic: activation scales computed per token at run time (no calibration needed);
            False = static per-tensor scales from ``Calibration``.
        act_symmetric: symmetric activation quantization.
        act_per_token: dynamic activations: a scale per token (row) of a linear layer's input; False: one scale
            per input tensor (torchao's per-tensor float8).
        observer: activation observer name (``moving_average``, ``minmax``, ``percentile``, ``mse``).
        weight_observer: ``minmax`` (qparams follow the weights, as QAT needs) or an observer name
            whose clipping is computed once and fixed (``mse``, ``percentile``).
        zero_point: asymmetric weights: ``"float"`` (unrounded, the default, as GGUF Q4_1 and tinygemm) or
            ``"int"`` (rounded to integers, as compressed-tensors/vLLM, GPTQ and AWQ checkpoints store them).
        freeze: freeze each module as soon as it is swapped (weight-only or dynamic activations only), so that its
            float weight is released before the next module is quantized.
        device: move each selected module to ``device`` just before it is quantized, then the rest of the model:
            with ``freeze=True`` the device holds one float layer at a time, so a model whose float weights do not
            fit there can still be quantized onto it (torchao's ``quantize_(..., device=)``).

    Every selected module is validated before any is replaced, so on error the model is untouched.
    Returns the model.
    """
    wspec = _weight_spec(weights, group_size, symmetric, weight_observer, zero_point)
    aspec = _act_spec(activations, dynamic, act_symmetric, observer, act_per_token)
    if wspec is None and aspec is None:
        raise ValueError("quantize: nothing to do, weights and activations are both None")
    if freeze and aspec is not None and not aspec.dynamic:
        raise ValueError("quantize: freeze=True needs weight-only or dynamic activation quantization; static "
                         "activations are calibrated first (quantize, `with qcal.Calibration(): ...`, then freeze)")
    if device is not None:
        device = torch.device(device)
    inc = _patterns(include, "include")
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in match_names(model, include, exclude):
        explicit = inc is not None and any(name == p or name.endswith("." + p) for p in inc if not _GLOB & set(p))
        if isinstance(module, QModuleMixin):
            raise ValueError(f"quantize: module {name!r} is already quantized ({type(module).__name__})")
        qcls = QMODULE_FOR.get(type(module))
        if qcls is None:
            if explicit:
                raise TypeError(f"quantize: module {name!r} of type {type(module).__name__} is not supported; "
                                f"supported: {[c.__name__ for c in QMODULE_FOR]}")
            continue
        if any(name.startswith(n + ".") for n, _ in replacements):
            continue
        replacements.append((name, qcls.from_module(module, name, wspec, aspec)))
    module = None  # the swapped-out float modules are referenced by nothing here (freeze=True frees their weights)
    if not replacements:
        warnings.warn("quantize: no module matched; nothing was quantized", stacklevel=2)
    if freeze:  # as freeze() refuses: a weight still on the meta device has no values
        meta = next((n for n, q in replacements if q.weight.device.type == "meta"), None)
        if meta is not None:
            raise ValueError(f"quantize: module {meta!r} has its weight on the meta device (no values to quantize); "
                             f"load the weights first, or quantize without freeze=True")
    for name, q in replacements:
        if device is not None:
            q.to(device)
        set_module(model, name, q)
        if freeze:  # the float weight goes with it: the float module it was swapped for is no longer referenced
            q.freeze()
    if device is not None:
        model.to(device)
    attach_to_transformers(model)
    return model


# Called with a model whose quantized modules quantize/load/export just made. ``qcal.integrations.transformers``
# registers its ``attach`` here when it is imported (``import qcal`` imports it where transformers is installed
# with the quantizer API qcal needs), so that this module does not import the integration built on it.
_ATTACH_HOOKS: list[Callable[[nn.Module], None]] = []


def register_attach_hook(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Call ``hook(model)`` on every model that :func:`attach_to_transformers` sees with quantized modules."""
    if hook not in _ATTACH_HOOKS:
        _ATTACH_HOOKS.append(hook)
    return hook


def attach_to_transformers(model: nn.Module) -> None:
    """Let ``save_pretrained`` of a transformers model write a qcal folder (no-op for other models, and
    without transformers)."""
    if _ATTACH_HOOKS and next(quantized_modules(model), None) is not None:
        for hook in _ATTACH_HOOKS:
            hook(model)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Replace the float weights of every quantized module by integer codes (in place).

    Raises before changing anything if a module with static activations was never calibrated.
    """
    mods = list(quantized_modules(model))
    for name, m in mods:
        w = m._parameters.get("weight")
        if not m.frozen and w is not None and w.device.type == "meta":
            raise ValueError(f"freeze: module {name!r} has its weight on the meta device (no values to quantize); "
                             f"load the weights first (from_pretrained, load_state_dict(assign=True) or qcal.load)")
    for _, m in mods:
        if not m.calibrated:
            raise RuntimeError(
                f"freeze: module {m.qcal_name!r} has static activation quantization that was never "
                f"calibrated; run `with qcal.Calibration(): model(samples)` first"
            )
    for _, m in mods:
        m.freeze()
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the non-persistent float32 buffers of float modules (rotary ``inv_freq``),
    which stay float32 as in a model transformers builds in ``dtype``: the same model ``from_pretrained``
    gives back."""
    keep = [(m, k, b) for m in model.modules() if not isinstance(m, QModuleMixin)
            for k in m._non_persistent_buffers_set
            if isinstance(b := m._buffers.get(k), torch.Tensor) and b.dtype == torch.float32]
    model.to(dtype)
    for m, k, b in keep:
        m._buffers[k] = b.to(m._buffers[k].device)
    return model
