"""compressed-tensors: the checkpoint format llm-compressor writes and vLLM, SGLang and transformers read.

:func:`export_compressed_tensors` writes a frozen qcal model in that layout (the package's own config
objects, format inference and int32 packing); :func:`from_compressed_tensors` turns a model loaded by
transformers from such a folder (modules still compressed) into a frozen qcal model running qcal's
kernels. Both are exact: the codes, scales and zero-points are moved, never re-quantized.

What maps (qcal -> compressed-tensors; vLLM's scheme class in brackets):

* int4 / int8 weight-only, per channel or group, symmetric or asymmetric with integer zero-points
  -> ``pack-quantized`` [``CompressedTensorsWNA16``]
* int8 weights x int8 dynamic per-token activations -> ``int-quantized`` [``CompressedTensorsW8A8Int8``]
* int4 groups x int8 dynamic per-token activations (8da4w) -> ``pack-quantized``, W4A8
  [``CompressedTensorsW4A8Int``]
* static per-tensor activation scales (``w8a8-static``) -> ``int-quantized`` with ``input_scale``
  [``CompressedTensorsW8A8Int8``, static]

qcal's asymmetric schemes keep an unrounded (float) zero-point; compressed-tensors stores zero-points
as integers, so only modules whose zero-points are whole numbers in range can be exported exactly;
others raise, naming the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..granularity import PerAxis, PerGroup, PerTensor
from ..nn import QMODULE_FOR, QLinear, QModuleMixin
from ..nn.hadamard import refuse_input_transforms
from ..primitives import pack, unpack
from ..qtypes import qint2, qint3, qint4, qint8
from ..quantize import quantized_modules, set_module
from ..serialization import build_shell
from ..spec import ActivationSpec, WeightSpec

__all__ = ["export_compressed_tensors", "load_compressed_tensors", "ct_weight_args", "ct_input_args"]

_INT_QTYPES = {2: qint2, 3: qint3, 4: qint4, 8: qint8}


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"compressed-tensors export: module {name!r}: {why}")


def ct_weight_args(name: str, spec: WeightSpec):
    """compressed-tensors ``QuantizationArgs`` of a qcal weight spec (ValueError naming the module if none)."""
    from compressed_tensors.quantization import QuantizationArgs

    qt = spec.qtype
    if qt.is_floating_point or qt.bits not in (2, 3, 4, 8):
        raise _unsupported(name, f"weights {qt} have no compressed-tensors integer layout qcal writes "
                                 f"(int2/3/4/8 only)")
    gran = spec.granularity
    if isinstance(gran, PerGroup):
        kw = dict(strategy="group", group_size=gran.group_size)
    elif isinstance(gran, PerAxis) and gran.axis == 0:
        kw = dict(strategy="channel")
    elif isinstance(gran, PerTensor):
        kw = dict(strategy="tensor")
    else:
        raise _unsupported(name, f"weight granularity {gran} has no compressed-tensors strategy")
    return QuantizationArgs(num_bits=qt.bits, type="int", symmetric=spec.symmetric, dynamic=False, **kw)


def ct_input_args(name: str, spec: ActivationSpec | None):
    """compressed-tensors ``QuantizationArgs`` of a qcal input-activation spec (None: not quantized)."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec is None:
        return None
    if spec.qtype is not qint8:
        raise _unsupported(name, f"activations {spec.qtype}: only int8 activations are exported")
    if spec.dynamic:
        if not spec.per_token:
            raise _unsupported(name, "dynamic per-tensor activations are not exported (vLLM's int8 is per token)")
        if not spec.symmetric:
            raise _unsupported(name, "asymmetric dynamic activations have no compressed-tensors kernel in vLLM")
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
    return QuantizationArgs(num_bits=8, type="int", symmetric=spec.symmetric, dynamic=False, strategy="tensor")


