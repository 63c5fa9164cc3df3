"""llama.cpp's own speed next to qcal's: the same model requantized by ``llama-quantize``, timed by ``llama-bench``.

Optional: nothing here runs unless a llama.cpp build's tool folder is given (``--llamacpp DIR`` or
``$QCAL_LLAMACPP``). Every failure (missing tools, a model that is not a GGUF, a tool that exits with an error)
becomes a one-line note and the evaluation goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "QCAL_LLAMACPP"
TOOLS = ("llama-bench", "llama-quantize")
SCHEME_TYPES = {"bf16": "BF16", "int8wo": "Q8_0", "int8dq": "Q8_0", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0",
                "gguf-q4_1": "Q4_1"}
PREFIX_TYPES = {"int4wo-": "Q4_0", "8da4w-": "Q4_0"}
SKIPPED = "llama.cpp rows skipped"


def llamacpp_type(scheme: str) -> str | None:
    """The llama.cpp file type with the same weight format as qcal's ``scheme`` (``"Q4_0"``), None if there is none.

    bf16 -> BF16, int8wo -> Q8_0, int4wo-<g> and 8da4w-<g> -> Q4_0 (llama.cpp's Q4_0 has groups of 32 and no zero
    point; the nearest of its types, not an exact match for other group sizes); int8dq -> Q8_0 (8-bit weights and,
    as llama.cpp's Q8_0 dot products, 8-bit activations); gguf-q8_0 / gguf-q4_0 / gguf-q4_1 -> their own type (the
    same weights, bit for bit).
    """
    if scheme in SCHEME_TYPES:
        return SCHEME_TYPES[scheme]
    return next((t for prefix, t in PREFIX_TYPES.items() if scheme.startswith(prefix)), None)


@dataclass
class LlamaCppRow:
    """llama-bench's throughput for one llama.cpp file type, and the qcal schemes it stands next to."""

    type: str
    schemes: list[str]
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    file_bytes: int | None = None
    build: str | None = None  # llama-bench's build_commit and build_number, e.g. "b11434 (11434)"
    note: str | None = None

    @property
    def label(self) -> str:
        return f"llama.cpp {self.type}"


