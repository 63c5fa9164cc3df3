"""Cost of a fake-quant (QAT) training step against a float training step, same model, same dtype.

Each round times one float step and one fake-quant step back to back (forward, backward, AdamW
step); the table reports medians and the ratio.

    python benchmarks/bench_qat.py --schemes int4wo-64,8da4w-64 --dtype bfloat16 --batch 2 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qcal.algorithms.qat import Int4WeightOnlyQATQuantizer, Int8DynActInt4WeightQATQuantizer


def _prepare(model, scheme):
    kind, _, g = scheme.rpartition("-")
    q = {"int4wo": Int4WeightOnlyQATQuantizer, "8da4w": Int8DynActInt4WeightQATQuantizer}[kind](groupsize=int(g))
    return q.prepare(model)


def _stepper(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default="int4wo-64,8da4w-64")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qcal.eval.models import load_model

    base, _ = load_model(args.model)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seqlen), generator=gen)
    float_model = copy.deepcopy(base).to(dtype).train()
    float_step = _stepper(float_model, batch)
    rows = []
    for scheme in args.schemes.split(","):
        fq_model = _prepare(copy.deepcopy(base), scheme).to(dtype).train()
        fq_step = _stepper(fq_model, batch)
        float_step(), fq_step()  # warm-up
        tf, tq = [], []
        for _ in range(args.rounds):
            tf.append(float_step())
            tq.append(fq_step())
        rows.append((scheme, statistics.median(tf), statistics.median(tq)))
        del fq_model, fq_step
    print(f"\nQAT training step, {args.model}, {args.dtype}, batch {args.batch} x {args.seqlen} tokens, "
          f"{args.threads} threads, medians of {args.rounds}")
    print(f"{'scheme':<12}{'float step s':>14}{'fake-quant step s':>19}{'ratio':>8}")
    for scheme, tf, tq in rows:
        print(f"{scheme:<12}{tf:>14.3f}{tq:>19.3f}{tq / tf:>8.2f}x")


if __name__ == "__main__":
    main()
