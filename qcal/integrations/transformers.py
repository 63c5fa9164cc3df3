"""Hugging Face transformers integration: ``quant_method: "qcal"`` in ``config.json``.

``import qcal`` registers :class:`QcalConfig` and :class:`QcalHfQuantizer` with transformers' quantizer
registry, so that

* ``model.save_pretrained(dir)`` of a qcal-quantized model (frozen or fake-quant) writes sharded
  safetensors plus ``quantization_config`` (per-module specs, grouped like compressed-tensors'
  ``config_groups``) and a sha256 of every quantized tensor in the shards' metadata; each frozen
  linear also gets an empty ``weight``, so that transformers without qcal imported stops on the size
  mismatch instead of loading random weights;
* ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the quantized modules on the meta device
  before any weight is read (dtypes and shapes from the shards' headers), loads the tensors straight
  into them, verifies their hashes and selects the kernels: the same logits as the saved model;
* ``from_pretrained(float_dir, quantization_config=QcalConfig(scheme="int4wo-64"))`` quantizes each
  linear as its weight arrives (calibration-free schemes only), so peak memory stays near the
  quantized size.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import __version__
from ..nn import QMODULE_FOR, QModuleMixin
from ..quantize import quantize, quantized_modules, register_attach_hook, set_module
from ..rtn import rtn_kwargs
from ..serialization import FORMAT_VERSION, INPUT_TRANSFORMS, build_shell, tensor_sha256, written_version

__all__ = ["QUANT_METHOD", "QcalConfig", "QcalHfQuantizer", "attach", "tensor_sha256", "check_safetensors_file",
           "checkpoint_tensors", "checkpoint_metadata", "float_buffer_dtypes"]

QUANT_METHOD = "qcal"
_METADATA_KEY = "qcal"


def check_safetensors_file(path: str | os.PathLike) -> dict[str, dict]:
    """The header of a safetensors file, after checking that the file is as long as the header says.

    Raises ValueError naming the file when it is truncated, padded or its header is not valid.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"qcal: {path} is truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"qcal: {path} is truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"qcal: {path} has a corrupt safetensors header") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        raise ValueError(f"qcal: {path} has a corrupt safetensors header") from None
    if 8 + n + end != size:
        raise ValueError(f"qcal: {path} is truncated or was modified: its header describes {8 + n + end} bytes, "
                         f"the file has {size}")
    return header


def _record(m: QModuleMixin) -> dict:
    rec = m.qcal_config()
    rec.pop("weight_shape")
    return rec


