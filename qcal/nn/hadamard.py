"""Hadamard matrices of the orders LLMs use, and the online Hadamard transform of a linear layer's input.

:func:`hadamard_matrix` builds orthonormal Hadamard matrices that are not only powers of two (576 = 8·72,
1536 = 12·128, 5632 = 44·128) from Sylvester's and Paley's constructions and Kronecker products.

:class:`OnlineHadamard` computes ``x Hᵀ`` over the last dimension at run time with ``H = A ⊗ S / √n``: ``S`` a
Sylvester matrix of order ``2^k`` applied by the fast Walsh–Hadamard transform (``k`` butterfly passes, no
matrix), ``A`` a small Paley-built factor applied by a matmul (``m`` multiply-adds an element, ``m = n / 2^k``).
:func:`add_input_hadamard` puts it in front of a linear layer whose weight was multiplied by ``Hᵀ``
(``W x = (W Hᵀ)(H x)``): the function is unchanged, the layer's input (what activation quantization sees) has its
outliers spread over all channels (QuaRot's online rotation before ``down_proj``). The transform is a child module
``input_hadamard`` run by a forward pre-hook, so calibration hooks, ``quantize`` and ``freeze`` see and keep the
rotated input; :mod:`qcal.serialization` records it per module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

HADAMARD = "hadamard"  # the name checkpoints record for this input transform

__all__ = ["HADAMARD", "hadamard_matrix", "OnlineHadamard", "add_input_hadamard", "input_hadamard",
           "refuse_input_transforms"]


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


@cache
def _paley(n: int) -> torch.Tensor | None:
    """Paley's first construction: a ±1 Hadamard matrix of order ``n = q + 1``, ``q`` a prime ≡ 3 (mod 4)."""
    q = n - 1
    if not (_is_prime(q) and q % 4 == 3):
        return None
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = chi[idx]
    return s + torch.eye(n, dtype=torch.float64)


@cache
def _hadamard_pm1(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` (Sylvester for powers of two, Paley, Kronecker products), or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and n % 4 and n != 2:
        return None  # Hadamard orders are 1, 2 and multiples of 4
    direct = _paley(n)
    if direct is not None:
        return direct
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n == 2:
        return h2
    best = None
    for m in range(4, n // 2 + 1, 4):  # n = m * k with both factors Hadamard orders: the larger factor first
        if n % m == 0:
            k = n // m
            a = _paley(m) if _paley(m) is not None else (None if m & (m - 1) else _hadamard_pm1(m))
            b = _hadamard_pm1(k) if k != n else None
            if a is not None and b is not None:
                best = torch.kron(a, b)
                break
    if best is None and n % 2 == 0:
        half = _hadamard_pm1(n // 2)
        if half is not None:
            best = torch.kron(h2, half)
    return best


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order ``n`` (entries ±1/√n, ``H Hᵀ = I``); ValueError naming ``n`` when
    none of Sylvester's and Paley's constructions and their Kronecker products reaches it."""
    h = _hadamard_pm1(int(n)) if n >= 1 else None
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known to qcal (orders 2^a * q' with q' = p + 1, "
                         f"p a prime = 3 mod 4, e.g. 576 = 4*12*12, 1536 = 12*128); use random_orthogonal")
    return (h / math.sqrt(n)).to(dtype)



@cache
def _online_factors(n: int) -> tuple[int, int]:
    """``(m, p)``: ``n = m * p``, ``p`` the largest power of two with a known ±1 Hadamard matrix of order ``m``."""
    p = 1 << ((n & -n).bit_length() - 1)  # the largest power of two dividing n
    while p > 1 and _hadamard_pm1(n // p) is None:
        p //= 2
    if _hadamard_pm1(n // p) is None:
        hadamard_matrix(n)  # raises, naming n
    return n // p, p


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) over the last dimension, a power of two."""
    p = x.shape[-1]
    h = 1
    while h < p:
        y = x.reshape(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x


class OnlineHadamard(nn.Module):
    """``x -> x Hᵀ`` over the last dimension (size ``n``), ``H`` orthonormal (:meth:`matrix`); computed in float32
    and returned in the input's dtype. Holds no tensors a checkpoint needs (the factor is rebuilt from ``n``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"OnlineHadamard: n must be a positive int, got {n!r}")
        self.n = n
        self.m, self.p = _online_factors(n)
        self._a: dict[torch.device, torch.Tensor] = {}

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The orthonormal ``n x n`` matrix ``H`` the forward applies (``forward(x) == x @ H.T``)."""
        return (torch.kron(_hadamard_pm1(self.m), _sylvester(self.p)) / math.sqrt(self.n)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard: input has {x.shape[-1]} features, the transform is of order {self.n}")
        shape, dtype = x.shape, x.dtype
        a = self._a.get(x.device)
        if a is None:
            a = self._a[x.device] = _hadamard_pm1(self.m).to(device=x.device, dtype=torch.float32).contiguous()
        fast = None if _fast is None else _fast(x.reshape(-1, self.n), a)
        if fast is not None:
            return fast.reshape(shape)
        y = _fwht(x.reshape(-1, self.m, self.p).to(torch.float32))
        if self.m > 1:
            y = torch.matmul(a, y.reshape(-1, self.m, self.p))
        return (y.reshape(shape) * (1.0 / math.sqrt(self.n))).to(dtype)

    def extra_repr(self) -> str:
        return f"n={self.n} ({self.m} x {self.p})"


# fn(rows (M, n), a (m, m) float32) -> rows Hᵀ in the rows' dtype, or None where it does not apply: the native CPU
# kernel, installed by qcal.kernels on import (this layer imports no kernels)
_fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None


def set_fast_hadamard(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None) -> None:
    """Install the function :class:`OnlineHadamard` tries before its PyTorch path."""
    global _fast
    _fast = fn


def _apply_input_hadamard(module: nn.Module, args: tuple) -> tuple:
    return (module.input_hadamard(args[0]), *args[1:])


def add_input_hadamard(linear: nn.Module) -> OnlineHadamard:
    """Put an :class:`OnlineHadamard` of the layer's input size in front of ``linear`` (a child ``input_hadamard``
    and a forward pre-hook). The caller multiplies the weight by ``Hᵀ`` (``weight @ had.matrix().T``) so that the
    layer's function is unchanged; returns the transform."""
    if input_hadamard(linear) is not None:
        raise ValueError(f"add_input_hadamard: {type(linear).__name__} already has an input Hadamard transform")
    n = getattr(linear, "in_features", None)
    if not isinstance(n, int):
        raise TypeError(f"add_input_hadamard: {type(linear).__name__} is not a linear layer (no in_features)")
    had = OnlineHadamard(n)
    linear.add_module("input_hadamard", had)
    linear.register_forward_pre_hook(_apply_input_hadamard)
    return had


def input_hadamard(module: nn.Module) -> OnlineHadamard | None:
    """The module's input Hadamard transform, or None."""
    had = module._modules.get("input_hadamard")
    return had if isinstance(had, OnlineHadamard) else None


def refuse_input_transforms(model: nn.Module, where: str) -> None:
    """ValueError naming the first module with an online input transform: formats that store only weights
    cannot carry it (the weights alone would compute another function)."""
    for name, m in model.named_modules():
        if input_hadamard(m) is not None:
            raise ValueError(f"{where}: module {name!r} applies an online Hadamard transform to its input, which "
                             "this format cannot express (its stored weight includes Hᵀ); save with qcal.save or "
                             "export(format='hf'), or quantize without the had- transform")
