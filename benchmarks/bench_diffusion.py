"""Diffusion denoisers (PixArt-Sigma transformer, SD1.5 UNet; random weights) per scheme: memory, step time, fidelity.

    python benchmarks/bench_diffusion.py [--model pixart|sd-unet] [--schemes bf16,int8wo,int8dq] [--compile]
    python benchmarks/bench_diffusion.py --tiny --schemes bf16,int8wo --steps 1 --warmup 0   # seconds

After the diffusers-torchao README table: the denoiser is built from its real architecture config (diffusers
classes, seeded random weights; nothing is downloaded), cast to bf16, and for bf16 and each scheme one row gives

* model MiB: parameters and buffers (what the weights occupy, kernel-derived buffers included);
* inference MiB: peak RSS (CPU) or allocator peak (CUDA) during the timed steps, above the level just before them
  (freed heap memory is handed back to the system first, so a step that reuses it still counts);
* s/step: median seconds of one denoiser forward (one denoising step) over ``--steps`` timed calls, after
  ``--warmup`` untimed ones (warmup s); a ``--compile`` row adds ``torch.compile`` (default mode), its first call
  timed as compile s;
* quantize s / quant peak MiB: seconds to quantize and freeze (static W8A8: its calibration passes included) and
  the peak memory above the bf16 model during it;
* fidelity versus the bf16 model on the same latents, timestep and prompt embedding: relative error
  ``||y_q - y_bf16|| / ||y_bf16||`` and PSNR (dB, peak ``max |y_bf16|``) of the predicted noise (PixArt's learned
  variance channels left out, as its pipeline does). With random weights there is no picture worth looking at.

Int4 group sizes that do not divide a layer's input (``in_channels * kh * kw`` for a conv) leave that layer in
float; the row's notes count them. ``w8a8-static`` is calibrated on denoising steps at several timesteps (fresh
latents and prompt embeddings); ``autoquant`` picks a scheme per linear layer on the benchmark's inputs.
``--channels-last`` runs the model and latents in channels-last memory format (the fast layout of CPU
convolutions, the UNet's; the seed's recipe does the same before compiling).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import qcal
from qcal.eval.speed import PeakMemory, model_bytes
from qcal.kernels import native
from qcal.nn import QMODULE_FOR
from qcal.quantize import cast_model
from qcal.rtn import match_rtn, rtn_kwargs
from qcal.schemes import apply_scheme

DEFAULT_SCHEMES = "bf16,int8wo,int8dq,int4wo-64,fp8wo,fp8dq,fp6wo,w8a8-static"
EVAL_TIMESTEP = 400
CALIB_TIMESTEPS = (950, 500, 50)  # static activation ranges move with the noise level
MODELS = {
    "pixart": "PixArt-Sigma-XL-2 transformer (PixArtTransformer2DModel)",
    "sd-unet": "Stable Diffusion 1.5 UNet (UNet2DConditionModel)",
}


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning on ``model.to(dtype)`` (it would repeat for every scheme)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def build_model(name: str, tiny: bool, latent: int, seed: int = 0) -> nn.Module:
    """The float32 denoiser ``name`` with seeded random weights, for ``latent`` x ``latent`` latents."""
    import diffusers

    torch.manual_seed(seed)
    if name == "pixart":
        if tiny:
            return diffusers.PixArtTransformer2DModel(
                num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                cross_attention_dim=64, sample_size=latent, patch_size=2, caption_channels=32,
                norm_type="ada_norm_single", use_additional_conditions=False).eval()
        # PixArt-alpha/PixArt-Sigma-XL-2-{512,1024}-MS transformer config; sample_size follows the resolution
        # (the positional embedding's interpolation scale then defaults to max(sample_size // 64, 1), as there)
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, caption_channels=4096, sample_size=latent, patch_size=2,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, use_additional_conditions=False).eval()
    if name == "sd-unet":
        if tiny:
            return diffusers.UNet2DConditionModel(
                sample_size=latent, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=32).eval()
        # runwayml/stable-diffusion-v1-5 unet config: the class defaults are SD1.x's but for cross_attention_dim
        return diffusers.UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_inputs(name: str, model: nn.Module, batch: int, latent: int, tokens: int, timestep: int,
                seed: int) -> dict[str, torch.Tensor]:
    """Keyword inputs of one denoising step: bf16 latent noise, prompt embedding, a timestep per sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    width = cfg.caption_channels if name == "pixart" else cfg.cross_attention_dim
    latents = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(torch.bfloat16)
    prompt = torch.randn(batch, tokens, width, generator=g).to(torch.bfloat16)
    return {"hidden_states" if name == "pixart" else "sample": latents, "encoder_hidden_states": prompt,
            "timestep": torch.full((batch,), timestep, dtype=torch.long)}


