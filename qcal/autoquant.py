"""``autoquant``: per layer, the fastest scheme whose output error stays within a budget.

For every ``nn.Linear`` the example inputs reach, each candidate scheme is built on a copy of the
layer, frozen and timed on the layer's captured input (per weight shape and input shape, the
candidates measured alternately, fastest round kept); its error is the relative L2 distance of
its output from the float32 output of the original layer. The fastest candidate within
``max_rel_error`` replaces the layer (``none`` -- the layer as it is -- is always eligible).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import match_names, set_module
from .schemes import apply_scheme

__all__ = ["autoquant", "AutoQuantChoice", "DEFAULT_CANDIDATES", "fastest_round", "device_sync"]

DEFAULT_CANDIDATES = ("int8wo", "int4wo-64", "int4wo-32", "int8dq", "8da4w-64", "8da4w-32")


@dataclass
class AutoQuantChoice:
    """What autoquant measured and chose for one layer (times in seconds per call)."""

    name: str
    shape: tuple[int, int]
    rows: int
    chosen: str
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    def speedup(self) -> float:
        """Time of ``none`` over the chosen scheme's time."""
        return self.times["none"] / self.times[self.chosen]


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (a no-op on CPU): timers must call it."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def fastest_round(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = 0.003,
                  max_inner: int = 50, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Time ``fns`` round-robin; fastest per-call seconds of each over ``rounds`` rounds.

    ``sync`` (see :func:`device_sync`) runs before and after each timed stretch, so asynchronous
    devices are timed by the work they did, not by how fast it was queued.
    """
    sync = sync or (lambda: None)
    inner = {}
    for k, f in fns.items():
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        inner[k] = max(1, min(max_inner, int(budget_s / max(time.perf_counter() - t0, 1e-7))))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                f()
            sync()
            best[k] = min(best[k], (time.perf_counter() - t0) / inner[k])
    return best


def _candidate(layer: nn.Linear, scheme: str) -> nn.Module:
    twin = copy.deepcopy(layer).float()
    return apply_scheme(nn.Sequential(twin), scheme, quantize_lm_head=True)[0]


def _run(model: nn.Module, example_inputs) -> None:
    if isinstance(example_inputs, dict):
        model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        model(*example_inputs)
    else:
        model(example_inputs)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def autoquant(model: nn.Module, example_inputs, max_rel_error: float = 0.05,
              candidates: Iterable[str] = DEFAULT_CANDIDATES, *, include=None, exclude=None,
              rounds: int = 10, verbose: bool = False) -> list[AutoQuantChoice]:
    """Quantize ``model`` in place, choosing per linear layer; returns one :class:`AutoQuantChoice` each.

    Args:
        model: a float model (its linear layers are replaced by frozen qcal modules).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs; the
            shapes it produces at each layer are the shapes timed (e.g. one decode step).
        max_rel_error: budget on ``||y_q - y|| / ||y||`` per layer, ``y`` the float32 output.
        candidates: scheme names (see :mod:`qcal.schemes`); ``none`` is always added.
        include / exclude: module-name globs as in :func:`qcal.quantize`.
        rounds: interleaved timing rounds per (layer shape, input shape).
    """
    cands = [c for c in candidates if c != "none"]
    layers = [(n, m) for n, m in match_names(model, include, exclude) if type(m) is nn.Linear]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach()))
             for n, m in layers]
    try:
        _run(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    timing: dict[tuple, dict[str, float]] = {}
    report: list[AutoQuantChoice] = []
    for name, layer in layers:
        if name not in inputs:
            continue
        x = inputs[name]
        ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        twins = {}
        for c in cands:
            try:
                twins[c] = _candidate(layer, c)
            except (ValueError, TypeError):  # e.g. a group size that does not divide in_features
                continue
        key = (tuple(layer.weight.shape), tuple(x.shape), x.dtype)
        if key not in timing:
            fns = {"none": lambda layer=layer, x=x: layer(x)}
            fns.update({c: (lambda q=q, x=x: q(x)) for c, q in twins.items()})
            timing[key] = fastest_round(fns, rounds, sync=device_sync(x.device))
        times = timing[key]
        errors = {"none": 0.0} | {c: _rel_err(q(x), ref) for c, q in twins.items()}
        ok = [c for c in ["none", *twins] if errors[c] <= max_rel_error and c in times]
        chosen = min(ok, key=lambda c: times[c])
        if chosen != "none":
            set_module(model, name, twins[chosen])
        choice = AutoQuantChoice(name, tuple(layer.weight.shape), x.numel() // x.shape[-1], chosen,
                                 {c: times[c] for c in ["none", *twins] if c in times}, errors)
        report.append(choice)
        if verbose:
            print(f"{name}: {chosen} ({choice.speedup():.2f}x, err {errors[chosen]:.2e})")
    return report
