"""qcal against llama.cpp on the same cores, same model, same weight types: one table from back-to-back runs.

    python benchmarks/bench_llamacpp.py --llamacpp benchmarks/llamacpp/build/bin          # build: llamacpp/build.sh
    python benchmarks/bench_llamacpp.py --llamacpp DIR --threads 2 --new-tokens 128 --short 16
    python benchmarks/bench_llamacpp.py --llamacpp DIR --rounds 3      # medians of 3 back-to-back rounds

Runs the eval harness (``python -m qcal.eval --metrics speed --quantize-lm-head --llamacpp DIR``) twice: once with a
``--long``-token prompt (pp at that length on an empty context, then decode after it) and once with a ``--short``
prompt (decode on a nearly empty context). In each run llama-bench times the same GGUF model requantized to the
llama.cpp type of each scheme (BF16, Q8_0, Q4_0) with ``-d 0,<prompt>``, so both decode at the same context depth.
Prints a markdown table: prefill and decode tokens/s of both, their ratios, and qcal's decode weight traffic against
the machine's STREAM-like read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SCHEMES = "bf16,int8wo,int4wo-64,8da4w-64"


def run_eval(args: argparse.Namespace, prompt: int, path: str) -> list[dict]:
    """One harness run with a ``prompt``-token prompt; its JSON records."""
    cmd = [sys.executable, "-m", "qcal.eval", "--metrics", "speed", "--quant", args.schemes, "--threads",
           str(args.threads), "--quantize-lm-head", "--llamacpp", args.llamacpp, "--prefill-len", str(prompt),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--model", args.model,
           "--stream-bandwidth", "--no-progress", "--json", path]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=sys.stderr)  # its table too
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def median_records(runs: list[list[dict]]) -> list[dict]:
    """One record per scheme: each numeric field's median over the runs (other fields from the first run)."""
    out = []
    for i, first in enumerate(runs[0]):
        rec = dict(first)
        for key, value in first.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [run[i][key] for run in runs if isinstance(run[i].get(key), (int, float))]
                rec[key] = statistics.median(values)
        out.append(rec)
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return format(v, fmt) if v is not None else "-"


def table(long: list[dict], short: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of both runs, one row per scheme."""
    n, lp, sp = args.new_tokens, args.long, args.short
    head = (f"| qcal scheme | llama.cpp | pp{lp} qcal | pp{lp} llama.cpp | ratio | tg{n} @{sp} qcal | "
            f"tg{n} @{sp} llama.cpp | ratio | tg{n} @{lp} qcal | tg{n} @{lp} llama.cpp | ratio | "
            f"qcal decode GB/s @{sp} (of read) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_scheme = {r["scheme"]: r for r in short}
    for r in long:
        s = by_scheme.get(r["scheme"], {})
        gbs = s.get("decode_gb_s")
        frac = s.get("stream_fraction")
        traffic = f"{gbs:.1f} ({frac:.0%})" if gbs is not None and frac is not None else _num(gbs)
        cells = [r["scheme"], r.get("llamacpp_type") or "-"]
        for rec, key in ((r, "prefill_tok_s"), (s, "decode_tok_s"), (r, "decode_tok_s")):
            ours, theirs = rec.get(key), rec.get(f"llamacpp_{key}")
            cells += [_num(ours), _num(theirs), _ratio(ours, theirs)]
        lines.append("| " + " | ".join(cells + [traffic]) + " |")
    build = next((r.get("llamacpp_build") for r in long + short if r.get("llamacpp_build")), None)
    read = next((r.get("stream_read_gb_s") for r in short if r.get("stream_read_gb_s")), None)
    lines.append("")
    lines.append(f"llama.cpp {build or '(no build measured)'}; {args.threads} threads; machine read bandwidth "
                 f"{_num(read)} GB/s (STREAM-like); @N: decode after an N-token prompt (llama-bench -d N)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamacpp", required=True, metavar="DIR", help="a llama.cpp build's bin folder")
    ap.add_argument("--schemes", default=SCHEMES, help=f"qcal schemes (default: {SCHEMES})")
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF model the harness loads (default: smollm2-135m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens decoded (default: 128)")
    ap.add_argument("--long", type=int, default=512, help="the long prompt and pp length (default: 512)")
    ap.add_argument("--short", type=int, default=16, help="the short prompt (default: 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run both harness calls this many times in turn and report each figure's median (on a "
                         "machine whose speed drifts, the ratios of single runs vary by 10-20%%)")
    args = ap.parse_args()
    longs, shorts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            longs.append(run_eval(args, args.long, os.path.join(tmp, f"long{r}.json")))
            shorts.append(run_eval(args, args.short, os.path.join(tmp, f"short{r}.json")))
    print(table(median_records(longs), median_records(shorts), args))
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds (each figure separately; a ratio is of the medians)")


if __name__ == "__main__":
    main()
