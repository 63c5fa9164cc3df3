"""``explain(model)``: which scheme, kernel and how many bytes each quantized module has, and what runs."""

from __future__ import annotations

import math

from torch import nn

from .kernels import derived_bytes
from .quantize import quantized_modules

__all__ = ["explain", "module_rows"]


def _scheme(m) -> str:
    w = m.weight_spec
    a = m.act_spec
    ws = "w:none" if w is None else (
        f"w:{w.qtype.name.removeprefix('q')}" + (f"/g{w.group_size}" if w.group_size else "/pc")
        + ("" if w.symmetric else "/asym"))
    acts = "a:none" if a is None else (
        f"a:{a.qtype.name.removeprefix('q')}/{'dyn' if a.dynamic else 'static'}" + ("" if a.symmetric else "/asym"))
    return f"{ws} {acts}"


def _canonical_bytes(m) -> int:
    total = 0
    for n, b in list(m._parameters.items()) + list(m._buffers.items()):
        if b is not None and n not in m._non_persistent_buffers_set:
            total += b.numel() * b.element_size()
    return total


def module_rows(model: nn.Module) -> list[dict]:
    """One dict per quantized module: name, shape, scheme, kernel, dispatch, bytes (canonical, derived)."""
    rows = []
    for name, m in quantized_modules(model):
        kernel = getattr(m, "kernel", None) if m.frozen else None
        rows.append({
            "name": name,
            "shape": "x".join(str(s) for s in m.weight_shape),
            "scheme": _scheme(m),
            "kernel": kernel.name if kernel is not None else "fake-quant",
            "dispatch": kernel.dispatch if kernel is not None else "-",
            "bytes": _canonical_bytes(m),
            "derived_bytes": derived_bytes(m),
            "bf16_bytes": 2 * math.prod(m.weight_shape),
        })
    return rows


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def explain(model: nn.Module, print_table: bool = True) -> str:
    """Print (and return) a table of every quantized module's scheme, kernel and bytes, then what each kernel runs
    for which input (its table's decision: input dtype, eager or traced, number of rows M).

    ``bytes`` counts the canonical state (what a checkpoint holds: integer weights, scales, zero
    points, bias); ``+derived`` is what the chosen kernel adds (e.g. a packed int4 layout);
    ``vs bf16`` is canonical bytes over a bf16 copy of the weight.
    """
    rows = module_rows(model)
    header = ["module", "shape", "scheme", "kernel", "bytes", "+derived", "vs bf16"]
    body = [[r["name"], r["shape"], r["scheme"], r["kernel"], _fmt_bytes(r["bytes"]),
             _fmt_bytes(r["derived_bytes"]), f"{r['bytes'] / max(r['bf16_bytes'], 1):.2f}x"] for r in rows]
    tot = sum(r["bytes"] for r in rows)
    der = sum(r["derived_bytes"] for r in rows)
    bf = sum(r["bf16_bytes"] for r in rows)
    body.append(["total", "", f"{len(rows)} modules", "", _fmt_bytes(tot), _fmt_bytes(der),
                 f"{tot / max(bf, 1):.2f}x"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    dispatch = dict.fromkeys((r["kernel"], r["dispatch"]) for r in rows if r["dispatch"] != "-")
    if dispatch:
        out += ["", "kernel dispatch:"] + [f"  {kernel}: {text}" for kernel, text in dispatch]
    text = "\n".join(out)
    if print_table:
        print(text)
    return text
