"""All or nothing: a model is either fully quantized or left exactly as it was.

:func:`transaction` records the module tree (which child each module holds, and its forward pre-hooks) and, when
the work inside may rewrite weights in place (GPTQ, SmoothQuant), a copy of every parameter and buffer written to
a temporary safetensors file (disk, not memory). On any exception, a ``KeyboardInterrupt`` included, the original
modules are put back and the tensors restored into the original Parameter objects, then the exception
propagates.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["transaction"]

_ATTRS = ("hf_quantizer",)
_ACTIVE: set[int] = set()  # models inside a transaction: an inner one (GPTQ within apply_scheme) adds nothing


@contextlib.contextmanager
def transaction(model: nn.Module, snapshot_tensors: bool = True) -> Iterator[None]:
    """Undo everything done to ``model`` inside the block if it raises."""
    if id(model) in _ACTIVE:
        yield
        return
    _ACTIVE.add(id(model))
    try:
        with _transaction(model, snapshot_tensors):
            yield
    finally:
        _ACTIVE.discard(id(model))


@contextlib.contextmanager
def _transaction(model: nn.Module, snapshot_tensors: bool) -> Iterator[None]:
    children = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]
    # what a transform may add: children (an input transform) and forward pre-hooks (the hook that runs it)
    added = [(m, set(m._modules), dict(m._forward_pre_hooks)) for m in model.modules()]
    attrs = {a: model.__dict__[a] for a in _ATTRS if a in model.__dict__}
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None) if config is not None else None
    had_qconfig = config is not None and hasattr(config, "quantization_config")
    slots: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        saved: Path | None = None
        if snapshot_tensors:
            from safetensors.torch import save_file

            tensors, seen = {}, set()
            for mod in model.modules():
                for kind, table in ((True, mod._parameters), (False, mod._buffers)):
                    for key, t in table.items():
                        if t is None:
                            continue
                        slots.append((mod, key, kind, t))
                        if id(t) not in seen and t.device.type != "meta":
                            seen.add(id(t))
                            tensors[str(id(t))] = t.detach().contiguous().cpu()
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qcal-undo-")))
            saved = tmp / "undo.safetensors"
            save_file(tensors, str(saved))
            del tensors
        try:
            yield
        except BaseException:
            for parent, name, child in children:
                parent._modules[name] = child
            for m, names, hooks in added:
                for name in set(m._modules) - names:
                    del m._modules[name]
                if m._forward_pre_hooks != hooks:
                    m._forward_pre_hooks.clear()
                    m._forward_pre_hooks.update(hooks)
            for a in _ATTRS:
                if a in attrs:
                    model.__dict__[a] = attrs[a]
                else:
                    model.__dict__.pop(a, None)
            if config is not None:
                if had_qconfig:
                    config.quantization_config = qconfig
                elif hasattr(config, "quantization_config"):
                    del config.quantization_config
            if saved is not None:
                from safetensors import safe_open

                with safe_open(str(saved), framework="pt") as f:
                    keys = set(f.keys())
                    for mod, key, is_param, t in slots:
                        (mod._parameters if is_param else mod._buffers)[key] = t  # the original object back
                        if str(id(t)) in keys:
                            keys.discard(str(id(t)))  # a tied tensor is restored once
                            with torch.no_grad():
                                t.data = f.get_tensor(str(id(t))).to(t.device)
            raise
