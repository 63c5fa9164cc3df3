"""Evaluate several quantization schemes of one float model: quality, size, memory, then speed."""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .lmeval import lm_eval_wikitext
from .perplexity import token_perplexity
from .report import SchemeResult
from .speed import PeakMemory, measure_speed, model_bytes, time_generation, timed
from .static_decode import StaticCacheGenerator

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
    attention: str | None = None
    runtime: str = "auto"
    seed: int = 0
    progress: bool = True


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
    copy, the quantization transient excluded.
    """
    device = next(model.parameters()).device
    calib = functools.cache(calib) if calib is not None else None  # shared by all schemes
    results, runnable = [], {}
    for scheme in schemes:
        gc.collect()
        with PeakMemory(device) as peak:
            quantized, seconds = quantized_copy(model, scheme, cfg, calib)
            result = SchemeResult(scheme=scheme, model_bytes=model_bytes(quantized), quantize_s=seconds)
            runner = torch.compile(quantized) if cfg.compile else quantized
            gc.collect()
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
        result.token_ppl = token_perplexity(model, input_ids, cfg.seqlen, cfg.limit, cfg.progress)
    if "word_ppl" in cfg.metrics:
        result.word_ppl = lm_eval_wikitext(
            model, tokenizer, docs, limit=cfg.doc_limit, batch_size=cfg.batch_size, max_length=cfg.max_length
        )["word_perplexity"]
    if "ppl" not in cfg.metrics and "word_ppl" not in cfg.metrics:
        time_generation(model, torch.zeros(1, cfg.prefill_len, dtype=torch.long), 0)


RUNTIMES = ("auto", "lean", "hf")


class RuntimeUnavailableError(ValueError):
    """``runtime="lean"`` asked for a model (or with ``compile``) it cannot run."""


def choose_runtime(models: Sequence[torch.nn.Module], cfg: EvalConfig) -> str:
    """The runtime every timed model uses: ``cfg.runtime``, or for ``"auto"`` :class:`qcal.generation.LeanGenerator`
    (``"lean"``) when it runs all of them (bf16 CPU Llama-family models, no ``compile``), else ``"hf"``.
    ``"lean"`` asked for a model it cannot run raises :class:`RuntimeUnavailableError` with the reason."""
    from qcal.generation import unsupported_reason

    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {cfg.runtime!r}; choose from {', '.join(RUNTIMES)}")
    if cfg.runtime == "hf" or (cfg.runtime == "auto" and cfg.compile):
        return "hf"
    if cfg.runtime == "lean" and cfg.compile:
        raise RuntimeUnavailableError("runtime 'lean' is eager: it cannot be combined with compile")
    reasons = [r for r in map(unsupported_reason, models) if r is not None]
    if not reasons:
        return "lean"
    if cfg.runtime == "lean":
        raise RuntimeUnavailableError(f"runtime 'lean' cannot run every timed model: {reasons[0]}")
    return "hf"


def _speed_runner(model: torch.nn.Module, cfg: EvalConfig, runtime: str = "hf"):
    """What the speed rounds time: with ``runtime="lean"`` a :class:`qcal.generation.LeanGenerator`, else the eager
    model, or with ``compile`` a static-cache compiled generator.

    ``cfg.attention`` (a Hugging Face attention name, ``"qcal"`` or ``"auto"``; None = the model's own,
    and the generator's default when compiled) is set on every Hugging Face-run model, the bf16 baseline too.
    """
    if runtime == "lean":
        from qcal.generation import LeanGenerator

        return LeanGenerator(model, cfg.prefill_len + cfg.new_tokens)
    if cfg.compile:
        return StaticCacheGenerator(model, cfg.prefill_len + cfg.new_tokens,
                                    **({} if cfg.attention is None else {"attn_implementation": cfg.attention}))
    if cfg.attention is not None:
        from qcal.kernels.attention import set_attention

        set_attention(model, cfg.attention)
    return model


def _add_speed(
    model: torch.nn.Module, results: list[SchemeResult], runnable: dict[str, torch.nn.Module], cfg: EvalConfig
) -> None:
    """Time all models alternately (adding a bf16 copy when it is not among them), all through one runtime
    (:func:`choose_runtime`), and fill in ratios."""
    models = dict(runnable)
    if BASELINE not in models:
        baseline, _ = quantized_copy(model, BASELINE, cfg, None)
        models = {BASELINE: baseline} | models
    runtime = choose_runtime(list(models.values()), cfg)
    runners = {name: _speed_runner(m, cfg, runtime) for name, m in models.items()}
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
        result.speed_runtime = runtime
