"""Compatibility alias: the calibration and evaluation text loaders live in :mod:`qcal.data`."""

from __future__ import annotations

from ..data import (
    C4_FILE,
    C4_SHARD,
    EMBEDDED_SHA256,
    EMBEDDED_WIKITEXT,
    WIKITEXT_FILES,
    CalibSource,
    DataUnavailableError,
    calibration_windows,
    load_c4_texts,
    load_wikitext,
    resolve_data_dir,
    tokenize,
    wikitext_documents,
    wikitext_rows,
)

__all__ = ["C4_FILE", "C4_SHARD", "EMBEDDED_SHA256", "EMBEDDED_WIKITEXT", "WIKITEXT_FILES", "CalibSource",
           "DataUnavailableError", "calibration_windows", "load_c4_texts", "load_wikitext", "resolve_data_dir",
           "tokenize", "wikitext_documents", "wikitext_rows"]
