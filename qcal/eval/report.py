"""Results of one scheme, and their output: stdout table, JSON records, size-vs-perplexity plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .llamacpp import LlamaCppReport

JSON_KEYS = ("scheme", "token_ppl", "word_ppl", "prefill_tok_s", "decode_tok_s", "prefill_ratio",
             "decode_ratio", "model_bytes", "peak_mem_bytes", "quantize_s", "quantize_peak_bytes", "speed_runtime",
             "weight_bytes_per_token", "decode_gb_s")
# in a record only when measured: --stream-bandwidth, and a llama.cpp row of the same weight type (--llamacpp)
OPTIONAL_JSON_KEYS = ("stream_read_gb_s", "stream_fraction", "llamacpp_type", "llamacpp_prefill_tok_s",
                      "llamacpp_decode_tok_s", "decode_vs_llamacpp", "llamacpp_build")


@dataclass
class SchemeResult:
    """Everything measured for one scheme; None where not measured."""

    scheme: str
    token_ppl: float | None = None
    word_ppl: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    prefill_ratio: float | None = None
    decode_ratio: float | None = None
    model_bytes: int | None = None
    peak_mem_bytes: int | None = None
    quantize_s: float | None = None
    quantize_peak_bytes: int | None = None  # memory added while quantizing: the float copy, calibration, the solver
    speed_runtime: str | None = None  # "lean", "hf" or "compiled": what ran the timed generation (all models alike)
    speed_attention: str | None = None  # the Hugging Face attention of the timed models (None: each model's own)
    weight_bytes_per_token: int | None = None  # weights one decoded token reads (speed.weight_bytes_per_token)
    decode_gb_s: float | None = None  # weight_bytes_per_token x decode_tok_s, 10^9 bytes/s
    stream_read_gb_s: float | None = None  # the machine's STREAM-like read bandwidth at the same thread count
    stream_fraction: float | None = None  # decode_gb_s / stream_read_gb_s
    llamacpp_type: str | None = None  # the llama.cpp file type of the same weight format, when measured
    llamacpp_prefill_tok_s: float | None = None
    llamacpp_decode_tok_s: float | None = None
    decode_vs_llamacpp: float | None = None  # decode_tok_s / llamacpp_decode_tok_s
    llamacpp_build: str | None = None

    def record(self) -> dict:
        """The JSON record: :data:`JSON_KEYS`, then those of :data:`OPTIONAL_JSON_KEYS` that were measured; NaN
        written as null."""
        data = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}
        return {k: data[k] for k in JSON_KEYS} | {k: data[k] for k in OPTIONAL_JSON_KEYS if data[k] is not None}


def _fmt(value: float | int | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def format_table(results: list[SchemeResult], baseline: str = "bf16", llamacpp: LlamaCppReport | None = None) -> str:
    """A fixed-width table, one row per scheme; ratios are versus ``baseline`` (higher is faster).

    ``llamacpp`` adds a row per llama.cpp file type measured (prefill and decode tok/s, GGUF size).
    """
    header = ("scheme", "token ppl", "word ppl", "prefill tok/s", "decode tok/s", f"prefill/{baseline}",
              f"decode/{baseline}", "size MiB", "peak MiB", "quant s", "quant peak MiB", "read/tok MiB",
              "decode GB/s")
    rows = [header] + [
        (
            r.scheme,
            _fmt(r.token_ppl, ".3f"),
            _fmt(r.word_ppl, ".3f"),
            _fmt(r.prefill_tok_s, ".1f"),
            _fmt(r.decode_tok_s, ".2f"),
            _fmt(r.prefill_ratio, ".2f", "x"),
            _fmt(r.decode_ratio, ".2f", "x"),
            _mib(r.model_bytes),
            _mib(r.peak_mem_bytes),
            _fmt(r.quantize_s, ".2f"),
            _mib(r.quantize_peak_bytes),
            _mib(r.weight_bytes_per_token),
            _fmt(r.decode_gb_s, ".2f"),
        )
        for r in results
    ]
    for row in llamacpp.rows if llamacpp is not None else ():
        cells = (row.label, "-", "-", _fmt(row.prefill_tok_s, ".1f"), _fmt(row.decode_tok_s, ".2f"), "-", "-",
                 _mib(row.file_bytes))
        rows.append(cells + ("-",) * (len(header) - len(cells)))
    rules = (1 + len(results),) if llamacpp is not None and llamacpp.rows else ()  # above the llama.cpp rows
    return _render(rows, left=1, rules=rules)


def _render(rows: list[tuple[str, ...]], left: int, rules: tuple[int, ...] = ()) -> str:
    """Fixed-width text of ``rows`` (the first is the header, ruled below): the first ``left`` columns left-aligned,
    the others right-aligned; a rule also above each row index in ``rules``."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for k, row in enumerate(rows):
        if k == 1 or k in rules:
            lines.append(rule)
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def format_llamacpp_ratios(results: list[SchemeResult]) -> str:
    """A short table of qcal decode tok/s over llama.cpp's for the same weight type; "" when none was matched."""
    matched = [r for r in results if r.decode_vs_llamacpp is not None]
    if not matched:
        return ""
    header = ("scheme", "llama.cpp", "qcal decode tok/s", "llama.cpp decode tok/s", "qcal/llama.cpp")
    rows = [header] + [(r.scheme, r.llamacpp_type or "-", _fmt(r.decode_tok_s, ".2f"),
                        _fmt(r.llamacpp_decode_tok_s, ".2f"), _fmt(r.decode_vs_llamacpp, ".2f", "x"))
                       for r in matched]
    return _render(rows, left=2)


def format_stream_line(results: list[SchemeResult], stream: dict[str, float], threads: int) -> str:
    """One line: the machine's STREAM-like bandwidth and each scheme's decode weight traffic as a fraction of the
    read bandwidth."""
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in stream.items() if k != "read")
    parts = [f"{r.scheme} {r.decode_gb_s:.2f} GB/s = {r.stream_fraction:.0%}" for r in results
             if r.stream_fraction is not None and r.decode_gb_s is not None]
    line = (f"memory bandwidth ({threads} threads, STREAM-like, GB/s): read {stream['read']:.1f} "
            f"({kernels})")
    return line + ("; decode weight traffic / read: " + ", ".join(parts) if parts else "")


def write_json(results: list[SchemeResult], path: str | os.PathLike) -> None:
    """Write one record per scheme (see :data:`JSON_KEYS`) as a JSON list."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([r.record() for r in results], f, indent=2)
        f.write("\n")


def plot_size_vs_ppl(results: list[SchemeResult], path: str | os.PathLike, title: str = "") -> bool:
    """Scatter model size (MiB) vs perplexity (token, else word), one labelled point per scheme.

    Returns False (and writes nothing) when no scheme has both a size and a perplexity.
    """
    use_token = any(r.token_ppl is not None for r in results)
    points = [(r.scheme, r.model_bytes / 2**20, r.token_ppl if use_token else r.word_ppl)
              for r in results if r.model_bytes is not None]
    points = [p for p in points if p[2] is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, size, ppl in points:
        ax.scatter(size, ppl)
        ax.annotate(name, (size, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("model size (MiB, parameters + buffers)")
    ax.set_ylabel("token perplexity" if use_token else "word perplexity")
    ax.set_title(title or "size vs perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
