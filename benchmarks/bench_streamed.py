"""Streamed PTQ from a checkpoint on disk (``qcal.quantize_pretrained``): peak memory, time per block, disk.

    # a Llama checkpoint with TinyLlama-1.1B's shapes and random weights, fp32 safetensors shards (~4.4 GB)
    python benchmarks/bench_streamed.py make --out ckpt/tinyllama-random
    # GPTQ int4 g64 from it, 128 x 512 calibration tokens (random ids: the weights are random too)
    python benchmarks/bench_streamed.py run --src ckpt/tinyllama-random --out ckpt/tinyllama-gptq \\
        --scheme gptq-int4-64-actorder --batch-size 8 --max-memory 0.25
    # where the memory goes: peak RSS per phase on 2 blocks of the same shapes (activations on disk)
    python benchmarks/bench_streamed.py make --out ckpt/tinyllama-2 --layers 2
    python benchmarks/bench_streamed.py profile --src ckpt/tinyllama-2 --out ckpt/tinyllama-2-gptq \
        --scheme gptq-int4-64-actorder --calib-samples 16 --batch-size 4
    # equality with the in-memory quantizer on a model that fits (the bundled SmolLM2-135M, or a folder)
    python benchmarks/bench_streamed.py compare --src smollm2-135m --scheme gptq-int4-64-actorder

``run`` prints peak RSS (the process's ``ru_maxrss``) against the float32 checkpoint's size, seconds per block,
total seconds and the bytes written, then loads the result with ``from_pretrained`` and runs one forward.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {"tinyllama-1.1b": TINYLLAMA, "llama2-7b": LLAMA2_7B}


def _size(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern))


def make(out: Path, shape: str = "tinyllama-1.1b", layers: int | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(SHAPES[shape])
    if layers is not None:  # fewer blocks of the real shapes: per-block time and memory
        config["num_hidden_layers"] = layers
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out, max_shard_size="1GB")
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{_size(out) / 2**30:.2f} GiB")


def _windows(n: int, seqlen: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def run(args) -> None:
    from transformers import AutoConfig

    from qcal.pretrained import quantize_pretrained

    vocab = AutoConfig.from_pretrained(args.src).vocab_size
    calib = _windows(args.calib_samples, args.seqlen, vocab)
    fp32 = _size(args.src)
    times: list[float] = [time.perf_counter()]

    class _Stop(Exception):
        pass

    def on_block(i: int) -> None:
        times.append(time.perf_counter())
        if args.stop_after is not None and len(times) - 1 >= args.stop_after:
            raise _Stop

    try:
        summary = quantize_pretrained(args.src, args.out, args.scheme, calib=calib, batch_size=args.batch_size,
                                      device=args.device,
                                      max_memory=None if args.max_memory is None else int(args.max_memory * 2**30),
                                      on_block=on_block)
    except _Stop:  # the run resumes from here when started again without --stop-after
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        per = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"stopped after {len(per)} blocks: s per block {', '.join(f'{t:.1f}' for t in per)} (the first "
              f"includes loading and the calibration capture); peak RSS {rss / 2**30:.2f} GiB = {rss / fp32:.1%} "
              f"of the {fp32 / 2**30:.2f} GiB checkpoint")
        return
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per = summary["seconds_per_block"]
    rows = [("checkpoint (fp32) GiB", f"{fp32 / 2**30:.2f}"), ("peak RSS GiB", f"{rss / 2**30:.2f}"),
            ("peak RSS / checkpoint", f"{rss / fp32:.1%}"), ("blocks", str(len(per))),
            ("s per block (mean / max)", f"{sum(per) / len(per):.1f} / {max(per):.1f}"),
            ("total s", f"{summary['total_s']:.0f}"), ("written GiB", f"{summary['bytes_written'] / 2**30:.2f}")]
    if torch.device(args.device).type == "cuda":
        rows.append(("peak GPU memory GiB", f"{torch.cuda.max_memory_allocated(args.device) / 2**30:.2f}"))
        rows.append(("GPU", torch.cuda.get_device_name(args.device)))
    for k, v in rows:
        print(f"{k:<26} {v}")
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.out)
    logits = model(torch.randint(0, vocab, (1, 16))).logits
    print(f"from_pretrained + forward: {time.perf_counter() - t0:.1f} s, logits finite: "
          f"{bool(torch.isfinite(logits).all())}")


def profile(args) -> None:
    """Peak RSS per phase of a streamed run: a thread samples ``/proc/self/statm`` every 5 ms and files each sample
    under the innermost phase running (the functions below, wrapped)."""
    import threading

    import qcal.algorithms.gptq as gptq
    import qcal.algorithms.sequential as seq
    import qcal.pretrained as pre
    from qcal.pretrained import quantize_pretrained

    phase, peaks, stop = ["other"], {}, threading.Event()

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample() -> None:
        while not stop.is_set():
            r, p = rss_mib(), phase[0]
            peaks[p] = max(peaks.get(p, 0.0), r)
            time.sleep(0.005)

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def labelled(*a, **k):
            old, phase[0] = phase[0], label
            try:
                return fn(*a, **k)
            finally:
                phase[0] = old
        setattr(owner, name, labelled)

    for owner, name, label in [(pre, "_skeleton", "meta model"), (pre, "_load", "read tensors"),
                               (pre, "_capture", "capture block 0 inputs"),
                               (seq._StageRecorder, "run", "forwards: Gram matrices"),
                               (gptq, "_hessian_inverse_cholesky", "GPTQ: Cholesky"), (gptq, "_gptq", "GPTQ: rest"),
                               (pre, "_atomic_save", "write shard"), (pre, "cast_model", "head: cast")]:
        wrap(owner, name, label)
    from transformers import AutoConfig

    calib = _windows(args.calib_samples, args.seqlen, AutoConfig.from_pretrained(args.src).vocab_size)
    threading.Thread(target=sample, daemon=True).start()
    summary = quantize_pretrained(args.src, args.out, args.scheme, calib=calib, batch_size=args.batch_size,
                                  max_memory=0, progress=False)
    stop.set()
    fp32 = _size(args.src)
    print(f"peak RSS {summary['peak_rss_mib']:.0f} MiB; by phase (MiB, the innermost phase running):")
    for label, mib in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<26} {mib:7.0f}")
    per = ", ".join(f"{t:.1f}" for t in summary["seconds_per_block"])
    print(f"checkpoint {fp32 / 2**20:.0f} MiB; s per block {per}")


def compare(args) -> None:
    """Streamed vs in-memory (``apply_scheme``) on the same calibration windows: tensors compared one by one."""
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcal.data import calibration_windows
    from qcal.pretrained import quantize_pretrained
    from qcal.schemes import apply_scheme

    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if str(src) == "smollm2-135m":  # the bundled model, written as a safetensors folder first
            from qcal.eval.models import load_model

            model, tok = load_model("smollm2-135m")
            src = Path(tmp) / "src"
            model.save_pretrained(src)
            tok.save_pretrained(src)
            del model
        tok = AutoTokenizer.from_pretrained(src)
        calib = calibration_windows(tok, "c4", args.calib_samples, args.seqlen, 0, args.data_dir)
        t0 = time.perf_counter()
        quantize_pretrained(src, Path(tmp) / "streamed", args.scheme, calib=calib)
        t_stream = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        t0 = time.perf_counter()
        apply_scheme(model, args.scheme, calib=lambda: calib)
        t_mem = time.perf_counter() - t0
        model.save_pretrained(Path(tmp) / "memory")
        a, b = {}, {}
        for f in (Path(tmp) / "streamed").glob("*.safetensors"):
            a.update(load_file(f))
        for f in (Path(tmp) / "memory").glob("*.safetensors"):
            b.update(load_file(f))
    same = sum(k in b and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    print(f"tensors: {len(a)} streamed, {len(b)} in memory, {same} bit-identical; "
          f"streamed {t_stream:.0f} s, in memory {t_mem:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random-weight Llama checkpoint with TinyLlama-1.1B's (or another "
                       "model's) shapes")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    m.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the model's)")
    for name in ("run", "compare", "profile"):
        r = sub.add_parser(name)
        r.add_argument("--src", type=Path, required=True)
        r.add_argument("--scheme", default="gptq-int4-64-actorder")
        r.add_argument("--calib-samples", type=int, default=128)
        r.add_argument("--seqlen", type=int, default=512)
        r.add_argument("--data-dir", default=os.environ.get("QCAL_DATA_DIR"))
        if name in ("run", "profile"):
            r.add_argument("--out", type=Path, required=True)
            r.add_argument("--batch-size", type=int, default=8)
        if name == "run":
            r.add_argument("--device", default="cpu", help="where the blocks are quantized (cpu, cuda)")
            r.add_argument("--max-memory", type=float, default=None, help="GiB of activations kept in RAM")
            r.add_argument("--stop-after", type=int, default=None,
                           help="stop after this many blocks (peak memory and time per block so far)")
    args = p.parse_args()
    if args.cmd == "make":
        make(args.out, args.shape, args.layers)
    else:
        {"run": run, "compare": compare, "profile": profile}[args.cmd](args)


if __name__ == "__main__":
    main()
