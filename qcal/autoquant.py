"""``autoquant``: per layer, the fastest scheme whose output error stays within a budget.

For every ``nn.Linear`` the model's inputs reach, each candidate scheme is built on a copy of the
layer, frozen and timed on the layer's input (per weight shape and input shape, the candidates
measured alternately, fastest round kept); its error is the relative L2 distance of its output from
the float32 output of the original layer. The fastest candidate within ``max_rel_error`` replaces the
layer (``none`` -- the layer as it is -- is always eligible). Inputs are measured as they pass (in the
layer's forward pre-hook) and then dropped: only their shapes and call counts are kept, so recording
a large model's forward costs no activation memory.

As in torchao: ``model = autoquant(model, example_input)`` measures on that input and returns the
model; without an input the model's first forward is measured and the layers are swapped right after
it; ``manual=True`` records every forward until ``model.finalize_autoquant()``. The timings are kept in
:data:`AUTOQUANT_CACHE` (keyed by scheme, weight shape, input shape, dtype and device), which
:func:`save_autoquant_cache` / :func:`load_autoquant_cache` write and read, so a second run on the same
shapes skips the benchmarking.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import match_names, set_module
from .schemes import _find, _split, apply_scheme

__all__ = ["autoquant", "AutoQuantChoice", "DEFAULT_CANDIDATES", "AUTOQUANT_CACHE", "save_autoquant_cache",
           "load_autoquant_cache", "fastest_round", "device_sync"]

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("int8wo", "int4wo-64", "int4wo-32", "int8dq", "8da4w-64", "8da4w-32")

#: Seconds per call measured by :func:`autoquant`: ``(scheme, weight shape, input shape, dtype, device type)`` to
#: seconds (``scheme`` ``"none"`` is the float layer). Filled as layers are timed, read before timing.
AUTOQUANT_CACHE: dict[tuple[str, tuple[int, ...], tuple[int, ...], str, str], float] = {}


@dataclass
class AutoQuantChoice:
    """What autoquant measured and chose for one layer (times in seconds per call)."""

    name: str
    shape: tuple[int, int]
    rows: int
    chosen: str
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    calls: dict[tuple[int, ...], int] = field(default_factory=dict)  # input shape -> forward calls seen

    def speedup(self) -> float:
        """Time of ``none`` over the chosen scheme's time."""
        return self.times["none"] / self.times[self.chosen]


