"""Perplexity after leaving qcal and coming back: save_pretrained -> from_pretrained, and compressed-tensors
export -> transformers (+ compressed-tensors) load, against qcal's own frozen model, on SmolLM2-135M.

    HF_HUB_OFFLINE=1 python benchmarks/bench_interop.py --data-dir ../shared/data \
        --schemes int8wo,int4wo-64,gptq-int4-64-actorder,int8dq,8da4w-64 --seqlen 512 --limit 40

Also measures the peak RSS of ``from_pretrained`` of each saved qcal folder in a fresh process, against the
folder's size. Prints a table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_RSS_CHILD = r"""
import sys
import qcal, torch
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


before = status("VmRSS")
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(before, status("VmHWM"), status("VmRSS"))
"""


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def _child_rss(code: str, *args: str) -> tuple[int, int, int]:
    """(RSS before from_pretrained, peak RSS, RSS after) of a fresh process (VmHWM is reset by exec,
    unlike getrusage's ru_maxrss)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    before, peak, after = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    return before, peak, after


class _reference_kernels:  # noqa: N801 - used like a function
    """Within the block the frozen modules of ``model`` run qcal's reference kernel."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import qcal.kernels

        self.saved = list(qcal.kernels.KERNELS)
        qcal.kernels.KERNELS[:] = []
        self._reselect()

    def __exit__(self, *exc):
        import qcal.kernels

        qcal.kernels.KERNELS[:] = self.saved
        self._reselect()

    def _reselect(self):
        import qcal

        for _, m in qcal.quantized_modules(self.model):
            m.select_kernel()


def _ct_decompressed(float_model, ct_dir: Path):
    """The float model with each quantized linear's weight replaced by compressed-tensors' own decompression
    of the folder (bf16, the folder's dtype)."""
    from qcal.integrations.compressed_tensors import ct_dequantized_weights
    from qcal.schemes import cast_model

    m = cast_model(copy.deepcopy(float_model), torch.bfloat16)
    for name, w in ct_dequantized_weights(ct_dir).items():
        m.get_submodule(name).weight.data = w.to(torch.bfloat16)
    return m


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default="int8wo,int4wo-64,int4wo-64-intzp,gptq-int4-64-actorder,"
                                        "gptq-int4-64-actorder-intzp,int8dq,8da4w-64")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext-valid"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import qcal
    from qcal import data
    from qcal.eval import models
    from qcal.eval.perplexity import token_perplexity
    from qcal.schemes import apply_scheme

    model, tok = models.load_model("smollm2-135m")
    ids = data.tokenize(tok, data.load_wikitext("test", args.data_dir))

    def calib():
        return data.calibration_windows(tok, args.calib, args.calib_samples, 512, 0, args.data_dir)

    def ppl(m):
        return token_perplexity(m, ids, args.seqlen, args.limit, False)

    rows = []
    for scheme in args.schemes.split(","):
        t0 = time.perf_counter()
        q = apply_scheme(copy.deepcopy(model), scheme, calib=calib)
        row = {"scheme": scheme, "quantize_s": round(time.perf_counter() - t0, 1), "qcal": ppl(q)}
        with _reference_kernels(q):  # dequantize + bf16 GEMM: the arithmetic of transformers' dense path
            row["qcal_reference"] = ppl(q)
        with tempfile.TemporaryDirectory() as d:
            hf_dir, ct_dir = Path(d) / "hf", Path(d) / "ct"
            q.save_pretrained(hf_dir)
            row["hf_folder_mb"] = round(_folder_bytes(hf_dir) / 2**20, 1)
            before, peak, after = _child_rss(_RSS_CHILD, str(hf_dir))
            row["hf_load_peak_rss_growth_mb"] = round((peak - before) / 2**20, 1)
            row["hf_load_rss_growth_mb"] = round((after - before) / 2**20, 1)
            row["save_pretrained"] = ppl(AutoModelForCausalLM.from_pretrained(hf_dir))
            try:
                qcal.export(q, ct_dir, format="compressed-tensors")
            except ValueError as e:
                row["compressed_tensors"] = None
                row["ct_note"] = str(e).split(": ", 2)[-1][:80]
            else:
                try:
                    row["compressed_tensors"] = ppl(AutoModelForCausalLM.from_pretrained(ct_dir))
                    row["ct_path"] = "transformers"
                except RuntimeError:  # asymmetric pack-quantized: vllm-project/llm-compressor#1618
                    row["compressed_tensors"] = ppl(_ct_decompressed(model, ct_dir))
                    row["ct_path"] = "compressed-tensors decompressor"
                row["ct_import"] = ppl(qcal.load_pretrained(ct_dir))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nSmolLM2-135M, WikiText-2 test, {args.limit} x {args.seqlen} token perplexity, lm_head bf16; "
          f"RSS growth of from_pretrained in a fresh process (peak, and after; the process had imported torch, "
          f"transformers and the model code before)\n")
    head = ["scheme", "qcal frozen", "qcal frozen, reference kernels", "save_pretrained -> from_pretrained",
            "compressed-tensors -> transformers",
            "compressed-tensors -> qcal.load_pretrained", "folder MB", "load RSS growth MB (peak / after)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        ct = (f"{r['compressed_tensors']:.4f} ({r['ct_path']})" if r["compressed_tensors"] is not None
              else f"not exportable ({r['ct_note']})")
        ci = f"{r['ct_import']:.4f}" if r.get("ct_import") is not None else "-"
        print(f"| {r['scheme']} | {r['qcal']:.4f} | {r['qcal_reference']:.4f} | {r['save_pretrained']:.4f} | {ct} | "
              f"{ci} | {r['hf_folder_mb']} | "
              f"{r['hf_load_peak_rss_growth_mb']} / {r['hf_load_rss_growth_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
