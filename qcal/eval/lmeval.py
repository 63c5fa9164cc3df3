"""lm-eval's ``wikitext`` metrics (word/byte perplexity, bits per byte) on an in-memory model, offline.

The task mirrors lm-eval's ``wikitext`` (``loglikelihood_rolling`` over articles, its own detokenizer and
``process_results``), but reads the articles from the locally resolved WikiText-2 test text
(:func:`qcal.data.wikitext_documents`) through the ``json`` dataset builder: no hub access.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

TASK_NAME = "qcal_wikitext"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
AGGREGATIONS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                "bits_per_byte": "bits_per_byte"}


def _wikitext_preprocess():
    """lm-eval's ``preprocess_wikitext`` module (detokenizer and ``process_results``)."""
    name = "lm_eval.tasks.wikitext.preprocess_wikitext"
    try:
        return importlib.import_module(name)
    except ImportError:
        import lm_eval

        path = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def wikitext_task_config(docs_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """An lm-eval task config (dict form) equal to lm-eval's ``wikitext``, reading ``docs_file`` (jsonl)."""
    pre = _wikitext_preprocess()
    kwargs = {"data_files": {"test": str(docs_file)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": kwargs,
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": pre.wikitext_detokenizer,
        "process_results": pre.process_results,
        "metric_list": [
            {"metric": m, "aggregation": AGGREGATIONS[m], "higher_is_better": False} for m in METRICS
        ],
        "metadata": {"version": 2.0},
    }


def lm_eval_wikitext(
    model: torch.nn.Module,
    tokenizer: object,
    docs: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> dict[str, float]:
    """Run lm-eval on ``docs`` (WikiText articles) with ``HFLM(pretrained=model)``.

    Returns word_perplexity, byte_perplexity, bits_per_byte, the summed log-likelihood over the
    evaluated articles (``loglikelihood``, nats) and their count (``docs``). ``max_length`` is the
    rolling window (default: lm-eval's, from the model config).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = list(docs[:limit] if limit is not None else docs)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # float32 log-softmax: lm-eval otherwise sums log-probs in the model dtype (bf16 rounds the totals)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              softmax_dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="qcal-wikitext-") as tmp:
        docs_file = Path(tmp) / "test.jsonl"
        docs_file.write_text("".join(json.dumps({"page": d}) + "\n" for d in docs), encoding="utf-8")
        out = simple_evaluate(
            model=lm,
            tasks=[wikitext_task_config(docs_file, cache_dir=Path(tmp) / "cache")],
            task_manager=TaskManager(include_defaults=False),  # skip indexing lm-eval's own tasks
            bootstrap_iters=0,
            log_samples=True,
        )
    metrics = out["results"][TASK_NAME]
    samples = out["samples"][TASK_NAME]
    result = {m: float(metrics[f"{m},none"]) for m in METRICS}
    result["loglikelihood"] = float(sum(s[METRICS[0]][0] for s in samples))
    result["docs"] = len(samples)
    return result