def denoise(model: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One denoising step: the denoiser's output (B, C, h, w)."""
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def predicted_noise(y: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The noise prediction of an output; a learned-variance output (twice the latent channels) is halved."""
    return y[:, :in_channels] if y.shape[1] == 2 * in_channels else y


def fidelity(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, PSNR in dB with peak ``max |ref|``; inf when equal) of ``y`` against ``ref``."""
    y, ref = y.double(), ref.double()
    rel = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    mse = (y - ref).pow(2).mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(ref.abs().max().item() ** 2 / mse)
    return rel, psnr


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules qcal can swap (``nn.Linear``, ``nn.Conv2d``), by name."""
    return [(n, m) for n, m in model.named_modules() if type(m) in QMODULE_FOR]


def quantize_model(model: nn.Module, scheme: str, calib: list[dict[str, torch.Tensor]],
                   example: dict[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """Quantize and freeze the bf16 ``model`` in place with ``scheme``; returns (model, notes)."""
    if scheme == "bf16":
        return model, ""
    if scheme == "autoquant":
        qcal.autoquant(model, example, error_on_unseen=False)
        chosen: dict[str, int] = {}
        for r in getattr(model, "autoquant_report", []):
            chosen[r.chosen] = chosen.get(r.chosen, 0) + 1
        return model, "per linear: " + ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items()))
    if scheme == "w8a8-static":
        qcal.quantize(model, weights=qcal.qint8, activations=qcal.qint8)
        with qcal.Calibration(), torch.no_grad():
            for inputs in calib:
                model(**inputs)
        qcal.freeze(model)
        return cast_model(model, torch.bfloat16), f"calibrated on {len(calib)} steps, t={list(CALIB_TIMESTEPS)}"
    rtn = match_rtn(scheme)
    group = rtn_kwargs(scheme).get("group_size") if rtn is not None else None
    unfit = [n for n, m in quantizable(model) if group and m.weight[0].numel() % group]
    if not unfit:
        return apply_scheme(model, scheme, quantize_lm_head=True), ""
    qcal.quantize(model, exclude=unfit, **rtn_kwargs(scheme))  # the scheme, less the layers it cannot take
    qcal.freeze(model)
    names = ", ".join(unfit[:3]) + (", ..." if len(unfit) > 3 else "")
    return cast_model(model, torch.bfloat16), f"group size {group} does not fit: {names}"


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_steps(step: Callable[[], torch.Tensor], steps: int, warmup: int,
               first_call: bool) -> tuple[float | None, float | None, float, float | None, torch.Tensor]:
    """(first-call s or None, warmup s or None, median s/step, peak MiB or None, last output)."""
    first = warm = None
    y = None
    if first_call:  # torch.compile compiles here
        start = time.perf_counter()
        y = step()
        first = time.perf_counter() - start
    if warmup:
        start = time.perf_counter()
        for _ in range(warmup):
            y = step()
        warm = time.perf_counter() - start
    del y
    release_freed_memory()
    times = []
    with PeakMemory() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            y = step()
            times.append(time.perf_counter() - start)
    mib = None if peak.bytes is None else peak.bytes / 2**20
    return first, warm, statistics.median(times), mib, y


def run_scheme(base: nn.Module, scheme: str, args: argparse.Namespace, inputs: dict[str, torch.Tensor],
               calib: list[dict[str, torch.Tensor]], ref: torch.Tensor) -> Iterator[dict[str, Any]]:
    """The eager row of ``scheme`` (and its compiled row with ``--compile``), each yielded as measured."""
    total = len(quantizable(base))
    release_freed_memory()
    model = base if scheme == "bf16" else copy.deepcopy(base)
    start = time.perf_counter()
    with quiet_diffusers(), PeakMemory() as qpeak:
        model, notes = quantize_model(model, scheme, calib, inputs)
    quantize_s = time.perf_counter() - start if scheme != "bf16" else 0.0
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = [m.frozen for _, m in qcal.quantized_modules(model)]
    if not all(frozen):
        raise RuntimeError(f"{scheme}: {frozen.count(False)} quantized modules were left unfrozen")
    left = len(quantizable(model))
    if scheme != "bf16" and left:
        notes = f"{left} of {total} Linear/Conv2d float" + (f" ({notes})" if notes else "")
    common = {"model": args.model, "tiny": args.tiny, "batch_size": args.batch_size, "resolution": args.resolution,
              "prompt_tokens": args.prompt_tokens, "threads": torch.get_num_threads(), "scheme": scheme,
              "quantize_s": quantize_s, "quantize_peak_mib": None if qpeak.bytes is None else qpeak.bytes / 2**20,
              "channels_last": args.channels_last, "model_mib": model_bytes(model) / 2**20,
              "quantized_modules": len(frozen), "float_modules": left}
    variants = [False, True] if args.compile else [False]
    for compiled in variants:
        if compiled:
            torch._dynamo.reset()
            runner = torch.compile(model)
        else:
            runner = model
        first, warm, step_s, peak, y = time_steps(lambda r=runner: denoise(r, inputs), args.steps, args.warmup,
                                                  first_call=compiled)
        rel, psnr = fidelity(predicted_noise(y, base.config.in_channels), ref)
        del y, runner
        yield {**common, "compile": compiled, "compile_s": first, "warmup_s": warm, "step_s": step_s,
               "inference_mib": peak, "rel_err": rel, "psnr_db": None if math.isinf(psnr) else psnr,
               "notes": notes}
    del model
    torch._dynamo.reset()
    release_freed_memory()


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (README style)."""
    head = ["model", "batch", "res", "scheme", "compile", "model MiB", "inference MiB", "quantize s",
            "quant peak MiB", "warmup s", "compile s", "s/step", "x bf16", "rel err", "PSNR dB", "notes"]
    base = {r["compile"]: r["step_s"] for r in rows if r["scheme"] == "bf16"}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        psnr = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        cells = [r["model"] + (" (tiny)" if r["tiny"] else ""), str(r["batch_size"]), str(r["resolution"]),
                 r["scheme"], str(r["compile"]), f"{r['model_mib']:.1f}", _fmt(r["inference_mib"], ".1f", "n/a"),
                 f"{r['quantize_s']:.2f}", _fmt(r["quantize_peak_mib"], ".1f", "n/a"), _fmt(r["warmup_s"], ".2f"),
                 _fmt(r["compile_s"], ".2f"), f"{r['step_s']:.3f}",
                 _fmt(base[r["compile"]] / r["step_s"] if r["compile"] in base else None, ".2f"),
                 f"{r['rel_err']:.4f}", psnr, r["notes"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="pixart", help="the denoiser (default pixart)")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the model (seconds; default 64 px)")
    p.add_argument("--resolution", type=int, default=None, help="image pixels a side (latents / 8; default 512)")
    p.add_argument("--batch-size", type=int, default=2, help="2: classifier-free guidance doubles the batch")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt embedding length (default 120 for pixart, 77 for sd-unet; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=3, help="timed denoising steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES,
                   help=f"comma list of qcal schemes, bf16 and autoquant (default {DEFAULT_SCHEMES})")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row after each scheme's eager row")
    p.add_argument("--channels-last", action="store_true", help="channels-last model and latents (CPU convolutions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (inputs use seed + 1 onwards)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows (and versions, command) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 64 if args.tiny else 512
    if args.resolution % 16:
        p.error("--resolution must be a multiple of 16 (latents / 8, patches of 2)")
    if args.prompt_tokens is None:
        args.prompt_tokens = 8 if args.tiny else {"pixart": 120, "sd-unet": 77}[args.model]
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    args.scheme_list = [s.strip() for s in args.schemes.split(",") if s.strip()]
    return args


def versions() -> dict[str, str]:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "qcal": qcal.__version__,
            "native kernels": native.native_status()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints the table and returns the rows (torch's thread count restored after)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args, "python benchmarks/bench_diffusion.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, command: str) -> list[dict[str, Any]]:
    """The rows of ``args``' schemes, printed as a table (and written to ``args.json``)."""
    native.available()  # built or loaded once here, not inside the first quantized row's quantize s
    latent = args.resolution // 8
    with quiet_diffusers():
        base = build_model(args.model, args.tiny, latent, args.seed).to(torch.bfloat16)
    inputs = make_inputs(args.model, base, args.batch_size, latent, args.prompt_tokens, EVAL_TIMESTEP, args.seed + 1)
    if args.channels_last:
        base = base.to(memory_format=torch.channels_last)
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in inputs.items()}
    calib = [make_inputs(args.model, base, args.batch_size, latent, args.prompt_tokens, t, args.seed + 2 + i)
             for i, t in enumerate(CALIB_TIMESTEPS)]
    params = sum(p.numel() for p in base.parameters())
    print(f"{MODELS[args.model]}{' (tiny)' if args.tiny else ''}: {params / 1e6:.1f}M parameters, random weights; "
          f"batch {args.batch_size}, {args.resolution}x{args.resolution} px (latents {latent}x{latent}), "
          f"{args.prompt_tokens} prompt tokens, timestep {EVAL_TIMESTEP}, {torch.get_num_threads()} threads",
          flush=True)
    ref = predicted_noise(denoise(base, inputs), base.config.in_channels).float()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(args.scheme_list) * (2 if args.compile else 1), desc="rows", disable=args.no_progress)
    for scheme in args.scheme_list:
        bar.set_postfix_str(scheme)
        for row in run_scheme(base, scheme, args, inputs, calib, ref):
            rows.append(row)
            bar.update()
    bar.close()
    meta = {"command": command, "versions": versions()}
    print(f"\n{command}\n" + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "\n")
    print(format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
