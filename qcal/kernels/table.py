"""Linear kernels as data: per scheme and device, an ordered table of implementations and when each runs.

An :class:`Impl` is one way to compute ``x @ W^T`` for a frozen linear layer, with the conditions it needs:
static ones, checked once when a module is frozen or moved (device, qcal's native kernels built, the layer's
shapes), and per-call ones (input dtype after the scheme's compute cast, number of rows ``M``, eager vs traced).
A :class:`Layout` is derived state an implementation reads (a re-laid weight, float32 scales): kept on the module
as non-persistent buffers, never in a checkpoint.

A :class:`LinearTable` (one per scheme and device) picks, for a module, the rows whose static conditions hold
and precomputes the decision for every input regime; only the layouts of rows that can run are derived. The
same decision is what :func:`qcal.explain` prints (``Plan.dispatch``): the table is the documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import Kernel, native
from .common import is_frozen_linear

__all__ = ["Layout", "Impl", "LinearTable", "Plan"]

_Run = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
_REGIMES = [(dtype, compiling) for compiling in (False, True)
            for dtype in (torch.bfloat16, torch.float32, torch.float16)]
_NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class Layout:
    """Derived tensors an implementation reads: ``derive(module) -> {buffer name: tensor}``."""

    name: str
    derive: Callable[[torch.nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Impl:
    """One implementation of a scheme's matmul: ``run(module, x2)`` on ``x2 (M, K)`` in the compute dtype returns
    ``(M, N)`` without bias. The conditions default to "always"."""

    name: str
    run: _Run
    native: bool | str = False  # True: needs qcal's AVX-512 library; an operator's name: the AVX2 library with it
    fits: Callable[[torch.nn.Module], bool] | None = None  # shapes/layouts of the module it takes
    dtypes: tuple[torch.dtype, ...] | None = None          # input dtypes (after the compute cast)
    max_m: int | None = None                               # M <= max_m
    eager: bool = False                                    # not under torch.compile
    layout: Layout | None = None
    # ``run`` as one qcal operator: ``torch.ops.qcal.<name>(x2, *args(module))`` (tensors, ints and bools), for
    # callers that run it outside Python (the lean runtime's native decode step)
    direct: tuple[str, Callable[[torch.nn.Module], tuple]] | None = None
    # ``run`` for several modules on one input as one qcal operator (the lean runtime's prefill of q / k / v and of
    # gate / up; each output ``run``'s, bit for bit): ``(name, per, shared)`` calls
    # ``torch.ops.qcal.<name>(x2, *lists, *shared(module))``, ``lists`` the modules' ``per(module)`` tuples
    # transposed into lists; modules qualify together where their ``shared(module)`` are equal
    multi: tuple[str, Callable[[torch.nn.Module], tuple], Callable[[torch.nn.Module], tuple]] | None = None

    def usable(self, module: torch.nn.Module) -> bool:
        """The static conditions."""
        if isinstance(self.native, str):
            ok = native.isa() == "avx2" and native.has(self.native)
        else:
            ok = not self.native or native.available()
        return ok and (self.fits is None or self.fits(module))

    def takes(self, dtype: torch.dtype, compiling: bool) -> bool:
        """The per-call conditions other than M."""
        return (self.dtypes is None or dtype in self.dtypes) and not (self.eager and compiling)

    def condition(self) -> str:
        parts = [] if self.dtypes is None else ["/".join(str(d).removeprefix("torch.") for d in self.dtypes)]
        parts += [] if not self.eager else ["eager"]
        return ", ".join(parts)


class Plan(Kernel):
    """A module's decision: for each (input dtype, traced) regime, the implementation per range of M."""

    def __init__(self, table: LinearTable, impls: list[Impl]) -> None:
        self.table, self.impls = table, impls
        self.device_type, self.compute_dtype = table.device_type, table.compute_dtype
        self.name = f"{table.device_type}_{table.scheme}" + ("_native" if any(i.native for i in impls) else "")
        cdt = table.compute_dtype  # with a compute dtype, inputs of every dtype arrive in it
        self.regimes = [(cdt, False), (cdt, True)] if cdt is not None else _REGIMES
        self.segments = {regime: self._segments(*regime) for regime in self.regimes}

    def _segments(self, dtype: torch.dtype, compiling: bool) -> tuple[tuple[int, Impl], ...]:
        """``((max M, impl), ...)`` in order; the last covers every larger M."""
        out: list[tuple[int, Impl]] = []
        bound = 0
        for impl in self.impls:
            if not impl.takes(dtype, compiling):
                continue
            hi = _NO_LIMIT if impl.max_m is None else impl.max_m
            if hi > bound:
                out.append((hi, impl))
                bound = hi
            if hi == _NO_LIMIT:
                break
        return tuple(out)

    def choose(self, dtype: torch.dtype, m: int) -> Impl:
        key = (dtype, torch.compiler.is_compiling())
        segments = self.segments.get(key)
        if segments is None:
            segments = self._segments(*key)
        for hi, impl in segments:
            if m <= hi:
                return impl
        raise ValueError(f"{self.name}: no implementation for {dtype} inputs of {m} rows")  # tables end in a catch-all

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.device_type:  # the input is elsewhere: choose again for the module's device
            module.select_kernel()
            return module.kernel(module, x)
        shape = x.shape
        if not shape or shape[-1] != module.in_features:
            raise ValueError(f"{module.qcal_name}: the input's last dimension is {shape[-1] if shape else None}, "
                             f"the layer takes {module.in_features} features (input shape {tuple(shape)})")
        x2 = x.reshape(-1, shape[-1])
        dtype = x.dtype
        cdt = self.compute_dtype or dtype
        if dtype != cdt:
            x2 = x2.to(cdt)
        y = self.choose(cdt, x2.shape[0]).run(module, x2)
        bias = module._parameters.get("bias")
        if bias is not None:
            y = y + bias
        if y.dtype != dtype:
            y = y.to(dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @property
    def dispatch(self) -> str:
        """The decision as text, e.g. ``M<=64: qcal int4 mm | M>64: qcal panel int4 mm`` (per regime where they
        differ: ``bf16 eager: ...; fp32: ...``)."""
        decisions: dict[str, list[tuple[torch.dtype, bool]]] = {}
        for regime in self.regimes:
            segs, lo, text = self.segments[regime], 0, []
            for hi, impl in segs:
                rng = f"M>{lo}" if hi == _NO_LIMIT else (f"M<={hi}" if lo == 0 else f"{lo}<M<={hi}")
                text.append(impl.name if len(segs) == 1 else f"{rng}: {impl.name}")
                lo = hi
            decisions.setdefault(" | ".join(text), []).append(regime)
        if len(decisions) == 1:
            return next(iter(decisions))
        return "; ".join(f"{_label(regimes, self.compute_dtype is None)}: {text}"
                         for text, regimes in decisions.items())


_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def _label(regimes: list[tuple[torch.dtype, bool]], by_dtype: bool) -> str:
    """``[(bf16, False), (fp32, False), (fp32, True)]`` -> ``bf16 eager/fp32``."""
    out = []
    for dtype in dict.fromkeys(d for d, _ in regimes):
        modes = {c for d, c in regimes if d == dtype}
        mode = "" if len(modes) == 2 else ("compiled" if True in modes else "eager")
        out.append(" ".join(p for p in ((_SHORT.get(dtype, str(dtype)) if by_dtype else ""), mode) if p))
    return "/".join(out)


@dataclass(frozen=True)
class LinearTable:
    """The implementations of one scheme on one device, in order of preference; the last one must run for any
    input (no conditions)."""

    scheme: str
    device_type: str
    matches: Callable[[torch.nn.Module], bool]   # the module's scheme
    impls: tuple[Impl, ...]
    compute_dtype: torch.dtype | None = None     # inputs are cast to it (None: the input's dtype)

    @property
    def name(self) -> str:
        return f"{self.device_type}_{self.scheme}"

    def supports(self, module: torch.nn.Module) -> bool:
        return (is_frozen_linear(module) and module.qweight.device.type == self.device_type
                and self.matches(module))

    def bind(self, module: torch.nn.Module) -> Plan | None:
        """The plan for ``module`` (None when no row can run it): the usable rows that some input regime reaches.
        Derives their layouts (tensors as non-persistent buffers, numbers as attributes)."""
        usable = [i for i in self.impls if i.usable(module)]
        if not usable:
            return None
        reached = {id(impl) for segs in Plan(self, usable).segments.values() for _, impl in segs}
        plan = Plan(self, [i for i in usable if id(i) in reached])
        layouts = {impl.layout.name: impl.layout for impl in plan.impls if impl.layout is not None}
        with torch.no_grad():
            for layout in layouts.values():
                for name, value in layout.derive(module).items():
                    if isinstance(value, torch.Tensor):
                        module.register_buffer(name, value, persistent=False)
                    else:
                        setattr(module, name, value)
        return plan

    def __repr__(self) -> str:
        return self.name
