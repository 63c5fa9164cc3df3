"""Bytes held by a frozen qcal Linear versus its bf16 weight: canonical state and kernel-derived buffers.

    python benchmarks/bench_memory.py

``canonical`` is what a checkpoint holds (integer weight, scales, zero points); ``derived`` is
what the chosen kernel adds at freeze (non-persistent buffers, e.g. tinygemm's packed int4 copy
and its (K/g, N, 2) scales-and-zeros); ``total`` is what the module occupies while running.
Targets: int4 g64 canonical <= 0.30x, int8 canonical <= 0.55x.
"""

from __future__ import annotations

import torch
from torch import nn

from qcal.explain import module_rows
from qcal.schemes import apply_scheme

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
SCHEMES = ["int8wo", "int8dq", "int4wo-64", "int4wo-32", "8da4w-64"]
TARGETS = {"int8wo": 0.55, "int8dq": 0.55, "int4wo-64": 0.30, "8da4w-64": 0.30}


def main() -> None:
    torch.manual_seed(0)
    print("| scheme | shape (out x in) | kernel | bf16 weight | canonical | x bf16 | derived | x bf16 | total x "
          "| target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scheme in SCHEMES:
        for n, k in SHAPES:
            model = apply_scheme(nn.Sequential(nn.Linear(k, n, bias=False)), scheme, quantize_lm_head=True)
            r = module_rows(model)[0]
            bf16 = r["bf16_bytes"]
            canon, derived = r["bytes"], r["derived_bytes"]
            target = TARGETS.get(scheme)
            verdict = "-" if target is None else f"<= {target:.2f} {'ok' if canon / bf16 <= target else 'MISSED'}"
            print(f"| {scheme} | {n}x{k} | {r['kernel']} | {bf16:,} | {canon:,} | {canon / bf16:.3f} | {derived:,} | "
                  f"{derived / bf16:.3f} | {(canon + derived) / bf16:.3f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