def save_autoquant_cache(path: str | os.PathLike) -> None:
    """Write :data:`AUTOQUANT_CACHE` to ``path`` as JSON."""
    rows = [{"scheme": k[0], "weight": list(k[1]), "input": list(k[2]), "dtype": k[3], "device": k[4], "seconds": v}
            for k, v in AUTOQUANT_CACHE.items()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def load_autoquant_cache(path: str | os.PathLike) -> int:
    """Add the timings of a :func:`save_autoquant_cache` file to :data:`AUTOQUANT_CACHE`; returns how many.

    The file is checked whole before anything is added (a malformed one raises ``ValueError``)."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"autoquant cache {os.fspath(path)!r} is not JSON: {e}") from None
    entries = {}
    if not isinstance(rows, list):
        raise ValueError(f"autoquant cache {os.fspath(path)!r}: expected a list of timings")
    for i, r in enumerate(rows):
        try:
            key = (str(r["scheme"]), tuple(int(d) for d in r["weight"]), tuple(int(d) for d in r["input"]),
                   str(r["dtype"]), str(r["device"]))
            seconds = float(r["seconds"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"autoquant cache {os.fspath(path)!r}, entry {i}: {e!r}") from None
        if not (seconds > 0 and seconds < float("inf")):
            raise ValueError(f"autoquant cache {os.fspath(path)!r}, entry {i}: seconds must be positive and finite")
        entries[key] = seconds
    AUTOQUANT_CACHE.update(entries)
    return len(entries)


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
    for hooks in (twin._forward_pre_hooks, twin._forward_hooks):  # a copy of the layer's, e.g. the recorder's
        hooks.clear()
    return apply_scheme(nn.Sequential(twin), scheme, quantize_lm_head=True)[0].to(layer.weight.device)


def _run(model: nn.Module, example_input) -> None:
    if isinstance(example_input, dict):
        model(**example_input)
    elif isinstance(example_input, (tuple, list)):
        model(*example_input)
    else:
        model(example_input)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class _Recorder:
    """Per linear layer: errors and times of every candidate on each distinct input shape, calls per shape."""

    def __init__(self, layers: list[tuple[str, nn.Linear]], candidates: list[str], rounds: int) -> None:
        self.layers = layers
        self.candidates = candidates
        self.rounds = rounds
        self.errors: dict[str, dict[str, float]] = {}  # layer -> scheme -> worst error over its input shapes
        self.times: dict[str, dict[tuple, dict[str, float]]] = {}  # layer -> input shape -> scheme -> seconds
        self.calls: dict[str, dict[tuple, int]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers]

    def _hook(self, name: str):
        @torch.compiler.disable
        def hook(layer, args):
            x = args[0]
            shape = tuple(x.shape)
            calls = self.calls.setdefault(name, {})
            calls[shape] = calls.get(shape, 0) + 1
            if calls[shape] == 1:
                with torch.no_grad():
                    self._measure(name, layer, x.detach())
        return hook

    def _measure(self, name: str, layer: nn.Linear, x: torch.Tensor) -> None:
        ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        twins = {}
        for c in self.candidates:
            try:
                twins[c] = _candidate(layer, c)
            except (ValueError, TypeError):  # e.g. a group size that does not divide in_features
                continue
        errors = self.errors.setdefault(name, {"none": 0.0})
        for c, q in twins.items():
            errors[c] = max(errors.get(c, 0.0), _rel_err(q(x), ref))
        base = (tuple(layer.weight.shape), tuple(x.shape), str(x.dtype), x.device.type)
        # the float layer through F.linear: calling it would run this hook again
        fns = {"none": lambda: F.linear(x, layer.weight, layer.bias)}
        fns.update({c: (lambda q=q: q(x)) for c, q in twins.items()})
        todo = {c: f for c, f in fns.items() if (c, *base) not in AUTOQUANT_CACHE}
        if todo:
            AUTOQUANT_CACHE.update({(c, *base): t for c, t in
                                    fastest_round(todo, self.rounds, sync=device_sync(x.device)).items()})
        self.times.setdefault(name, {})[tuple(x.shape)] = {c: AUTOQUANT_CACHE[(c, *base)] for c in fns}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def choices(self, max_rel_error: float) -> list[AutoQuantChoice]:
        """One choice per layer that ran: the least total time (calls x seconds per call) within the budget."""
        report = []
        for name, layer in self.layers:
            if name not in self.times:
                continue
            calls, per_shape, errors = self.calls[name], self.times[name], self.errors[name]
            schemes = [c for c in ["none", *self.candidates] if all(c in t for t in per_shape.values())]
            total = {c: sum(calls[s] * t[c] for s, t in per_shape.items()) / sum(calls.values()) for c in schemes}
            ok = [c for c in schemes if errors[c] <= max_rel_error]
            chosen = min(ok, key=lambda c: total[c])
            first = next(iter(per_shape))
            rows = 1
            for d in first[:-1]:
                rows *= d
            report.append(AutoQuantChoice(name, tuple(layer.weight.shape), rows, chosen, total,
                                          {c: errors[c] for c in schemes}, dict(calls)))
        return report


def _finalize(root: nn.Module, recorder: _Recorder, max_rel_error: float, error_on_unseen: bool,
              verbose: bool) -> list[AutoQuantChoice]:
    unseen = [n for n, _ in recorder.layers if n not in recorder.times]
    if unseen and error_on_unseen:
        raise RuntimeError(f"autoquant: {len(unseen)} linear layers saw no input ({', '.join(unseen[:8])}"
                           f"{', ...' if len(unseen) > 8 else ''}); run inputs that reach them first, or pass "
                           "error_on_unseen=False to keep them unquantized")
    recorder.remove()
    report = recorder.choices(max_rel_error)
    layers = dict(recorder.layers)
    twins = {r.name: _candidate(layers[r.name], r.chosen) for r in report if r.chosen != "none"}
    for name, twin in twins.items():  # every twin built before the first swap: all or nothing
        set_module(root, name, twin)
    for r in report:
        msg = f"autoquant {r.name}: {r.chosen} ({r.speedup():.2f}x, error {r.errors[r.chosen]:.2e})"
        print(msg) if verbose else log.info(msg)
    if unseen:
        log.info("autoquant: %d linear layers saw no input and stay unquantized: %s", len(unseen), ", ".join(unseen))
    root.autoquant_report = report
    if "finalize_autoquant" in root.__dict__:
        del root.finalize_autoquant
    return report


def autoquant(model: nn.Module, example_input=None, max_rel_error: float = 0.05,
              candidates: Iterable[str] = DEFAULT_CANDIDATES, *, include=None, exclude=None, rounds: int = 10,
              manual: bool = False, error_on_unseen: bool = True, verbose: bool = False) -> nn.Module:
    """Quantize ``model`` in place, choosing per linear layer; returns ``model`` (torchao's semantics).

    Args:
        model: a float model, or a ``torch.compile`` wrapper of one (its linear layers are replaced by frozen qcal
            modules; the wrapper recompiles on its next call).
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs; the shapes it produces
            at each layer are the shapes timed (e.g. one decode step). ``None``: the model's next forward is
            measured instead, and the layers are swapped when it returns (or at ``model.finalize_autoquant()``
            with ``manual=True``).
        max_rel_error: budget on ``||y_q - y|| / ||y||`` per layer, ``y`` the float32 output.
        candidates: scheme names (see :mod:`qcal.schemes`); ``none`` is always added.
        include / exclude: module-name globs as in :func:`qcal.quantize`.
        rounds: interleaved timing rounds per (layer shape, input shape) not yet in :data:`AUTOQUANT_CACHE`.
        manual: keep measuring every forward (each new input shape of a layer is timed; calls are counted to
            weigh the shapes) until ``model.finalize_autoquant()``.
        error_on_unseen: when finalizing, raise if a selected linear saw no input (the model unchanged, still
            recording); False keeps such layers in float.

    After finalizing, ``model.autoquant_report`` lists an :class:`AutoQuantChoice` per measured layer.
    """
    if not isinstance(max_rel_error, (int, float)) or not max_rel_error >= 0:
        raise ValueError(f"autoquant: max_rel_error must be a number >= 0, got {max_rel_error!r}")
    if isinstance(candidates, str):
        candidates = candidates.split(",")
    cands = [c for c in candidates if c != "none"]
    for c in cands:
        _find(_split(c)[1])  # unknown names fail here, before anything is hooked
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"autoquant: rounds must be an int >= 1, got {rounds!r}")
    root = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: hook and swap inside it
    if "finalize_autoquant" in root.__dict__:
        raise RuntimeError("autoquant: this model is already recording; call model.finalize_autoquant() first")
    layers = [(n, m) for n, m in match_names(root, include, exclude) if type(m) is nn.Linear]
    recorder = _Recorder(layers, cands, rounds)

    def finalize() -> list[AutoQuantChoice]:
        return _finalize(root, recorder, max_rel_error, error_on_unseen, verbose)

    if example_input is not None:
        try:
            with torch.no_grad():
                _run(root, example_input)
        except BaseException:
            recorder.remove()
            raise
        if not manual:
            try:
                finalize()
            except BaseException:
                recorder.remove()
                raise
            return model
    root.finalize_autoquant = finalize
    if not manual:
        def after_first_forward(module, args, output):
            handle.remove()
            finalize()

        handle = root.register_forward_hook(torch.compiler.disable(after_first_forward))
    return model
