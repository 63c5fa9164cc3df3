"""Evaluate several quantization schemes of one float model: quality, size, memory, then speed."""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..runtime import LeanGenerator, StaticCacheGenerator, TokenGenerator, set_attention, unsupported_reason
from ..runtime import ops as runtime_ops
from ..runtime.hf_attention import resolve
from .llamacpp import LlamaCppReport
from .lmeval import lm_eval_wikitext
from .perplexity import token_perplexity
from .report import SchemeResult
from .speed import PeakMemory, measure_speed, model_bytes, time_generation, timed, weight_bytes_per_token

METRICS = ("ppl", "word_ppl", "speed")
BASELINE = "bf16"


@dataclass
class EvalConfig:
    """What to measure and how; mirrors the CLI flags."""

    metrics: Sequence[str] = METRICS
    seqlen: int = 2048
    limit: int | None = None
    doc_limit: int | None = None
    max_length: int | None = None
    batch_size: int = 1
    prefill_len: int = 512
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    quantize_lm_head: bool = False
    compile: bool = False
    attention: str | None = "auto"  # None: "model"
    runtime: str = "auto"
    seed: int = 0
    progress: bool = True
    export_gguf: str | None = None  # write each quantized model as GGUF here (``-<scheme>`` added for several)
    gguf_pre_tokenizer: str = "default"
    kv_cache: str | None = None  # "int8" / "int4": token perplexity through a quantized KV cache


class UnknownSchemeError(ValueError):
    """A ``--quant`` name that ``qcal.schemes`` does not know."""


def check_schemes(names: Sequence[str]) -> None:
    """Raise :class:`UnknownSchemeError` naming the available schemes if any of ``names`` is unknown."""
    from qcal.schemes import available_schemes, describe_scheme

    for name in names:
        try:
            describe_scheme(name)
        except ValueError:
            known = ", ".join(available_schemes())
            raise UnknownSchemeError(f"unknown scheme {name!r}; available: {known}") from None


def quantized_copy(
    model: torch.nn.Module, scheme: str, cfg: EvalConfig, calib: Callable[[], list[torch.Tensor]] | None
) -> tuple[torch.nn.Module, float]:
    """A deep copy of the float ``model`` with ``scheme`` applied, and the seconds the scheme took."""
    from qcal.schemes import apply_scheme

    work = copy.deepcopy(model)
    with timed() as seconds:
        work = apply_scheme(work, scheme, quantize_lm_head=cfg.quantize_lm_head, calib=calib)
    work.eval()
    return work, seconds[0]


def export_gguf_file(model: torch.nn.Module, tokenizer: object, cfg: EvalConfig, scheme: str | None) -> str:
    """Write ``model`` to ``cfg.export_gguf`` (with ``-<scheme>`` before the suffix when given); the path."""
    import sys
    from pathlib import Path

    from qcal.export import export

    path = Path(cfg.export_gguf)
    if scheme is not None:
        path = path.with_name(f"{path.stem}-{scheme}{path.suffix or '.gguf'}")
    export(model, path, format="gguf", tokenizer=tokenizer, pre_tokenizer=cfg.gguf_pre_tokenizer, overwrite=True)
    print(f"wrote {path}", file=sys.stderr)
    return str(path)


def evaluate_schemes(
    model: torch.nn.Module,
    tokenizer: object,
    schemes: Sequence[str],
    cfg: EvalConfig,
    *,
    input_ids: torch.Tensor | None = None,
    docs: Sequence[str] | None = None,
    calib: Callable[[], list[torch.Tensor]] | None = None,
) -> list[SchemeResult]:
    """One :class:`SchemeResult` per scheme, in order; speed ratios are versus a bf16 copy.

    ``input_ids`` (the tokenized test text) is needed for ``ppl``, ``docs`` (articles) for ``word_ppl``.
    Peak memory is the memory added by the scheme's model and its quality evaluation (or one prefill
    if none is asked): RSS high-water mark (CPU) or allocator peak (CUDA) above the level before the
    copy, the quantization transient excluded; ``quantize_peak_bytes`` is that transient: the copy, the
    calibration activations and the solver's work, above the same level.
    """
    device = next(model.parameters()).device
    calib = functools.cache(calib) if calib is not None else None  # shared by all schemes
    results, runnable = [], {}
    for scheme in schemes:
        gc.collect()
        with PeakMemory(device) as peak:
            quantized, seconds = quantized_copy(model, scheme, cfg, calib)
            result = SchemeResult(scheme=scheme, model_bytes=model_bytes(quantized), quantize_s=seconds,
                                  weight_bytes_per_token=weight_bytes_per_token(quantized))
            if cfg.export_gguf:
                export_gguf_file(quantized, tokenizer, cfg, scheme if len(schemes) > 1 else None)
            runner = torch.compile(quantized) if cfg.compile else quantized
            gc.collect()
            result.quantize_peak_bytes = peak.peak_bytes()
            peak.reset_peak()  # count the quantized model and its inference, not the quantization transient
            _evaluate_quality(runner, tokenizer, result, cfg, input_ids, docs)
        result.peak_mem_bytes = peak.bytes
        results.append(result)
        if "speed" in cfg.metrics:
            runnable[scheme] = quantized
        del quantized, runner
        gc.collect()
    if "speed" in cfg.metrics:
        _add_speed(model, results, runnable, cfg)
    return results


