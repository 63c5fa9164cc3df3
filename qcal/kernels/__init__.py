"""Frozen-module kernels, chosen per (device, scheme, shape, CPU features) when a module is frozen or moved.

A kernel is an object with a ``name``, a ``dispatch`` string (what runs for which input, shown by
:func:`qcal.explain`) and ``__call__(module, x) -> Tensor``. The built-in linear kernels are tables
(:mod:`qcal.kernels.table`): per scheme and device an ordered list of implementations with their conditions
(:mod:`qcal.kernels.cpu`, :mod:`qcal.kernels.cuda`), qcal's native CPU operators first where they are built
(:mod:`qcal.kernels.native`, :mod:`qcal.kernels.library`). Kernel-derived tensors (a packed layout, float32
scales) are non-persistent buffers whose names start with ``_k_``; the canonical frozen state (``qweight``,
``weight_scale``, ``weight_zero_point``) is never replaced, so checkpoints stay device independent.
:func:`select_kernel` takes the first registered kernel that supports the module, else the reference kernel
(dequantize, then the float op), which supports everything.
"""

from __future__ import annotations

import torch

__all__ = ["Kernel", "ReferenceKernel", "KERNELS", "register_kernel", "select_kernel", "derived_bytes", "Opaque"]


class Kernel:
    """Base kernel: override ``supports`` and ``__call__``; ``prepare`` (derive tensors) is optional."""

    name = "kernel"

    def supports(self, module) -> bool:
        return False

    def prepare(self, module) -> None:
        """Derive whatever the kernel needs from the canonical frozen state."""

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def dispatch(self) -> str:
        """What runs for which input (shown by ``qcal.explain``)."""
        return self.name

    def __repr__(self) -> str:
        return self.name


class ReferenceKernel(Kernel):
    """Dequantize the weight, fake-quantize the input, run the float op. Exact reference."""

    name = "reference"
    dispatch = "dequant + float op"

    def supports(self, module) -> bool:
        return True

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        return module.frozen_forward_reference(x)


class Opaque:
    """Kernel-derived state that is not a plain tensor (e.g. oneDNN's packed weight), kept in a module attribute
    whose name starts with ``_k_``: ``deepcopy`` and pickling leave it empty (the kernel derives it again on first
    use), :func:`select_kernel` drops it, :func:`derived_bytes` counts it."""

    def __init__(self, value=None, nbytes: int = 0) -> None:
        self.value, self.nbytes = value, nbytes

    def __deepcopy__(self, memo) -> Opaque:
        return Opaque()

    def __getstate__(self) -> dict:
        return {"value": None, "nbytes": 0}


REFERENCE = ReferenceKernel()
KERNELS: list = []
"""Kernels and linear tables, tried in order by :func:`select_kernel`."""


def register_kernel(kernel, first: bool = True):
    """Add a kernel (or a :class:`~qcal.kernels.table.LinearTable`) to the dispatch list (tried before the others
    when ``first``)."""
    if first:
        KERNELS.insert(0, kernel)
    else:
        KERNELS.append(kernel)
    return kernel


def select_kernel(module) -> Kernel:
    """The first registered kernel that supports ``module``, prepared for it; the reference kernel otherwise.

    Derived buffers of a previous choice (names starting with ``_k_``) are dropped first."""
    for n in [n for n in module._buffers if n.startswith("_k_")]:
        del module._buffers[n]
        module._non_persistent_buffers_set.discard(n)
    for n in [n for n, v in module.__dict__.items() if n.startswith("_k_") and isinstance(v, Opaque)]:
        del module.__dict__[n]
    for k in KERNELS:
        if not k.supports(module):
            continue
        bind = getattr(k, "bind", None)
        if bind is None:
            k.prepare(module)
            return k
        plan = bind(module)
        if plan is not None:
            return plan
    return REFERENCE


def derived_bytes(module) -> int:
    """Bytes of the non-persistent (kernel-derived) buffers and :class:`Opaque` state of ``module``, not counting
    submodules."""
    return sum(b.numel() * b.element_size() for n, b in module._buffers.items()
               if b is not None and n in module._non_persistent_buffers_set) + \
        sum(v.nbytes for v in module.__dict__.values() if isinstance(v, Opaque))


def _native_hadamard(rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """The online Hadamard transform by the native kernel (bf16 / float32 rows on the CPU), else None."""
    from . import native

    if rows.device.type != "cpu" or rows.dtype not in (torch.bfloat16, torch.float32) or not native.available():
        return None
    return torch.ops.qcal.hadamard(rows, a)


def _install() -> None:
    from ..nn import hadamard, qmodule
    from .conv import CONV_KERNELS
    from .cpu import TABLES_CPU
    from .cuda import TABLES_CUDA

    KERNELS.extend(TABLES_CUDA + TABLES_CPU + CONV_KERNELS)
    qmodule.set_kernel_selector(select_kernel)
    hadamard.set_fast_hadamard(_native_hadamard)


_install()
