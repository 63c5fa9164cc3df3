"""Calibration and evaluation text: WikiText-2 raw and C4, from a local folder, the package or `datasets`.

Resolution order for every loader: an explicit ``data_dir``, then the ``QCAL_DATA_DIR`` environment
variable (folders laid out like ``shared/data``: ``wikitext-2-raw/{test,validation}.txt`` and
``c4/en-train-00000-of-01024-first1000.jsonl``), then, for WikiText-2 raw, the copy embedded in the
package (``qcal/wikitext/``, checked by sha256), then Hugging Face ``datasets`` (online or cached).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

WIKITEXT_FILES = {"test": "wikitext-2-raw/test.txt", "validation": "wikitext-2-raw/validation.txt"}
EMBEDDED_WIKITEXT = Path(__file__).with_name("wikitext")
EMBEDDED_SHA256 = {"test": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83",
                   "validation": "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"}
C4_FILE = "c4/en-train-00000-of-01024-first1000.jsonl"
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
CalibSource = Literal["c4", "wikitext-valid"]


class DataUnavailableError(RuntimeError):
    """Raised when neither a local data folder nor `datasets` can provide the text."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``data_dir`` if given, else ``$QCAL_DATA_DIR``, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get("QCAL_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def _local_file(data_dir: str | os.PathLike | None, relative: str) -> tuple[Path | None, str]:
    root = resolve_data_dir(data_dir)
    if root is None:
        return None, "no --data-dir / QCAL_DATA_DIR given"
    path = root / relative
    return (path, "") if path.is_file() else (None, f"{path} does not exist")


def _unavailable(what: str, local_note: str, hub_what: str, error: Exception) -> DataUnavailableError:
    return DataUnavailableError(
        f"cannot load {what}: (1) local data folder: {local_note}; pass --data-dir or set QCAL_DATA_DIR to a "
        f"folder laid out like shared/data; (2) datasets.load_dataset({hub_what}) failed "
        f"({type(error).__name__}: {error}); it needs network access or a cached copy."
    )


def load_wikitext(split: Literal["test", "validation"], data_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw ``split`` as ``"\\n\\n".join(rows)``, the usual perplexity string."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"split must be one of {sorted(WIKITEXT_FILES)}, got {split!r}")
    path, note = _local_file(data_dir, WIKITEXT_FILES[split])
    if path is not None:
        return path.read_text(encoding="utf-8")
    if resolve_data_dir(data_dir) is None:
        embedded = _embedded_wikitext(split)
        if embedded is not None:
            return embedded
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as error:  # offline, not cached, or datasets missing
        hub = '"wikitext", "wikitext-2-raw-v1"'
        raise _unavailable(f"WikiText-2 raw {split}", note, hub, error) from error
    return "\n\n".join(rows)


def _embedded_wikitext(split: str) -> str | None:
    """The split shipped with the package (None if the file is absent); a corrupt copy is an error."""
    import hashlib
    import lzma

    path = EMBEDDED_WIKITEXT / f"{split}.txt.xz"
    if not path.is_file():
        return None
    try:
        raw = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as e:
        raise DataUnavailableError(f"the embedded WikiText-2 {split} split {path} is corrupt ({e})") from None
    if hashlib.sha256(raw).hexdigest() != EMBEDDED_SHA256[split]:
        raise DataUnavailableError(f"the embedded WikiText-2 {split} split {path} does not match its sha256")
    return raw.decode("utf-8")


def load_c4_texts(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents of C4 ``en`` train shard 00000 (the local copy holds its first 1000)."""
    path, note = _local_file(data_dir, C4_FILE)
    if path is not None:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    try:
        import datasets

        ds = datasets.load_dataset("allenai/c4", data_files={"train": C4_SHARD}, split="train")
    except Exception as error:
        hub = f'"allenai/c4", data_files={C4_SHARD!r}'
        raise _unavailable("C4 en train shard 00000", note, hub, error) from error
    return list(ds["text"])


def wikitext_rows(text: str) -> list[str]:
    """Invert ``"\\n\\n".join(rows)``: rows are ``""`` or one line ending in ``"\\n"``."""
    rows: list[str] = []
    pos, end = 0, len(text)
    while True:
        if pos >= end or text[pos] == "\n":
            rows.append("")
        else:
            stop = text.find("\n", pos)
            stop = end if stop < 0 else stop + 1
            rows.append(text[pos:stop])
            pos = stop
        if pos >= end:
            return rows
        if not text.startswith("\n\n", pos):
            raise ValueError(f"not a '\\n\\n'-joined WikiText string (at character {pos})")
        pos += 2


def wikitext_documents(text: str) -> list[str]:
    """Split a WikiText split into articles, as ``EleutherAI/wikitext_document_level`` does.

    The rows are turned back into the raw file (blank rows are ``" \\n"``), which is cut before every
    top-level ``" = Title = "`` heading; each article is its lines joined with ``"\\n"``. Text not in
    that joined-rows form is split as it stands.
    """
    try:
        raw = "".join(row if row else " \n" for row in wikitext_rows(text))
    except ValueError:
        raw = text
    pages, lines = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def tokenize(tokenizer: Callable, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a (1, n) LongTensor, special tokens as the tokenizer adds them."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence length is longer than the maximum"
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids.long()


def calibration_windows(
    tokenizer: Callable,
    source: CalibSource = "c4",
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> list[torch.Tensor]:
    """``n_samples`` random (1, ``seqlen``) token windows for calibration, seeded; never the test split.

    ``"c4"`` draws random documents with at least ``seqlen`` tokens and a random window in each, like
    GPTQ's ``get_c4``; ``"wikitext-valid"`` draws random windows from the tokenized validation split.
    """
    rng = random.Random(seed)
    if source == "wikitext-valid":
        ids = tokenize(tokenizer, load_wikitext("validation", data_dir))[0]
        if ids.numel() <= seqlen:
            raise ValueError(f"validation split has {ids.numel()} tokens, fewer than seqlen={seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(n_samples)]
        return [ids[s : s + seqlen].clone().unsqueeze(0) for s in starts]
    if source != "c4":
        raise ValueError(f"calibration source must be 'c4' or 'wikitext-valid', got {source!r}")
    texts = load_c4_texts(data_dir)
    cache: dict[int, torch.Tensor] = {}
    short: set[int] = set()
    windows = []
    while len(windows) < n_samples:
        if len(short) == len(texts):
            raise ValueError(f"no C4 document has at least {seqlen} tokens")
        i = rng.randint(0, len(texts) - 1)
        if i in short:
            continue
        if i not in cache:
            cache[i] = tokenize(tokenizer, texts[i])[0]
        ids = cache[i]
        if ids.numel() < seqlen:
            short.add(i)
            continue
        s = rng.randint(0, ids.numel() - seqlen)
        windows.append(ids[s : s + seqlen].clone().unsqueeze(0))
    return windows
