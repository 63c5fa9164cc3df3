"""``save``/``load``: safetensors for the tensors plus a versioned JSON manifest.

The file format holds plain tensors only (no pickles, no tensor subclasses), so a checkpoint
does not depend on qcal's class layout; the manifest carries ``format_version`` and is checked
before anything is touched. ``load`` validates every tensor name and shape against the target
model first and only then swaps modules and assigns tensors, so a bad file leaves the model as
it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .granularity import PerTensor
from .nn import QMODULE_FOR, QModuleMixin
from .nn.hadamard import HADAMARD, add_input_hadamard, input_hadamard
from .observers import Observer
from .primitives import packed_shape
from .quantize import attach_to_transformers, quantized_modules, set_module
from .spec import ActivationSpec, WeightSpec

__all__ = ["save", "load", "build_shell", "FORMAT_VERSION", "TENSORS_FILE", "MANIFEST_FILE"]

FORMAT_VERSION = 3  # 2: a sha256 per tensor (version 1 files still load, without that check); 3: a module may
# record an online input transform (written only by models that have one, so that older qcal refuses them)
INPUT_TRANSFORMS = (HADAMARD,)
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
    modules = {n: m.qcal_config() for n, m in quantized_modules(model)}
    version = written_version(model, modules)
    manifest = {
        "format": "qcal",
        "format_version": version,
        "qcal_version": __version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "modules": modules,
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "sha256": tensor_sha256(t)} for n, t in tensors.items()},
        "aliases": aliases,
        "parameters": params,
    }
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": "qcal", "format_version": str(version)})
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def written_version(model: nn.Module, records: dict[str, dict]) -> int:
    """The format version a checkpoint of these module records needs (2 unless one has an input transform);
    ValueError naming a float module with an input transform (only quantized modules' records carry it)."""
    for name, m in model.named_modules():
        if input_hadamard(m) is not None and name not in records:
            raise ValueError(f"qcal: module {name!r} has an online Hadamard input transform but is not quantized; "
                             "a checkpoint records transforms with quantized modules only (quantize it too)")
    return 3 if any("input_transform" in r for r in records.values()) else 2


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major, its own dtype)."""
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(b.tobytes()).hexdigest()


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"qcal.load: {path / MANIFEST_FILE}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_manifest(m, path: Path) -> None:
    """Every field's type and every cross-reference, before any tensor is read or the model touched."""
    if not isinstance(m, dict):
        raise _bad(path, f"the manifest is a {type(m).__name__}, not a mapping")
    if m.get("format") != "qcal":
        raise _bad(path, "not a qcal manifest")
    version = m.get("format_version")
    if not _is_int(version) or version < 1:
        raise _bad(path, f"format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise ValueError(f"qcal.load: {path} has format_version {version!r}; this qcal reads versions "
                         f"<= {FORMAT_VERSION}: upgrade qcal")
    for key, kind in (("model_class", str), ("modules", dict), ("tensors", dict)):
        if not isinstance(m.get(key), kind):
            raise _bad(path, f"{key!r} is missing or not a {kind.__name__}")
    if version >= 2 and not isinstance(m.get("parameters"), list):
        raise _bad(path, "'parameters' is missing or not a list")
    if not isinstance(m.get("aliases", {}), dict) or not isinstance(m.get("parameters", []), list):
        raise _bad(path, "'aliases' must be a mapping and 'parameters' a list")
    for name, info in m["tensors"].items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or \
                not isinstance(info.get("shape"), list) or not all(_is_int(s) and s >= 0 for s in info["shape"]):
            raise _bad(path, f"tensor entry {name!r} is malformed")
        if version >= 2 and not (isinstance(info.get("sha256"), str) and len(info["sha256"]) == 64):
            raise _bad(path, f"tensor entry {name!r} has no sha256")
    for alias, target in m.get("aliases", {}).items():
        if target not in m["tensors"]:
            raise _bad(path, f"alias {alias!r} points to {target!r}, which is not a stored tensor")
    known = set(m["tensors"]) | set(m.get("aliases", {}))
    for p in m.get("parameters", []):
        if p not in known:
            raise _bad(path, f"parameter {p!r} is not a stored tensor")
    for name, cfg in m["modules"].items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or \
                not isinstance(cfg.get("frozen"), bool) or not isinstance(cfg.get("weight_shape"), list) or \
                not all(_is_int(s) and s > 0 for s in cfg["weight_shape"]) or \
                not isinstance(cfg.get("weights"), (dict, type(None))) or \
                not isinstance(cfg.get("activations"), (dict, type(None))):
            raise _bad(path, f"module entry {name!r} is malformed")
        transform = cfg.get("input_transform")
        if transform is not None and (version < 3 or transform not in INPUT_TRANSFORMS):
            raise _bad(path, f"module {name!r} has an unknown input_transform {transform!r}")
        try:
            WeightSpec.from_dict(cfg["weights"]) if cfg["weights"] is not None else None
            ActivationSpec.from_dict(cfg["activations"]) if cfg["activations"] is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(path, f"module {name!r} has an invalid spec ({e})") from None


