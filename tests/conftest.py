"""Shared fixtures: tiny models built from configs, never from the hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2, tie: bool = True):
    """A 2-layer Llama with random weights (a few MB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def greedy_reference(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens from ``model`` in eager mode with its dynamic KV cache, (1, steps)."""
    out = model(prompt, use_cache=True)
    ref, token = [], out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        ref.append(token)
        out = model(token, use_cache=True, past_key_values=out.past_key_values)
        token = out.logits[:, -1:].argmax(-1)
    return torch.cat(ref, dim=1)


@pytest.fixture(scope="session", autouse=True)
def _native_build():
    """Build (first use) or load qcal's native operators once, before the first test: the build shows as that
    test's setup time, never inside a test or at collection. Where they cannot be built, PyTorch's ops run."""
    from qcal.kernels import native

    native.available()


@pytest.fixture(scope="session")
def native_kernels(_native_build):
    """qcal's native operators; skips the test where they are unavailable."""
    from qcal.kernels import native

    if not native.available():
        pytest.skip(f"needs the AVX-512 native library (native kernels: {native.native_status()})")
    return native


@pytest.fixture(scope="session")
def runtime_kernels(_native_build):
    """The generation runtime's native operators (the AVX-512 or the AVX2 library); skips the test without them."""
    from qcal.kernels import native
    from qcal.runtime import ops

    if not ops.available():
        pytest.skip(f"native runtime operators unavailable (kernels {native.native_status()})")
    return native


@pytest.fixture(autouse=True)
def _native_ops(request):
    """``@pytest.mark.native_ops("op", ...)``: skips unless the loaded native library (either instruction set)
    registers every named operator."""
    marker = request.node.get_closest_marker("native_ops")
    if marker is not None:
        from qcal.kernels import native

        request.getfixturevalue("_native_build")
        missing = [op for op in marker.args if not native.has(op)]
        if missing:
            pytest.skip(f"native operators {', '.join(missing)} unavailable (kernels {native.native_status()})")


def pytest_collection_modifyitems(config, items):
    """Markers from what a test uses: ``native`` (the native_kernels fixture), ``compile`` (torch.compile)."""
    import inspect

    for item in items:
        if {"native_kernels", "runtime_kernels"} & set(getattr(item, "fixturenames", ())) or \
                item.get_closest_marker("native_ops") is not None:
            item.add_marker(pytest.mark.native)
        fn = getattr(item, "function", None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            source = ""
        if "torch.compile" in source or "compile=True" in source or item.module.__name__ == "test_compile":
            item.add_marker(pytest.mark.compile)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def reference_kernels(monkeypatch):
    """Frozen modules use the reference (dequantize, then float op) kernel: exact parity checks."""
    import qcal.kernels

    monkeypatch.setattr(qcal.kernels, "KERNELS", [])


def pair_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` as the panel kernels sum it: per output one fp32 chain over k, of each pair of columns the odd
    one first (vdpbf16ps's order), inputs below 2^-126 read as zero. ``x`` (M, K) and ``w`` (N, K) hold values whose
    products are exact in fp32 (bf16 x bf16, bf16 x int8), so each step's one rounding is fp32's add."""
    tiny = torch.finfo(torch.float32).tiny
    x, w = (torch.where(t.float().abs() < tiny, 0.0, t.float()) for t in (x, w))
    acc = torch.zeros(x.shape[0], w.shape[0])
    for k in range(0, x.shape[1], 2):
        acc = acc + x[:, k + 1, None] * w[None, :, k + 1]
        acc = acc + x[:, k, None] * w[None, :, k]
    return acc
