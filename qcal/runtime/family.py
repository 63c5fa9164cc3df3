"""Which Hugging Face causal LMs the lean runtime computes exactly, told by their structure (not their class names).

A model qualifies when it is a pre-norm decoder whose layers hold exactly what the runtime applies: ``self_attn``
with ``q_proj/k_proj/v_proj/o_proj`` (full causal attention, ``head_dim ** -0.5`` scaling, rotary embeddings from
the inner model's ``rotary_emb``), ``mlp`` with ``gate_proj/up_proj/down_proj`` and a SiLU activation,
``input_layernorm`` and ``post_attention_layernorm`` RMSNorms (``weight`` times the normalized row, no bias). Any
other weights in a layer (Qwen3's ``q_norm``/``k_norm``, Gemma's extra norms, attention sinks) would be ignored,
so such models are refused, with the module named. Llama, Mistral (without a sliding window), Qwen2 and SmolLM
qualify.
"""

from __future__ import annotations

import inspect
import math
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["structure_reason", "attention_shape", "forward_params"]

ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER_PARTS = ("self_attn", "mlp") + _NORMS
# config entries that scale embeddings, residuals, scores or logits (the runtime applies none of them)
_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                "final_logit_softcapping", "attn_logit_softcapping")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # tables that change with the sequence length


def forward_params(model: nn.Module) -> set[str]:
    """The parameter names of ``model``'s forward (of the original module under ``torch.compile``)."""
    try:
        return set(inspect.signature(getattr(model, "_orig_mod", model).forward).parameters)
    except (TypeError, ValueError):
        return set()


def attention_shape(config: object) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _stateful(module: nn.Module) -> bool:
    return any(True for _ in chain(module.parameters(), module.buffers()))


def _own_state(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers held by ``module`` itself (not its children)."""
    return [n for n, t in chain(module._parameters.items(), module._buffers.items()) if t is not None]


def _extra_children(module: nn.Module, where: str, allowed: tuple[str, ...]) -> str | None:
    """The reason when ``module`` holds weights outside ``allowed`` children."""
    own = _own_state(module)
    if own:
        return f"{where} holds {own[0]!r} itself, which the lean runtime does not apply"
    for name, child in module.named_children():
        if name not in allowed and _stateful(child):
            return f"{where}.{name} ({type(child).__name__}) holds weights the lean runtime does not apply"
    return None


def _rmsnorm_reason(norm: nn.Module | None, where: str) -> str | None:
    if norm is None:
        return f"{where} is missing"
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(norm, "variance_epsilon"):
        return f"{where} ({type(norm).__name__}) is not an RMSNorm with a weight and variance_epsilon"
    extra = [n for n, _ in chain(norm.named_parameters(), norm.named_buffers()) if n != "weight"]
    if extra or getattr(norm, "bias", None) is not None:
        return f"{where} ({type(norm).__name__}) holds {(extra or ['bias'])[0]!r} besides its weight"
    return None


def _is_silu(act: object) -> bool:
    if not callable(act):
        return False
    probe = torch.linspace(-8.0, 8.0, 33)
    try:
        return torch.allclose(act(probe), F.silu(probe))
    except Exception:  # an activation that cannot take a plain fp32 tensor is not the SiLU the runtime applies
        return False


def _config_reason(cfg: object) -> str | None:
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "needs hidden_act='silu' and pretraining_tp=1"
    layer_types = getattr(cfg, "layer_types", None) or ()
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types) or (
            getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", None) is not False):
        return "sliding-window attention is not supported"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return f"partial rotary embeddings (partial_rotary_factor={cfg.partial_rotary_factor}) are not supported"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope_type {rope_type!r} changes its tables with the sequence length"
    for key in _MULTIPLIERS:
        value = getattr(cfg, key, None)
        if value is not None and value != 1:
            return f"{key}={value} is not applied by the lean runtime"
    return None


def structure_reason(model: nn.Module) -> str | None:
    """None when ``model`` has the structure described in the module docstring, else what is missing or extra."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList) or not hasattr(model, "lm_head"):
        return "not a causal LM with model.model.layers and lm_head"
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no config"
    reason = _config_reason(cfg)
    if reason is not None:
        return reason
    if getattr(inner, "rotary_emb", None) is None:
        return "model.model has no rotary_emb module"
    emb = model.get_input_embeddings()
    if getattr(emb, "weight", None) is None:
        return "the input embedding has no weight"
    top = _extra_children(model, type(model).__name__, ("model", "lm_head"))
    body = _extra_children(inner, "model.model", ("layers", "norm", "rotary_emb") +
                           tuple(n for n, c in inner.named_children() if c is emb))
    reason = top or body or _rmsnorm_reason(getattr(inner, "norm", None), "model.model.norm")
    if reason is not None:
        return reason
    heads, kv_heads, head_dim = attention_shape(cfg)
    for i, layer in enumerate(inner.layers):
        where = f"model.layers.{i}"
        missing = [n for n in _LAYER_PARTS if getattr(layer, n, None) is None]
        if missing:
            return f"{where} ({type(layer).__name__}) lacks {', '.join(missing)}"
        attn, mlp = layer.self_attn, layer.mlp
        missing = [f"self_attn.{p}" for p in ATTENTION_PROJ if getattr(attn, p, None) is None]
        missing += [f"mlp.{p}" for p in MLP_PROJ if getattr(mlp, p, None) is None]
        if missing:
            return f"{where} lacks {', '.join(missing)}"
        reason = (_extra_children(layer, where, _LAYER_PARTS)
                  or _extra_children(attn, f"{where}.self_attn", ATTENTION_PROJ)
                  or _extra_children(mlp, f"{where}.mlp", MLP_PROJ + ("act_fn",))
                  or _rmsnorm_reason(layer.input_layernorm, f"{where}.input_layernorm")
                  or _rmsnorm_reason(layer.post_attention_layernorm, f"{where}.post_attention_layernorm"))
        if reason is not None:
            return reason
        if not _is_silu(getattr(mlp, "act_fn", None)):
            return f"{where}.mlp.act_fn is not a SiLU"
        if getattr(attn, "sliding_window", None) is not None:
            return f"{where}.self_attn uses a sliding window"
        scaling = getattr(attn, "scaling", None)
        if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
            return f"{where}.self_attn scales scores by {scaling}, not head_dim ** -0.5"
        for p, size in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
            out = getattr(getattr(attn, p), "out_features", size)
            if out != size:
                return f"{where}.self_attn.{p} has {out} outputs, not {size} (heads x head_dim)"
    return None
