"""Per-op speed of the frozen qcal linear kernels against bf16 ``F.linear``, measured alternately.

    python benchmarks/bench_kernels.py                 # per-op table, SmolLM2-135M shapes, M in {1, 32, 512}
    python benchmarks/bench_kernels.py --crossover     # every implementation of a kernel's table per M (sets max_m)
    python benchmarks/bench_kernels.py --cold          # M=1 through 30 copies of the layers: weights from DRAM
    python benchmarks/bench_kernels.py --overhead      # per-call cost of a native operator vs PyTorch ops
    python benchmarks/bench_kernels.py --hadamard      # the online Hadamard transform against down_proj's matmul
    python benchmarks/bench_kernels.py --device cuda   # per-op and crossover tables on a GPU

Every round times each candidate back-to-back (bf16 first) on the same input, a few calls each;
a candidate's time is its fastest round and a ratio is bf16 time / candidate time. Taking the
fastest of many short interleaved rounds keeps the ratios fair while other processes load the
cores (their stalls only lengthen some rounds). Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcal.autoquant import device_sync, fastest_round
from qcal.kernels import native
from qcal.schemes import apply_scheme

SHAPES = [(576, 576, "q/o_proj"), (192, 576, "k/v_proj"), (1536, 576, "gate/up"), (576, 1536, "down"),
          (49152, 576, "lm_head")]
SHAPES_7B = [(4096, 4096, "q/k/v/o_proj"), (11008, 4096, "gate/up"), (4096, 11008, "down"),
             (32000, 4096, "lm_head")]  # Llama-2-7B
SCHEMES = ["int8wo", "int4wo-64", "int8dq", "8da4w-64"]


DEVICE = torch.device("cpu")


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 30, budget_s: float = 0.004,
              base: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Time ``fns`` round-robin. Returns (fastest-round seconds per call, ratio base time / fn time)."""
    base = base or next(iter(fns))
    best = fastest_round(fns, rounds, budget_s, max_inner=100, sync=device_sync(DEVICE))
    return best, {k: best[base] / v for k, v in best.items()}


def frozen_linear(n: int, k: int, scheme: str) -> nn.Module:
    """A frozen bf16 QLinear (k -> n) quantized with ``scheme`` (random weights).

    ``<scheme>:torch`` freezes with qcal's native kernel disabled (PyTorch's ops, e.g. tinygemm).
    """
    m = nn.Sequential(nn.Linear(k, n, bias=False, device=DEVICE))
    name, _, variant = scheme.partition(":")
    with native.disabled(variant == "torch"):
        return apply_scheme(m, name, quantize_lm_head=True)[0]


