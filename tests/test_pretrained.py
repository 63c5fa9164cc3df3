"""Streamed quantization of a checkpoint on disk (``quantize_pretrained``, ``python -m qcal.quantize``): the written
checkpoint equals the in-memory quantizers' bit for bit, survives a SIGKILL and resumes, and refuses bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from qcal.pretrained import quantize_pretrained
from qcal.schemes import apply_scheme

pytest.importorskip("safetensors")
ROOT = Path(__file__).resolve().parents[1]
CALIB = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _src(tmp_path: Path, layers: int = 3, tie: bool = True) -> Path:
    src = tmp_path / "src"
    make_tiny_llama(layers=layers, tie=tie).save_pretrained(src)
    return src


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("max_memory", [None, 0])  # 0: every activation goes through files on disk
def test_streamed_gptq_equals_in_memory(tmp_path, max_memory):
    from transformers import AutoModelForCausalLM

    src = _src(tmp_path)
    summary = quantize_pretrained(src, tmp_path / "out", "gptq-int4-32-actorder", calib=CALIB, progress=False,
                                  max_memory=max_memory)
    assert summary["blocks"] == 3 and len(summary["seconds_per_block"]) == 3
    ref = apply_scheme(make_tiny_llama(layers=3), "gptq-int4-32-actorder", calib=lambda: CALIB)
    ref.save_pretrained(tmp_path / "ref")
    _assert_same(_tensors(tmp_path / "out"), _tensors(tmp_path / "ref"))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = torch.randint(0, 256, (1, 20))
    assert torch.equal(got(x).logits, ref(x).logits)
    assert not (tmp_path / "out" / ".qcal-progress").exists()


def test_untied_head_streams(tmp_path):
    """An untied output head is read only when it is written (not for the calibration capture)."""
    src = _src(tmp_path, layers=2, tie=False)
    quantize_pretrained(src, tmp_path / "out", "gptq-int4-32", calib=CALIB, max_memory=0, progress=False)
    apply_scheme(make_tiny_llama(layers=2, tie=False), "gptq-int4-32", calib=lambda: CALIB).save_pretrained(
        tmp_path / "ref")
    out, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    assert "lm_head.weight" in out
    _assert_same(out, ref)


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    from qcal.algorithms.gptq import GPTQQuantizer
    from qcal.quantize import cast_model, freeze

    src = _src(tmp_path)
    quantize_pretrained(src, tmp_path / "out", "gptq-int4-32-actorder", calib=CALIB, batch_size=2, max_memory=0,
                        progress=False)
    ref = make_tiny_llama(layers=3)
    GPTQQuantizer(bits=4, groupsize=32, act_order=True, static_groups=True, batch_size=2,
                  progress=False).quantize(ref, CALIB)
    cast_model(freeze(ref), torch.bfloat16).save_pretrained(tmp_path / "ref")
    _assert_same(_tensors(tmp_path / "out"), _tensors(tmp_path / "ref"))


def test_streamed_8da4w_gptq_equals_in_memory(tmp_path):
    src = _src(tmp_path, layers=2)
    quantize_pretrained(src, tmp_path / "out", "8da4w-gptq-32", calib=CALIB, progress=False)
    apply_scheme(make_tiny_llama(layers=2), "8da4w-gptq-32", calib=lambda: CALIB).save_pretrained(tmp_path / "ref")
    _assert_same(_tensors(tmp_path / "out"), _tensors(tmp_path / "ref"))


@pytest.mark.parametrize("scheme", ["smoothquant-w8a8", "smoothquant-w8a8-static", "w8a8-static"])
def test_streamed_activation_schemes_equal_in_memory(tmp_path, scheme):
    """SmoothQuant's ranges come from the float model's stream, static calibration passes its own outputs on (one
    window per step, as the in-memory calibration runs them): the in-memory checkpoint, bit for bit."""
    src = _src(tmp_path)
    quantize_pretrained(src, tmp_path / "out", scheme, calib=CALIB, batch_size=1, max_memory=0, progress=False)
    apply_scheme(make_tiny_llama(layers=3), scheme, calib=lambda: CALIB).save_pretrained(tmp_path / "ref")
    out, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    assert any(k.endswith("input_scale") for k in out) == scheme.endswith("static")
    _assert_same(out, ref)


def test_calibration_free_scheme_needs_no_data(tmp_path):
    src = _src(tmp_path)
    quantize_pretrained(src, tmp_path / "out", "int4wo-32", progress=False)
    apply_scheme(make_tiny_llama(layers=3), "int4wo-32").save_pretrained(tmp_path / "ref")
    _assert_same(_tensors(tmp_path / "out"), _tensors(tmp_path / "ref"))


_KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_pretrained import CALIB
from qcal.pretrained import quantize_pretrained

def kill(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)

quantize_pretrained({src!r}, {dst!r}, "gptq-int4-32-actorder", calib=CALIB, max_memory=0, progress=False,
                    on_block=kill)
"""


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    src = _src(tmp_path, layers=4)
    quantize_pretrained(src, tmp_path / "whole", "gptq-int4-32-actorder", calib=CALIB, max_memory=0, progress=False)
    dst = tmp_path / "resumed"
    code = _KILLED_RUN.format(tests=str(ROOT / "tests"), src=str(src), dst=str(dst))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in dst.glob("model-block*.safetensors")) == ["model-block00000.safetensors",
                                                                           "model-block00001.safetensors"]
    seen = []
    quantize_pretrained(src, dst, "gptq-int4-32-actorder", calib=CALIB, max_memory=0, progress=False,
                        on_block=seen.append)
    assert seen == [2, 3]  # blocks 0 and 1 were not done again
    for f in sorted((tmp_path / "whole").iterdir()):
        assert f.read_bytes() == (dst / f.name).read_bytes(), f.name