def _read(path: Path, device) -> tuple[dict, dict[str, torch.Tensor]]:
    mpath, tpath = path / MANIFEST_FILE, path / TENSORS_FILE
    if not mpath.is_file() or not tpath.is_file():
        raise FileNotFoundError(f"qcal.load: {path} must contain {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"qcal.load: {mpath} is not valid JSON ({e}); the file is truncated or corrupt") from None
    _validate_manifest(manifest, path)
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
        if "sha256" in info and tensor_sha256(t) != info["sha256"]:
            raise ValueError(f"qcal.load: tensor {name!r} in {tpath} does not match the sha256 recorded when it was "
                             f"saved (the file was modified or corrupted)")
    extra = set(tensors) - set(manifest["tensors"])
    if extra:
        raise ValueError(f"qcal.load: {tpath} holds tensors the manifest does not list: {sorted(extra)[:5]}")
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
    if cfg.get("input_transform") == HADAMARD:
        add_input_hadamard(q)
    return q


def _check_module_tensors(name: str, q: QModuleMixin, get) -> None:
    """The stored tensors of a quantized module against its spec: dtypes and shapes of the codes, scales and
    zero-points (raises ValueError naming the tensor)."""
    def fail(attr: str, t: torch.Tensor, want: str) -> ValueError:
        return ValueError(f"qcal.load: tensor '{name}.{attr}' is {t.dtype} {tuple(t.shape)}; the module's spec "
                          f"needs {want}")

    spec = q.weight_spec
    if q.frozen and spec is not None:
        qw, s, zp = get("qweight"), get("weight_scale"), get("weight_zero_point")
        want = q.qweight
        if qw.dtype != want.dtype or qw.shape != want.shape:
            raise fail("qweight", qw, f"{want.dtype} {tuple(want.shape)}")
        rows, cols = q.weight_shape[0], q.weight_2d_cols
        g = spec.group_size
        grid = (1, 1) if isinstance(spec.granularity, PerTensor) else (rows, cols // g if g else 1)
        if not s.is_floating_point() or tuple(s.shape) != grid:
            raise fail("weight_scale", s, f"a float tensor of shape {grid}")
        if spec.symmetric and zp is not None:
            raise fail("weight_zero_point", zp, "none (symmetric weights)")
        if not spec.symmetric and (zp is None or not zp.is_floating_point() or tuple(zp.shape) != grid):
            raise ValueError(f"qcal.load: tensor '{name}.weight_zero_point' is missing or not a float tensor of "
                             f"shape {grid} (asymmetric weights)")
    a = q.act_spec
    if a is not None and not a.dynamic:
        s = get("input_scale")
        if q.frozen and s is None:
            raise ValueError(f"qcal.load: tensor '{name}.input_scale' is missing (static activations)")
        if s is not None and (not s.is_floating_point() or s.numel() != 1):
            raise fail("input_scale", s, "one float value")


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
        _check_module_tensors(sname, q, lambda a, s=sname: tensors.get(aliases.get(f"{s}.{a}", f"{s}.{a}")))
    # every Parameter of the model's float structure is recorded as one (else it would be shadowed)
    param_names = set(manifest.get("parameters", []))
    if "parameters" in manifest:
        for full in names:
            mod, attr = slots[full]
            if isinstance(mod._parameters.get(attr), nn.Parameter) and full not in param_names and \
                    not (isinstance(mod, QModuleMixin) and attr not in ("weight", "bias")):
                raise ValueError(f"qcal.load: the manifest's 'parameters' does not list {full!r}, a parameter of "
                                 f"the model (edited manifest?)")

    # all checks passed: mutate
    for name, q in shells.items():
        set_module(model, name, q)
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
