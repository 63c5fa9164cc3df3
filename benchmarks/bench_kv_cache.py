"""Quantized KV cache (qcal.runtime.kv_cache) against transformers' bf16 dynamic cache: memory, decode, perplexity.

    python benchmarks/bench_kv_cache.py --context 4096 --new-tokens 32 --threads 2 --ppl-windows 8
    python benchmarks/bench_kv_cache.py --runtime lean --context 4096 --new-tokens 32 --threads 1

One bf16 model (the built-in SmolLM2-135M unless ``--model``), its own Hugging Face forward and attention; per
cache (bf16, int8, int4), back to back in rounds: a prefill of ``--context`` tokens of WikiText-2 test text, then
``--new-tokens`` greedy decode steps, each timed; the fastest round's median step is reported. Memory is the bytes
the cache holds after the prefill (the bf16 cache's key and value tensors; the quantized cache's codes, scales and
minima). Perplexity: token perplexity of the first ``--ppl-windows`` windows of ``--context`` tokens, attention
reading the keys and values through each cache (``python -m qcal.eval --kv-cache``'s measure).

``--runtime lean`` times qcal's :class:`~qcal.runtime.LeanGenerator` instead (``kv_bits`` 8 / 4: decode attention
reads the codes in place; bytes are those of the filled positions).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _cache(model, kind: str):
    from transformers import DynamicCache

    from qcal.runtime.kv_cache import QuantizedKVCache

    return DynamicCache(config=model.config) if kind == "bf16" else QuantizedKVCache(model.config, int(kind[3:]))


def _bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_round(model, prompt: torch.Tensor, kind: str, new_tokens: int) -> tuple[float, list[float], int]:
    """(prefill seconds, per-step decode seconds, cache bytes after the prefill)."""
    from qcal.eval.perplexity import _cache_kwarg

    cache = _cache(model, kind)
    kw = _cache_kwarg(model, cache)  # once: the signature lookup stays out of the timed steps
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, **kw)
    prefill = time.perf_counter() - t0
    nbytes = _bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        out = model(token, use_cache=True, **kw)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t0)
    return prefill, steps, nbytes


@torch.no_grad()
def decode_round_lean(model, prompt: torch.Tensor, kind: str, new_tokens: int) -> tuple[float, list[float], int]:
    """:func:`decode_round` through :class:`qcal.runtime.LeanGenerator` with a bf16 or quantized static cache."""
    from qcal.runtime import LeanGenerator

    n = prompt.shape[1]
    gen = LeanGenerator(model, n + new_tokens, kv_bits=None if kind == "bf16" else int(kind[3:]))
    t0 = time.perf_counter()
    token = gen.prefill(prompt).argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token = gen.decode(token).argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
    return prefill, steps, gen.cache_nbytes() * n // gen.max_cache_len


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="anything qcal.eval.models.load_model accepts")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding (default: 4096)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ppl-windows", type=int, default=0, help="perplexity windows of --context tokens (0: none)")
    p.add_argument("--caches", default="bf16,int8,int4")
    p.add_argument("--runtime", choices=["hf", "lean"], default="hf",
                   help="the model's own forward (hf) or qcal's LeanGenerator (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="WikiText-2 folder root (default: the copy bundled with qcal)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qcal.data import load_wikitext, tokenize
    from qcal.eval.models import load_model
    from qcal.eval.perplexity import token_perplexity

    kinds = args.caches.split(",")
    bad = [k for k in kinds if k not in ("bf16", "int8", "int4")]
    if bad:
        p.error(f"--caches: unknown {bad}; choose from bf16, int8, int4")
    model, tokenizer = load_model(args.model)
    model = model.to(torch.bfloat16).eval()
    ids = tokenize(tokenizer, load_wikitext("test", args.data_dir)).reshape(1, -1)
    if ids.shape[1] < args.context + 1:
        p.error(f"--context {args.context}: the test text has only {ids.shape[1]} tokens")
    prompt = ids[:, :args.context]
    best: dict[str, tuple[float, float, int]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for kind in kinds:
            run = decode_round_lean if args.runtime == "lean" else decode_round
            prefill, steps, nbytes = run(model, prompt, kind, args.new_tokens)
            if r == 0:
                continue
            step = statistics.median(steps)
            if kind not in best or step < best[kind][1]:
                best[kind] = (prefill, step, nbytes)
    ppl = {}
    for kind in kinds if args.ppl_windows else ():
        ppl[kind] = token_perplexity(model, ids, args.context, args.ppl_windows,
                                     kv_cache=None if kind == "bf16" else kind)
    base = best.get("bf16")
    print(f"\n{args.model}, bf16 weights, {args.runtime} runtime, {torch.get_num_threads()} threads; "
          f"context {args.context} tokens, "
          f"{args.new_tokens} decode steps, fastest of {args.rounds} rounds (median step)"
          + (f"; token ppl over {args.ppl_windows} windows of {args.context}" if ppl else ""))
    print("| cache | bytes after prefill | x bf16 | prefill s | decode tok/s | x bf16 | token ppl | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        prefill, step, nbytes = best[kind]
        mem = f"{nbytes / base[2]:.3f}" if base else "-"
        speed = f"{base[1] / step:.2f}" if base else "-"
        q = ppl.get(kind)
        rel = f"{(q / ppl['bf16'] - 1) * 100:+.2f}%" if q is not None and "bf16" in ppl else "-"
        print(f"| {kind} | {nbytes:,} | {mem} | {prefill:.2f} | {1 / step:.1f} | {speed} | "
              f"{'-' if q is None else f'{q:.3f}'} | {rel} |")


if __name__ == "__main__":
    main()