class QcalConfig(QuantizationConfigMixin):
    """qcal's ``quantization_config``.

    Args:
        scheme: a calibration-free scheme name (``int8wo``, ``int8dq``, ``int4wo-<g>``, ``int4wo-pc``,
            ``8da4w-<g>``, ``int3wo-<g>``) to quantize a float checkpoint while it loads. Schemes that
            need calibration (GPTQ, SmoothQuant, static activations) raise: run them with the Python API
            on the loaded float model, then ``save_pretrained``.
        modules_to_not_convert: module-name globs left float when quantizing on load (default
            ``["lm_head"]``).
        config_groups: written by qcal on save: ``{group: {type, weights, activations, frozen, targets}}``.
    """

    def __init__(self, scheme: str | None = None, modules_to_not_convert: list[str] | None = None,
                 config_groups: dict[str, dict] | None = None, format_version: int = FORMAT_VERSION,
                 qcal_version: str | None = None, buffer_dtypes: dict[str, str] | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"QcalConfig: unknown fields {sorted(kwargs)} (written by a newer qcal?)")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or not \
                1 <= format_version <= FORMAT_VERSION:
            raise ValueError(f"QcalConfig: format_version {format_version!r} is not readable by qcal {__version__} "
                             f"(reads 1..{FORMAT_VERSION}): upgrade qcal")
        if scheme is not None:
            try:
                rtn_kwargs(scheme)
            except ValueError as e:
                raise ValueError(f"QcalConfig: {e}. Quantize the loaded float model with the Python API instead "
                                 f"(qcal.schemes.apply_scheme(model, {scheme!r}, calib=...) or the algorithm's "
                                 f"quantizer), then model.save_pretrained(dir)") from None
        if config_groups is None and scheme is None:
            raise ValueError("QcalConfig: give scheme= to quantize a float checkpoint on load")
        self.scheme = scheme
        self.modules_to_not_convert = ["lm_head"] if modules_to_not_convert is None else list(modules_to_not_convert)
        self.config_groups = config_groups
        self.format_version = format_version
        self.qcal_version = qcal_version or __version__
        self.buffer_dtypes = buffer_dtypes

    @classmethod
    def from_model(cls, model: nn.Module, scheme: str | None = None) -> QcalConfig:
        """The config describing the quantized modules of ``model`` as they are now."""
        records = {name: _record(m) for name, m in quantized_modules(model)}
        left = [n for n, m in model.named_modules() if type(m) in QMODULE_FOR
                and not any(n == q or n.startswith(q + ".") for q in records)]
        return cls.from_records(records, left, float_buffer_dtypes(model), scheme, written_version(model, records))

    @classmethod
    def from_records(cls, records: dict[str, dict], left: list[str], buffer_dtypes: dict[str, str],
                     scheme: str | None = None, format_version: int = 2) -> QcalConfig:
        """The config of quantized modules given as ``{name: record}`` (a model written piece by piece), the
        quantizable modules ``left`` float, and the dtypes of non-persistent float buffers."""
        groups: dict[str, dict] = {}
        for name, rec in records.items():
            key = json.dumps(rec, sort_keys=True)
            if key not in groups:
                groups[key] = {**rec, "targets": []}
            groups[key]["targets"].append(name)
        return cls(scheme=scheme, modules_to_not_convert=left, buffer_dtypes=buffer_dtypes or None,
                   format_version=format_version,
                   config_groups={f"group_{i}": g for i, g in enumerate(groups.values())})

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
               "qcal_version": self.qcal_version, "modules_to_not_convert": self.modules_to_not_convert}
        if self.scheme is not None:
            out["scheme"] = self.scheme
        if self.config_groups is not None:
            out["config_groups"] = self.config_groups
        if self.buffer_dtypes:
            out["buffer_dtypes"] = self.buffer_dtypes
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def module_records(self) -> dict[str, dict]:
        """``{module name: record}`` from ``config_groups``; raises ValueError on a malformed config."""
        out: dict[str, dict] = {}
        if not isinstance(self.config_groups, dict):
            raise ValueError("qcal: quantization_config.config_groups is missing or not a mapping")
        for gname, g in self.config_groups.items():
            if not isinstance(g, dict) or not isinstance(g.get("targets"), list) or \
                    not {"type", "weights", "activations", "frozen"} <= g.keys():
                raise ValueError(f"qcal: quantization_config.config_groups[{gname!r}] is malformed")
            rec = {k: g[k] for k in ("type", "weights", "activations", "frozen", "input_transform") if k in g}
            transform = rec.get("input_transform")
            if transform is not None and (transform not in INPUT_TRANSFORMS or self.format_version < 3):
                raise ValueError(f"qcal: quantization_config.config_groups[{gname!r}] has an unknown input_transform")
            for t in g["targets"]:
                if not isinstance(t, str) or t in out:
                    raise ValueError(f"qcal: quantization_config target {t!r} is malformed or listed twice")
                out[t] = rec
        return out


