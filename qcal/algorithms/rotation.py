"""Orthogonal rotations fused into the weights of Llama-family models (QuaRot, SpinQuant without training).

A rotation ``Q`` of the residual stream changes no output: every linear that reads the stream gets ``W Q``,
every linear that writes it (``o_proj``, ``down_proj``) ``Qᵀ W``, the embeddings ``E Q``; an RMSNorm commutes with
``Q`` once its weight is folded into the linears it feeds (``rms(Qᵀx) = rms(x)``). Per attention head, the
values and ``o_proj``'s matching input columns take a second rotation. What changes is the quantization: a
(randomised) Hadamard matrix spreads a few outlier channels over all of them, so round-to-nearest and GPTQ lose
less, per group and per channel alike.

:func:`hadamard_matrix` (from :mod:`qcal.nn.hadamard`) builds orthonormal Hadamard matrices of the sizes LLMs use
that are not powers of two; :func:`random_orthogonal` is the fallback for sizes without one. :func:`rotate_model`
works in float64 and writes back in the weights' dtype: the rotated float model's logits equal the original's within
float32 rounding. Tied input and output embeddings are untied (the head absorbs the final norm's weight; the
embeddings do not). :func:`hadamard_mlp_inputs` adds QuaRot's online rotation: a fast Hadamard transform of
``down_proj``'s input at run time, its inverse folded into the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.hadamard import add_input_hadamard, hadamard_matrix, input_hadamard

__all__ = ["hadamard_matrix", "random_hadamard", "random_orthogonal", "fuse_norms", "rotate_model",
           "hadamard_mlp_inputs"]


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian matrix, signs fixed)."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``diag(±1) H``: a Hadamard matrix with randomly signed rows (QuaRot's randomised Hadamard), or a random
    orthogonal matrix where no Hadamard matrix of order ``n`` is known."""
    try:
        h = hadamard_matrix(n)
    except ValueError:
        return random_orthogonal(n, seed, dtype)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1
    return (signs[:, None] * h).to(dtype)


def _llama_parts(model: nn.Module):
    """(embeddings, blocks, final norm, head) of a Llama-family causal LM; ValueError naming what is missing."""
    inner = getattr(model, "model", None)
    names = ("embed_tokens", "layers", "norm")
    if inner is None or not all(hasattr(inner, n) for n in names) or getattr(model, "lm_head", None) is None:
        raise ValueError(f"rotate_model: {type(model).__name__} is not a Llama-family causal LM "
                         "(model.embed_tokens, model.layers, model.norm, lm_head)")
    for i, block in enumerate(inner.layers):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
        for parent, leaves in need:
            if parent is None or not all(type(getattr(parent, leaf, None)) is nn.Linear for leaf in leaves):
                raise ValueError(f"rotate_model: block {i} has no float nn.Linear {leaves} "
                                 "(rotate before quantizing; Llama-family attention and gated MLP only)")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not _is_rmsnorm(getattr(block, norm, None)):
                raise ValueError(f"rotate_model: block {i}.{norm} is not an RMSNorm (weight * x / rms(x))")
    if not _is_rmsnorm(inner.norm):
        raise ValueError("rotate_model: the final norm is not an RMSNorm")
    return inner.embed_tokens, inner.layers, inner.norm, model.lm_head


def _is_rmsnorm(m) -> bool:
    """An RMSNorm that computes ``weight * x / rms(x)`` (Llama's, Qwen2's, Mistral's; not Gemma's ``1 + weight``)."""
    return m is not None and "rmsnorm" in type(m).__name__.lower() and "gemma" not in type(m).__name__.lower() \
        and isinstance(getattr(m, "weight", None), torch.Tensor) and getattr(m, "bias", None) is None


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype)


def _untie(model: nn.Module) -> None:
    head, emb = model.lm_head, model.model.embed_tokens
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    for cfg in (getattr(model.config, "get_text_config", lambda: None)(),):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


@torch.no_grad()
def fuse_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm's weight into the linears it feeds (q/k/v, gate/up, the head) and set it to 1; the float
    function is unchanged. Unties tied embeddings (the head takes the final norm's weight)."""
    _, blocks, norm, head = _llama_parts(model)
    _untie(model)

    def fold(n: nn.Module, linears) -> None:
        g = n.weight.detach().double()
        for lin in linears:
            _set(lin, lin.weight.detach().double() * g[None, :])
        n.weight.data = torch.ones_like(n.weight)

    for block in blocks:
        a, m = block.self_attn, block.mlp
        fold(block.input_layernorm, (a.q_proj, a.k_proj, a.v_proj))
        fold(block.post_attention_layernorm, (m.gate_proj, m.up_proj))
    fold(norm, (head,))
    return model


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, heads: bool = True,
                 residual: torch.Tensor | None = None) -> nn.Module:
    """Fuse the norms, then rotate the residual stream by ``residual`` (default: a randomised Hadamard matrix of
    the hidden size, seeded) and, with ``heads``, each attention head's values by a randomised Hadamard matrix of
    the head size. In place; returns the model (float, not quantized: quantize it next)."""
    emb, blocks, _, head = _llama_parts(model)
    d = emb.weight.shape[1]
    q = random_hadamard(d, seed) if residual is None else residual.double()
    if q.shape != (d, d) or not torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-8):
        raise ValueError(f"rotate_model: residual must be an orthogonal {d} x {d} matrix")
    fuse_norms(model)
    emb.weight.data = (emb.weight.detach().double() @ q).to(emb.weight.dtype)
    for i, block in enumerate(blocks):
        a, m = block.self_attn, block.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):  # read the stream
            _set(lin, lin.weight.detach().double() @ q)
        for lin in (a.o_proj, m.down_proj):  # write it
            _set(lin, q.T @ lin.weight.detach().double(),
                 None if lin.bias is None else q.T @ lin.bias.detach().double())
        if heads:
            hd = getattr(a, "head_dim", None) or a.o_proj.in_features // model.config.num_attention_heads
            r = random_hadamard(hd, seed + 1 + i)
            wv = a.v_proj.weight.detach().double()
            _set(a.v_proj, (r @ wv.reshape(-1, hd, wv.shape[1])).reshape(wv.shape),
                 None if a.v_proj.bias is None else (r @ a.v_proj.bias.detach().double().reshape(-1, hd, 1)
                                                     ).reshape(-1))
            wo = a.o_proj.weight.detach().double()
            _set(a.o_proj, (wo.reshape(wo.shape[0], -1, hd) @ r.T).reshape(wo.shape))
    _set(head, head.weight.detach().double() @ q)
    return model


@torch.no_grad()
def hadamard_mlp_inputs(model: nn.Module) -> nn.Module:
    """Give every block's ``down_proj`` an online Hadamard transform of its input (:func:`add_input_hadamard`)
    and multiply its weight by ``Hᵀ``: exact in float, and the input that activation quantization sees (the
    gated MLP's product, where the largest outliers of a Llama model live) has them spread over all channels.
    In place; returns the model (float: quantize it next)."""
    _, blocks, _, _ = _llama_parts(model)
    for i, block in enumerate(blocks):
        if input_hadamard(block.mlp.down_proj) is not None:
            raise ValueError(f"hadamard_mlp_inputs: block {i}.mlp.down_proj already has an input Hadamard transform")
    for block in blocks:
        down = block.mlp.down_proj
        had = add_input_hadamard(down)
        _set(down, down.weight.detach().double() @ had.matrix().T)
    return model
