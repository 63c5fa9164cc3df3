"""Sequential (block-by-block) calibration: give each linear the Gram matrix of its real inputs.

The pipeline behind GPTQ, in the spirit of the reference ``llama.py``:

1. run the model on the calibration batches until the first decoder block, and keep that
   block's inputs (hidden states plus the keyword arguments the model passes to every block);
2. for each block in turn: record ``XᵀX / n`` of each target linear's input, hand it to
   ``solve`` (which rewrites the linear's weight), then run the block once more to produce the
   next block's inputs from the now-quantized block.

With ``true_sequential`` a linear is solved from inputs produced by the already-solved linears
before it (q/k/v first, then o_proj, then gate/up, then down_proj); linears that read the same
tensor form one stage. When all samples fit in one batch, each linear is solved inside its own
forward pre-hook the moment its complete input arrives, so one forward per block suffices;
with several batches, each stage costs a forward over the batches that stops after the stage.

Only one block's activations and Gram matrices exist at a time.

Which blocks: a model with a ``config`` (Hugging Face) is walked along its decoder blocks, the
``nn.ModuleList`` of ``config.num_hidden_layers`` modules holding the most parameters (or the
list named by ``blocks=``). Any other ``nn.Module`` is treated as a single block and run on the
inputs as given (a tensor is the one positional argument, a tuple the positional arguments, a
dict the keyword arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["find_blocks", "run_sequential", "gram", "block_grams", "BlockStates"]

Solve = Callable[[str, nn.Module, torch.Tensor], float]
State = tuple[tuple, dict[str, Any]]  # (args, kwargs) of one block call


class BlockStates(Sequence):
    """The inputs of one block, already captured: an ``(args, kwargs)`` per batch. Given to :func:`run_sequential`
    (or a quantizer) in place of calibration inputs, the model is treated as that one block and each state is
    read when the block runs (a subclass may keep them on disk)."""

    def __init__(self, states: Sequence[State]) -> None:
        self._states = list(states)

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, i):
        return self._states[i]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def mean_gram(total: torch.Tensor, tokens: int) -> torch.Tensor:
    """``XᵀX / n`` over every process's calibration samples, computed in place in ``total`` (returned). Under an
    initialised ``torch.distributed`` process group each rank holds a share of the samples, and the sums and counts
    are added across ranks before the division: in float64, in rank order, so every rank gets the same matrix run
    after run, a slice of ~1M entries at a time (no second matrix)."""
    if not _distributed():
        return total.div_(tokens)
    import torch.distributed as dist

    world = dist.get_world_size()
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=total.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    n = counts[0].clone()
    for c in counts[1:]:
        n += c
    flat = total.view(-1)
    step = 1 << 20
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step].double()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        acc = parts[0]
        for q in parts[1:]:
            acc += q
        flat[i:i + step] = acc / n
    return total


def gram(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` (float32) of the rows of ``x`` viewed as ``(-1, features)``."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    return x2.T @ x2


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)``: the decoder blocks of a Hugging Face model, or None for a plain module."""
    if name is not None:
        blocks = model.get_submodule(name)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"blocks={name!r} is a {type(blocks).__name__}, not an nn.ModuleList")
        return name, blocks
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n_layers is None:
        return None
    best = None
    for mname, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, mname, m)
    return None if best is None else (best[1], best[2])


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (None for a model without parameters)."""
    param = next(model.parameters(), None)
    return None if param is None else param.device


def to_device(x, device: torch.device | None):
    """``x`` (a tensor, or a tuple/list/dict holding tensors) with its tensors on ``device``.

    Calibration inputs are usually recorded on the CPU; the algorithms move them to the model.
    """
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def _batches(inputs: Sequence, batch_size: int | None, device: torch.device | None = None) -> list:
    """Concatenate consecutive same-shaped tensors into batches of at most ``batch_size`` samples.

    Batches are moved to ``device`` (the model's): calibration inputs recorded on the CPU can
    drive a model on a GPU.
    """
    out: list = []
    group: list[torch.Tensor] = []

    def flush():
        if group:
            out.append(to_device(torch.cat(group) if len(group) > 1 else group[0], device))
            group.clear()

    for x in inputs:
        if not isinstance(x, torch.Tensor):
            flush()
            out.append(to_device(x, device))
            continue
        x = x if x.dim() > 1 else x.unsqueeze(0)
        full = batch_size is not None and sum(g.shape[0] for g in group) + x.shape[0] > batch_size
        if group and (x.shape[1:] != group[0].shape[1:] or full):
            flush()
        group.append(x)
    flush()
    return out


def _call(module: nn.Module, x, **extra):
    if isinstance(x, dict):
        return module(**x, **extra)
    if isinstance(x, (tuple, list)):
        return module(*x, **extra)
    return module(x, **extra)


def _capture(model: nn.Module, first_block: nn.Module, batches: list) -> list[State]:
    """Inputs of ``first_block`` for every batch (the model stops right there)."""
    states: list[State] = []

    def hook(module, args, kwargs):
        states.append((tuple(args), dict(kwargs)))
        raise _Stop

    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call(model, b, **extra)
            except _Stop:
                pass
    finally:
        handle.remove()
    return states


def _hidden(state: State) -> torch.Tensor:
    args, kwargs = state
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(state: State, h: torch.Tensor) -> State:
    args, kwargs = state
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _run(block: nn.Module, state: State):
    out = block(*state[0], **state[1])
    return out[0] if isinstance(out, (tuple, list)) else out


class _GramMemo:
    """``XᵀX / n`` of the last input seen, so linears reading the same tensor share one matmul and one matrix."""

    def __init__(self) -> None:
        self.key = None
        self.value = None
        self.ref = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        if key != self.key:
            self.value = None  # the old matrix goes before the new one is made
            self.key, self.value, self.ref = key, mean_gram(gram(x), x.numel() // x.shape[-1]), x
        return self.value


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _solve_online(block, state: State, layers: dict[str, nn.Module], solve: Solve,
                  errors: dict[str, float]) -> torch.Tensor:
    """One forward over the single batch; each linear is solved in its pre-hook, then runs quantized."""
    memo = _GramMemo()

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if name not in errors:  # first call of this linear in the block
                errors[name] = solve(name, module, memo(x))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        return _run(block, state)
    finally:
        for h in handles:
            h.remove()


class _StageRecorder:
    """Forward pre-hooks for one pass: accumulate ``XᵀX`` of the current stage's linears.

    With ``true_sequential`` the stage is the first pending linear to run plus those reading the
    same tensor; the pass stops as soon as a linear outside the stage runs. Otherwise every
    pending linear belongs to the stage and the pass runs to the end. Linears that read the same tensor share
    one sum (``leader``: the first of them to run).
    """

    def __init__(self, pending: dict[str, nn.Module], true_sequential: bool) -> None:
        self.stage: list[str] = [] if true_sequential else list(pending)
        self.fixed = not true_sequential  # stage membership known
        self.first: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.leader: dict[str, str] = {}
        self.last: tuple[str, tuple, torch.Tensor] | None = None  # (leader, key, input) of the last input seen
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in pending.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if not self.fixed:
                if self.first is None or _same_tensor(x, self.first):
                    self.first = x
                    self.stage.append(name)
                else:
                    self.fixed = True
            if name not in self.stage:
                raise _Stop
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
            if name not in self.leader:
                same = self.last is not None and self.last[1] == key
                self.leader[name] = self.last[0] if same else name
            self.last = (self.leader[name], key, x)  # x keeps its address from being reused
            if self.leader[name] != name:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if name in self.sums:  # accumulated in place: no second n x n matrix
                self.sums[name].addmm_(x2.T, x2)
            else:
                self.sums[name] = x2.T @ x2
            self.tokens[name] = self.tokens.get(name, 0) + x2.shape[0]
        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """``XᵀX / n`` of each stage linear that ran, in stage order (every rank the same); linears that read the
        same tensor share one matrix. The sums are consumed."""
        grams: dict[str, torch.Tensor] = {}
        for n in self.stage:
            if n in self.leader:
                lead = self.leader[n]
                grams[n] = grams[lead] if lead in grams else mean_gram(self.sums.pop(lead), self.tokens[lead])
        return grams

    def run(self, block: nn.Module, states: Sequence[State]) -> None:
        try:
            for state in states:
                self.last = None
                try:
                    _run(block, state)
                except _Stop:
                    pass
                self.fixed, self.first = True, None
        finally:
            for h in self.handles:
                h.remove()
            self.last = None


def block_grams(block: nn.Module, states: Sequence[State], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``XᵀX / n`` of the inputs of ``layers`` (``{name: linear}`` inside ``block``) over one forward of ``block``
    on every batch of ``states`` (and, under ``torch.distributed``, every process's); linears that read the same
    tensor share one matrix; a linear that never ran is left out."""
    rec = _StageRecorder(dict(layers), true_sequential=False)
    rec.run(block, states)
    return rec.grams()


def _solve_staged(block, states: list[State], layers: dict[str, nn.Module], solve: Solve,
                  true_sequential: bool, errors: dict[str, float]) -> None:
    """Stage by stage: a forward over all batches accumulates the stage's Gram matrices, then solve."""
    pending = dict(layers)
    while pending:
        rec = _StageRecorder(pending, true_sequential)
        rec.run(block, states)
        if not rec.stage:  # the remaining linears never ran: nothing to solve them from
            return
        grams = rec.grams()
        stage = list(grams)
        ran = rec.stage
        del rec
        if _distributed():
            _solve_shared(stage, pending, grams, solve, errors)
        else:
            for name in stage:
                errors[name] = solve(name, pending[name], grams.pop(name))
        for name in ran:
            pending.pop(name)


def _solve_shared(stage: list[str], modules: dict[str, nn.Module], grams: dict[str, torch.Tensor], solve: Solve,
                  errors: dict[str, float]) -> None:
    """The stage's linears dealt round-robin over the ranks: each solves its own, then every solved linear's
    tensors (its state dict: weight and fixed qparams) go from its solver to every rank."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for k, name in enumerate(stage):
        owner = k % world
        payload = [None]
        if owner == rank:
            err = solve(name, modules[name], grams[name])
            payload = [(err, {key: t.cpu() for key, t in modules[name].state_dict().items()})]
        dist.broadcast_object_list(payload, src=owner)
        err, state = payload[0]
        if owner != rank:
            module = modules[name]
            for key, t in state.items():
                sub, _, attr = key.rpartition(".")
                holder = module.get_submodule(sub) if sub else module
                if attr in holder._parameters:
                    holder._parameters[attr].data = t.to(holder._parameters[attr].device)
                else:
                    setattr(holder, attr, t.to(next(module.parameters()).device))
        errors[name] = err


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    inputs: Sequence,
    select: Callable[[nn.Module], dict[str, nn.Module]],
    solve: Solve,
    *,
    true_sequential: bool = True,
    batch_size: int | None = None,
    blocks: str | None = None,
    progress: bool = True,
    desc: str = "sequential",
    prepare: Callable[[nn.Module, Sequence[State]], Any] | None = None,
) -> dict[str, float]:
    """Walk ``model`` block by block; ``solve(name, linear, XᵀX/n)`` each linear ``select(block)`` returns
    (linears reading the same tensor are given the same matrix: ``solve`` must not write it).
    ``prepare(block, states)``, when given, runs first on each block and its inputs (the ``(args, kwargs)`` of
    each batch), e.g. a float transform calibrated on the same pass (AWQ's scales before GPTQ).

    ``inputs``: token-id tensors for a Hugging Face model (``(1, seqlen)`` or ``(b, seqlen)``),
    else whatever the module takes, or the :class:`BlockStates` of ``model`` as one block.
    ``batch_size=None`` runs all same-shaped samples as one
    batch (fastest; memory grows with the sample count); an int bounds the batch.
    Returns ``{full linear name: solve's return value}``.
    """
    from tqdm.auto import tqdm

    found = None if isinstance(inputs, BlockStates) else find_blocks(model, blocks)
    batches = inputs if isinstance(inputs, BlockStates) else _batches(inputs, batch_size, model_device(model))
    if not batches:
        raise ValueError(f"{desc}: no calibration inputs")
    if isinstance(inputs, BlockStates):
        prefix, block_list, states = "", [model], inputs
    elif found is None:
        prefix, block_list = "", [model]
        states: list[State] = [((b,), {}) if isinstance(b, torch.Tensor) else
                               ((tuple(b), {}) if isinstance(b, (tuple, list)) else ((), dict(b)))
                               for b in batches]
    else:
        prefix, block_list = found[0] + ".", list(found[1])
        states = _capture(model, block_list[0], batches)
        if not states:
            raise RuntimeError(f"{desc}: the model never called its first block {prefix}0")
    results: dict[str, float] = {}
    bar = tqdm(block_list, desc=desc, disable=not progress, leave=False)
    for i, block in enumerate(bar):
        if prepare is not None:
            prepare(block, states)
        layers = select(block)
        errors: dict[str, float] = {}
        if true_sequential and len(states) == 1 and not _distributed():  # several processes share out solves
            states = [_with_hidden(states[0], _solve_online(block, states[0], layers, solve, errors))]
        else:
            if layers:
                _solve_staged(block, states, layers, solve, true_sequential, errors)
            if i + 1 < len(block_list):  # the last block's outputs feed nothing
                states = [_with_hidden(s, _run(block, s)) for s in states]
        block_name = prefix + str(i) if found is not None else ""
        for name, err in errors.items():
            results[f"{block_name}.{name}".strip(".")] = err
        if errors:
            bar.set_postfix_str(" ".join(f"{n.rpartition('.')[2]}={e:.3g}" for n, e in errors.items()))
    return results