@torch.no_grad()
def per_op_table(ms: list[int], schemes: list[str], shapes=SHAPES, rounds: int = 30) -> str:
    head = "| shape (out x in) | M | bf16 us | " + " | ".join(f"{s} x" for s in schemes) + " | paths |"
    lines = [head, "|" + "---|" * (4 + len(schemes))]
    for n, k, label in shapes:
        mods = {s: frozen_linear(n, k, s) for s in schemes}
        w = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) / k ** 0.5
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
            fns: dict[str, Callable] = {"bf16": lambda x=x, w=w: F.linear(x, w)}
            fns.update({s: (lambda q=q, x=x: q(x)) for s, q in mods.items()})
            big = n * m > 10_000_000
            med, ratio = alternate(fns, rounds=4 if big else rounds)
            paths = ", ".join(f"{s}: {q.kernel.choose(torch.bfloat16, m).name}" for s, q in mods.items()
                              if hasattr(q.kernel, "choose"))
            lines.append(f"| {n}x{k} {label} | {m} | {med['bf16'] * 1e6:.0f} | "
                         + " | ".join(f"{ratio[s]:.2f}" for s in schemes) + f" | {paths} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


@torch.no_grad()
def hadamard_table(ms: list[int], shapes=SHAPES, rounds: int = 30) -> str:
    """The online Hadamard transform of ``down_proj``'s input (``had-``) against that layer's matmuls."""
    from qcal.nn.hadamard import OnlineHadamard

    head = "| down_proj (out x in) | M | bf16 us | Hadamard us | Hadamard / bf16 | int8dq us | Hadamard / int8dq |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for n, k, label in shapes:
        if label.strip() != "down":
            continue
        had, q = OnlineHadamard(k), frozen_linear(n, k, "int8dq")
        w = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) / k ** 0.5
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
            best, _ = alternate({"bf16": lambda x=x, w=w: F.linear(x, w), "had": lambda x=x, had=had: had(x),
                                 "int8dq": lambda x=x, q=q: q(x)}, rounds=rounds)
            us = {key: v * 1e6 for key, v in best.items()}
            lines.append(f"| {n}x{k} ({had.m} x {had.p}) | {m} | {us['bf16']:.0f} | {us['had']:.1f} | "
                         f"{us['had'] / us['bf16']:.2f} | {us['int8dq']:.0f} | {us['had'] / us['int8dq']:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


@torch.no_grad()
def crossover_table(ms: list[int], schemes: list[str], shapes=SHAPES[:4]) -> str:
    """Every implementation a module's table reaches for bf16 eager inputs, timed at each M (ratio vs bf16), next to
    the one the table chooses: where they differ, a ``max_m`` in qcal/kernels/cpu.py is off."""
    lines = ["| scheme | shape | M | bf16 us | implementations (x bf16) | fastest | chosen |",
             "|---|---|---|---|---|---|---|"]
    for s in schemes:
        for n, k, _ in shapes:
            q = frozen_linear(n, k, s)
            impls = [i for i in getattr(q.kernel, "impls", []) if i.takes(torch.bfloat16, False)]
            if len(impls) < 2:
                continue
            w = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) / k ** 0.5
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
                fns = {"bf16": lambda x=x, w=w: F.linear(x, w)}
                fns.update({i.name: (lambda x=x, q=q, i=i: i.run(q, x)) for i in impls})
                med, ratio = alternate(fns, rounds=20)
                best = max((i.name for i in impls), key=lambda name: ratio[name])
                cells = ", ".join(f"{i.name}: {ratio[i.name]:.2f}" for i in impls)
                lines.append(f"| {s} | {n}x{k} | {m} | {med['bf16'] * 1e6:.0f} | {cells} | {best} | "
                             f"{q.kernel.choose(torch.bfloat16, m).name} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


@torch.no_grad()
def overhead_table(calls: int = 20000) -> str:
    """Per-call time of tiny calls, where the work is negligible: what a decode step pays per linear layer beyond
    its arithmetic (a SmolLM2-135M decode step makes 211 linear calls)."""
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    q = frozen_linear(16, 64, "int4wo-64")
    fns = {"F.linear bf16 (16x64)": lambda: F.linear(x, w), "torch.add (dispatcher, one small op)": lambda: x + x,
           f"frozen int4 module call ({q.kernel.name})": lambda: q(x)}
    if native.available():
        b, d = q._buffers, q.__dict__
        op = torch.ops.qcal.w4a16_mm_small
        fns["torch.ops.qcal.w4a16_mm_small (16x64)"] = lambda: op(x, b["_k_n4w"], b["_k_n4sz"], d["_k_has_zero"], 64)
    lines = ["| call | us per call |", "|---|---|"]
    for name, fn in fns.items():
        for _ in range(calls // 10):
            fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            best = min(best, (time.perf_counter() - start) / (calls // 5))
        lines.append(f"| {name} | {best * 1e6:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


@torch.no_grad()
def cold_table(schemes: list[str], layers: int = 30, passes: int = 8) -> str:
    """M=1 through ``layers`` copies of a Llama block's seven linears, as a decode step streams them.

    In a model each weight is read once per token, from DRAM rather than cache; a scheme's time is
    its fastest pass over all layers. MB counts what a call reads: the derived kernel layout or the
    canonical buffers, whichever is larger (bf16: the weight).
    """
    from qcal.kernels import derived_bytes

    lines = ["| scheme | ms per pass | us per call | MB read | GB/s |", "|---|---|---|---|---|"]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (576, 1536)}
    for scheme in ["bf16"] + [s for s in schemes if s != "bf16"]:
        if scheme == "bf16":
            mods = [nn.Linear(k, n, bias=False).to(torch.bfloat16) for _ in range(layers) for n, k in LAYER]
            nbytes = sum(m.weight.numel() * 2 for m in mods)
        else:
            mods = [frozen_linear(n, k, scheme) for _ in range(layers) for n, k in LAYER]
            # a kernel reads either its derived layout (int4) or the canonical buffers in place (int8)
            nbytes = sum(max(derived_bytes(m), sum(b.numel() * b.element_size() for n, b in m.named_buffers()
                                                   if not n.startswith("_k_"))) for m in mods)
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            for m in mods:
                m(xs[m.in_features])
            best = min(best, time.perf_counter() - start)
        lines.append(f"| {scheme} | {best * 1e3:.2f} | {best / len(mods) * 1e6:.1f} | {nbytes / 1e6:.0f} | "
                     f"{nbytes / best / 1e9:.1f} |")
        print(lines[-1], flush=True)
        del mods
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crossover", action="store_true", help="every implementation of a kernel per M (sets max_m)")
    ap.add_argument("--overhead", action="store_true", help="per-call cost of tiny calls (decode overhead)")
    ap.add_argument("--cold", action="store_true", help="M=1 through 30 copies of the layer shapes (DRAM-bound)")
    ap.add_argument("--hadamard", action="store_true", help="the online Hadamard transform vs down_proj's matmuls")
    ap.add_argument("--m", default=None, help="comma-separated M values")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="comma-separated; <scheme>:torch = with qcal's native kernel disabled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (--cold is CPU only)")
    ap.add_argument("--shapes", choices=["smollm2-135m", "llama2-7b"], default="smollm2-135m",
                    help="the linear shapes of the per-op table")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.cold and DEVICE.type != "cpu":
        ap.error("--cold measures CPU DRAM streaming; use it with --device cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schemes = args.schemes.split(",")
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, ratios = bf16 time / qcal time "
          f"(fastest of interleaved rounds); native int4 kernel: {native.native_status()}")
    if args.overhead:
        overhead_table()
    elif args.hadamard:
        hadamard_table([int(v) for v in (args.m or "1,32,512").split(",")],
                       SHAPES_7B if args.shapes == "llama2-7b" else SHAPES)
    elif args.cold:
        cold_table(schemes)
    elif args.crossover:
        ms = [int(v) for v in (args.m or "1,2,4,8,12,16,24,32,64").split(",")]
        crossover_table(ms, schemes)
    else:
        ms = [int(v) for v in (args.m or "1,32,512").split(",")]
        print(f"shapes: {args.shapes}")
        per_op_table(ms, schemes, SHAPES_7B if args.shapes == "llama2-7b" else SHAPES)


if __name__ == "__main__":
    main()
