"""QModuleMixin: the state of a quantized module and its three modes; math delegated to primitives.

Modes
-----
* fake-quant (default after ``quantize``): weights are float Parameters, fake-quantized in
  every forward (straight-through gradients reach them), so ordinary training loops do QAT.
* observing: inside ``qcal.Calibration`` the input observer records activations and updates
  the static input scale.
* frozen (after ``freeze``): integer weights (int4/int2 packed) and scales only; the float
  weight is dropped and the forward runs through a kernel from :mod:`qcal.kernels`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..granularity import block_size_for
from ..observers import get_observer
from ..primitives import (
    check_float,
    choose_qparams,
    dequantize,
    fake_quantize,
    float_grid,
    grad_scale,
    pack,
    quantize,
    scale_dtype_for,
    unpack,
)
from ..spec import ActivationSpec, WeightSpec
from .hadamard import HADAMARD, input_hadamard

__all__ = ["QModuleMixin", "unquantized"]


class QModuleMixin:
    """Mixed into a float module class (``QLinear(nn.Linear, QModuleMixin)``)."""

    frozen: bool = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_module(cls, module: nn.Module, name: str, weight_spec: WeightSpec | None,
                    act_spec: ActivationSpec | None) -> QModuleMixin:
        """A quantized twin of ``module`` sharing its Parameter objects; ``module`` is not modified."""
        q = cls.__new__(cls)
        q.__dict__.update(module.__dict__)
        for d in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            q.__dict__[d] = type(module.__dict__[d])(module.__dict__[d])
        q._setup_quant(name, weight_spec, act_spec)
        return q

    def _setup_quant(self, name: str, weight_spec: WeightSpec | None, act_spec: ActivationSpec | None) -> None:
        if weight_spec is None and act_spec is None:
            raise ValueError(f"{name}: nothing to quantize (weights and activations are both None)")
        self.qcal_name = name
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.frozen = False
        self.weight_shape = tuple(self.weight.shape)
        self.weight_2d_cols = self.weight[0].numel()
        check_float(self.weight, f"{name}.weight")
        if weight_spec is not None:
            block_size_for(weight_spec.granularity, tuple(self.weight_2d().shape), f"{name} (weight)")
        # weight qparams; None means "derived from the current weight at every forward"
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_zero_point", None)
        if act_spec is not None and not act_spec.dynamic:
            obs_cls = get_observer(act_spec.observer)
            self.input_observer = obs_cls(act_spec.qtype, None, act_spec.symmetric, name=f"{name} (input)")
        if weight_spec is not None and weight_spec.observer != "minmax":
            self.fix_weight_qparams()

    # ---------------------------------------------------------------- weights
    def weight_2d(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the ``(out_features, -1)`` matrix the quantization is defined on."""
        w = self.weight if w is None else w
        return w.reshape(w.shape[0], -1)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fixed weight (scale, zero_point) if set, else min/max of the current weight."""
        if self.weight_scale is not None:
            return _learnable(self.weight_scale, getattr(self, "lsq_weight_grad", 1.0)), self.weight_zero_point
        spec = self.weight_spec
        return choose_qparams(self.weight_2d().detach(), spec.qtype, spec.granularity, spec.symmetric,
                              name=f"{self.qcal_name} (weight)", integer_zero_point=spec.integer_zero_point)

    @torch.no_grad()
    def fix_weight_qparams(self, scale: torch.Tensor | None = None,
                           zero_point: torch.Tensor | None = None) -> None:
        """Fix the weight qparams: given ones, or from the spec's observer on the current weight."""
        spec = self.weight_spec
        if scale is None:
            obs = get_observer(spec.observer)(spec.qtype, spec.granularity, spec.symmetric, momentum=None,
                                              name=f"{self.qcal_name} (weight)")
            obs.integer_zero_point = spec.integer_zero_point
            obs(self.weight_2d().detach())
            scale, zero_point = obs.calculate_qparams(scale_dtype_for(self.weight.dtype))
        self.weight_scale = scale.detach().clone()
        self.weight_zero_point = None if zero_point is None else zero_point.detach().clone()

    def qweight_fake(self) -> torch.Tensor:
        """Fake-quantized weight (float, straight-through gradients), in the weight's shape."""
        if self.weight_spec is None:
            return self.weight
        s, zp = self.weight_qparams()
        w = fake_quantize(self.weight_2d(), s, zp, self.weight_spec.qtype, name=f"{self.qcal_name} (weight)")
        return w.reshape(self.weight_shape)

    def int_weight(self) -> torch.Tensor:
        """The integer (or float8) weight codes as an unpacked ``(out, -1)`` tensor."""
        qt = self.weight_spec.qtype
        if self.frozen:
            return unpack(self.qweight, qt, self.weight_2d_cols)
        s, zp = self.weight_qparams()
        return quantize(self.weight_2d().detach(), s, zp, qt, name=f"{self.qcal_name} (weight)")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight reconstructed from the frozen codes (or the fake-quant weight)."""
        if not self.frozen:
            w = self.qweight_fake().detach()
            return w if dtype is None else w.to(dtype)
        if self.weight_spec is None:
            return self.__dict__["_parameters"]["weight"]
        dtype = dtype or self.weight_scale.dtype
        q = self.int_weight()
        if self.weight_spec.qtype.is_subbyte_float:  # codes -> their values
            q = float_grid(self.weight_spec.qtype, q.device)[q.long()]
        w = dequantize(q, self.weight_scale, self.weight_zero_point, dtype)
        return w.reshape(self.weight_shape)

    # ---------------------------------------------------------------- activations
    def observe_input(self, x: torch.Tensor, momentum: float | None = None) -> bool:
        """Record a calibration input and refresh the static input scale. False if not applicable."""
        if self.act_spec is None or self.act_spec.dynamic:
            return False
        if x.numel() == 0:  # an empty batch has no range to record
            return False
        x2 = x.reshape(-1, x.shape[-1])
        self.input_observer(x2, momentum)
        s, zp = self.input_observer.calculate_qparams(scale_dtype_for(x.dtype))
        if isinstance(self.input_scale, nn.Parameter):
            with torch.no_grad():
                self.input_scale.copy_(s)
        else:
            self.input_scale = s
        self.input_zero_point = zp
        return True

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input activation according to the activation spec."""
        spec = self.act_spec
        if spec is None or x.numel() == 0:
            return x
        x2 = x.reshape(-1, x.shape[-1])
        if spec.dynamic:
            per_token = self._per_token_ok and spec.per_token
            if per_token and self.frozen:
                # a row holding NaN/Inf gives a NaN output row, as the fast kernels do; the other rows are unaffected
                bad = ~torch.isfinite(x2).all(dim=-1, keepdim=True)
                x2 = torch.where(bad, torch.zeros((), dtype=x2.dtype, device=x2.device), x2)
            s, zp = choose_qparams(x2.detach(), spec.qtype, spec.granularity(per_token),
                                   spec.symmetric, scale_dtype=torch.float32, name=f"{self.qcal_name} (input)")
            out = fake_quantize(x2, s, zp, spec.qtype, name=f"{self.qcal_name} (input)")
            if per_token and self.frozen:
                out = torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
            return out.reshape(x.shape)
        else:
            if self.input_scale is None:
                raise RuntimeError(
                    f"{self.qcal_name}: static activation quantization was never calibrated; run forward "
                    f"passes inside `with qcal.Calibration():` first, or quantize with dynamic=True"
                )
            s, zp = _learnable(self.input_scale, getattr(self, "lsq_input_grad", 1.0)), self.input_zero_point
        return fake_quantize(x2, s, zp, spec.qtype, name=f"{self.qcal_name} (input)").reshape(x.shape)

    @property
    def calibrated(self) -> bool:
        """True unless static activation quantization still lacks its scale."""
        return self.act_spec is None or self.act_spec.dynamic or self.input_scale is not None

    # ---------------------------------------------------------------- freeze
    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float weight by integer codes and fixed scales; choose a kernel."""
        if self.frozen:
            return
        if not self.calibrated:
            raise RuntimeError(
                f"{self.qcal_name}: cannot freeze, static activation quantization was never calibrated "
                f"(run `with qcal.Calibration(): model(samples)` before freeze)"
            )
        if self.weight_spec is not None:
            s, zp = self.weight_qparams()
            s = s.detach().clone()
            zp = None if zp is None else zp.detach().clone()
            q = quantize(self.weight_2d().detach(), s, zp, self.weight_spec.qtype, name=f"{self.qcal_name} (weight)")
            self._parameters.pop("weight")
            if "weight_scale" in self._parameters:
                self._parameters.pop("weight_scale")
            if "weight_zero_point" in self._parameters:
                self._parameters.pop("weight_zero_point")
            self.register_buffer("qweight", pack(q, self.weight_spec.qtype))
            self.register_buffer("weight_scale", s)
            self.register_buffer("weight_zero_point", zp)
        if "input_observer" in self._modules:
            del self._modules["input_observer"]
        self.frozen = True
        self.select_kernel()

    def select_kernel(self) -> None:
        """(Re)choose the frozen forward kernel for the current device and scheme (:mod:`qcal.kernels`)."""
        self.kernel = _kernel_selector(self)

    def _canonical_state(self) -> tuple | None:
        """Device and dtypes of the canonical frozen buffers (None when not frozen with quantized weights)."""
        if not self.__dict__.get("frozen") or getattr(self, "qweight", None) is None:
            return None
        return tuple((b.device, b.dtype) for b in (self.qweight, self.weight_scale, self.weight_zero_point)
                     if b is not None)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()``...: a frozen module whose canonical buffers changed device or
        dtype derives its kernel layout afresh.

        Derived layouts are functions of the canonical state on the current device and dtype, so a
        moved or cast model computes exactly what a checkpoint loaded in that state computes.
        """
        before = self._canonical_state()
        wide = {k: b for k in _QPARAMS if isinstance(b := self._buffers.get(k), torch.Tensor)
                and b.is_floating_point() and b.dtype != torch.float16}
        derived = {k: b for k, b in self._buffers.items() if k.startswith("_k_") and isinstance(b, torch.Tensor)}
        codes = self._buffers.get("qweight")  # float8 codes are data, not a float: casts must not widen them
        fp8 = isinstance(codes, torch.Tensor) and codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if fp8:
            self._buffers["qweight"] = codes.view(torch.uint8)  # an integer tensor moves but is never cast
        try:
            out = super()._apply(fn, recurse)
        finally:
            if fp8:
                self._buffers["qweight"] = self._buffers["qweight"].view(codes.dtype)
        for k, b in wide.items():  # .half() must not squeeze the scales into float16's range (scale_dtype_for)
            new = self._buffers.get(k)
            if isinstance(new, torch.Tensor) and new.dtype == torch.float16:
                self._buffers[k] = b.to(device=new.device, dtype=torch.float32)
        for k, b in derived.items():  # kernel-derived tensors keep the dtype and layout their kernel reads (a
            new = self._buffers.get(k)  # channels-last cast must not re-stride a 4-D packed layout); only the device
            if isinstance(new, torch.Tensor) and (new.dtype != b.dtype or new.stride() != b.stride()):  # moves
                self._buffers[k] = b.to(device=new.device)
        after = self._canonical_state()
        if after is not None and after != before and self.qweight.device.type != "meta":
            self.select_kernel()
        return out

    def frozen_forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Reference frozen forward: fake-quantized input, dequantized weight, float op."""
        x = self.quantize_input(x)
        return self.float_forward(x, self.dequantized_weight(x.dtype))

    # ---------------------------------------------------------------- forward
    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return self.kernel(self, x)
        return self.float_forward(self.quantize_input(x), self.qweight_fake())

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("frozen") and self.weight_spec is not None:
            return self.dequantized_weight()
        return super().__getattr__(name)

    def qcal_config(self) -> dict:
        """What the manifest records for this module (``input_transform`` only where it has one)."""
        cfg = {
            "type": type(self).__name__,
            "weights": None if self.weight_spec is None else self.weight_spec.to_dict(),
            "activations": None if self.act_spec is None else self.act_spec.to_dict(),
            "frozen": self.frozen,
            "weight_shape": list(self.weight_shape),
        }
        if input_hadamard(self) is not None:
            cfg["input_transform"] = HADAMARD
        return cfg

    def extra_repr(self) -> str:
        base = super().extra_repr()
        w = "none" if self.weight_spec is None else (
            f"{self.weight_spec.qtype}/{type(self.weight_spec.granularity).__name__}"
            + (f"({self.weight_spec.group_size})" if self.weight_spec.group_size else ""))
        a = "none" if self.act_spec is None else (
            f"{self.act_spec.qtype}/{'dynamic' if self.act_spec.dynamic else 'static'}")
        state = f"frozen[{self.kernel.name}]" if self.frozen else "fake-quant"
        return f"{base}, weights={w}, activations={a}, {state}"



class _ReferenceForward:
    """The frozen forward before :mod:`qcal.kernels` installs its selector: dequantize, then the float op."""

    name = "reference"
    dispatch = "dequant + float op"

    def __call__(self, module: QModuleMixin, x: torch.Tensor) -> torch.Tensor:
        return module.frozen_forward_reference(x)


_kernel_selector: Callable[[QModuleMixin], Any] = lambda module: _ReferenceForward()


@contextlib.contextmanager
def unquantized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the ``with``, the not-yet-frozen quantized modules under ``module`` run their float op on their float
    weights and unquantized inputs (hooks still run): statistics of the float function of a model already swapped
    for quantization, e.g. AWQ's on GPTQ's pass."""
    mods = [m for m in module.modules() if isinstance(m, QModuleMixin) and not m.frozen and "forward" not in m.__dict__]
    try:
        for m in mods:
            m.forward = lambda x, m=m: m.float_forward(x, m.weight)
        yield module
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def set_kernel_selector(selector: Callable[[QModuleMixin], Any]) -> None:
    """Install the function that chooses a frozen module's kernel (called by :mod:`qcal.kernels` on import, so
    that this layer needs no import of the kernels)."""
    global _kernel_selector
    _kernel_selector = selector


_QPARAMS = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


def _learnable(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """A trainable (Parameter) scale gets LSQ's gradient scaling and stays positive; buffers pass through."""
    if isinstance(scale, nn.Parameter):
        return grad_scale(scale, factor).clamp(min=torch.finfo(scale.dtype).tiny)
    return scale
