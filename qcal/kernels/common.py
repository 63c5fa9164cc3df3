"""Shared pieces of the linear kernels: input/output plumbing, per-token int8 quantization, int4 layouts."""

from __future__ import annotations

import torch

from . import Kernel

__all__ = ["LinearKernel", "quantize_per_token", "int4_codes_u8", "dequant_int4", "tinygemm_group_size",
           "tinygemm_scales_zeros", "is_frozen_linear", "set_derived"]

_TINY = torch.finfo(torch.float32).tiny


def is_frozen_linear(module) -> bool:
    """A frozen qcal linear layer with quantized weights."""
    return (getattr(module, "frozen", False) and getattr(module, "weight_spec", None) is not None
            and hasattr(module, "in_features") and getattr(module, "qweight", None) is not None)


def set_derived(module, name: str, tensor: torch.Tensor) -> None:
    """Attach a kernel-derived tensor as a non-persistent buffer (never part of a checkpoint)."""
    module.register_buffer(name, tensor, persistent=False)


_SCALE_DIV: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = _SCALE_DIV.get(device)
    if c is None:  # 1-element float32 tensors: they promote a bf16 amax to float32 in the same op
        c = _SCALE_DIV[device] = (torch.full((1,), _TINY, device=device), torch.full((1,), 127.0, device=device))
    return c


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization of a 2-D tensor: ``(codes as float32, scale (M, 1) float32)``.

    Same math as the reference (``scale = max(amax / 127, tiny)`` in float32, ``round(x / scale)``
    half to even); the codes are exact integers in [-127, 127], so callers may cast them to int8 or
    bf16 without loss. Five small ops: eager decode is dominated by per-op overhead.
    """
    tiny, q = _scale_consts(x2.device)
    scale = torch.addcdiv(tiny, x2.abs().amax(dim=-1, keepdim=True), q)  # tiny + amax/127 == max(amax/127, tiny)
    return torch.round(x2 / scale), scale


def int4_codes_u8(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical packed int4 ``(N, K/2)`` -> unsigned nibble codes ``u = q + 8`` as uint8 ``(N, K)``."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], -1)


def dequant_int4(module, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``(u - 8 - zp) * s`` of a frozen int4 linear, in ``dtype`` (fewest passes), computed in fp32
    and rounded once for 16-bit dtypes, so that every path (native, PyTorch ops, traced) builds the same weight.

    bf16 on an AVX512-BF16 CPU: qcal's one-pass native kernel."""
    if dtype == torch.bfloat16:
        from . import native

        w = native.dequant_int4(module.qweight, module.weight_scale, module.weight_zero_point)
        if w is not None:
            return w
    u = int4_codes_u8(module.qweight)
    n, k = u.shape
    math = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # fp32 math, one rounding
    s = module.weight_scale.to(math)
    groups = s.shape[1]
    u = u.view(n, groups, k // groups)
    zp = module.weight_zero_point
    # a 0-dim float tensor keeps uint8 - off in ``math`` (a Python 8.0 would promote to float32)
    off = torch.full((), 8.0, dtype=math, device=u.device) if zp is None else (zp.to(math) + 8.0).unsqueeze(-1)
    return ((u - off) * s.unsqueeze(-1)).view(n, k).to(dtype)


def tinygemm_group_size(module) -> int | None:
    """The tinygemm group size that represents this int4 weight (per-channel becomes one K-tile group)."""
    k = module.qweight.shape[1] * 2
    groups = module.weight_scale.shape[1]
    g = k // groups
    if groups == 1:  # per channel: repeat the scale over the largest supported group dividing K
        return next((c for c in (256, 128, 64, 32) if k % c == 0), None)
    return g if g in (32, 64, 128, 256) else None


def tinygemm_scales_zeros(module, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K/g, N, 2)`` scales and zeros with tinygemm's ``w = (u - 8) * scale + zero``; ours ``zero = -zp * s``."""
    s = module.weight_scale.float()
    zp = module.weight_zero_point
    z = torch.zeros_like(s) if zp is None else -zp.float() * s
    k = module.qweight.shape[1] * 2
    rep = (k // group_size) // s.shape[1]
    if rep > 1:
        s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)
    return torch.stack((s.t(), z.t()), dim=-1).to(dtype).contiguous()


class LinearKernel(Kernel):
    """Kernel for a frozen linear layer on one device type, dispatching on ``M`` (rows of the input).

    Subclasses implement ``small(module, x2)`` for ``M <= max_small_m`` and ``large`` otherwise,
    on a 2-D input already in ``compute_dtype`` (None: the input's dtype), returning the output
    without bias. ``max_small_m`` is the measured crossover (see ``benchmarks/bench_kernels.py``).
    """

    device_type = "cpu"
    compute_dtype: torch.dtype | None = torch.bfloat16
    max_small_m = 0
    small_path = "-"
    large_path = "-"

    def supports(self, module) -> bool:
        return is_frozen_linear(module) and module.qweight.device.type == self.device_type and \
            self.supports_linear(module)

    def supports_linear(self, module) -> bool:  # pragma: no cover - overridden
        return False

    @property
    def dispatch(self) -> str:
        """Human-readable M dispatch, e.g. ``M<=16: tinygemm | M>16: dequant+mm``."""
        if self.max_small_m <= 0:
            return self.large_path
        return f"M<={self.max_small_m}: {self.small_path} | M>{self.max_small_m}: {self.large_path}"

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.device_type:  # the module moved after freeze: choose again
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
        y = self.small(module, x2) if x2.shape[0] <= self.max_small_m else self.large(module, x2)
        if module.bias is not None:
            y = y + module.bias
        if y.dtype != dtype:
            y = y.to(dtype)
        return y.view(*shape[:-1], y.shape[-1])

    def small(self, module, x2: torch.Tensor) -> torch.Tensor:
        return self.large(module, x2)

    def large(self, module, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError
