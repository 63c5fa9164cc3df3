"""GGUF (llama.cpp, ollama, LM Studio): export frozen qcal models, import GGUF files as frozen qcal models.

Quantized linear weights map onto GGUF's 32-wide blocks exactly: symmetric int4 groups of 32 -> ``Q4_0``
(``w = (u - 8) * d``), asymmetric int4 groups of 32 with integer zero-points -> ``Q4_1`` (``w = u * d + m``,
``m = -(8 + zp) * d``), symmetric int8 groups of 32 -> ``Q8_0`` (``w = q * d``); ``d`` and ``m`` are float16 in the
file. Quantization that targets GGUF (the ``gguf-*`` schemes, ``GPTQQuantizer(gguf_type=...)``) rounds its scales
with :func:`round_scale` as they are chosen, so the file holds qcal's weights bit for bit (Q4_1: scales with 7
significant bits, which makes ``m`` exact in float16 too). Other scales are rounded on export, with a warning
stating the largest weight change. The container, metadata and tokenizer are written with the ``gguf`` package.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..granularity import PerGroup
from ..kernels.common import int4_codes_u8
from ..nn.hadamard import refuse_input_transforms
from ..qtypes import qint4, qint8
from ..quantize import quantized_modules

__all__ = ["GGUF_TYPES", "round_scale", "block_qparams", "gguf_type", "export_gguf", "load_gguf"]

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_LLAMA_ARCHS = ("llama", "mistral")  # Hugging Face model_type -> GGUF "llama" (the same tensors and metadata)
_LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def round_scale(scale: torch.Tensor, gguf: str) -> torch.Tensor:
    """Scales as ``gguf`` stores them, rounded away from zero (so every weight of the group stays in range), float32.

    ``Q4_0`` / ``Q8_0``: float16. ``Q4_1``: float16 with 7 significant bits, so that the block minimum
    ``-(8 + zp) * d`` (an integer of at most 4 bits times ``d``) is exact in float16 as well. The sign is kept
    (``Q4_0``'s reference grid has negative scales)."""
    if gguf not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf!r}; choose from {', '.join(GGUF_TYPES)}")
    s = scale.float()
    sign = torch.where(s < 0, -1.0, 1.0)
    s = s.abs().clamp(min=2.0 ** -14, max=60000.0)  # float16 normals: no subnormal or infinite scale
    bits = 7 if gguf == "Q4_1" else 11
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    step = 2.0 ** bits
    return (sign * torch.ldexp(torch.ceil(mant * step) / step, exp)).to(torch.float16).float()


def block_qparams(block: torch.Tensor, gguf: str, importance: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and ``Q4_1`` zero-point) of each row of ``block`` ``(rows, 32)`` as ``gguf`` stores it, ``(rows,)``
    float32.

    ``Q4_0``: llama.cpp's grid, ``d = m / -8`` where ``m`` is the block's weight of largest magnitude (it lands
    exactly on code -8, so the step is ``|m| / 8``, finer than ``amax / 7``). With ``importance`` (one non-negative
    weight per column, e.g. the diagonal of the layer's input Gram matrix: llama.cpp's importance matrix) the
    scale is searched instead: 19 candidate grids around ``m / -8``, each refitted by weighted least squares,
    rounded to float16, and scored by ``Σ w (x - q d)²`` with ``w = importance * sqrt(σ² + x²)`` (``σ²``: the
    block's mean square), the error llama.cpp's importance-matrix quantizer minimises. ``Q4_1`` (min/max, integer
    zero-point) and ``Q8_0`` (``amax / 127``) take their block's range."""
    if gguf not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf!r}; choose from {', '.join(GGUF_TYPES)}")
    if block.dim() != 2 or block.shape[1] != 32:
        raise ValueError(f"GGUF blocks are (rows, 32), got {tuple(block.shape)}")
    x = block.float()
    if gguf != "Q4_0":
        from ..primitives import choose_qparams_from_minmax

        qt = qint8 if gguf == "Q8_0" else qint4
        scale, zp = choose_qparams_from_minmax(x.amin(1), x.amax(1), qt, gguf == "Q8_0", torch.float32,
                                               integer_zero_point=gguf == "Q4_1")
        return round_scale(scale, gguf), None if zp is None else zp.float()
    m = x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)  # signed weight of largest magnitude
    scale = round_scale(m / -8.0, gguf)
    if importance is None:
        return scale, None
    imp = importance.float().reshape(-1, 32).expand_as(x)
    w = imp * torch.sqrt((x * x).mean(1, keepdim=True) + x * x)

    def error(d: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / d[:, None]), -8, 7)
        return (w * (x - q * d[:, None]) ** 2).sum(1)

    best, best_err = scale, error(scale)
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    for step in range(-9, 10):
        codes = torch.clamp(torch.round(x * (-(8 + 0.1 * step) / safe_m)[:, None]), -8, 7)
        sum_lx, sum_l2 = (w * x * codes).sum(1), (w * codes * codes).sum(1)
        d = torch.where(sum_l2 > 0, sum_lx / sum_l2.clamp(min=1e-30), scale)
        d = torch.where(d.abs() < 2.0 ** -14, scale, d).to(torch.float16).float()
        err = error(d)
        better = err < best_err
        best, best_err = torch.where(better, d, best), torch.where(better, err, best_err)
    return best, None


def gguf_type(module: nn.Module) -> str | None:
    """The GGUF block type a frozen qcal linear maps onto exactly in layout (None: none)."""
    w, a = module.weight_spec, module.act_spec
    if a is not None or w is None or not isinstance(w.granularity, PerGroup) or w.group_size != 32:
        return None
    if w.qtype == qint4:
        return "Q4_0" if w.symmetric else ("Q4_1" if w.integer_zero_point else None)
    return "Q8_0" if w.qtype == qint8 and w.symmetric else None


def _blocks(module: nn.Module, kind: str) -> tuple[np.ndarray, float]:
    """``(N, K / 32 * block bytes)`` uint8 blocks of a frozen linear and the largest change of a weight they make
    (0.0: bit-exact)."""
    n, k = module.weight_shape
    g = k // 32
    s = module.weight_scale.float().reshape(n, g)
    d = s.to(torch.float16)
    ref = module.dequantized_weight(torch.float32).reshape(n, g, 32)
    if kind == "Q8_0":
        q = module.qweight.reshape(n, g, 32)
        out = torch.cat([d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8)], dim=-1)
        deq = q.float() * d.float().unsqueeze(-1)
    else:
        u = int4_codes_u8(module.qweight).reshape(n, g, 32)
        qs = u[..., :16] | (u[..., 16:] << 4)  # byte j: element j (low nibble), element j + 16 (high)
        if kind == "Q4_0":
            parts = [d.unsqueeze(-1).view(torch.uint8), qs]
            deq = (u.float() - 8) * d.float().unsqueeze(-1)
        else:
            zp = module.weight_zero_point
            zp = torch.zeros_like(s) if zp is None else zp.float().reshape(n, g)
            m = (-(8 + zp) * s).to(torch.float16)
            parts = [d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), qs]
            deq = u.float() * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
        out = torch.cat(parts, dim=-1)
    change = (deq - ref).abs().max().item() if ref.numel() else 0.0
    return out.reshape(n, -1).contiguous().numpy(), change


def _rope_rows(n: int, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q/k projection (its rotary pairs dimensions i and i + D/2 of a head as
    neighbours): the permutation its converter applies to Hugging Face's weights."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)


def _tokenizer_metadata(writer, tokenizer, pre: str) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [""] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(size)]
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"qcal.export(format='gguf'): only byte-level BPE tokenizers are written, got "
                         f"{state['model']['type']}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _float_tensor(t: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    import gguf

    kind = kind.lower()
    if kind in ("f32", "f16"):
        return t.detach().to(_FLOAT_TYPES[kind]).cpu().numpy(), None
    if kind == "bf16":
        return t.detach().to(torch.bfloat16).view(torch.uint16).cpu().numpy().view(np.uint8).reshape(
            t.shape[0], -1), gguf.GGMLQuantizationType.BF16
    if kind == "q8_0":
        return gguf.quants.quantize(t.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    raise ValueError(f"unknown tensor type {kind!r}; choose from f32, f16, bf16, q8_0")


def _plan(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every quantized linear's GGUF type, checked before anything is written."""
    out, bad = {}, []
    for name, m in quantized_modules(model):
        kind = gguf_type(m) if m.frozen else None
        if kind is None:
            w = m.weight_spec
            what = "not frozen" if not m.frozen else (
                f"{w.qtype.name} {'groups of ' + str(w.group_size) if w.group_size else 'per channel'}, "
                f"{'symmetric' if w.symmetric else 'asymmetric'}" + (", activations quantized" if m.act_spec else ""))
            bad.append(f"{name} ({what})")
        out[name] = (kind, m)
    if bad:
        raise ValueError("qcal.export(format='gguf'): these modules do not map onto a GGUF block type: "
                         + "; ".join(bad[:5]) + ("..." if len(bad) > 5 else "")
                         + ". GGUF holds int4 groups of 32 symmetric (Q4_0) or with integer zero-points (Q4_1), and "
                           "int8 groups of 32 symmetric (Q8_0), weight-only: use the gguf-q4_0 / gguf-q4_1 / "
                           "gguf-q8_0 schemes (or their gptq- versions)")
    return out


def export_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, embedding_type: str = "q8_0",
                output_type: str | None = None, float_type: str = "bf16", pre_tokenizer: str = "default",
                overwrite: bool = False) -> Path:
    """Write a Llama-architecture causal LM (frozen qcal linears, float or quantized) as one GGUF file.

    ``embedding_type`` / ``output_type`` (``f32``, ``f16``, ``bf16``, ``q8_0``) are the token embedding's and a float
    output head's types (``output_type`` None: as the embedding; a tied head is left out, as llama.cpp expects);
    ``float_type`` that of other float matrices (norms are always f32). ``tokenizer``: the model's Hugging Face
    tokenizer (byte-level BPE), written with ``pre_tokenizer`` as llama.cpp's pre-tokenizer name (e.g. ``smollm``,
    ``llama-bpe``). Everything is checked before the file is written."""
    import gguf

    refuse_input_transforms(model, "qcal.export(format='gguf')")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"qcal.export: {path} exists (pass overwrite=True)")
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _LLAMA_ARCHS:
        raise ValueError(f"qcal.export(format='gguf'): only Llama-architecture models ({', '.join(_LLAMA_ARCHS)}) "
                         f"have a GGUF mapping here, got {getattr(cfg, 'model_type', type(model).__name__)!r}")
    if tokenizer is None:
        raise ValueError("qcal.export(format='gguf'): pass tokenizer= (the file must be self-contained)")
    for kind in (embedding_type, output_type or embedding_type, float_type):
        if kind.lower() not in (*_FLOAT_TYPES, "q8_0"):
            raise ValueError(f"qcal.export(format='gguf'): unknown tensor type {kind!r}")
    plan = _plan(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and "lm_head" not in plan

    tensors: list[tuple[str, np.ndarray, object]] = []
    worst: list[tuple[float, str]] = []
    emb = model.get_input_embeddings().weight
    tensors.append(("token_embd.weight", *_float_tensor(emb, embedding_type)))
    for i, layer in enumerate(model.model.layers):
        for hf, gg in _LAYER_TENSORS.items():
            mod = layer.get_submodule(hf)
            name = f"blk.{i}.{gg}.weight"
            key = f"model.layers.{i}.{hf}"
            n_rows = plan[key][1].weight_shape[0] if key in plan else mod.weight.shape[0]
            rows = _rope_rows(n_rows, heads if gg == "attn_q" else kv_heads) if gg in ("attn_q", "attn_k") else None
            if key in plan:
                kind, qm = plan[key]
                blocks, change = _blocks(qm, kind)
                worst.append((change, key))
                tensors.append((name, blocks if rows is None else blocks[rows.numpy()], getattr(
                    gguf.GGMLQuantizationType, kind)))
            elif gg.endswith("norm"):
                tensors.append((name, *_float_tensor(mod.weight, "f32")))
            else:
                w = mod.weight if rows is None else mod.weight[rows]
                tensors.append((name, *_float_tensor(w, float_type)))
            if getattr(mod, "bias", None) is not None:
                raise ValueError(f"qcal.export(format='gguf'): {key} has a bias, which llama.cpp's llama "
                                 f"architecture does not read")
    tensors.append(("output_norm.weight", *_float_tensor(model.model.norm.weight, "f32")))
    if "lm_head" in plan:
        kind, qm = plan["lm_head"]
        blocks, change = _blocks(qm, kind)
        worst.append((change, "lm_head"))
        tensors.append(("output.weight", blocks, getattr(gguf.GGMLQuantizationType, kind)))
    elif not tied:
        tensors.append(("output.weight", *_float_tensor(model.lm_head.weight, output_type or embedding_type)))
    change, where = max(worst, default=(0.0, ""))
    if change > 0:
        warnings.warn(f"qcal.export(format='gguf'): scales rounded to float16 as GGUF stores them; the largest "
                      f"weight change is {change:.3g} (in {where}). Quantize with a gguf-* scheme for exact files.",
                      UserWarning, stacklevel=3)

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(getattr(cfg, "_name_or_path", "") or "qcal model")
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(emb.shape[0])
    kinds = Counter(k for k, _ in plan.values())  # the file type names the most common block type
    main = kinds.most_common(1)[0][0] if kinds else {"f32": "ALL_F32", "f16": "F16"}.get(float_type.lower(), "BF16")
    writer.add_file_type(getattr(gguf.LlamaFileType, main if main.startswith("ALL") else f"MOSTLY_{main}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tokenizer, pre_tokenizer)
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    tmp = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_gguf(path: str | os.PathLike, **kwargs) -> nn.Module:
    """A GGUF file as a frozen qcal model: transformers builds the model (``gguf_file=``), and every ``Q4_0`` /
    ``Q4_1`` / ``Q8_0`` linear becomes a frozen qcal module with the file's codes and scales (Q4_0 and Q8_0
    bit-exact; Q4_1's ``u * d + m`` within float32 rounding of qcal's ``(q - zp) * s``)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from ..quantize import freeze, quantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"qcal.load_gguf: {path} is not a file")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    by_type: dict[str, list[str]] = {k: [] for k in GGUF_TYPES}
    for i in range(len(model.model.layers)):
        for hf, gg in _LAYER_TENSORS.items():
            kind = types.get(f"blk.{i}.{gg}.weight")
            if kind in by_type:
                by_type[kind].append(f"model.layers.{i}.{hf}")
    if types.get("output.weight") in by_type:
        by_type[types["output.weight"]].append("lm_head")
    for kind, names in by_type.items():
        if not names:
            continue
        wt = qint8 if kind == "Q8_0" else qint4
        quantize(model, weights=wt, group_size=32, symmetric=kind != "Q4_1", include=names,
                 zero_point="int" if kind == "Q4_1" else "float")
    # the file's scales (and zero-points) fixed on each module: freeze recovers the codes from the dequantized weights
    tensors = {t.name: t for t in reader.tensors}
    for i in range(len(model.model.layers)):
        for hf, gg in _LAYER_TENSORS.items():
            _fix_from_file(model.get_submodule(f"model.layers.{i}.{hf}"), tensors.get(f"blk.{i}.{gg}.weight"),
                           gg, model.config)
    if "lm_head" in sum(by_type.values(), []):
        _fix_from_file(model.lm_head, tensors["output.weight"], "output", model.config)
    freeze(model)
    return model


def _fix_from_file(module: nn.Module, tensor, gg: str, cfg) -> None:
    if tensor is None or tensor.tensor_type.name not in GGUF_TYPES or not hasattr(module, "weight_spec"):
        return
    kind = tensor.tensor_type.name
    raw = torch.from_numpy(np.array(tensor.data, copy=True)).view(torch.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    zp = None
    if kind == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        zp = -m / d - 8
    if gg in ("attn_q", "attn_k"):  # back to Hugging Face's row order
        heads = cfg.num_attention_heads if gg == "attn_q" else (cfg.num_key_value_heads or cfg.num_attention_heads)
        inv = torch.argsort(_rope_rows(n, heads))
        d = d[inv]
        zp = None if zp is None else zp[inv]
    module.fix_weight_qparams(d, zp)
