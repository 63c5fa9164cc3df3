"""Checkpoints written by earlier qcal versions keep loading: every folder under ``tests/golden/v<N>/`` (written by
``tests/golden/make_golden.py`` when format version N was current) loads into a meta-built tiny Llama with the
same dequantized weights, bit for bit, and the same logits through the reference kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import qcal
from qcal.serialization import tensor_sha256

GOLDEN = sorted(p for p in (Path(__file__).parent / "golden").glob("v*/*") if p.is_dir())


def test_every_format_version_has_golden_files():
    from qcal.serialization import FORMAT_VERSION

    versions = {int(p.parent.name[1:]) for p in GOLDEN}
    assert FORMAT_VERSION in versions, "a new format version needs tests/golden/make_golden.py run for it"


@pytest.mark.parametrize("folder", GOLDEN, ids=[f"{p.parent.name}/{p.name}" for p in GOLDEN])
def test_golden_checkpoint_loads_exactly(folder, reference_kernels):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**json.loads((folder / "config.json").read_text()))).eval()
    qcal.load(model, folder)
    model.float()
    hashes = json.loads((folder / "expected.json").read_text())
    assert hashes.keys() == {n for n, _ in qcal.quantized_modules(model)}
    for name, m in qcal.quantized_modules(model):
        assert tensor_sha256(m.dequantized_weight(torch.float32)) == hashes[name], name
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
