"""STREAM-like memory bandwidth of this machine through torch: copy, scale, add, triad and a read-only reduction.

    python benchmarks/bench_bandwidth.py --threads 1,2 --mib 512 --repeats 5 --json bandwidth.json

Float32 arrays of ``--mib`` MiB each (far larger than the caches), one row per thread count
(``torch.set_num_threads``), best of ``--repeats`` passes per kernel, in GB/s (10^9 bytes/s). Bytes are counted as
STREAM counts them: copy ``c = a`` and scale ``b = s*c`` move 2 arrays, add ``c = a + b`` and triad ``a = b + s*c``
3, read (``torch.dot(a, a)``: one array read) 1; write-allocate traffic is not counted.
``python -m qcal.eval --stream-bandwidth`` prints the read figure next to each scheme's decode weight traffic (the
function is ``qcal.eval.speed.stream_bandwidth``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from qcal.eval.cli import _positive
from qcal.eval.speed import STREAM_BYTES, stream_bandwidth


def _threads(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}") from None
    if not items or min(items) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return items


def table(rows: dict[int, dict[str, float]]) -> str:
    """A markdown table, one row per thread count, GB/s per kernel."""
    kernels = list(STREAM_BYTES)
    lines = ["| threads | " + " | ".join(f"{k} GB/s" for k in kernels) + " |",
             "| ---: | " + " | ".join("---:" for _ in kernels) + " |"]
    lines += [f"| {t} | " + " | ".join(f"{r[k]:.1f}" for k in kernels) + " |" for t, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=_threads, default=[1, 2], help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--mib", type=_positive, default=512, help="MiB per array; three arrays (default: %(default)s)")
    p.add_argument("--repeats", type=_positive, default=5, help="passes per kernel, best kept (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the settings and GB/s as JSON")
    args = p.parse_args(argv)
    rows = {t: stream_bandwidth(t, mib=args.mib, repeats=args.repeats) for t in args.threads}
    print(f"STREAM-like bandwidth, float32 arrays of {args.mib} MiB, best of {args.repeats}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"mib": args.mib, "repeats": args.repeats, "bytes_per_element": STREAM_BYTES,
                       "gb_s": {str(t): r for t, r in rows.items()}}, f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
