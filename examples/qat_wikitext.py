"""QAT on a real model: fine-tune SmolLM2-135M under int4 weight-only (or 8da4w) and report
WikiText-2 test perplexity before and after, through the eval harness.

Trains on the wikitext-2 validation text (or the C4 train sample), never on the test split.
The loss is distillation from the float model (``--loss kd``, default) or next-token
cross-entropy (``--loss ce``). Weights start from round-to-nearest or GPTQ (``--init gptq``).

    python examples/qat_wikitext.py --scheme int4wo-64 --steps 200 --plot qat_loss.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import qcal
from qcal.algorithms.qat import (
    Int4WeightOnlyQATQuantizer,
    Int8DynActInt4WeightQATQuantizer,
    learnable_scales,
    residual_latent_weights,
)
from qcal.data import calibration_windows, load_wikitext, tokenize
from qcal.eval.models import load_model
from qcal.eval.perplexity import token_perplexity


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec, as for python -m qcal.eval")
    p.add_argument("--scheme", default="int4wo-64", help="int4wo-<g> or 8da4w-<g>")
    p.add_argument("--init", choices=["rtn", "gptq"], default="rtn", help="PTQ weights QAT starts from")
    p.add_argument("--train-data", choices=["wikitext-valid", "c4"], default="wikitext-valid")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (or QCAL_DATA_DIR)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seqlen", type=int, default=256, help="training sequence length")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--lsq", action="store_true", help="also learn the weight scales (LSQ); with --init gptq the "
                   "weights sit exactly on the grid, and small weight steps alone change no integer code")
    p.add_argument("--lsq-lr", type=float, default=None, help="learning rate of the LSQ scales (default: --lr); "
                   "Adam moves every scale by about this much per step, whatever its gradient's size")
    p.add_argument("--gptq-latent", choices=["residual", "grid"], default="residual",
                   help="with --init gptq: where the trainable float weights start inside their GPTQ rounding "
                   "cell: 'grid' = on the grid point (small steps then change no code), 'residual' (default) = "
                   "moved toward the float weight, up to just inside the cell (0.499 step): the same codes")
    p.add_argument("--init-cache", default=None, help="with --init gptq: load the GPTQ weights from this file if "
                   "it exists, else save them there (GPTQ is deterministic for a given --seed)")
    p.add_argument("--loss", choices=["kd", "ce"], default="kd", help="distillation from the float model, or CE")
    p.add_argument("--trainable", choices=["linear", "all"], default="linear",
                   help="train only the quantized linear weights (default) or every parameter")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--bf16-ppl", type=float, default=None,
                   help="bf16 perplexity of the same eval setting from an earlier run (skips measuring it again)")
    p.add_argument("--ptq-ppl", type=float, default=None,
                   help="PTQ perplexity of the same scheme and eval setting from an earlier run, e.g. the eval "
                   "harness (skips measuring it again; with --init gptq only together with an existing --init-cache)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def _quantizer(scheme: str):
    kind, _, g = scheme.rpartition("-")
    if kind == "int4wo":
        return Int4WeightOnlyQATQuantizer(groupsize=int(g), precision=torch.bfloat16)
    if kind == "8da4w":
        return Int8DynActInt4WeightQATQuantizer(groupsize=int(g), precision=torch.bfloat16)
    raise SystemExit(f"--scheme must be int4wo-<g> or 8da4w-<g>, got {scheme!r}")


def _ppl(model, ids, args) -> float:
    return token_perplexity(model, ids, args.eval_seqlen, args.eval_limit, progress=True)


def _frozen_ppl(fake_model, quantizer, ids, args) -> float:
    frozen = quantizer.convert(copy.deepcopy(fake_model))
    return _ppl(frozen, ids, args)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    float_model, tok = load_model(args.model)
    test_ids = tokenize(tok, load_wikitext("test", args.data_dir))
    quantizer = _quantizer(args.scheme)

    bf16_ppl = args.bf16_ppl or _ppl(copy.deepcopy(float_model).to(torch.bfloat16), test_ids, args)
    student = quantizer.prepare(copy.deepcopy(float_model))
    t0 = time.perf_counter()
    cached = args.init == "gptq" and args.init_cache is not None and os.path.exists(args.init_cache)
    if args.ptq_ppl is not None and args.init == "gptq" and not cached:
        raise ValueError("--ptq-ppl with --init gptq needs an existing --init-cache (the weights it was measured on)")
    if cached:
        for _, m in qcal.quantized_modules(student):
            m.fix_weight_qparams()  # create the qparam buffers the cached state fills
        student.load_state_dict(torch.load(args.init_cache, weights_only=True))
        print(f"GPTQ weights loaded from {args.init_cache}")
    elif args.init == "gptq":
        from qcal.algorithms.gptq import GPTQQuantizer

        # GPTQ keeps the prepared modules' weight specs and fixes their qparams: QAT starts from it
        calib = calibration_windows(tok, "wikitext-valid", 128, 512, args.seed, args.data_dir)
        GPTQQuantizer(groupsize=quantizer.groupsize, act_order=True, static_groups=True).quantize(student, calib)
        if args.init_cache:
            torch.save(student.state_dict(), args.init_cache)
    if args.init == "gptq" and args.gptq_latent == "residual":
        residual_latent_weights(student, float_model)
    ptq_s = time.perf_counter() - t0
    ptq_ppl = args.ptq_ppl or _frozen_ppl(student, quantizer, test_ids, args)

    train = calibration_windows(tok, args.train_data, args.steps * args.batch, args.seqlen, args.seed + 1,
                                args.data_dir)
    params = ([m.weight for _, m in qcal.quantized_modules(student)] if args.trainable == "linear"
              else [p for p in student.parameters() if p.requires_grad])
    groups = [{"params": params}]
    if args.lsq:
        scales = learnable_scales(student)
        groups.append({"params": scales, "lr": args.lsq_lr or args.lr})
        params = params + scales
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)
                                              * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    teacher = float_model if args.loss == "kd" else None
    student.train()
    losses = []
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc="QAT"):
        batch = torch.cat(train[step * args.batch:(step + 1) * args.batch])
        logits = student(batch).logits[:, :-1].float()
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(batch).logits[:, :-1].float()
            loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                            reduction="batchmean") / logits.shape[1]
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    student.eval()
    qat_ppl = _frozen_ppl(student, quantizer, test_ids, args)
    gap_ptq = ptq_ppl - bf16_ppl
    result = {
        "scheme": args.scheme, "init": args.init, "steps": args.steps, "batch": args.batch, "seqlen": args.seqlen,
        "lr": args.lr, "lsq": args.lsq, "lsq_lr": args.lsq_lr, "init_cache": cached, "loss": args.loss,
        "gptq_latent": args.gptq_latent if args.init == "gptq" else None,
        "eval_seqlen": args.eval_seqlen,
        "eval_limit": args.eval_limit, "bf16_ppl": bf16_ppl, "ptq_ppl": ptq_ppl, "qat_ppl": qat_ppl,
        "gap_recovered": (ptq_ppl - qat_ppl) / gap_ptq if gap_ptq > 0 else None,
        "ptq_s": ptq_s, "train_s": train_s, "losses": losses,
    }
    print(f"\n{'scheme':<12}{'bf16 ppl':>10}{'PTQ ppl':>10}{'QAT ppl':>10}{'gap recovered':>15}{'train s':>9}")
    rec = "n/a" if result["gap_recovered"] is None else f"{100 * result['gap_recovered']:.1f}%"
    print(f"{args.scheme:<12}{bf16_ppl:>10.3f}{ptq_ppl:>10.3f}{qat_ppl:>10.3f}{rec:>15}{train_s:>9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, lw=0.8, label="step loss")
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
        ax.plot(smooth, lw=2, label=f"moving mean ({k})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{args.loss} loss")
        ax.set_title(f"QAT {args.scheme}: ppl {ptq_ppl:.2f} -> {qat_ppl:.2f} (bf16 {bf16_ppl:.2f})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"loss curve written to {os.path.abspath(args.plot)}")
    return result


if __name__ == "__main__":
    main()
