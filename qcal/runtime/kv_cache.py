"""A quantized KV cache for Hugging Face models: int8 or int4 keys and values, per token and head, asymmetric.

Each new token's key and value vectors are quantized once, per (batch, head, token) over the head dimension or
per group of it (a float16 scale and minimum each), and appended: nothing is re-quantized as the cache grows
(unlike ``transformers.QuantizedCache``'s residual window, whose states are quantized again at every flush). Every
``update`` returns the whole cache dequantized in the model's dtype, the new tokens included, so attention --
prefill as much as decode -- reads exactly what a quantized cache holds: a perplexity measured through it is the
perplexity of generation with it.

Storage per token and head of dimension ``d`` against ``2 d`` bytes in bf16: int8, one group, ``d + 4`` (53% at
``d = 64``, 52% at 128); int4 in groups of 16 (the default), ``d / 2 + d / 4`` (37.5%); int4 over the whole head,
``d / 2 + 4`` (28% at 64, 27% at 128), less accurate.

``QuantizedKVCache(model.config, bits=8)`` goes wherever a ``transformers`` cache does
(``model.generate(..., past_key_values=cache)``, ``model(ids, past_key_values=cache, use_cache=True)``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "quantize_kv", "dequantize_kv", "DEFAULT_GROUP"]

#: Values per scale and minimum by bit width (None: the whole head dimension). Per-token int4 over a whole head of
#: 64 costs SmolLM2-135M 14.6% perplexity at 1024 tokens, groups of 32 7.3%, of 16 4.0%; int8 per head 0.17%.
DEFAULT_GROUP: dict[int, int | None] = {8: None, 4: 16}

_F16_MAX = 65504.0
_F16_TINY = 2.0**-14  # float16's smallest normal: scales below it would lose precision


def _check_layout(d: int, bits: int, group_size: int | None) -> int:
    """The group size for rows of ``d`` values (ValueError where it does not fit)."""
    g = d if group_size is None else group_size
    if g < 1 or d % g:
        raise ValueError(f"quantize_kv: group_size {group_size} does not divide the head dimension {d}")
    if bits == 4 and g % 2:
        raise ValueError(f"quantize_kv: int4 packs two codes a byte; the group size {g} is odd")
    return g


def quantize_kv(x: torch.Tensor, bits: int, group_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, minimum)`` of ``x`` (``(..., d)``) per vector over its last dimension, or per group of
    ``group_size`` along it: uint8 codes ``(..., d)`` (int8) or ``(..., d // 2)`` (int4, even ``d``, low nibble
    first), float16 ``scale`` and ``minimum`` ``(..., d // group_size)``; ``x ≈ codes * scale + minimum``.
    Non-finite groups dequantize to NaN."""
    if bits not in (4, 8):
        raise ValueError(f"quantize_kv: bits must be 4 or 8, got {bits}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_kv: expected a float tensor, got {x.dtype}")
    d = x.shape[-1]
    g = _check_layout(d, bits, group_size)
    qmax = (1 << bits) - 1
    xf = x.float().reshape(*x.shape[:-1], d // g, g)
    mn, mx = xf.amin(-1), xf.amax(-1)
    mn16 = mn.clamp(-_F16_MAX, _F16_MAX).half()
    scale16 = ((mx - mn16.float()) / qmax).clamp(_F16_TINY, _F16_MAX).half()
    bad = ~(torch.isfinite(mn) & torch.isfinite(mx))
    if bad.any():
        scale16 = scale16.masked_fill(bad, float("nan"))
    codes = ((xf - mn16.float().unsqueeze(-1)) / scale16.float().unsqueeze(-1)).round_().clamp_(0, qmax)
    codes = codes.nan_to_num_(0).to(torch.uint8).reshape(x.shape)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale16, mn16


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize_kv`, in ``dtype`` (the group size is read from the shapes). bf16 on an
    AVX512-BF16 CPU: one native pass (``torch.ops.qcal.kv_dequant``), the same bits as the PyTorch ops below."""
    if dtype == torch.bfloat16 and codes.dim() == 4 and codes.device.type == "cpu" and _native():
        return torch.ops.qcal.kv_dequant(codes, scale, minimum, bits)
    if bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), -1).flatten(-2)
    groups = scale.shape[-1]
    x = codes.float().unflatten(-1, (groups, codes.shape[-1] // groups))
    return (x * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)).flatten(-2).to(dtype)


def _native() -> bool:
    from qcal.kernels.native import has

    return has("kv_quantize", "kv_dequant")


class _Store:
    """Growable (batch, heads, tokens, ...) buffers of codes, scales and minima, sized for ``x``'s batch, heads and
    head dimension; states are quantized straight into them (natively for bf16 on the CPU); capacity doubles."""

    def __init__(self, x: torch.Tensor, bits: int, group_size: int | None) -> None:
        b, h, t, d = x.shape
        g = _check_layout(d, bits, group_size)
        self.bits, self.group_size, self.d, self.length = bits, group_size, d, 0
        self.codes = torch.empty(b, h, t, d if bits == 8 else d // 2, dtype=torch.uint8, device=x.device)
        self.scale = torch.empty(b, h, t, d // g, dtype=torch.float16, device=x.device)
        self.minimum = torch.empty_like(self.scale)

    def check(self, x: torch.Tensor) -> None:
        if x.shape[:2] != self.codes.shape[:2] or x.shape[3] != self.d:
            raise ValueError(f"QuantizedKVCache: new states of shape {tuple(x.shape)} do not match the cache's "
                             f"{tuple(self.codes.shape[:2])} x tokens x {self.d}")

    def write(self, x: torch.Tensor) -> None:
        """Quantize ``x`` (checked by :meth:`check`) into the next positions."""
        n, t = self.length, x.shape[2]
        if n + t > self.codes.shape[2]:
            cap = max(n + t, 2 * self.codes.shape[2])
            self.codes, self.scale, self.minimum = (self._grow(buf, cap) for buf in (self.codes, self.scale,
                                                                                      self.minimum))
        slots = self.codes[:, :, n:n + t], self.scale[:, :, n:n + t], self.minimum[:, :, n:n + t]
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.stride(3) == 1 and _native():
            torch.ops.qcal.kv_quantize(x, *slots, self.bits)
        else:
            for slot, part in zip(slots, quantize_kv(x, self.bits, self.group_size), strict=True):
                slot.copy_(part)
        self.length = n + t

    def _grow(self, buf: torch.Tensor, cap: int) -> torch.Tensor:
        new = buf.new_empty((*buf.shape[:2], cap, *buf.shape[3:]))
        new[:, :, :self.length] = buf[:, :, :self.length]
        return new

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.length
        return self.codes[:, :, :n], self.scale[:, :, :n], self.minimum[:, :, :n]

    def index_batch(self, index: torch.Tensor) -> None:
        self.codes, self.scale, self.minimum = (t.index_select(0, index.to(t.device)) for t in self.view())

    def repeat_batch(self, repeats: int) -> None:
        self.codes, self.scale, self.minimum = (t.repeat_interleave(repeats, dim=0) for t in self.view())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.view())


class QuantizedKVLayer(BaseQuantizedLayer):
    """One attention layer's keys and values as int8 / int4 codes per (batch, head, token) (see the module)."""

    def __init__(self, bits: int = 8, group_size: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"QuantizedKVCache: bits must be 4 or 8, got {bits}")
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self._k: _Store | None = None
        self._v: _Store | None = None

    def _quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_kv(tensor, self.bits, self.group_size)

    def _dequantize(self, q_tensor: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return dequantize_kv(*q_tensor, self.bits, self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and append the new states; return all keys and values (new ones included), dequantized."""
        if key_states.dim() != 4 or value_states.dim() != 4 or key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError("QuantizedKVCache: expected keys and values of shape (batch, heads, tokens, head_dim), "
                             f"got {tuple(key_states.shape)} and {tuple(value_states.shape)}")
        if not key_states.is_floating_point() or not value_states.is_floating_point():
            raise TypeError(f"QuantizedKVCache: expected float keys and values, got {key_states.dtype} and "
                            f"{value_states.dtype}")
        if not self.is_initialized:
            k, v = _Store(key_states, self.bits, self.group_size), _Store(value_states, self.bits, self.group_size)
            self.lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
            self._k, self._v = k, v
        self._k.check(key_states)  # both checked before either is stored
        self._v.check(value_states)
        self._k.write(key_states)
        self._v.write(value_states)
        self.cumulative_length = self._k.length
        self._quantized_keys, self._quantized_values = self._k.view(), self._v.view()
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search); codes and their scales move together, nothing is re-quantized."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k.index_batch(indices)
            self._v.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k.repeat_batch(repeats)
            self._v.repeat_batch(repeats)

    def nbytes(self) -> int:
        """Bytes of codes, scales and minima held (the tokens stored, not the spare capacity)."""
        return 0 if self._k is None else self._k.nbytes() + self._v.nbytes()


class QuantizedKVCache(Cache):
    """A ``transformers`` cache whose every layer is a :class:`QuantizedKVLayer`: ``bits`` 8 or 4, a scale and
    minimum per ``group_size`` values of each key and value vector (default: :data:`DEFAULT_GROUP` for the bits,
    ``None`` the whole head dimension)."""

    def __init__(self, config, bits: int = 8, group_size: int | None | str = "default") -> None:
        if bits not in (4, 8):
            raise ValueError(f"QuantizedKVCache: bits must be 4 or 8, got {bits}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if group_size == "default":  # the default group, where it divides the head (else the whole head)
            group_size = DEFAULT_GROUP[bits]
            group_size = group_size if group_size is not None and head_dim % group_size == 0 else None
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"QuantizedKVCache: group_size must be a positive int or None, got {group_size!r}")
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if types - {"full_attention"}:
            raise ValueError(f"QuantizedKVCache: only full-attention layers are supported, the model has {types}")
        if group_size is not None and head_dim % group_size:
            raise ValueError(f"QuantizedKVCache: group_size {group_size} does not divide the head dimension {head_dim}")
        self.bits, self.group_size = bits, group_size
        super().__init__(layers=[QuantizedKVLayer(bits, group_size) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes the cache holds over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
