"""Where a decoded token's time goes in qcal's lean runtime, per scheme: the linear layers by shape, lm_head, the rest.

    python benchmarks/bench_decode_profile.py                           # bundled SmolLM2-135M, 2 threads
    python benchmarks/bench_decode_profile.py --schemes bf16,int8wo --threads 1 --prompt 512

A decode step of ``LeanGenerator``'s Python layer loop (``native_step=False``: its linear calls are the ones timed
alone; ``bench_decode_step.py`` gives what the native step saves) is timed after a ``--prompt``-token prompt (median
of ``--tokens`` steps); then the same step's linear layers are called alone, in decode order with the same one-row
inputs and their weights streamed from memory as in the step, grouped by role (q/o, k/v, gate/up, down, lm_head).
"rest" is the step minus the linear layers: norms, rotary embeddings, attention, the Python loop and operator
dispatch. GB/s: weight bytes read by a group / its time. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch

ROLES = {"q_proj": "q/o", "o_proj": "q/o", "k_proj": "k/v", "v_proj": "k/v", "gate_proj": "gate/up",
         "up_proj": "gate/up", "down_proj": "down"}


def _weight_bytes(mod: torch.nn.Module) -> int:
    from qcal.eval.speed import weight_bytes_per_token

    return weight_bytes_per_token(torch.nn.Sequential(mod))


@torch.no_grad()
def profile(model: torch.nn.Module, prompt: int, tokens: int, rounds: int) -> dict[str, float]:
    """Milliseconds per token: ``step`` and one entry per role, plus ``<role> bytes``."""
    from qcal.runtime.family import ATTENTION_PROJ, MLP_PROJ
    from qcal.runtime.lean import LeanGenerator

    gen = LeanGenerator(model, prompt + tokens + 1, native_step=False)  # the loop whose calls are timed below
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    token = gen.prefill(ids).argmax(-1).view(1, 1)
    steps = []
    for _ in range(tokens):
        start = time.perf_counter()
        token = gen.decode(token).argmax(-1).view(1, 1)
        steps.append(time.perf_counter() - start)
    calls = []  # (role, fn, input) in decode order
    for layer in gen.layers:
        names = ATTENTION_PROJ + MLP_PROJ
        for name, fn, mod in zip(names, layer.fns1, layer.modules, strict=True):
            calls.append((ROLES[name], fn, torch.randn(1, mod.in_features, dtype=torch.bfloat16), _weight_bytes(mod)))
    calls.append(("lm_head", gen.head, torch.randn(1, gen.lm_head.in_features, dtype=torch.bfloat16),
                  _weight_bytes(gen.lm_head)))
    roles = list(dict.fromkeys(role for role, *_ in calls))
    best = {role: float("inf") for role in roles}
    for _ in range(rounds):
        spent = dict.fromkeys(roles, 0.0)
        for role, fn, x, _ in calls:
            start = time.perf_counter()
            fn(x)
            spent[role] += time.perf_counter() - start
        best = {role: min(best[role], spent[role]) for role in roles}
    result = {"step": statistics.median(steps) * 1e3}
    for role in roles:
        result[role] = best[role] * 1e3
        result[f"{role} bytes"] = sum(b for r, *_, b in calls if r == role)
    return result


def decode_parser(doc: str) -> argparse.ArgumentParser:
    """The decode benchmarks' shared arguments: --schemes, --model, --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="bf16,int8wo,int4wo-64,8da4w-64")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def scheme_models(args: argparse.Namespace) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(scheme, model)`` for each of ``--schemes``: ``--model`` in bf16, quantized (lm_head too) unless bf16; sets
    ``--threads``."""
    torch.set_num_threads(args.threads)
    from qcal.eval.models import load_model
    from qcal.schemes import apply_scheme

    for scheme in args.schemes.split(","):
        model, _ = load_model(args.model)
        model = model.to(torch.bfloat16).eval()
        if scheme != "bf16":
            apply_scheme(model, scheme, quantize_lm_head=True)
        yield scheme, model


def main() -> None:
    ap = decode_parser(__doc__)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before the timed steps (default: 16)")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed (default: 64)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the linear layers alone, fastest kept")
    args = ap.parse_args()
    rows = [(scheme, profile(model, args.prompt, args.tokens, args.rounds)) for scheme, model in scheme_models(args)]
    roles = ["q/o", "k/v", "gate/up", "down", "lm_head"]
    print(f"decode step after a {args.prompt}-token prompt, {args.threads} threads; ms per token (weight GB/s)\n")
    print("| scheme | step ms | tok/s | " + " | ".join(roles) + " | linear total | rest (norms, rope, attention, "
          "Python) |")
    print("|---" * (len(roles) + 5) + "|")
    for scheme, r in rows:
        cells = [f"{r[role]:.2f} ({r[f'{role} bytes'] / r[role] / 1e6:.1f})" for role in roles]
        linear = sum(r[role] for role in roles)
        print(f"| {scheme} | {r['step']:.2f} | {1e3 / r['step']:.1f} | " + " | ".join(cells) +
              f" | {linear:.2f} | {r['step'] - linear:.2f} ({(r['step'] - linear) / r['step']:.0%}) |")


if __name__ == "__main__":
    main()
