"""``qcal.export`` / ``qcal.load_pretrained``: quantized models to and from other libraries' formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

__all__ = ["export", "load_pretrained", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("compressed-tensors", "qcal", "hf", "gguf")


def export(model: nn.Module, path: str | os.PathLike, format: str = "compressed-tensors", *,  # noqa: A002
           overwrite: bool = False, **kwargs) -> Path:
    """Write the quantized ``model`` to ``path`` in ``format``.

    * ``"compressed-tensors"``: the layout llm-compressor writes (vLLM, SGLang, transformers + compressed-tensors).
    * ``"hf"``: transformers' ``save_pretrained`` with ``quant_method: "qcal"`` (reload with qcal imported).
    * ``"qcal"``: :func:`qcal.save` (safetensors + manifest, for any PyTorch model).
    * ``"gguf"``: one ``.gguf`` file for llama.cpp / ollama (Llama architecture; ``tokenizer=`` required; see
      :func:`qcal.integrations.gguf.export_gguf` for the tensor types).

    Every module is checked before anything is written; an existing non-empty folder needs ``overwrite=True``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"qcal.export: unknown format {format!r}; available: {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    if format == "gguf":  # a file, checked there
        from .integrations.gguf import export_gguf

        return export_gguf(model, path, overwrite=overwrite, **kwargs)
    if format == "compressed-tensors":  # it checks the folder itself
        from .integrations.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, path, overwrite=overwrite, **kwargs)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"qcal.export: {path} exists and is not empty (pass overwrite=True)")
    if format == "hf":
        if not hasattr(model, "save_pretrained"):
            raise TypeError("qcal.export(format='hf'): the model must be a transformers PreTrainedModel")
        from .quantize import attach_to_transformers

        attach_to_transformers(model)
        model.save_pretrained(path, **kwargs)
        return path
    from .serialization import save

    save(model, path)
    return path


def load_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a causal LM folder written by qcal (``quant_method: "qcal"``) or by llm-compressor /
    :func:`export` (``compressed-tensors``), or a ``.gguf`` file, as a frozen qcal model running qcal's kernels.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ...).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.suffix == ".gguf":
        from .integrations.gguf import load_gguf

        return load_gguf(path, **kwargs)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"qcal.load_pretrained: {path} has no config.json (not a model folder)")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "qcal":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if method == "compressed-tensors":
        from .integrations.compressed_tensors import load_compressed_tensors
        from .quantize import attach_to_transformers

        model = load_compressed_tensors(path, **kwargs)
        attach_to_transformers(model)
        return model
    raise ValueError(f"qcal.load_pretrained: {path} is not a qcal or compressed-tensors checkpoint "
                     f"(quant_method={method!r})")