def _integer_zero_point(name: str, m: QModuleMixin) -> torch.Tensor:
    zp = m.weight_zero_point.float()
    qt = m.weight_spec.qtype
    r = torch.round(zp)
    if not torch.equal(r, zp) or r.min() < qt.qmin or r.max() > qt.qmax:
        raise _unsupported(name, "its asymmetric weights use unrounded (float) zero-points, which "
                                 "compressed-tensors cannot store (it packs integer zero-points); this scheme "
                                 "cannot be exported exactly")
    return r.to(torch.int8)


def _module_tensors(name: str, m: QModuleMixin, fmt: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qt = m.weight_spec.qtype
    codes = unpack(m.qweight, qt, m.weight_2d_cols)  # int8 (out, in)
    out: dict[str, torch.Tensor] = {}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_to_int32(codes.contiguous(), qt.bits)
        out["weight_shape"] = torch.tensor(list(m.weight_shape), dtype=torch.int64)
    else:
        out["weight"] = codes.contiguous()
    out["weight_scale"] = m.weight_scale.detach().clone().contiguous()
    if m.weight_zero_point is not None:
        zp = _integer_zero_point(name, m)
        out["weight_zero_point"] = pack_to_int32(zp.contiguous(), qt.bits, packed_dim=0) \
            if fmt == "pack-quantized" else zp.contiguous()
    if m.act_spec is not None and not m.act_spec.dynamic:
        out["input_scale"] = m.input_scale.detach().reshape(1).clone()
        if m.input_zero_point is not None:
            izp = torch.round(m.input_zero_point.float())
            if not torch.equal(izp, m.input_zero_point.float()):
                raise _unsupported(name, "its static input zero-point is not a whole number")
            out["input_zero_point"] = izp.reshape(1).to(torch.int8)
    if m.bias is not None:
        out["bias"] = m.bias.detach().clone()
    return {f"{name}.{k}": v for k, v in out.items()}


def _plan(model: nn.Module) -> tuple[dict[str, dict], list[str]]:
    """Validate every module first: ``{group: {scheme, format, targets}}`` and the ignore list."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    groups: dict[str, dict] = {}
    for name, m in quantized_modules(model):
        if not isinstance(m, QLinear):
            raise _unsupported(name, f"{type(m).__name__} is not exported (linear layers only)")
        if not m.frozen:
            raise _unsupported(name, "the module is not frozen: call qcal.freeze(model) first")
        if m.weight_spec is None:
            raise _unsupported(name, "activation-only quantization has no compressed-tensors layout")
        w = ct_weight_args(name, m.weight_spec)
        a = ct_input_args(name, m.act_spec)
        if m.weight_zero_point is not None:
            _integer_zero_point(name, m)
        scheme = QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)
        fmt = infer_module_format(nn.Linear, scheme).value
        key = json.dumps([w.model_dump(), a.model_dump() if a else None, fmt], sort_keys=True, default=str)
        groups.setdefault(key, {"weights": w, "input_activations": a, "format": fmt, "targets": []})
        groups[key]["targets"].append(name)
    if not groups:
        raise ValueError("compressed-tensors export: the model has no quantized modules")
    quantized = {n for g in groups.values() for n in g["targets"]}
    ignore = [n for n, mod in model.named_modules() if type(mod) in QMODULE_FOR and n not in quantized
              and isinstance(mod, nn.Linear)]
    return {f"group_{i}": g for i, g in enumerate(groups.values())}, ignore


def _quantization_config(groups: dict[str, dict], ignore: list[str]) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    single = len(groups) == 1
    schemes = {}
    for gname, g in groups.items():
        targets = ["Linear"] if single else [f"re:^{n.replace('.', '[.]')}$" for n in g["targets"]]
        schemes[gname] = QuantizationScheme(targets=targets, weights=g["weights"],
                                            input_activations=g["input_activations"], format=g["format"])
    formats = {g["format"] for g in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    qc = QuantizationConfig(config_groups=schemes, ignore=ignore, format=fmt, quantization_status="compressed")
    data = qc.model_dump(exclude=["quant_method"])
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **json.loads(json.dumps(data, default=str))}


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                              max_shard_size: str | int = "5GB") -> Path:
    """Write the frozen qcal ``model`` (a transformers model) as a compressed-tensors folder at ``path``.

    Everything is validated before anything is written; the folder is built beside ``path`` and moved
    into place at the end, so a failure leaves no partial checkpoint. Returns the folder.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    refuse_input_transforms(model, "compressed-tensors export")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"compressed-tensors export: {path} exists and is not empty (pass overwrite=True)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("compressed-tensors export: the model must be a transformers PreTrainedModel")
    groups, ignore = _plan(model)
    module_fmt = {n: g["format"] for g in groups.values() for n in g["targets"]}

    tensors: dict[str, torch.Tensor] = {}
    for name, m in quantized_modules(model):
        tensors.update(_module_tensors(name, m, module_fmt[name]))
    quantized = set(module_fmt)
    seen: dict[int, str] = {}
    for mname, mod in model.named_modules():
        if mname in quantized or any(mname.startswith(q + ".") for q in quantized):
            continue
        prefix = mname + "." if mname else ""
        for k, p in list(mod._parameters.items()) + [(k, b) for k, b in mod._buffers.items()
                                                     if k not in mod._non_persistent_buffers_set]:
            if p is None or prefix + k in tensors:
                continue
            if id(p) in seen:  # tied weights are stored once, as transformers does
                continue
            seen[id(p)] = prefix + k
            tensors[prefix + k] = p.detach().contiguous().cpu()

    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = config.to_dict()
    if isinstance(out_layer, QModuleMixin):  # a quantized output layer no longer shares the embedding
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    cfg["quantization_config"] = _quantization_config(groups, ignore)
    cfg.pop("_name_or_path", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qcal-export-", dir=path.parent))
    try:
        split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for fname, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- import
def _spec_from_args(name: str, w, a) -> tuple[WeightSpec, ActivationSpec | None]:
    def refuse(why: str) -> ValueError:
        return ValueError(f"compressed-tensors import: module {name!r}: {why}; qcal has no kernel for it")

    if w is None or w.type != "int" or w.num_bits not in _INT_QTYPES:
        raise refuse(f"weights {None if w is None else f'{w.type}{w.num_bits}'}")
    if w.strategy == "group":
        gran = PerGroup(w.group_size)
    elif w.strategy == "channel":
        gran = PerAxis(0)
    elif w.strategy == "tensor":
        gran = PerTensor()
    else:
        raise refuse(f"weight strategy {w.strategy!r}")
    if w.actorder == "group" or getattr(w, "dynamic", False):
        raise refuse(f"actorder={w.actorder!r} / dynamic weights")
    wspec = WeightSpec(_INT_QTYPES[w.num_bits], gran, bool(w.symmetric))
    if a is None:
        return wspec, None
    if a.type != "int" or a.num_bits != 8:
        raise refuse(f"input activations {a.type}{a.num_bits}")
    if a.dynamic is True and a.strategy == "token" and a.symmetric:
        return wspec, ActivationSpec(qint8, dynamic=True, symmetric=True)
    if a.dynamic is False and a.strategy == "tensor":
        return wspec, ActivationSpec(qint8, dynamic=False, symmetric=bool(a.symmetric))
    raise refuse(f"input activations strategy={a.strategy!r} dynamic={a.dynamic!r}")


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    for t in patterns:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t == type(module).__name__:
            return True
    return False


def _parse_config(qdict: dict | None, path: Path):
    """compressed-tensors' own ``QuantizationConfig`` of a folder; ValueError for what qcal cannot run."""
    from compressed_tensors.quantization import QuantizationConfig

    if not qdict or qdict.get("quant_method") != "compressed-tensors":
        raise ValueError(f"compressed-tensors import: {path} is not a compressed-tensors checkpoint")
    try:
        qconfig = QuantizationConfig.model_validate({k: v for k, v in qdict.items()
                                                     if k in QuantizationConfig.model_fields})
    except Exception as e:  # pydantic's ValidationError and the package's own checks
        raise ValueError(f"compressed-tensors import: {path}: invalid quantization_config: {e}") from None
    if qdict.get("sparsity_config") or qdict.get("transform_config"):
        raise ValueError("compressed-tensors import: sparsity and transform configs have no qcal kernel")
    if qconfig.kv_cache_scheme is not None:
        raise ValueError("compressed-tensors import: kv_cache_scheme has no qcal kernel")
    return qconfig


class _Tensors:
    """The tensors of a safetensors folder (single file or sharded with an index), read on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        from .transformers import check_safetensors_file

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in path.glob("*.safetensors")]
        if not files:
            raise FileNotFoundError(f"compressed-tensors import: no safetensors file in {path}")
        self.where: dict[str, object] = {}
        for f in files:
            check_safetensors_file(path / f)
            h = safe_open(str(path / f), framework="pt")
            for k in h.keys():
                self.where[k] = h

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


@torch.no_grad()
def load_compressed_tensors(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a compressed-tensors causal LM folder (llm-compressor's output) as a frozen qcal model.

    The float parts (embeddings, norms, layers left in ``ignore``) load through transformers; each
    quantized linear becomes a frozen qcal module holding the checkpoint's codes, scales and zero-points
    (packed zero-points in either of compressed-tensors' layouts). Every module is validated before the
    model is returned; a scheme qcal has no kernel for raises, naming the module. The float model is
    built first, so peak memory is about the float model's size. ``kwargs`` go to ``from_pretrained``.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qdict = getattr(config, "quantization_config", None)
    qdict = qdict if isinstance(qdict, dict) else getattr(qdict, "to_dict", lambda: None)()
    qconfig = _parse_config(qdict, path)
    del config.quantization_config
    tensors = _Tensors(path)

    # plan every module against the float skeleton's names before any float weight is read
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    plans = []
    for name, mod in skeleton.named_modules():
        if not isinstance(mod, nn.Linear) or _matches(name, mod, qconfig.ignore or []):
            continue
        hits = [g for g in qconfig.config_groups.values() if _matches(name, mod, g.targets)]
        if not hits:
            continue
        scheme = hits[0]
        if scheme.output_activations is not None:
            raise ValueError(f"compressed-tensors import: module {name!r}: output activation quantization has no "
                             f"qcal kernel")
        wspec, aspec = _spec_from_args(name, scheme.weights, scheme.input_activations)
        plans.append((name, mod.out_features, mod.in_features, mod.bias is not None, wspec, aspec))
    if not plans:
        raise ValueError("compressed-tensors import: no linear layer of the model matches the config's targets")
    del skeleton

    built: dict[str, QModuleMixin] = {}
    for name, out_f, in_f, has_bias, wspec, aspec in plans:
        def t(key: str, required: bool = True, name: str = name) -> torch.Tensor | None:
            full = f"{name}.{key}"
            if full not in tensors:
                if required:
                    raise ValueError(f"compressed-tensors import: tensor {full!r} is missing from the checkpoint")
                return None
            return tensors.get(full)

        bits = wspec.qtype.bits
        packed = t("weight_packed", required=False)
        if packed is not None:
            shape = t("weight_shape", required=False)
            shape = (out_f, in_f) if shape is None else tuple(int(v) for v in shape.tolist())
            if shape != (out_f, in_f):
                raise ValueError(f"compressed-tensors import: module {name!r}: stored weight shape {shape} differs "
                                 f"from the layer's {(out_f, in_f)}")
            codes = unpack_from_int32(packed, bits, torch.Size(shape))
        else:
            codes = t("weight")
            if codes.is_floating_point() or tuple(codes.shape) != (out_f, in_f):
                raise ValueError(f"compressed-tensors import: module {name!r}: weight is {codes.dtype} "
                                 f"{tuple(codes.shape)}, expected integer codes of shape {(out_f, in_f)}")
            codes = codes.to(torch.int8)
        if codes.min() < wspec.qtype.qmin or codes.max() > wspec.qtype.qmax:
            raise ValueError(f"compressed-tensors import: module {name!r} has codes outside {wspec.qtype}")
        scale = t("weight_scale")
        if not scale.is_floating_point():
            raise ValueError(f"compressed-tensors import: module {name!r}: weight_scale is {scale.dtype}")
        scale = scale.reshape(out_f, -1) if not isinstance(wspec.granularity, PerTensor) else scale.reshape(1, 1)
        groups = scale.shape[1]
        expect = 1 if not isinstance(wspec.granularity, PerGroup) else in_f // wspec.granularity.group_size
        if groups != expect or (isinstance(wspec.granularity, PerGroup) and in_f % wspec.granularity.group_size):
            raise ValueError(f"compressed-tensors import: module {name!r}: weight_scale has shape "
                             f"{tuple(scale.shape)}, expected ({out_f}, {expect})")
        zp = None
        if not wspec.symmetric:
            zp = t("weight_zero_point")
            if tuple(zp.shape) != tuple(scale.shape):  # packed along the output dim
                zp = unpack_from_int32(zp, bits, torch.Size(scale.shape), packed_dim=0)
            zp = zp.to(torch.float32).to(scale.dtype)
        iscale = izp = None
        if aspec is not None and not aspec.dynamic:
            iscale = t("input_scale").reshape(1, 1).to(scale.dtype)
            izp = t("input_zero_point", required=False)
            izp = None if izp is None else izp.reshape(1, 1).to(scale.dtype)
        plain = nn.Linear(in_f, out_f, bias=has_bias, device="meta", dtype=scale.dtype)
        cfg = {"type": "QLinear", "weights": wspec.to_dict(),
               "activations": None if aspec is None else aspec.to_dict(), "frozen": True, "weight_shape": [out_f, in_f]}
        q = build_shell(plain, name, cfg)
        q._buffers["qweight"] = pack(codes.contiguous(), wspec.qtype)
        q._buffers["weight_scale"] = scale.contiguous()
        q._buffers["weight_zero_point"] = zp
        q._buffers["input_scale"] = iscale
        q._buffers["input_zero_point"] = izp
        if has_bias:
            q._parameters["bias"] = nn.Parameter(t("bias"), requires_grad=False)
        built[name] = q

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the quantized linears' float weights are absent by design
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    dtype = next(model.parameters()).dtype
    for name, q in built.items():
        if q.bias is not None:
            q.bias.data = q.bias.data.to(dtype)
        set_module(model, name, q)
        q.select_kernel()
    return model


@torch.no_grad()
def ct_dequantized_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{module name: float weight}`` of every quantized linear of a compressed-tensors folder, as
    compressed-tensors' own compressor decompresses it (a reference for checks and benchmarks; this also
    covers asymmetric ``pack-quantized`` folders that transformers' loader cannot read yet,
    vllm-project/llm-compressor#1618)."""
    from compressed_tensors.compressors import BaseCompressor

    path = Path(path)
    qconfig = _parse_config(json.loads((path / "config.json").read_text()).get("quantization_config"), path)
    tensors = _Tensors(path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors.where if k.endswith(".weight_scale")})
    out = {}
    for name in names:
        plain = nn.Linear(1, 1, device="meta")
        hits = [g for g in qconfig.config_groups.values() if _matches(name, plain, g.targets)]
        if not hits or _matches(name, plain, qconfig.ignore or []):
            continue
        scheme = hits[0]
        fmt = scheme.format or qconfig.format
        prefix = name + "."
        local = {k[len(prefix):]: tensors.get(k) for k in tensors.where if k.startswith(prefix) and "." not in
                 k[len(prefix):]}
        compressor = BaseCompressor.get_value_from_registry(fmt)
        out[name] = compressor.decompress(local, scheme)["weight"]
    return out
