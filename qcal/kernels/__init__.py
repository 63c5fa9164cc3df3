"""Frozen-module kernels, chosen per (device, weight qtype, activation scheme, shape).

A kernel is a small object with a ``name``, ``supports(module) -> bool`` and
``__call__(module, x) -> Tensor``; it may cache derived tensors (e.g. a packed layout) on the
module as non-persistent buffers via ``prepare(module)``. The canonical frozen state
(``qweight``, ``weight_scale``, ``weight_zero_point``) is never replaced, so checkpoints stay
device independent. ``select_kernel`` returns the first registered kernel that supports the
module; the reference kernel (dequantize, then the float op) supports everything.
"""

from __future__ import annotations

import torch

__all__ = ["Kernel", "ReferenceKernel", "KERNELS", "register_kernel", "select_kernel"]


class Kernel:
    """Base kernel: override ``supports`` and ``__call__``; ``prepare`` is optional."""

    name = "kernel"

    def supports(self, module) -> bool:
        return False

    def prepare(self, module) -> None:
        """Derive whatever the kernel needs from the canonical frozen state."""

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class ReferenceKernel(Kernel):
    """Dequantize the weight, fake-quantize the input, run the float op. Exact reference."""

    name = "reference"

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
    """First registered kernel that supports ``module``; the reference kernel otherwise."""
    for k in KERNELS:
        if k.supports(module):
            k.prepare(module)
            return k
    return REFERENCE


REFERENCE = ReferenceKernel()