@torch.no_grad()
def _evaluate_quality(
    model: torch.nn.Module,
    tokenizer: object,
    result: SchemeResult,
    cfg: EvalConfig,
    input_ids: torch.Tensor | None,
    docs: Sequence[str] | None,
) -> None:
    """Fill in token and word perplexity as ``cfg.metrics`` asks; one prefill if neither is asked."""
    if "ppl" in cfg.metrics:
        result.token_ppl = token_perplexity(model, input_ids, cfg.seqlen, cfg.limit, cfg.progress, cfg.kv_cache)
    if "word_ppl" in cfg.metrics:
        result.word_ppl = lm_eval_wikitext(
            model, tokenizer, docs, limit=cfg.doc_limit, batch_size=cfg.batch_size, max_length=cfg.max_length
        )["word_perplexity"]
    if "ppl" not in cfg.metrics and "word_ppl" not in cfg.metrics:
        time_generation(model, torch.zeros(1, cfg.prefill_len, dtype=torch.long), 0)


RUNTIMES = ("auto", "lean", "hf")
ATTENTIONS = ("auto", "model", "qcal", "sdpa", "eager")


class RuntimeUnavailableError(ValueError):
    """``runtime="lean"`` asked for models, an attention or ``compile`` it cannot run."""


def resolve_runtime(cfg: EvalConfig, models: Sequence[torch.nn.Module]) -> tuple[str, str | None]:
    """``(runtime, attention)`` of every timed model in ``models``, the bf16 baseline too.

    The one place where ``cfg.runtime``, ``cfg.attention`` and ``cfg.compile`` meet (the CLI help of ``--runtime``,
    ``--attention`` and ``--compile`` states this rule):

    * runtime: ``"compiled"`` (:class:`qcal.runtime.StaticCacheGenerator`: a static KV cache and ``torch.compile``)
      with ``compile``; else ``"lean"`` (:class:`qcal.runtime.LeanGenerator`) when asked, or for ``"auto"`` when
      it runs every model and the attention asked for is ``"auto"`` or ``"qcal"`` (its attention is qcal's
      kernels); else ``"hf"`` (each model's own forward and dynamic cache).
    * attention (a Hugging Face attention name, None = each model's own): ``"qcal"`` for the lean runtime, else
      :func:`qcal.runtime.hf_attention.resolve` of ``cfg.attention`` on the models' device: ``"auto"`` is qcal's
      decode kernel where it runs there, else the model's own, or ``"eager"`` for the compiled runtime.

    ``runtime="lean"`` that cannot be honoured raises :class:`RuntimeUnavailableError` with the reason; an unknown
    ``cfg.runtime`` or ``cfg.attention`` raises ``ValueError``.
    """
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {cfg.runtime!r}; choose from {', '.join(RUNTIMES)}")
    attention = "model" if cfg.attention is None else cfg.attention
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {cfg.attention!r}; choose from {', '.join(ATTENTIONS)}")
    params = (next(m.parameters(), None) for m in models)
    device = next((p.device for p in params if p is not None), torch.device("cpu"))
    if cfg.compile:
        if cfg.runtime == "lean":
            raise RuntimeUnavailableError("runtime 'lean' is eager: it cannot be combined with compile")
        return "compiled", resolve(attention, device, compiled=True)
    if cfg.runtime == "lean" and attention not in ("auto", "qcal"):
        raise RuntimeUnavailableError(f"runtime 'lean' runs qcal's attention kernels, not attention {attention!r}")
    if cfg.runtime != "hf" and attention in ("auto", "qcal"):
        reason = next((r for r in map(unsupported_reason, models) if r is not None), None)
        if reason is None and cfg.kv_cache in ("int8", "int4") and not runtime_ops.has_kv():
            reason = "this CPU's native library has no quantized-KV-cache operators"
        if reason is None:
            return "lean", "qcal"
        if cfg.runtime == "lean":
            raise RuntimeUnavailableError(f"runtime 'lean' cannot run every timed model: {reason}")
    return "hf", resolve(attention, device)


