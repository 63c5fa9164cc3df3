"""Evaluation harness: WikiText-2 perplexity (token and lm-eval word level), speed and size per scheme.

Run ``python -m qcal.eval --task wikitext``; or use the pieces as a library, e.g.
``token_perplexity(model, input_ids, seqlen)``.
"""

from ..data import calibration_windows, load_c4_texts, load_wikitext, tokenize, wikitext_documents
from .perplexity import token_perplexity, window_nlls
from .report import SchemeResult, format_table, plot_size_vs_ppl, write_json
from .speed import PeakMemory, measure_speed, model_bytes

__all__ = [
    "load_wikitext", "load_c4_texts", "calibration_windows", "tokenize", "wikitext_documents",
    "token_perplexity", "window_nlls", "SchemeResult", "format_table", "write_json", "plot_size_vs_ppl",
    "PeakMemory", "measure_speed", "model_bytes",
]
