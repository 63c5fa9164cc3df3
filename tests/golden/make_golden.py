"""Write the golden qcal checkpoints of this format version: ``tests/golden/v<FORMAT_VERSION>/<scheme>/``.

Each folder holds what :func:`qcal.save` wrote for a tiny Llama (built from ``config.json`` there, random weights,
seed 0) quantized with one scheme, and ``expected.safetensors``: the input ids, the logits of the saved model run
through the reference kernels in float32; ``expected.json``: the sha256 of every quantized module's dequantized
float32 weight. Every later qcal must load these folders to the same weights (``tests/test_golden.py``). Run once
per format version:

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import qcal
import qcal.kernels
from qcal.schemes import apply_scheme
from qcal.serialization import FORMAT_VERSION

# per format version, the schemes whose checkpoints it introduced (a checkpoint is written in the lowest version that
# holds it: version 3 adds online input transforms)
SCHEMES = {2: ["int8wo", "int8dq", "int4wo-16", "int4wo-pc", "int4wo-16-intzp", "8da4w-16", "int3wo-16", "w8a8-static",
               "gptq-int4-16-actorder", "smoothquant-w8a8", "fake-quant-w8a8-static"],
           3: ["had-int8dq", "had-8da4w-16"]}
CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 24), generator=g) for _ in range(4)]


@torch.no_grad()
def expected(model, ids) -> dict[str, torch.Tensor]:
    kernels = list(qcal.kernels.KERNELS)
    qcal.kernels.KERNELS[:] = []  # the reference kernel: dequantize, fake-quantize the input, float op
    try:
        for _, m in qcal.quantized_modules(model):
            if m.frozen:
                m.select_kernel()
        out = {"input_ids": ids, "logits": model.float()(ids).logits}
    finally:
        qcal.kernels.KERNELS[:] = kernels
    return out


def weight_hashes(model) -> dict[str, str]:
    from qcal.serialization import tensor_sha256

    return {name: tensor_sha256(m.dequantized_weight(torch.float32)) for name, m in qcal.quantized_modules(model)}


def main() -> None:
    root = Path(__file__).parent / f"v{FORMAT_VERSION}"
    shutil.rmtree(root, ignore_errors=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for scheme in SCHEMES[FORMAT_VERSION]:
        model = tiny()
        if scheme == "fake-quant-w8a8-static":
            qcal.quantize(model, weights=qcal.qint8, activations=qcal.qint8, exclude="lm_head")
            with qcal.Calibration():
                for x in calib():
                    model(x)
        else:
            model = apply_scheme(model, scheme, calib=calib)
        out = root / scheme
        qcal.save(model, out)
        assert json.loads((out / "qcal.json").read_text())["format_version"] == FORMAT_VERSION, scheme
        (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
        (out / "expected.json").write_text(json.dumps(weight_hashes(model), indent=1))
        save_file(expected(model, ids), str(out / "expected.safetensors"))
        print(scheme, sum(f.stat().st_size for f in out.iterdir()))


if __name__ == "__main__":
    main()
