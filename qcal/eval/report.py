"""Results of one scheme, and their output: stdout table, JSON records, size-vs-perplexity plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

JSON_KEYS = ("scheme", "token_ppl", "word_ppl", "prefill_tok_s", "decode_tok_s", "prefill_ratio",
             "decode_ratio", "model_bytes", "peak_mem_bytes", "quantize_s", "quantize_peak_bytes", "speed_runtime")


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

    def record(self) -> dict:
        """The JSON record: exactly :data:`JSON_KEYS`, NaN written as null."""
        data = asdict(self)
        return {k: None if isinstance(data[k], float) and math.isnan(data[k]) else data[k] for k in JSON_KEYS}


def _fmt(value: float | int | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def format_table(results: list[SchemeResult], baseline: str = "bf16") -> str:
    """A fixed-width table, one row per scheme; ratios are versus ``baseline`` (higher is faster)."""
    header = ("scheme", "token ppl", "word ppl", "prefill tok/s", "decode tok/s", f"prefill/{baseline}",
              f"decode/{baseline}", "size MiB", "peak MiB", "quant s", "quant peak MiB")
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
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    def line(row: tuple[str, ...]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    lines = [line(row) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
