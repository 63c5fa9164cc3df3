"""Side by side: 4-bit weight-only PTQ by llm-compressor (GPTQ) and AutoRound on qcal's model and data.

Both peers quantize the same float32 weights, calibrated on the same token windows, to int4 with
groups of 64 along the input dimension, asymmetric (a scale and an integer zero per group), lm_head
kept in float. Each result is written back as a plain float Hugging Face folder whose linear weights
are the peer's dequantized weights, ``scale * (q - zero)``, checked to lie on the int4 grid; qcal's own
evaluator then measures every folder with the same perplexity code.

Three steps, in two Python environments (the peers' pins clash with qcal's):

    # 1. qcal's environment: the float model and 128 x 512 C4 calibration windows
    python benchmarks/peers/side_by_side.py prepare --out /work/sbs --model smollm2-135m --calib c4 \\
        --calib-samples 128 --calib-seqlen 512 --data-dir ../shared/data

    # 2. the peers' environment (benchmarks/peers/make_venv.sh llmcompressor 'llmcompressor==0.14.0.1'
    #    'auto-round==0.15.1'): quantize, dequantize, check the grid, write /work/sbs/<peer>/
    HF_HUB_OFFLINE=1 benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/side_by_side.py \\
        run --peer llmcompressor --src /work/sbs
    HF_HUB_OFFLINE=1 benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/side_by_side.py \\
        run --peer autoround --src /work/sbs

    # 3. qcal's environment: WikiText-2 token perplexity (2048-token windows) of each folder, as a table
    python benchmarks/peers/side_by_side.py table --src /work/sbs

``run`` uses every core unless ``--threads`` says otherwise; its wall time (calibration and
quantization only) and peak RSS land in ``<peer>/run.json``, with the resolved settings and the grid
check. Settings: llm-compressor ``oneshot`` with a ``GPTQModifier`` (its defaults: block size 128,
dampening 0.01, static activation ordering, min-max observer, sequential pipeline, batch size 1);
AutoRound with its defaults (200 iterations, lr 1/iters, min-max tuning, batch size 8, seed 42, fp16
scales, bf16 autocast and ``torch.compile`` on CPU; the first run also pays inductor's compile time).
``table`` also evaluates ``float/`` as the reference row and caches each evaluation in ``DIR/eval/``
until its folder is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER_PYTHON = HERE / ".venv-llmcompressor" / "bin" / "python"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
PEERS = ("llmcompressor", "autoround")
BITS, GROUP = 4, 64
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template*", "*.model")


# --------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> None:
    """Write ``out/float/`` (float32 model + tokenizer) and ``out/calib.pt`` (an int64 (n, seqlen) tensor)."""
    import torch

    out = Path(args.out)
    shutil.rmtree(out / "float", ignore_errors=True)
    (out / "float").mkdir(parents=True)
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
        windows = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(args.seed))
        source = {"model": "tiny-random-llama", "calib": "random tokens"}
    else:
        from qcal.data import calibration_windows
        from qcal.eval.models import load_model

        data_dir = args.data_dir
        if data_dir is None and DEFAULT_DATA_DIR.is_dir():
            data_dir = str(DEFAULT_DATA_DIR)
        model, tokenizer = load_model(args.model)
        windows = torch.cat(calibration_windows(tokenizer, args.calib, args.calib_samples, args.calib_seqlen,
                                                args.seed, data_dir))
        tokenizer.save_pretrained(out / "float")
        source = {"model": args.model, "calib": args.calib, "data_dir": data_dir}
    model.to(torch.float32).save_pretrained(out / "float")
    config = json.loads((out / "float" / "config.json").read_text())
    assert "quantization_config" not in config, "float/ must be a plain float model (a GGUF source left its config)"
    windows = windows.to(torch.int64).contiguous()
    torch.save(windows, out / "calib.pt")
    meta = {**source, "calib_samples": windows.shape[0], "calib_seqlen": windows.shape[1], "seed": args.seed}
    (out / "prepare.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'float'} and {out / 'calib.pt'} {tuple(windows.shape)}")


# ------------------------------------------------------------------------------------------------ run


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (the tiny test model)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def word_level_tokenizer(vocab_size: int):
    """A stand-in tokenizer (token i is the word ``t<i>``) for a model folder without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def quantize_llmcompressor(model, tokenizer, windows, args) -> dict:
    """GPTQ through ``oneshot``; returns {linear name: (weight, scale, zero, qmin, qmax)} and settings."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    n, seqlen = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    weights = {"num_bits": BITS, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}
    modifier = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    # oneshot insists on a processor even for tokenized data; the tiny model has none
    processor = tokenizer if tokenizer is not None else word_level_tokenizer(model.config.vocab_size)
    start = time.perf_counter()
    model = oneshot(model=model, processor=processor, dataset=dataset, recipe=modifier,
                    num_calibration_samples=n, max_seq_length=seqlen)
    seconds = time.perf_counter() - start
    tensors, resolved = {}, None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            qargs: QuantizationArgs = module.quantization_scheme.weights
            resolved = qargs.model_dump(mode="json")
            g_idx = getattr(module, "weight_g_idx", None)
            if g_idx is not None and g_idx.numel() and g_idx.min() >= 0:
                expect = torch.arange(module.in_features, device=g_idx.device) // GROUP
                assert torch.equal(g_idx.long(), expect), f"{name}: groups are not contiguous runs of {GROUP}"
            qmin, qmax = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1  # compressed-tensors' signed int4 codes
            tensors[name] = (module.weight.detach(), module.weight_scale.detach(), module.weight_zero_point.detach(),
                             qmin, qmax)
    settings = {"recipe": "GPTQModifier", "weights": resolved, "ignore": ["lm_head"],
                "block_size": modifier.block_size, "dampening_frac": modifier.dampening_frac,
                "batch_size": 1, "num_calibration_samples": n, "max_seq_length": seqlen,
                "pipeline": "independent (default: sequential for GPTQ)"}
    return {"tensors": tensors, "seconds": seconds, "settings": settings}


def quantize_autoround(model, tokenizer, windows, args) -> dict:
    """AutoRound (SignRound) with its defaults; returns {linear name: (weight, scale, zero, qmin, qmax)}."""
    import torch
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    n, seqlen = windows.shape
    batch_size = min(8, n)  # AutoRound's default batch size
    # what AutoRound's own dataloader yields: dicts of (batch, seqlen) input_ids and attention_mask
    batches = [{"input_ids": chunk.clone(), "attention_mask": torch.ones_like(chunk)}
               for chunk in windows.split(batch_size)]
    config = SignRoundConfig(bits=BITS, group_size=GROUP, sym=False, **({} if args.iters is None else
                                                                          {"iters": args.iters}))
    # AutoRound insists on a tokenizer for a model object; the tiny model has none
    tokenizer = tokenizer if tokenizer is not None else word_level_tokenizer(model.config.vocab_size)
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer, alg_configs=config, dataset=batches, nsamples=n, seqlen=seqlen,
                   batch_size=batch_size)
    quantized, _ = ar.quantize()
    seconds = time.perf_counter() - start
    quantized = quantized if quantized is not None else ar.model
    tensors = {}
    for name, module in quantized.named_modules():
        if isinstance(module, torch.nn.Linear) and getattr(module, "scale", None) is not None:
            qmin, qmax = 0, 2**BITS - 1  # AutoRound's asymmetric codes are unsigned
            tensors[name] = (module.weight.detach(), module.scale.detach(), module.zp.detach(), qmin, qmax)
    keys = ("bits", "group_size", "sym", "data_type", "iters", "lr", "minmax_lr", "nsamples", "seqlen", "batch_size",
            "gradient_accumulate_steps", "seed", "scale_dtype", "amp", "amp_dtype", "enable_minmax_tuning",
            "enable_quanted_input", "enable_norm_bias_tuning", "enable_torch_compile", "low_cpu_mem_usage",
            "nblocks", "quant_lm_head", "not_use_best_mse", "dynamic_max_gap", "lr_scheduler")
    settings = {k: _jsonable(getattr(obj, k)) for obj in (ar, ar.quantize_config) for k in keys if _has(obj, k)}
    settings["dataset"] = f"{n} windows of {seqlen} tokens in batches of {batch_size}"
    return {"tensors": tensors, "seconds": seconds, "settings": settings}


def _has(obj, name: str) -> bool:
    try:
        getattr(obj, name)
    except Exception:
        return False
    return True


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def on_grid(name: str, weight, scale, zero, qmin: int, qmax: int):
    """The dequantized weight ``scale * (q - zero)`` (float32), after asserting ``weight`` already is one.

    Per (row, group of 64 input columns): at most 16 distinct values, an integer zero, and re-quantizing
    with the peer's scale and zero gives codes in [qmin, qmax] that reproduce the weight to float rounding.
    """
    import torch

    rows, cols = weight.shape
    groups = cols // GROUP
    assert cols % GROUP == 0 and scale.shape == (rows, groups) and zero.shape == (rows, groups), (
        f"{name}: weight {tuple(weight.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}")
    w = weight.float().reshape(rows, groups, GROUP)
    s = scale.float().reshape(rows, groups, 1)
    z = zero.float().reshape(rows, groups, 1)
    assert torch.equal(z, z.round()), f"{name}: non-integer zero points"
    assert (s > 0).all(), f"{name}: non-positive scales"
    distinct = 1 + (w.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1)
    q = torch.round(w / s) + z
    deq = (q - z) * s
    # the peer stored scale * (q - zero) in the weight's dtype: allow one rounding of that, in grid steps
    err = (deq - w).abs() / s
    tol = ((q - z).abs() + 1) * torch.finfo(weight.dtype).eps
    assert distinct.max().item() <= 2**BITS, f"{name}: {distinct.max().item()} distinct values in a group"
    assert qmin <= q.min().item() and q.max().item() <= qmax, f"{name}: codes outside [{qmin}, {qmax}]"
    assert (err <= tol).all(), f"{name}: re-quantized weight is up to {err.max().item():.3g} grid steps off"
    stats = {"max_distinct": distinct.max().item(), "max_err_steps": err.max().item(),
             "weight_dtype": str(weight.dtype), "scale_dtype": str(scale.dtype), "zero_dtype": str(zero.dtype)}
    return deq.reshape(rows, cols), stats


def run(args: argparse.Namespace) -> None:
    """Quantize ``src/float`` with one peer and write ``src/<peer>/`` (dequantized float folder + run.json)."""
    threads = args.threads or os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    try:
        from transformers import AutoModelForCausalLM
        if args.peer == "llmcompressor":
            import llmcompressor as lib
        else:
            import auto_round as lib
    except ImportError as error:
        sys.exit(f"{error}: run this step with {PEER_PYTHON.relative_to(REPO)}")
    torch.manual_seed(args.seed)  # llm-compressor draws its calibration order from torch's global generator
    src = Path(args.src).resolve()
    out = src / args.peer
    windows = torch.load(src / "calib.pt")
    assert windows.dtype == torch.int64 and windows.dim() == 2, "calib.pt must be an int64 (n, seqlen) tensor"
    tokenizer = load_tokenizer(src / "float")
    model = AutoModelForCausalLM.from_pretrained(src / "float", dtype=torch.float32).eval()
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    quantize = quantize_llmcompressor if args.peer == "llmcompressor" else quantize_autoround
    # the peers write logs and offload files into the working directory: keep them out of the repository
    scratch = Path(tempfile.mkdtemp(prefix=f"sbs-{args.peer}-"))
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        result = quantize(model, tokenizer, windows, args)
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tensors = result.pop("tensors")
    assert sorted(tensors) == linears, f"quantized {sorted(tensors)}, expected every linear but lm_head: {linears}"
    dequantized, checks = {}, []
    for name, (weight, scale, zero, qmin, qmax) in tensors.items():
        dequantized[name], stats = on_grid(name, weight, scale, zero, qmin, qmax)
        checks.append(stats)
    worst = {k: max(c[k] for c in checks) if k.startswith("max_") else sorted({c[k] for c in checks})
             for k in checks[0]}
    del model, tensors
    # a clean float model from the same folder, its linear weights replaced by the dequantized ones
    fresh = AutoModelForCausalLM.from_pretrained(src / "float", dtype=torch.float32)
    with torch.no_grad():
        for name, weight in dequantized.items():
            fresh.get_submodule(name).weight.copy_(weight)
    shutil.rmtree(out, ignore_errors=True)
    fresh.save_pretrained(out)
    for pattern in TOKENIZER_FILES:
        for path in (src / "float").glob(pattern):
            shutil.copy2(path, out / path.name)
    record = {"peer": args.peer, "version": lib.__version__, "seconds": round(result["seconds"], 2),
              "peak_rss_mib": round(peak_rss_mib, 1), "threads": threads, "seed": args.seed,
              "torch": torch.__version__, "quantized_linears": len(dequantized), "grid_check": worst,
              "settings": result["settings"]}
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


# ---------------------------------------------------------------------------------------------- table


def evaluate(folder: Path, args: argparse.Namespace) -> float:
    """qcal's token perplexity of ``folder``, cached in ``<src>/eval/`` until the folder is rewritten."""
    cache = folder.parent / "eval" / f"{folder.name}-{args.quant}-{args.seqlen}-{args.limit or 'all'}.json"
    stale = not cache.is_file() or cache.stat().st_mtime < (folder / "config.json").stat().st_mtime
    if stale or args.force:
        cache.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "qcal.eval", "--model", str(folder), "--quant", args.quant, "--metrics", "ppl",
               "--seqlen", str(args.seqlen), "--json", str(cache), "--no-progress"]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    (record,) = json.loads(cache.read_text())
    return record["token_ppl"]


