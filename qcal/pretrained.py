"""Quantize a Hugging Face checkpoint without ever holding the float model: block by block, from disk to disk.

:func:`quantize_pretrained` (and ``python -m qcal.quantize``) builds the model on the meta device, loads the
embeddings, runs the calibration windows to the first decoder block, then for each block in turn: reads its
tensors from the safetensors shards (``safe_open``, by name), quantizes it with the scheme on the block's inputs,
computes the next block's inputs, freezes and casts it, writes it as a shard of a qcal checkpoint
(``from_pretrained(dst)`` loads it) and frees it. Memory holds one float block, its Gram matrices and the
calibration activations; activations over ``max_memory`` live in files on disk instead, one batch read at a time.

Each scheme says which activation streams it reads (:class:`qcal.schemes.StreamedScheme`): the GPTQ family
(``gptq-*``, ``gptq-gguf-*``, ``8da4w-gptq-<g>``) solves each block from the outputs of the blocks before it,
already quantized, as the in-memory sequential GPTQ does; SmoothQuant takes its activation ranges from the float
model's stream; static activation calibration (``w8a8-static``, ``smoothquant-w8a8-static``) passes on the outputs
of its own calibration pass, window after window. Every one gives the checkpoint the in-memory scheme gives with
the same windows and batches, bit for bit. Calibration-free schemes need no calibration data and stream at disk
speed.

A run writes its progress into ``dst/.qcal-progress`` after every block (the block's shard, the next block's
inputs): a run killed at any point and started again with the same arguments continues after the last finished
block and writes the same files an uninterrupted run writes, byte for byte.

Under ``torchrun`` (an initialised process group) each process calibrates on its share of the windows; GPTQ's
Gram matrices are summed across processes and each stage's solves are dealt out among them
(:mod:`qcal.algorithms.sequential`), SmoothQuant's ranges are reduced to their extremes; every process ends with
the same block and the first one writes. Static activation calibration is a moving average over the windows in
order and runs in one process. Decoder-only Hugging Face models whose blocks take the hidden states plus keyword
arguments the model computes once (Llama, Mistral, Qwen2, ...) are supported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms.sequential import BlockStates, _batches, _capture, _hidden, _with_hidden, find_blocks
from .integrations.transformers import QcalConfig, _record, checkpoint_metadata, checkpoint_tensors, float_buffer_dtypes
from .nn import QMODULE_FOR
from .quantize import cast_model, quantized_modules
from .schemes import streamable_scheme
from .transaction import transaction

__all__ = ["quantize_pretrained", "main"]

_PROGRESS = ".qcal-progress"
_FORMAT = 2  # of the files under _PROGRESS
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, read by name from its safetensors files."""

    def __init__(self, src: Path) -> None:
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: src / f for k, f in weight_map.items()}
        elif (src / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(src / "model.safetensors", "pt") as f:
                self.where = {k: src / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json "
                                    f"(quantize_pretrained reads safetensors checkpoints)")

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def _load(module: nn.Module, ckpt: _Checkpoint, keys: Sequence[str], prefix: str = "",
          device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Give ``module``'s tensors ``keys`` (its state-dict names) their values from the checkpoint, where they are
    stored as ``prefix + key``, as float32 (float tensors as ``dtype``) on ``device``; returns them."""
    missing = [k for k in keys if prefix + k not in ckpt.where]
    if missing:
        raise ValueError(f"quantize_pretrained: the checkpoint has no tensor {prefix + missing[0]!r} "
                         f"({len(missing)} missing)")
    state = {k[len(prefix):]: v.float().to(device, dtype) for k, v in ckpt.read([prefix + k for k in keys]).items()}
    module.load_state_dict(state, strict=False, assign=True)
    return state


def _skeleton(src: Path) -> nn.Module:
    """The model on the meta device, with the buffers it computes itself (rotary frequencies) made real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, m in list(model.named_modules()):
        if any(b is not None and b.is_meta for k, b in m._buffers.items() if k in m._non_persistent_buffers_set):
            if "config" not in type(m).__init__.__code__.co_varnames:
                raise ValueError(f"quantize_pretrained: cannot rebuild the computed buffers of {name} "
                                 f"({type(m).__name__})")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(m)(config=config))
    return model


class _States(BlockStates):
    """The calibration activations entering a block: in memory, or one file per batch when they exceed the
    memory budget (the keyword arguments the model computed once stay in memory, shared by every stream)."""

    def __init__(self, kwargs: list, folder: Path, in_memory: bool, hidden: list, device: torch.device) -> None:
        super().__init__(kwargs)
        self.folder = folder
        self.in_memory = in_memory
        self.hidden: list[torch.Tensor | None] = hidden
        self.device = device

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        h = self.hidden[i] if self.in_memory else \
            torch.load(self.folder / f"{i}.pt", weights_only=True, map_location=self.device)
        return _with_hidden(self._states[i], h)


class _Next:
    """One stream's inputs of the next block, written to ``folder`` as they come (a resumed run reads them)."""

    def __init__(self, folder: Path, in_memory: bool) -> None:
        folder.mkdir(exist_ok=True)
        self.folder, self.in_memory = folder, in_memory
        self.hidden: list[torch.Tensor | None] = []

    def add(self, b: int, h: torch.Tensor) -> None:
        if b != len(self.hidden):
            raise RuntimeError(f"quantize_pretrained: batch {b} passed on out of order (expected {len(self.hidden)})")
        h = h.contiguous()
        torch.save(h.cpu(), self.folder / f"{b}.pt")
        self.hidden.append(h if self.in_memory else None)


def _first_inputs(model: nn.Module, first: nn.Module, batches: list, names: Sequence[str], states_dir: Path,
                  block: int, max_memory: int | None, device: torch.device) -> dict[str, _States]:
    """The inputs of block ``block`` for each stream: captured at the first block (every stream starts there), or,
    on a resumed run, read back from the files the last finished block wrote."""
    kwargs: list = []
    hidden: dict[str, list] = {name: [] for name in names}
    folders = {name: states_dir / f"{name}-{block}" for name in names}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    in_memory = True
    for b, batch in enumerate(batches):
        (state,) = _capture(model, first, [batch])
        h = _hidden(state)
        if b == 0:
            total = h.numel() * 4 * sum(x.shape[0] for x in batches) // batch.shape[0] * len(names)
            in_memory = max_memory is None or total <= max_memory
        kwargs.append(_with_hidden(state, torch.empty(0)))
        for name in names:
            if block > 0:  # resume: the files of the last finished block
                hidden[name].append(torch.load(folders[name] / f"{b}.pt", weights_only=True, map_location=device)
                                    if in_memory else None)
            else:
                if not in_memory:
                    torch.save(h.contiguous().cpu(), folders[name] / f"{b}.pt")
                hidden[name].append(h if in_memory else None)
        del state, h
    return {name: _States(kwargs, folders[name], in_memory, hidden[name], device) for name in names}


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        torch.distributed.barrier()


def _fingerprint(src: Path, scheme: str, calib: list[torch.Tensor] | None, dtype: torch.dtype,
                 batch_size: int | None, world: int, device: torch.device) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT, scheme, str(dtype), batch_size, world, device.type]).encode())
    for f in sorted(src.glob("*.safetensors")) + sorted(src.glob("*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for x in calib or []:
        h.update(x.numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _prefer_mmap() -> None:
    """Allocations of 1 MiB and more straight from the system (glibc): each block's large, short-lived buffers
    (Gram matrices, activations, weight copies) are returned when freed instead of fragmenting the heap, which
    otherwise raised the peak by ~0.2 GiB on TinyLlama's shapes. For the rest of the process (glibc's default
    threshold adapts up to 32 MiB)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _release_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise, and the process grows block by
    block)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _load_outside(model: nn.Module, prefix: str, ckpt: _Checkpoint, tied: bool, skip: Sequence[str] = (),
                  device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Load every tensor outside the decoder blocks (embeddings, final norm, head), but ``skip``, as ``dtype``
    (one at a time: one float32 tensor in memory besides those loaded); returns them."""
    keys = [k for k in model.state_dict() if not k.startswith(prefix) and not (tied and k == "lm_head.weight")
            and k not in skip]
    state = {}
    for k in keys:
        state.update(_load(model, ckpt, [k], device=device, dtype=dtype))
    if tied:
        model.tie_weights()
    return state


@torch.no_grad()
def quantize_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    scheme: str,
    *,
    calib: Callable[[], list[torch.Tensor]] | list[torch.Tensor] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Quantize the Hugging Face checkpoint ``src`` (safetensors) with ``scheme`` into the qcal checkpoint ``dst``,
    one decoder block in memory at a time. Returns a summary (seconds per block, total, peak RSS, bytes written).

    ``calib``: the calibration token windows (or a callable returning them) for calibrated schemes. ``device``:
    where each block is quantized (``"cuda"``: one block, its activations held in memory and one batch's forward
    on the GPU; the checkpoint is read and written through the CPU).
    ``batch_size``: windows per forward (None: all at once, as the in-memory quantizers do; the results equal
    theirs with the same batch size). ``max_memory``: bytes of calibration activations kept in RAM; above it they
    go to files under ``dst/.qcal-progress``, read one batch at a time (the budget covers the activations: one
    float32 block, its Gram matrices and one batch's forward come on top). ``on_block(i)`` is called once block
    ``i`` is on disk. Restarting after an interruption with the same arguments resumes after the last block written.
    The output embeddings, final norm and head stay float (``dtype``), as the in-memory schemes leave them.
    """
    src, dst = Path(src), Path(dst)
    device = torch.device(device)
    _prefer_mmap()
    plan = streamable_scheme(scheme)
    windows = None
    if plan.needs_calibration:
        windows = (calib() if callable(calib) else list(calib)) if calib is not None else None
        if not windows:
            raise ValueError(f"quantize_pretrained: scheme {scheme!r} needs calibration windows (calib=...)")
    rank, world = _rank_world()
    if windows is not None and world > 1:  # each process calibrates on its share; statistics are summed
        windows = windows[rank::world]
    ckpt = _Checkpoint(src)
    start = time.perf_counter()
    model = _skeleton(src)
    for m in model.modules():  # the computed buffers (rotary frequencies) go where the blocks run
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[k] = b.to(device)
    found = find_blocks(model)
    if found is None:
        raise ValueError(f"quantize_pretrained: {src} has no decoder blocks (config.num_hidden_layers)")
    prefix, blocks = found[0] + ".", found[1]
    work = dst / _PROGRESS
    fingerprint = _fingerprint(src, scheme, windows, dtype, batch_size, world, device)
    done = -1
    if (work / "progress.json").is_file() and \
            json.loads((work / "progress.json").read_text()).get("fingerprint") == fingerprint:
        done = int(json.loads((work / "progress.json").read_text())["done"])
    elif dst.exists() and any(p.name != _PROGRESS for p in dst.iterdir()):
        raise FileExistsError(f"quantize_pretrained: {dst} exists and is not an unfinished run of the same command")
    elif work.exists() and rank == 0:
        shutil.rmtree(work)
    _barrier()
    lead = rank == 0  # the process that writes the checkpoint
    work.mkdir(parents=True, exist_ok=True)
    states_dir = work / f"rank{rank}" if world > 1 else work
    states_dir.mkdir(exist_ok=True)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_keys = () if tied or head is None else tuple(
        n for n, p in model.named_parameters() if any(p is q for q in head.parameters()))
    outside = _load_outside(model, prefix, ckpt, tied, skip=head_keys, device=device)  # the head: when written

    streams: dict[str, _States] = {}
    if windows is not None and done + 1 < len(blocks):  # the first block's inputs, one batch at a time
        streams = _first_inputs(model, blocks[0], _batches(windows, batch_size, device), plan.streams, states_dir,
                                done + 1, max_memory, device)
    # the embeddings and head are not needed again until they are written: out of memory meanwhile
    model.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in outside.items()},
                          strict=False, assign=True)
    del outside
    from tqdm.auto import tqdm

    per_block: list[float] = []
    bar = tqdm(range(done + 1, len(blocks)), desc=f"quantize {scheme}", disable=not progress, unit="block")
    for i in bar:
        t0 = time.perf_counter()
        block = blocks[i]
        _load(block, ckpt, list(block.state_dict()), f"{prefix}{i}.", device)
        left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"quantize_pretrained: {prefix}{i}.{left[0]} has no value (not in the checkpoint, "
                             f"not computed by the model)")
        nxt = {name: _Next(states_dir / f"{name}-{i + 1}", st.in_memory) for name, st in streams.items()} \
            if i + 1 < len(blocks) else {}
        emit = (lambda name, b, h, nxt=nxt: nxt[name].add(b, h)) if nxt else None
        with transaction(block, snapshot_tensors=False):  # a failed block is re-read from disk: no undo copy
            plan.step(block, streams, emit)
        for name, n in nxt.items():
            if len(n.hidden) != len(streams[name]):
                raise RuntimeError(f"quantize_pretrained: scheme {scheme!r} passed on {len(n.hidden)} of "
                                   f"{len(streams[name])} batches of its {name!r} stream")
        old = [st.folder for st in streams.values()]
        for name, n in nxt.items():
            streams[name].hidden, streams[name].folder = n.hidden, n.folder
        plan.finish(block, dtype)
        if lead:
            tensors, hashes = checkpoint_tensors(block, f"{prefix}{i}.")
            tensors = {k: v.cpu() for k, v in tensors.items()}
            _atomic_save(tensors, dst / f"model-block{i:05d}.safetensors", checkpoint_metadata(hashes))
            _write_json({f"{prefix}{i}.{n}": _record(m) for n, m in quantized_modules(block)},
                        work / f"records-{i}.json")
        _barrier()  # every process has its next inputs on disk before the block counts as done
        if lead:
            _write_json({"fingerprint": fingerprint, "done": i}, work / "progress.json")
        for folder in old:
            if folder.exists():
                shutil.rmtree(folder)
        blocks[i] = block.to("meta")
        del block
        _release_memory()
        per_block.append(time.perf_counter() - t0)
        bar.set_postfix_str(f"{per_block[-1]:.1f} s/block")
        if on_block is not None:
            on_block(i)

    summary = {"scheme": scheme, "blocks": len(blocks), "seconds_per_block": per_block, "processes": world}
    if not lead:
        _barrier()
        return {**summary, "total_s": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib(),
                "bytes_written": 0}
    # outside the blocks: float, cast as the in-memory schemes cast the whole model (each tensor as it is read)
    _load_outside(model, prefix, ckpt, tied, dtype=dtype)
    parent, _, attr = found[0].rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, attr, nn.ModuleList())
    model.cpu()
    cast_model(model, dtype)
    buffer_dtypes = float_buffer_dtypes(model)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    if tied:
        tensors.pop("lm_head.weight", None)
    _atomic_save(tensors, dst / "model-outside.safetensors", {"format": "pt"})
    records: dict[str, dict] = {}
    for i in range(len(blocks)):
        records.update(json.loads((work / f"records-{i}.json").read_text()))
    left = [n for n, m in model.named_modules() if type(m) in QMODULE_FOR and not n.startswith(prefix)]
    config = model.config
    config.quantization_config = QcalConfig.from_records(records, left, buffer_dtypes)
    config.dtype = dtype
    config.save_pretrained(dst)
    weight_map, total = {}, 0
    for f in sorted(dst.glob("model-*.safetensors")):
        from safetensors import safe_open

        with safe_open(f, "pt") as h:
            for k in h.keys():
                weight_map[k] = f.name
        total += f.stat().st_size
    _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, dst / "model.safetensors.index.json")
    for f in src.iterdir():  # tokenizer and generation settings travel with the weights
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                                          "generation_config.json",
                                                                          "chat_template.jinja")):
            shutil.copy2(f, dst / f.name)
    shutil.rmtree(work, ignore_errors=True)
    _barrier()
    return {**summary, "total_s": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib(),
            "bytes_written": total}


def _table(summary: dict[str, Any]) -> str:
    per = summary["seconds_per_block"]
    rows = [("scheme", summary["scheme"]), ("blocks", str(summary["blocks"])),
            ("s per block (mean / max)", f"{sum(per) / len(per):.2f} / {max(per):.2f}" if per else "-"),
            ("total s", f"{summary['total_s']:.1f}"), ("peak RSS MiB", f"{summary['peak_rss_mib']:.0f}"),
            ("written MiB", f"{summary['bytes_written'] / 2**20:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qcal.quantize``: quantize a checkpoint on disk into a qcal checkpoint, one block at a time."""
    from .schemes import available_schemes

    p = argparse.ArgumentParser(prog="python -m qcal.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--scheme", required=True, help="a scheme that works block by block, e.g. gptq-int4-64-actorder, "
                   f"int8wo (all: {', '.join(available_schemes())})")
    p.add_argument("--out", required=True, type=Path, help="output folder (a qcal checkpoint)")
    p.add_argument("--calib", choices=["c4", "wikitext-valid"], default="c4", help="calibration text")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--data-dir", default=None, help="folder with local datasets (see qcal.data)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="dtype of the written model")
    p.add_argument("--device", default="cpu", help="where each block is quantized: cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: all at once)")
    p.add_argument("--max-memory", type=float, default=None,
                   help="GiB of calibration activations kept in RAM; the rest goes to disk")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():  # torchrun
        if device.startswith("cuda"):  # one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = None
    if streamable_scheme(args.scheme).needs_calibration:
        from transformers import AutoTokenizer

        from .data import calibration_windows

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        calib = calibration_windows(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed,
                                    args.data_dir)
    summary = quantize_pretrained(args.model, args.out, args.scheme, calib=calib, dtype=_DTYPES[args.dtype],
                                  device=device,
                                  batch_size=args.batch_size,
                                  max_memory=None if args.max_memory is None else int(args.max_memory * 2**30))
    if _rank_world()[0] == 0:
        print(_table(summary))
    return 0