class _QuantizeOnLoad(ConversionOps):
    """Receives one float weight, puts it into its fake-quant module, freezes that module at once."""

    def __init__(self, hf_quantizer: QcalHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, missing_keys=None,
                **kwargs) -> dict:
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        mname, _, attr = full_layer_name.rpartition(".")
        module = model.get_submodule(mname)
        with torch.no_grad():
            # the weight arrives in the load dtype: the same codes as quantize() + freeze() on the loaded model
            module._parameters[attr] = nn.Parameter(value.detach(), requires_grad=False)
            module.freeze()
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class QcalHfQuantizer(HfQuantizer):
    """transformers' side of qcal: builds quantized modules before weights load, checks them after."""

    requires_calibration = False
    quantization_config: QcalConfig

    def __init__(self, quantization_config: QcalConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._files: list[str] = []
        self._hashes: dict[str, str] = {}

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("qcal: disk offload (device_map with 'disk') is not supported for qcal models")
        if self.pre_quantized and self.quantization_config.config_groups is None:
            raise ValueError("qcal: this checkpoint's quantization_config has no config_groups (not written by "
                             "qcal's save_pretrained?)")

    # ------------------------------------------------------------------ before weights
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            quantize(model, exclude=self.quantization_config.modules_to_not_convert or None,
                     **rtn_kwargs(self.quantization_config.scheme))
            return model
        records = self.quantization_config.module_records()
        self._files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
        if not self._files:
            raise ValueError("qcal: a qcal checkpoint is read from safetensors files only")
        headers: dict[str, dict] = {}
        self._hashes = {}
        for f in self._files:  # each header read once: tensor layouts now, recorded hashes after loading
            header = check_safetensors_file(f)
            self._hashes.update(_recorded_hashes(header.pop("__metadata__", None) or {}, f))
            headers.update(header)
        by_module: dict[str, dict[str, dict]] = {}
        for key, info in headers.items():
            head = key
            while head:
                head = head.rpartition(".")[0]
                if head in records:
                    by_module.setdefault(head, {})[key] = info
                    break
        sentinels = {re.escape(f"{n}.weight") + "$" for n, rec in records.items()
                     if rec["frozen"] and rec["weights"] is not None}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | sentinels
        shells: dict[str, QModuleMixin] = {}
        for name, rec in records.items():
            try:
                orig = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"qcal: the checkpoint quantizes module {name!r}, which this model does not have "
                                 f"(another architecture?)") from None
            shell = build_shell(orig, name, {**rec, "weight_shape": list(orig.weight.shape)})
            _placeholders(shell, name, by_module.get(name, {}))
            shells[name] = shell
        for name, shell in shells.items():
            set_module(model, name, shell)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        mname, _, attr = param_name.rpartition(".")
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            return False
        return isinstance(module, QModuleMixin) and not module.frozen and attr == "weight"

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    # ------------------------------------------------------------------ after weights
    def _process_model_after_weight_loading(self, model, **kwargs):
        mods = list(quantized_modules(model))
        if self.pre_quantized:
            expected = self._hashes
            for name, m in mods:
                for k, t in _module_tensors(m, name).items():
                    if t.device.type == "meta":
                        raise ValueError(f"qcal: tensor {k!r} is missing from the checkpoint")
                    if k in expected and tensor_sha256(t) != expected[k]:
                        raise ValueError(f"qcal: tensor {k!r} does not match the sha256 recorded when it was saved "
                                         f"(the file was modified or corrupted)")
                if m.frozen:
                    m.select_kernel()
            _restore_buffer_dtypes(model, self.quantization_config.buffer_dtypes or {})
        else:
            missing = [n for n, m in mods if not m.frozen]
            if missing:
                raise ValueError(f"qcal: quantize on load: no weight arrived for {missing[:5]} "
                                 f"({len(missing)} modules); the checkpoint does not match the model")
            for _, m in mods:  # transformers re-creates non-persistent buffers (the kernel layouts) after loading
                m.select_kernel()
            self.quantization_config = QcalConfig.from_model(model, scheme=self.quantization_config.scheme)
        return model

    # ------------------------------------------------------------------ save
    def get_state_dict_and_metadata(self, model):
        bad = [n for n, m in quantized_modules(model) if not m.calibrated]
        if bad:
            raise ValueError(f"qcal: cannot save {bad[:5]}: static activation quantization was never calibrated "
                             f"(run `with qcal.Calibration(): model(samples)` first)")
        config = QcalConfig.from_model(model, scheme=getattr(self.quantization_config, "scheme", None))
        self.quantization_config = config
        model.config.quantization_config = config
        untie_quantized_output(model)
        state_dict, hashes = checkpoint_tensors(model)
        return state_dict, checkpoint_metadata(hashes)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def untie_quantized_output(model) -> None:
    """A quantized output layer no longer shares the (float) input embedding: record that in the config,
    so the folder loads it as its own layer instead of tying it back."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, QModuleMixin) or out.weight_spec is None:
        return
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    name = next(n for n, m in model.named_modules() if m is out) + "."
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {k: v for k, v in model.all_tied_weights_keys.items()
                                       if not k.startswith(name) and not v.startswith(name)}


def float_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Non-persistent float buffers (rotary ``inv_freq``...) are recomputed on load: their dtypes, so the loaded
    model computes exactly what the saved one did after a cast changed them."""
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, QModuleMixin):
            continue
        for k in mod._non_persistent_buffers_set:
            b = mod._buffers.get(k)
            if b is not None and b.is_floating_point():
                out[f"{mname}.{k}" if mname else k] = str(b.dtype).removeprefix("torch.")
    return out