def test_bad_inputs(tmp_path):
    src = _src(tmp_path, layers=2)
    with pytest.raises(ValueError, match="bf16.*cannot be applied one block at a time"):
        quantize_pretrained(src, tmp_path / "a", "bf16", calib=CALIB)
    with pytest.raises(ValueError, match="needs calibration windows"):
        quantize_pretrained(src, tmp_path / "b", "gptq-int4-32")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        quantize_pretrained(tmp_path, tmp_path / "c", "int8wo")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists"):
        quantize_pretrained(src, tmp_path / "d", "int8wo")
    assert (tmp_path / "d" / "keep.txt").read_text() == "user data"


def test_cli(tmp_path):
    src = _src(tmp_path, layers=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "qcal.quantize", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--max-memory" in out.stdout
    out = subprocess.run([sys.executable, "-m", "qcal.quantize", "--model", str(src), "--scheme", "int8wo",
                          "--out", str(tmp_path / "q")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak RSS MiB" in out.stdout and (tmp_path / "q" / "model.safetensors.index.json").is_file()


_RANK = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_pretrained import CALIB
from qcal.pretrained import quantize_pretrained

dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="file://" + {rdv!r})
quantize_pretrained({src!r}, {dst!r}, {scheme!r}, calib=CALIB, batch_size={batch!r}, progress=False)
dist.destroy_process_group()
"""


def _two_processes(tmp_path: Path, src: Path, scheme: str, batch: int | None) -> dict[str, torch.Tensor]:
    code = _RANK.format(tests=str(ROOT / "tests"), src=str(src), dst=str(tmp_path / "two"),
                        rdv=str(tmp_path / "rendezvous"), scheme=scheme, batch=batch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    return _tensors(tmp_path / "two")


def test_two_processes_smoothquant_bit_identical(tmp_path):
    """SmoothQuant's ranges are maxima: reduced over 2 processes they are exactly one process's."""
    src = _src(tmp_path, layers=2)
    quantize_pretrained(src, tmp_path / "one", "smoothquant-w8a8", calib=CALIB, batch_size=1, progress=False)
    _assert_same(_tensors(tmp_path / "one"), _two_processes(tmp_path, src, "smoothquant-w8a8", 1))


def test_two_processes_on_gloo_match_one(tmp_path):
    """Calibration split over 2 processes (Gram matrices summed over gloo) gives the one-process checkpoint up to
    the float32 rounding of the sums: the same scales and all but a few codes."""
    src = _src(tmp_path)
    quantize_pretrained(src, tmp_path / "one", "gptq-int4-32-actorder", calib=CALIB, progress=False)
    one, two = _tensors(tmp_path / "one"), _two_processes(tmp_path, src, "gptq-int4-32-actorder", None)
    assert sorted(one) == sorted(two)
    codes = [k for k in one if k.endswith("qweight")]
    assert codes
    differ = sum(int((one[k] != two[k]).sum()) for k in codes) / sum(one[k].numel() for k in codes)
    assert differ < 0.01
    scales = [k for k in one if k.endswith("weight_scale")]
    for k in scales:
        torch.testing.assert_close(one[k].float(), two[k].float(), rtol=1e-2, atol=0)
