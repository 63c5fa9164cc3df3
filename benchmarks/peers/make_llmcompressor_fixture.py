"""Write the llm-compressor checkpoints that ``tests/test_interop.py`` imports (``tests/fixtures/llmcompressor``).

Runs in llm-compressor's own virtual environment (its pins clash with qcal's):

    benchmarks/peers/make_venv.sh llmcompressor 'llmcompressor==0.14.0.1'
    HF_HUB_OFFLINE=1 benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/make_llmcompressor_fixture.py

The model is the tests' tiny Llama (random weights from a config and a seed); calibration is 16 random
token windows. Each checkpoint is what ``oneshot`` + ``save_pretrained(save_compressed=True)`` writes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llmcompressor"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    """A 256-token word-level tokenizer: oneshot wants a processor even for pre-tokenized data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def group_scheme(symmetric: bool, actorder: str | None) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                           "strategy": "group", "group_size": 32,
                                                           "actorder": actorder}}}


RECIPES = {
    # GPTQ int4 g32 asymmetric with activation ordering (the int4 checkpoint people deploy to vLLM)
    "w4a16-asym-g32-gptq": lambda: GPTQModifier(config_groups=group_scheme(False, "weight"), ignore=["lm_head"]),
    # GPTQ int4 g32 symmetric
    "w4a16-sym-g32-gptq": lambda: GPTQModifier(config_groups=group_scheme(True, None), ignore=["lm_head"]),
    # int8 weights per channel x int8 dynamic per-token activations (RTN)
    "w8a8-dynamic": lambda: QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": [torch.randint(0, 256, (64,), generator=g).tolist() for _ in range(16)]})
    names = sys.argv[1:] or list(RECIPES)
    src = OUT.parent / ".tiny-llama-float"
    tiny_llama().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    for name in names:
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        oneshot(model=model, processor=tiny_tokenizer(), dataset=ds, recipe=RECIPES[name](), num_calibration_samples=16,
                max_seq_length=64)
        model.save_pretrained(out, save_compressed=True)
        for extra in out.glob("recipe.yaml"):
            extra.unlink()
        cfg = json.loads((out / "config.json").read_text())
        print(name, json.dumps(cfg["quantization_config"]["config_groups"])[:200])
    shutil.rmtree(src)


if __name__ == "__main__":
    main()
