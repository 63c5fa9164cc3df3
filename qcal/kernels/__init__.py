"""Frozen-module kernels, chosen per (device, weight qtype, activation scheme, shape).

A kernel is a small object with a ``name``, ``supports(module) -> bool`` and
``__call__(module, x) -> Tensor``; it may cache derived tensors (e.g. a packed layout) on the
module as non-persistent buffers via ``prepare(module)``. The canonical frozen state
(``qweight``, ``weight_scale``, ``weight_zero_point``) is never replaced, so checkpoints stay
device independent. ``select_kernel`` returns the first registered kernel that supports the
module; the reference kernel (dequantize, then the float op) supports everything.

Registered here: CUDA then CPU kernels for int4/int8 weight-only, A8W8 dynamic and 8da4w linear
layers (:mod:`qcal.kernels.cpu`, :mod:`qcal.kernels.cuda`); each dispatches on the number of
input rows ``M`` (see its ``dispatch``). On AVX512-BF16 CPUs the int4 kernels use qcal's own
small-M kernel (:mod:`qcal.kernels.native`, C source in ``csrc/``) ahead of PyTorch's tinygemm op.
``derived_bytes(module)`` is the memory a kernel adds.
"""

from __future__ import annotations

import torch

__all__ = ["Kernel", "ReferenceKernel", "KERNELS", "register_kernel", "select_kernel", "derived_bytes"]


class Kernel:
    """Base kernel: override ``supports`` and ``__call__``; ``prepare`` is optional."""

    name = "kernel"

    def supports(self, module) -> bool:
        return False

    def prepare(self, module) -> None:
        """Derive whatever the kernel needs from the canonical frozen state."""

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def dispatch(self) -> str:
        """What runs for which input shape (shown by ``qcal.explain``)."""
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


KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel, first: bool = True) -> Kernel:
    """Add a kernel to the dispatch list (tried before the others when ``first``)."""
    if first:
        KERNELS.insert(0, kernel)
    else:
        KERNELS.append(kernel)
    return kernel


def select_kernel(module) -> Kernel:
    """First registered kernel that supports ``module`` (prepared); the reference kernel otherwise.

    Derived buffers of a previous choice (names starting with ``_k_``) are dropped first.
    """
    for n in [n for n in module._buffers if n.startswith("_k_")]:
        del module._buffers[n]
        module._non_persistent_buffers_set.discard(n)
    for k in KERNELS:
        if k.supports(module):
            k.prepare(module)
            return k
    return REFERENCE


REFERENCE = ReferenceKernel()


def derived_bytes(module) -> int:
    """Bytes of the non-persistent (kernel-derived) buffers of ``module``, not counting submodules."""
    return sum(b.numel() * b.element_size() for n, b in module._buffers.items()
               if b is not None and n in module._non_persistent_buffers_set)


def _register_builtin() -> None:
    from .cpu import KERNELS_CPU
    from .cuda import KERNELS_CUDA

    for k in KERNELS_CUDA + KERNELS_CPU:
        register_kernel(k, first=False)


_register_builtin()