def table(args: argparse.Namespace) -> None:
    """A markdown table: peer, version, token perplexity, calibration seconds, peak RSS."""
    src = Path(args.src).resolve()
    rows = [("float (reference)", "-", evaluate(src / "float", args), "-", "-", "-")]
    for peer in PEERS:
        if not (src / peer / "run.json").is_file():
            continue
        info = json.loads((src / peer / "run.json").read_text())
        rows.append((peer, info["version"], evaluate(src / peer, args), f"{info['seconds']:.1f}",
                     f"{info['peak_rss_mib']:.0f}", str(info["threads"])))
    limit = "all" if args.limit is None else f"the first {args.limit}"
    print(f"\nWikiText-2 test token perplexity over {limit} {args.seqlen}-token windows (weights as {args.quant}); "
          "int4 g64 asymmetric, lm_head in float\n")
    print("| peer | version | token ppl | calibration s | peak RSS MiB | threads |")
    print("|---|---|---:|---:|---:|---:|")
    for peer, version, ppl, seconds, rss, threads in rows:
        print(f"| {peer} | {version} | {ppl:.3f} | {seconds} | {rss} | {threads} |")


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="(qcal's environment) write DIR/float/ and DIR/calib.pt")
    p.add_argument("--out", required=True, help="output folder DIR")
    p.add_argument("--model", default="smollm2-135m", help="anything qcal.eval.models.load_model accepts")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext-valid"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help=f"folder laid out like shared/data (default: {DEFAULT_DATA_DIR} "
                   "if it exists, else $QCAL_DATA_DIR / datasets)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=prepare)
    r = sub.add_parser("run", help=f"(the peers' environment, {PEER_PYTHON.relative_to(REPO)}) quantize with a peer")
    r.add_argument("--peer", required=True, choices=PEERS)
    r.add_argument("--src", required=True, help="the folder prepare wrote")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    r.add_argument("--seed", type=int, default=0, help="torch.manual_seed before quantizing (AutoRound seeds itself)")
    r.add_argument("--iters", type=int, default=None, help=argparse.SUPPRESS)  # AutoRound, tiny tests only
    r.set_defaults(func=run)
    t = sub.add_parser("table", help="(qcal's environment) evaluate each DIR/<peer>/ and print a markdown table")
    t.add_argument("--src", required=True)
    t.add_argument("--limit", type=int, default=None, help="only the first N perplexity windows")
    t.add_argument("--seqlen", type=int, default=2048)
    t.add_argument("--quant", default="bf16", help="qcal scheme the folders are evaluated as (default: bf16)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--force", action="store_true", help="re-evaluate even when a cached result exists")
    t.set_defaults(func=table)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
