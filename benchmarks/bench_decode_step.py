"""The lean runtime's decode step three ways, interleaved in one process: the Python layer loop, the native step
(``torch.classes.qcal.DecodeStep``) with an OpenMP region per parallel kernel, and the native step keeping one team
of threads for the whole step.

    python benchmarks/bench_decode_step.py                       # bundled SmolLM2-135M, 2 threads
    python benchmarks/bench_decode_step.py --schemes 8da4w-64 --rounds 40 --prompt 512

Each round times ``--tokens`` decode steps of each variant in turn (same generator, same position, so the same
work); the table gives per variant the median over rounds of the per-round median step and the fastest round, in ms
per token. Interleaving keeps a noisy machine's drift out of the comparison. Prints a markdown table.
"""

from __future__ import annotations

import statistics
import time

import torch

VARIANTS = ("python loop", "native step, OpenMP regions", "native step, one team")


@torch.no_grad()
def measure(model: torch.nn.Module, prompt: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Per variant, the median step (ms) of each round."""
    from qcal.runtime.lean import LeanGenerator

    gen = LeanGenerator(model, prompt + 2)
    gen.prefill(torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0)))
    step = gen._step
    token = torch.tensor([[5]])
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            if step is None and variant != VARIANTS[0]:
                continue
            gen._step = None if variant == VARIANTS[0] else step
            if step is not None:
                step.set_team(variant == VARIANTS[2])
            times = []
            for _ in range(tokens):
                gen.length = prompt
                start = time.perf_counter()
                gen.decode(token)
                times.append(time.perf_counter() - start)
            out[variant].append(statistics.median(times) * 1e3)
    gen._step = step
    return out


def main() -> None:
    from bench_decode_profile import decode_parser, scheme_models

    ap = decode_parser(__doc__)
    ap.add_argument("--prompt", type=int, default=16, help="cache depth of the timed steps (default: 16)")
    ap.add_argument("--tokens", type=int, default=10, help="steps per variant and round (default: 10)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default: 20)")
    args = ap.parse_args()
    print(f"decode step at depth {args.prompt}, {args.threads} threads, {args.rounds} interleaved rounds of "
          f"{args.tokens} steps; ms per token, median round (fastest round)\n")
    print("| scheme | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for scheme, model in scheme_models(args):
        res = measure(model, args.prompt, args.tokens, args.rounds)
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f})" if v else "-" for v in res.values()]
        print(f"| {scheme} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
