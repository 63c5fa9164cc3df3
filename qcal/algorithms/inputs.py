"""``InputRecorder``: seeded calibration windows of token ids, with torchao's API."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from ..data import calibration_windows

__all__ = ["InputRecorder"]

_SOURCES = {"c4": "c4", "wikitext": "wikitext-valid", "wikitext-valid": "wikitext-valid",
            "wikitext2": "wikitext-valid"}


class InputRecorder:
    """Records calibration inputs: ``InputRecorder(tokenizer, 512).record_inputs("c4", 128).get_inputs()``.

    ``record_inputs(tasks, limit)`` draws ``limit`` random windows of ``calibration_seq_length``
    tokens, split evenly across ``tasks``: ``"c4"`` (the C4 train sample) or ``"wikitext"``
    (WikiText-2 *validation*; the test split is never used for calibration). Windows are seeded
    by ``seed`` and always full length, so ``pad_calibration_inputs``/``pad_token`` never apply.
    ``input_prep_func`` (if given) maps each ``(1, seqlen)`` id tensor to the model's input.
    Text comes from :mod:`qcal.data` (``data_dir``, else ``$QCAL_DATA_DIR``, else ``datasets``).
    """

    def __init__(
        self,
        tokenizer: Callable,
        calibration_seq_length: int = 512,
        input_prep_func: Callable | None = None,
        pad_calibration_inputs: bool = False,
        vocab_size: int | None = None,
        pad_token: int = 0,
        device: str | torch.device = "cpu",
        *,
        seed: int = 0,
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        if calibration_seq_length <= 0:
            raise ValueError(f"calibration_seq_length must be positive, got {calibration_seq_length}")
        self.tokenizer = tokenizer
        self.seqlen = calibration_seq_length
        self.input_prep_func = input_prep_func
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.seed = seed
        self.data_dir = data_dir
        self.inputs: list[torch.Tensor] = []

    def record_inputs(self, calibration_tasks: str | Sequence[str] = "c4", calibration_limit: int = 128
                      ) -> InputRecorder:
        """Add ``calibration_limit`` windows drawn from ``calibration_tasks``; returns self."""
        tasks = [calibration_tasks] if isinstance(calibration_tasks, str) else list(calibration_tasks)
        unknown = [t for t in tasks if t not in _SOURCES]
        if unknown or not tasks:
            raise ValueError(f"unknown calibration task(s) {unknown}; expected some of {sorted(_SOURCES)}")
        for k, task in enumerate(tasks):
            n = calibration_limit // len(tasks) + (k < calibration_limit % len(tasks))
            if n == 0:
                continue
            windows = calibration_windows(self.tokenizer, _SOURCES[task], n_samples=n, seqlen=self.seqlen,
                                          seed=self.seed + k, data_dir=self.data_dir)
            for ids in windows:
                if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
                    raise ValueError(f"token id {int(ids.max())} is outside vocab_size={self.vocab_size}")
                self.inputs.append(ids.to(self.device))
        return self

    def get_inputs(self) -> list:
        """The recorded windows (``(1, seqlen)`` LongTensors, or ``input_prep_func`` of them)."""
        if self.input_prep_func is None:
            return list(self.inputs)
        return [self.input_prep_func(ids) for ids in self.inputs]