def speed_runner(model: torch.nn.Module, runtime: str, attention: str | None,
                 max_cache_len: int, kv_bits: int | None = None) -> torch.nn.Module | TokenGenerator:
    """What the speed rounds time for ``model`` under :func:`resolve_runtime`'s answer: a
    :class:`qcal.runtime.LeanGenerator` (``"lean"``; ``kv_bits`` 8 / 4: its quantized KV cache), a compiled
    :class:`qcal.runtime.StaticCacheGenerator` (``"compiled"``) using ``attention``, or the model itself (``"hf"``)
    switched to ``attention`` (None: left as it is)."""
    if runtime == "lean":
        return LeanGenerator(model, max_cache_len, kv_bits=kv_bits)
    if runtime == "compiled":
        return StaticCacheGenerator(model, max_cache_len, attn_implementation=attention)
    if runtime == "hf":
        return model if attention is None else set_attention(model, attention)
    raise ValueError(f"unknown runtime {runtime!r}; choose from lean, compiled, hf")


def _add_speed(
    model: torch.nn.Module, results: list[SchemeResult], runnable: dict[str, torch.nn.Module], cfg: EvalConfig
) -> None:
    """Time all models alternately (adding a bf16 copy when it is not among them), all through one runtime and
    attention (:func:`resolve_runtime`), and fill in ratios."""
    models = dict(runnable)
    if BASELINE not in models:
        baseline, _ = quantized_copy(model, BASELINE, cfg, None)
        models = {BASELINE: baseline} | models
    runtime, attention = resolve_runtime(cfg, list(models.values()))
    kv_bits = {"int8": 8, "int4": 4}.get(cfg.kv_cache)
    runners = {name: speed_runner(m, runtime, attention, cfg.prefill_len + cfg.new_tokens, kv_bits)
               for name, m in models.items()}
    speeds = measure_speed(
        runners, vocab_size=model.get_input_embeddings().num_embeddings, prefill_len=cfg.prefill_len,
        new_tokens=cfg.new_tokens, repeats=cfg.repeats, warmup=cfg.warmup, seed=cfg.seed,
    )
    base = speeds[BASELINE]
    for result in results:
        speed = speeds[result.scheme]
        result.prefill_tok_s, result.decode_tok_s = speed.prefill_tok_s, speed.decode_tok_s
        result.prefill_ratio = speed.prefill_tok_s / base.prefill_tok_s
        result.decode_ratio = speed.decode_tok_s / base.decode_tok_s
        result.speed_runtime, result.speed_attention = runtime, attention
        result.decode_gb_s = decode_bandwidth(result.weight_bytes_per_token, speed.decode_tok_s)


def decode_bandwidth(weight_bytes: int | None, decode_tok_s: float | None) -> float | None:
    """Achieved weight bandwidth of decoding in GB/s (10^9 bytes/s): weight bytes per token x tokens/s."""
    if weight_bytes is None or decode_tok_s is None or decode_tok_s != decode_tok_s:  # NaN: nothing decoded
        return None
    return weight_bytes * decode_tok_s / 1e9


def add_stream_bandwidth(results: Sequence[SchemeResult], stream: dict[str, float]) -> None:
    """Attach the machine's STREAM-like read bandwidth (``stream["read"]``) and each scheme's fraction of it."""
    for result in results:
        result.stream_read_gb_s = stream["read"]
        if result.decode_gb_s is not None:
            result.stream_fraction = result.decode_gb_s / stream["read"]


def add_llamacpp(results: Sequence[SchemeResult], report: LlamaCppReport | None) -> None:
    """Attach llama.cpp's row of the same weight type to each scheme's result, with qcal decode / llama.cpp decode."""
    if report is None:
        return
    for result in results:
        row = report.row_for(result.scheme)
        if row is None:
            continue
        result.llamacpp_type, result.llamacpp_build = row.type, row.build
        result.llamacpp_prefill_tok_s, result.llamacpp_decode_tok_s = row.prefill_tok_s, row.decode_tok_s
        if result.decode_tok_s is not None and row.decode_tok_s:
            result.decode_vs_llamacpp = result.decode_tok_s / row.decode_tok_s