def checkpoint_tensors(module: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s tensors as a qcal checkpoint stores them (names prefixed), and the sha256 of its quantized
    modules' tensors: a frozen quantized module's float ``weight`` is an empty uint8 sentinel, so transformers
    without qcal stops on its size mismatch instead of loading random weights in place of the quantized ones."""
    state_dict = {prefix + k: v for k, v in module.state_dict().items()}
    hashes = {}
    for name, m in quantized_modules(module):
        name = prefix + name
        for k, t in _module_tensors(m, name).items():
            hashes[k] = tensor_sha256(t)
        if m.frozen and m.weight_spec is not None:
            state_dict[f"{name}.weight"] = torch.zeros(0, dtype=torch.uint8)
    return state_dict, hashes


def checkpoint_metadata(hashes: dict[str, str]) -> dict[str, str]:
    """The safetensors metadata of a qcal checkpoint file holding tensors with these sha256."""
    return {_METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "sha256": hashes}, sort_keys=True)}


def _module_tensors(m: QModuleMixin, name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in m.state_dict().items()}


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    for name, dtype in dtypes.items():
        mname, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            continue
        b = mod._buffers.get(attr)
        dt = getattr(torch, dtype, None)
        if b is not None and b.is_floating_point() and isinstance(dt, torch.dtype) and dt.is_floating_point:
            mod._buffers[attr] = b.to(dt)


def _recorded_hashes(meta: dict, file: str) -> dict[str, str]:
    """The per-tensor sha256 that save_pretrained wrote into a shard's metadata."""
    if _METADATA_KEY not in meta:
        return {}
    try:
        return dict(json.loads(meta[_METADATA_KEY])["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"qcal: {file} has malformed qcal metadata") from None


_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _placeholders(shell: QModuleMixin, name: str, headers: dict[str, dict]) -> None:
    """Give ``shell`` (and its observers) a meta tensor of the stored dtype and shape for every tensor the
    checkpoint holds under ``name.`` (``headers``), so transformers loads them in place; shapes are checked here."""
    prefix = name + "."
    for key, info in headers.items():
        sub, _, attr = key[len(prefix):].rpartition(".")
        if not sub and attr == "weight" and shell.frozen and shell.weight_spec is not None:
            continue  # the empty sentinel written by save (see get_state_dict_and_metadata)
        try:
            mod = shell.get_submodule(sub) if sub else shell
        except AttributeError:
            raise ValueError(f"qcal: tensor {key!r} has no place in module {name!r}") from None
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"qcal: tensor {key!r} has unsupported dtype {info['dtype']}")
        cur = mod._parameters.get(attr, mod._buffers.get(attr))
        if cur is not None and attr in ("weight", "bias", "qweight") and list(cur.shape) != info["shape"]:
            raise ValueError(f"qcal: tensor {key!r} has shape {info['shape']} in the checkpoint but "
                             f"{list(cur.shape)} in the model (another architecture?)")
        empty = torch.empty(info["shape"], dtype=dtype, device="meta")
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(empty, requires_grad=dtype.is_floating_point)
        else:
            mod._buffers[attr] = empty


def attach(model: nn.Module) -> None:
    """Give a transformers model quantized by qcal a quantizer, so ``save_pretrained`` writes a qcal folder."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or isinstance(getattr(model, "hf_quantizer", None), QcalHfQuantizer):
        return
    if getattr(model, "hf_quantizer", None) is not None:
        return  # quantized by another method: leave it alone
    config = QcalConfig.from_model(model)
    model.hf_quantizer = QcalHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config


def register() -> None:
    """Register ``quant_method: "qcal"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QcalConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QcalConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QcalHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QcalHfQuantizer)


register()
register_attach_hook(attach)
