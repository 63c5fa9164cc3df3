"""``save``/``load``: safetensors for the tensors plus a versioned JSON manifest.

The file format holds plain tensors only (no pickles, no tensor subclasses), so a checkpoint
does not depend on qcal's class layout; the manifest carries ``format_version`` and is checked
before anything is touched. ``load`` validates every tensor name and shape against the target
model first and only then swaps modules and assigns tensors, so a bad file leaves the model as
it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .nn import QMODULE_FOR, QModuleMixin
from .observers import Observer
from .primitives import packed_shape
from .quantize import attach_to_transformers, quantized_modules, set_module
from .spec import ActivationSpec, WeightSpec

__all__ = ["save", "load", "build_shell", "FORMAT_VERSION", "TENSORS_FILE", "MANIFEST_FILE"]

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "qcal.json"


def _all_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter and buffer by full name -> (tensor, is_parameter).

    Non-persistent buffers are included (e.g. rotary ``inv_freq``, so meta-built models load
    complete), except the derived kernel layouts of quantized modules.
    """
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for k, p in mod._parameters.items():
            if p is not None:
                out[prefix + k] = (p, True)
        derived = mod._non_persistent_buffers_set if isinstance(mod, QModuleMixin) else ()
        for k, b in mod._buffers.items():
            if b is not None and k not in derived:  # kernel layouts are rebuilt at load
                out[prefix + k] = (b, False)
    return out


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (quantized or not, frozen or not) to the folder ``path``."""
    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    params: list[str] = []
    for name, (t, is_param) in _all_tensors(model).items():
        if is_param:
            params.append(name)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    manifest = {
        "format": "qcal",
        "format_version": FORMAT_VERSION,
        "qcal_version": __version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "modules": {n: m.qcal_config() for n, m in quantized_modules(model)},
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for n, t in tensors.items()},
        "aliases": aliases,
        "parameters": params,
    }
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": "qcal", "format_version": str(FORMAT_VERSION)})
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def _read(path: Path, device) -> tuple[dict, dict[str, torch.Tensor]]:
    mpath, tpath = path / MANIFEST_FILE, path / TENSORS_FILE
    if not mpath.is_file() or not tpath.is_file():
        raise FileNotFoundError(f"qcal.load: {path} must contain {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"qcal.load: {mpath} is not valid JSON ({e}); the file is truncated or corrupt") from None
    if manifest.get("format") != "qcal":
        raise ValueError(f"qcal.load: {mpath} is not a qcal manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"qcal.load: {path} has format_version {version!r}; this qcal reads versions "
                         f"<= {FORMAT_VERSION}: upgrade qcal")
    try:
        tensors = load_file(str(tpath), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"qcal.load: cannot read {tpath}: {e} (the file is truncated or corrupt)") from None
    for name, info in manifest["tensors"].items():
        if name not in tensors:
            raise ValueError(f"qcal.load: tensor {name!r} listed in the manifest is missing from {tpath}")
        t = tensors[name]
        if list(t.shape) != info["shape"] or str(t.dtype).removeprefix("torch.") != info["dtype"]:
            raise ValueError(f"qcal.load: tensor {name!r} in {tpath} does not match its manifest entry")
    return manifest, tensors


def build_shell(orig: nn.Module, name: str, cfg: dict) -> QModuleMixin:
    """A quantized module built from the manifest entry, in the right state, before tensors arrive."""
    qcls = QMODULE_FOR.get(type(orig))
    if qcls is None or qcls.__name__ != cfg["type"]:
        raise ValueError(f"qcal.load: module {name!r} is a {type(orig).__name__} in the model but a "
                         f"{cfg['type']} in the checkpoint (another architecture?)")
    if list(orig.weight.shape) != cfg["weight_shape"]:
        raise ValueError(f"qcal.load: module {name!r} has weight shape {list(orig.weight.shape)} in the model "
                         f"but {cfg['weight_shape']} in the checkpoint (another architecture?)")
    wspec = None if cfg["weights"] is None else WeightSpec.from_dict(cfg["weights"])
    aspec = None if cfg["activations"] is None else ActivationSpec.from_dict(cfg["activations"])
    q = qcls.from_module(orig, name, None, aspec) if wspec is None else _from_module_no_observer(
        qcls, orig, name, wspec, aspec)
    if cfg["frozen"]:
        if wspec is not None:
            q._parameters.pop("weight")
            rows = orig.weight.shape[0]
            qdtype = torch.uint8 if wspec.qtype.packed_per_byte > 1 else wspec.qtype.dtype
            q.register_buffer("qweight", torch.empty(packed_shape((rows, orig.weight[0].numel()), wspec.qtype),
                                                     dtype=qdtype, device=orig.weight.device))
        q._modules.pop("input_observer", None)
        q.frozen = True
    return q


def _from_module_no_observer(qcls, orig, name, wspec, aspec):
    # the weight clipping stored in the checkpoint is restored below; do not recompute it
    plain = WeightSpec(wspec.qtype, wspec.granularity, wspec.symmetric, "minmax")
    q = qcls.from_module(orig, name, plain, aspec)
    q.weight_spec = wspec
    return q


@torch.no_grad()
def load(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu",
         strict_class: bool = True) -> nn.Module:
    """Restore a checkpoint written by :func:`save` into a float ``model`` of the same architecture.

    The model may live on the meta device; tensors are assigned, not copied. On any mismatch a
    ValueError names the offending module or tensor and the model is left untouched.
    """
    path = Path(path)
    manifest, tensors = _read(path, device)
    if strict_class and manifest["model_class"] != type(model).__name__:
        raise ValueError(f"qcal.load: checkpoint is for a {manifest['model_class']}, model is a "
                         f"{type(model).__name__} (another architecture?)")
    shells: dict[str, QModuleMixin] = {}
    for name, cfg in manifest["modules"].items():
        try:
            orig = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"qcal.load: the model has no module {name!r} (checkpoint from another "
                             f"architecture?)") from None
        if isinstance(orig, QModuleMixin):
            raise ValueError(f"qcal.load: module {name!r} is already quantized; load into a float model")
        shells[name] = build_shell(orig, name, cfg)

    # expected tensor slots of the model once the shells are in place
    def owner(full: str) -> tuple[nn.Module, str]:
        mname, _, attr = full.rpartition(".")
        head = mname
        while head:
            if head in shells:
                sub = mname[len(head):].lstrip(".")
                mod = shells[head].get_submodule(sub) if sub else shells[head]
                return mod, attr
            head = head.rpartition(".")[0]
        return (model.get_submodule(mname) if mname else model), attr

    aliases: dict[str, str] = manifest.get("aliases", {})
    names = list(tensors) + list(aliases)
    slots: dict[str, tuple[nn.Module, str]] = {}
    for full in names:
        try:
            mod, attr = owner(full)
        except AttributeError:
            raise ValueError(f"qcal.load: tensor {full!r} has no place in the model (another architecture?)") \
                from None
        t = tensors[aliases.get(full, full)]
        if attr in mod._parameters or attr in mod._buffers:
            cur = mod._parameters.get(attr, mod._buffers.get(attr))
            fixed_shape = not isinstance(mod, (QModuleMixin, Observer)) or attr in ("weight", "bias", "qweight")
            if cur is not None and fixed_shape and tuple(cur.shape) != tuple(t.shape):
                raise ValueError(f"qcal.load: tensor {full!r} has shape {tuple(t.shape)} in the checkpoint but "
                                 f"{tuple(cur.shape)} in the model (another architecture?)")
        elif not isinstance(mod, (QModuleMixin, Observer)):
            raise ValueError(f"qcal.load: tensor {full!r} has no place in the model (another architecture?)")
        slots[full] = (mod, attr)
    provided = set(names)
    for name in _all_tensors(model):
        if name in provided or any(name.startswith(s + ".") for s in shells):
            continue
        raise ValueError(f"qcal.load: tensor {name!r} of the model is missing from the checkpoint")
    for sname, q in shells.items():
        for attr, required in (("bias", q.bias is not None), ("qweight", q.frozen and q.weight_spec is not None),
                               ("weight_scale", q.frozen and q.weight_spec is not None),
                               ("weight", not q.frozen)):
            if required and f"{sname}.{attr}" not in provided:
                raise ValueError(f"qcal.load: tensor '{sname}.{attr}' is missing from the checkpoint")

    # all checks passed: mutate
    for name, q in shells.items():
        set_module(model, name, q)
    param_names = set(manifest.get("parameters", []))
    made: dict[str, torch.Tensor] = {}
    for full in names:
        mod, attr = slots[full]
        src = aliases.get(full, full)
        if full in param_names:
            if src not in made or not isinstance(made[src], nn.Parameter):
                t = tensors[src]
                made[src] = nn.Parameter(t, requires_grad=t.is_floating_point())
            mod._parameters[attr] = made[src]
            mod._buffers.pop(attr, None)
        else:
            mod._buffers[attr] = tensors[src]
    for q in shells.values():
        if q.frozen:
            q.select_kernel()
    attach_to_transformers(model)
    return model