@dataclass
class LlamaCppReport:
    """The rows measured, one-line notes on what was skipped and why, and how llama-bench was run."""

    rows: list[LlamaCppRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: str = ""
    source: str | None = None  # the GGUF the files were requantized from

    def row_for(self, scheme: str) -> LlamaCppRow | None:
        """The measured row matching ``scheme``, if any."""
        kind = llamacpp_type(scheme)
        return next((r for r in self.rows if r.type == kind and r.decode_tok_s is not None), None)

    def footer(self) -> str:
        """Lines for under the table: build, settings, source, notes."""
        lines = []
        builds = sorted({r.build for r in self.rows if r.build})
        if builds:
            lines.append(f"llama.cpp rows: llama-bench {', '.join(builds)}, {self.settings}, avg of its repetitions; "
                         f"GGUFs requantized from {self.source} by llama-quantize --allow-requantize")
        lines += [f"llama.cpp {r.type}: {r.note}" for r in self.rows if r.note]
        return "\n".join(lines + self.notes)


def resolve_folder(folder: str | os.PathLike | None) -> str | None:
    """``folder``, else ``$QCAL_LLAMACPP``, else None (no llama.cpp rows)."""
    if folder is not None and str(folder) != "":
        return str(folder)
    return os.environ.get(ENV_VAR) or None


def missing_tools(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be used (no such folder, tools missing or not executable), None when it can."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return f"{folder} is not a folder"
    missing = [t for t in TOOLS if not (path / t).is_file() or not os.access(path / t, os.X_OK)]
    if missing:
        return f"{folder} has no executable {' or '.join(missing)}"
    return None


def gguf_source(model: str) -> tuple[Path | None, str | None]:
    """``(GGUF path, None)`` for a ``--model`` llama-quantize can read, else ``(None, why not)``."""
    from .models import ModelUnavailableError, resolve_model

    try:
        source = resolve_model(model)
    except ModelUnavailableError as error:
        return None, str(error)
    if source.gguf_file is None:
        return None, f"--model {model} is not a GGUF file (llama-quantize needs one)"
    return Path(source.location) / source.gguf_file, None


def parse_bench(output: str, prefill_len: int, new_tokens: int) -> dict:
    """Prefill and decode tokens/s and the build from ``llama-bench -o json``: the ``avg_ts`` of the pp test of
    ``prefill_len`` tokens on an empty context and of the tg test of ``new_tokens`` at a context depth of
    ``prefill_len`` (after a prompt of that length, as qcal's decode is timed); builds without ``n_depth`` in their
    output ran every test on an empty context."""
    try:
        tests = json.loads(output)
    except json.JSONDecodeError as error:
        raise ValueError(f"llama-bench printed no JSON ({error})") from None
    if not isinstance(tests, list) or not tests:
        raise ValueError("llama-bench printed no test results")
    result: dict = {"prefill_tok_s": None, "decode_tok_s": None}
    for test in tests:
        depth = test.get("n_depth", 0)
        if test.get("n_gen", 0) == 0 and test.get("n_prompt") == prefill_len and depth == 0:
            result["prefill_tok_s"] = float(test["avg_ts"])
        elif test.get("n_prompt", 0) == 0 and test.get("n_gen") == new_tokens and depth == prefill_len:
            result["decode_tok_s"] = float(test["avg_ts"])
    first = tests[0]
    commit, number = first.get("build_commit"), first.get("build_number")
    result["build"] = f"{commit} ({number})" if commit is not None else None
    return result


def _run(cmd: Sequence[str | os.PathLike]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)


def _failure(proc: subprocess.CompletedProcess) -> str:
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    last = next((line for line in reversed((proc.stderr or proc.stdout or "").splitlines()) if line.strip()), "")
    return f"{why}: {last.strip()[:200]}" if last else why


def _bench(bench: Path, gguf: Path, args: list[str], row: LlamaCppRow, prefill_len: int, new_tokens: int) -> None:
    """Run llama-bench on ``gguf`` into ``row``; a crash with weight repacking is retried with ``--repack 0``."""
    cmd = [bench, "-m", gguf, *args, "-o", "json"]
    proc = _run(cmd)
    if proc.returncode != 0:
        first = _failure(proc)
        proc = _run([*cmd, "--repack", "0"])
        if proc.returncode != 0:
            row.note = f"llama-bench failed ({first})"
            return
        row.note = f"llama-bench failed with weight repacking ({first}); measured with --repack 0"
    try:
        parsed = parse_bench(proc.stdout, prefill_len, new_tokens)
    except ValueError as error:
        row.note = str(error)
        return
    row.prefill_tok_s, row.decode_tok_s, row.build = parsed["prefill_tok_s"], parsed["decode_tok_s"], parsed["build"]


def run_llamacpp(
    folder: str | os.PathLike | None,
    model: str,
    schemes: Sequence[str],
    *,
    threads: int,
    prefill_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    workdir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> LlamaCppReport | None:
    """llama-bench rows for the llama.cpp counterparts of ``schemes`` (see :func:`llamacpp_type`); None (and nothing
    run) when neither ``folder`` nor ``$QCAL_LLAMACPP`` names a tool folder.

    The GGUF ``model`` is requantized once per type with ``llama-quantize --allow-requantize SRC DST TYPE threads``
    into ``workdir`` (default: a temporary folder, removed afterwards), then timed with ``llama-bench -t threads
    -p prefill_len -n new_tokens -d 0,prefill_len -r repeats -o json``: prefill on an empty context, decode after
    ``prefill_len`` tokens, as qcal's harness times them. What cannot be done is reported in the notes, never
    raised.
    """
    folder = resolve_folder(folder)
    if folder is None:
        return None
    say = log or (lambda _msg: None)
    depths = f"0,{prefill_len}"
    report = LlamaCppReport(settings=f"-t {threads} -p {prefill_len} -n {new_tokens} -d {depths} -r {repeats} "
                                     f"(decode at depth {prefill_len})")
    reason = missing_tools(folder)
    if reason is not None:
        report.notes.append(f"{SKIPPED}: {reason}")
        return report
    types: dict[str, list[str]] = {}
    for scheme in schemes:
        kind = llamacpp_type(scheme)
        if kind is not None:
            types.setdefault(kind, []).append(scheme)
    unmatched = [s for s in schemes if llamacpp_type(s) is None]
    if unmatched:
        report.notes.append(f"no llama.cpp counterpart for {', '.join(unmatched)}")
    if not types:
        report.notes.append(f"{SKIPPED}: none of the schemes has a llama.cpp counterpart")
        return report
    src, reason = gguf_source(model)
    if src is None:
        report.notes.append(f"{SKIPPED}: {reason}")
        return report
    report.source = src.name
    tools = Path(folder).expanduser()
    bench_args = ["-t", str(threads), "-p", str(prefill_len), "-n", str(new_tokens), "-d", depths, "-r", str(repeats)]
    with tempfile.TemporaryDirectory(prefix="qcal-llamacpp-") as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for kind, matched in types.items():
            row = LlamaCppRow(kind, matched)
            report.rows.append(row)
            dst = out_dir / f"{src.stem}-{kind}.gguf"
            say(f"llama.cpp: llama-quantize {src.name} -> {kind}")
            proc = _run([tools / "llama-quantize", "--allow-requantize", src, dst, kind, str(threads)])
            if proc.returncode != 0 or not dst.is_file():
                row.note = f"llama-quantize failed ({_failure(proc)})"
                continue
            row.file_bytes = dst.stat().st_size
            say(f"llama.cpp: llama-bench {dst.name} {' '.join(bench_args)}")
            _bench(tools / "llama-bench", dst, bench_args, row, prefill_len, new_tokens)
    return report
