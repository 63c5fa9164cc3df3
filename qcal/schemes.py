"""Named quantization schemes shared by the library and the eval harness.

``apply_scheme(model, "int4wo-64")`` quantizes a float (fp32) model in place, freezes it and
casts it to the scheme's compute dtype. Names are matched against registered patterns;
``available_schemes()`` lists them. The schemes of :mod:`qcal.algorithms` (GPTQ, SmoothQuant, 8da4w with
GPTQ weights) are registered here, the layer above them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .algorithms import GPTQQuantizer, smoothquant_w8a8
from .algorithms.int8_dyn_act_int4_weight import swap_8da4w
from .algorithms.sequential import BlockStates, _run
from .algorithms.smoothquant import ActivationStats, smooth
from .calibration import Calibration, calibrate
from .qtypes import qint2, qint3, qint4, qint8, qtype
from .quantize import cast_model, freeze, quantize, quantized_modules
from .rtn import RTN_SCHEMES, match_rtn, scheme_regex

__all__ = ["SchemeContext", "register_scheme", "register_transform", "available_schemes", "available_transforms",
           "apply_scheme", "describe_scheme", "weight_format", "streamable_scheme", "StreamedScheme",
           "quantize_kwargs", "check_scheme", "cast_model", "calibrate"]


@dataclass
class SchemeContext:
    """What a scheme may need beyond the model."""

    quantize_lm_head: bool = False
    calib: Callable[[], list[torch.Tensor]] | None = None
    dtype: torch.dtype = torch.bfloat16
    progress: bool = True  # the algorithms' progress bars
    # a transform's per-block work left to the scheme's own block-by-block pass (``blockwise`` schemes): AWQ's
    # scale search runs on GPTQ's pass, one forward per block less
    prepare_block: Callable[[nn.Module, Sequence], Any] | None = None
    clip: bool = False  # the clip- prefix: weight ranges searched against the calibration inputs (taken by the scheme)

    @property
    def exclude(self) -> list[str] | None:
        return None if self.quantize_lm_head else ["lm_head"]

    def calibration_inputs(self, scheme: str) -> list[torch.Tensor]:
        if self.calib is None:
            raise ValueError(f"scheme {scheme!r} needs calibration data: pass calib=<callable returning input_ids>")
        return self.calib()


Emit = Callable[[str, int, torch.Tensor], None]
StreamStep = Callable[[nn.Module, re.Match, dict[str, BlockStates], Emit | None], None]


@dataclass(frozen=True)
class _Scheme:
    pattern: str
    regex: re.Pattern
    fn: Callable[[nn.Module, re.Match, SchemeContext], nn.Module]
    description: str
    finish: Callable[[nn.Module, torch.dtype], nn.Module] | None = None
    stream: tuple[tuple[str, ...], StreamStep] | None = None
    blockwise: bool = False  # calibrates block by block and runs ``ctx.prepare_block`` on each block first
    whole_model: bool = False  # needs the whole model in memory: cannot stream block by block


_SCHEMES: list[_Scheme] = []


def register_scheme(pattern: str, description: str,
                    finish: Callable[[nn.Module, torch.dtype], nn.Module] | None = None,
                    stream: tuple[tuple[str, ...], StreamStep] | None = None, blockwise: bool = False,
                    whole_model: bool = False):
    """Register ``fn(model, match, ctx) -> model`` for names matching ``pattern``.

    ``<g>`` in the pattern stands for a group size (digits). With ``finish(model, dtype)`` (freeze and cast), ``fn``
    only quantizes (fake-quant, qparams fixed) and works on any module, one decoder block included, so the scheme
    can stream a checkpoint block by block (:func:`qcal.pretrained.quantize_pretrained`): it calibrates on the
    block's inputs as the quantized model before it computes them. A scheme whose statistics come from elsewhere
    (the float model's activations, a calibration pass whose outputs feed the next block) gives
    ``stream=(names, step)``: the activation streams it reads (e.g. ``("float", "calibrated")``, all starting from
    the first block's inputs) and ``step(block, match, states, emit)``, which quantizes the block from
    ``states[name]`` (a :class:`~qcal.algorithms.sequential.BlockStates` per stream) and passes each stream's next
    hidden states to ``emit(name, batch_index, hidden)`` in batch order (``emit`` is None for the last block).
    ``blockwise=True``: ``fn`` calibrates decoder block by decoder block and runs ``ctx.prepare_block`` (when a
    transform set it) on each block and its inputs first. ``whole_model=True``: it cannot stream one block at a
    time (:func:`streamable_scheme` refuses it).
    """
    regex = scheme_regex(pattern)
    if stream is not None and finish is None:
        raise ValueError(f"register_scheme({pattern!r}): stream= needs finish=")

    def deco(fn):
        _SCHEMES.append(_Scheme(pattern, regex, fn, description, finish, stream, blockwise, whole_model))
        return fn

    return deco


Transform = Callable[[nn.Module, SchemeContext, str], nn.Module]
# prefix -> (description, transform(model, ctx, the scheme name after the prefix)): "rot-gptq-int4-64" rotates the
# float model, then applies gptq-int4-64
_TRANSFORMS: dict[str, tuple[str, Transform]] = {}


def register_transform(prefix: str, description: str):
    """Register ``fn(model, ctx, rest) -> model``, a transform of the float model that any scheme name can be
    prefixed with (``f"{prefix}-{rest}"``; prefixes combine, applied left to right before the scheme; ``rest`` is
    the name after the prefix, e.g. to learn the weight format the scheme quantizes to)."""
    if not re.fullmatch(r"[a-z0-9]+", prefix):
        raise ValueError(f"register_transform: prefix {prefix!r} must be lowercase letters and digits")

    def deco(fn):
        _TRANSFORMS[prefix] = (description, fn)
        return fn
    return deco


def _split(name: str) -> tuple[list[str], str]:
    """(the transform prefixes of ``name``, in order; the scheme they precede)."""
    prefixes = []
    while True:
        head, sep, rest = name.partition("-")
        if not sep or head not in _TRANSFORMS or not rest:
            return prefixes, name
        prefixes.append(head)
        name = rest


def available_schemes() -> list[str]:
    """Registered scheme patterns (``<g>`` = group size); each can be prefixed by transforms
    (:func:`available_transforms`)."""
    return [s.pattern for s in _SCHEMES]


def available_transforms() -> dict[str, str]:
    """``{prefix: description}`` of the transforms a scheme name can start with (``rot-int8dq``)."""
    return {p: d for p, (d, _) in _TRANSFORMS.items()}


def describe_scheme(name: str) -> str:
    """One-line description of a scheme name."""
    prefixes, base = _split(name)
    return "; then ".join([_TRANSFORMS[p][0] for p in prefixes] + [_find(base)[0].description])


def _find(name: str) -> tuple[_Scheme, re.Match]:
    for s in _SCHEMES:
        m = s.regex.match(name)
        if m:
            return s, m
    raise ValueError(f"unknown scheme {name!r}; available: {', '.join(available_schemes())} "
                     f"(each may be prefixed by {', '.join(p + '-' for p in _TRANSFORMS)})")


def apply_scheme(model: nn.Module, name: str, *, quantize_lm_head: bool = False,
                 calib: Callable[[], list[torch.Tensor]] | None = None) -> nn.Module:
    """Quantize the float ``model`` in place with scheme ``name``, freeze it and cast it to the
    scheme's compute dtype. Returns the model.

    All or nothing: on any error (or an interrupt) the model is left exactly as it was; schemes that rewrite
    weights in place (GPTQ, SmoothQuant) keep a copy of the model's tensors on disk meanwhile."""
    from .transaction import transaction

    prefixes, base = _split(name)
    scheme, match = _find(base)
    in_place = bool(prefixes) or scheme.pattern not in (*RTN_SCHEMES, "fp32", "bf16", "w8a8-static")  # GPTQ, ...
    config = copy.deepcopy(getattr(model, "config", None)) if prefixes else None  # a transform may edit it
    try:
        with transaction(model, snapshot_tensors=in_place):
            ctx = SchemeContext(quantize_lm_head, calib)
            rest = name
            for p in prefixes:
                rest = rest[len(p) + 1:]
                model = _TRANSFORMS[p][1](model, ctx, rest)
            model = scheme.fn(model, match, ctx)
            if ctx.prepare_block is not None or ctx.clip:
                raise RuntimeError(f"scheme {name!r}: {scheme.pattern} left a transform's work undone")
            return model if scheme.finish is None else scheme.finish(model, ctx.dtype)
    except BaseException:
        if config is not None:
            model.config = config
        raise


@dataclass(frozen=True)
class StreamedScheme:
    """How a scheme quantizes a model one decoder block at a time (:func:`streamable_scheme`)."""

    streams: tuple[str, ...]  # the activation streams it reads; () for a calibration-free scheme
    step: Callable[[nn.Module, dict[str, BlockStates], Emit | None], None]
    finish: Callable[[nn.Module, torch.dtype], nn.Module]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.streams)


def streamable_scheme(name: str) -> StreamedScheme:
    """The :class:`StreamedScheme` of a scheme that can quantize a model one decoder block at a time; ValueError
    naming the ones that can for any other."""
    prefixes, _ = _split(name)
    if prefixes:
        raise ValueError(f"scheme {name!r} cannot be applied one block at a time: {prefixes[0]}- transforms the "
                         "whole model (embeddings and head included)")
    scheme, match = _find(name)
    if scheme.whole_model:
        raise ValueError(f"scheme {name!r} cannot be applied one block at a time: it needs the whole model in memory")
    if scheme.finish is None:
        ok = [s.pattern for s in _SCHEMES if s.finish is not None and not s.whole_model]
        raise ValueError(f"scheme {name!r} cannot be applied one block at a time yet; these can: {', '.join(ok)}")
    if scheme.stream is not None:
        names, custom = scheme.stream
        return StreamedScheme(names, lambda block, states, emit: custom(block, match, states, emit), scheme.finish)
    calibrated = scheme.pattern not in RTN_SCHEMES and not scheme.pattern.startswith("gguf-")

    def step(block: nn.Module, states: dict[str, BlockStates], emit: Emit | None) -> None:
        inputs = states.get("quantized")
        scheme.fn(block, match, SchemeContext(False, None if inputs is None else (lambda: inputs), progress=False))
        if inputs is not None and emit is not None:  # the next block's inputs, from the quantized block
            for b in range(len(inputs)):
                emit("quantized", b, _run(block, inputs[b]))
    return StreamedScheme(("quantized",) if calibrated else (), step, scheme.finish)


def check_scheme(model: nn.Module, name: str, *, quantize_lm_head: bool = False) -> None:
    """Raise ValueError, naming the module, if scheme ``name`` cannot apply to ``model``: unknown, a group size
    of 0, or one that does not divide a linear layer's input size. Cheap: run it before any long work."""
    scheme, match = _find(_split(name)[1])
    g = match.groupdict().get("g")
    if g is None:
        return
    g = int(g)
    if g <= 0:
        raise ValueError(f"scheme {name!r}: the group size must be positive")
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (not quantize_lm_head and mname.split(".")[-1] == "lm_head"):
            continue
        if m.in_features % g:
            raise ValueError(f"scheme {name!r}: group size {g} does not divide the {m.in_features} input features "
                             f"of {mname!r}")


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    freeze(model)
    return cast_model(model, dtype)


@register_scheme("fp32", "float32, unquantized")
def _fp32(model, match, ctx):
    return model.float()


@register_scheme("bf16", "bfloat16, unquantized (the baseline)")
def _bf16(model, match, ctx):
    return cast_model(model, torch.bfloat16)


def quantize_kwargs(name: str) -> dict:
    """The ``quantize(...)`` arguments of a calibration-free scheme (``int8wo``, ``int4wo-64``, ...).

    Raises ValueError naming the scheme when it needs calibration data (GPTQ, SmoothQuant, static
    activations) or does not exist.
    """
    scheme, match = _find(name)
    if scheme.pattern not in RTN_SCHEMES:
        raise ValueError(f"scheme {name!r} needs calibration data and cannot be applied module by module; "
                         f"calibration-free schemes: {', '.join(RTN_SCHEMES)}")
    return RTN_SCHEMES[scheme.pattern][1](match)


# Calibration-free schemes (:mod:`qcal.rtn`): each is one ``quantize`` call.
def _rtn(kwargs: Callable[[re.Match], dict]):
    def apply(model, match, ctx):
        model = quantize(model, exclude=ctx.exclude, **kwargs(match))
        if ctx.clip:  # clip-: the weight ranges searched against the calibration inputs
            from .algorithms.clip import clip_weights

            clip_weights(model, ctx.calibration_inputs(f"clip-{match.string}"), progress=ctx.progress)
            ctx.clip = False
        return model
    return apply


for _pattern, (_description, _kwargs) in RTN_SCHEMES.items():
    register_scheme(_pattern, _description, finish=_finish)(_rtn(_kwargs))


def _calibrate_stream(block: nn.Module, states: BlockStates, emit: Emit | None, what: str) -> None:
    """``calibrate`` on one block: its inputs in order, each batch's output the next block's input (what the
    in-memory calibration passes on; the observers' moving average depends on the order)."""
    _single_process(what)
    with Calibration(momentum=0.9):
        for b in range(len(states)):
            out = _run(block, states[b])
            if emit is not None:
                emit("calibrated", b, out)


def _single_process(what: str) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        raise ValueError(f"{what}: static activation calibration is a moving average over the windows in order "
                         "and cannot be split over processes; run it in one process")


def _w8a8_static_step(block, match, states, emit):
    quantize(block, weights=qint8, activations=qint8)
    _calibrate_stream(block, states["calibrated"], emit, match.string)


@register_scheme("w8a8-static", "int8 static per-tensor activations (calibrated) x int8 per-channel weights",
                 finish=_finish, stream=(("calibrated",), _w8a8_static_step))
def _w8a8_static(model, match, ctx):
    quantize(model, weights=qint8, activations=qint8, exclude=ctx.exclude)
    calibrate(model, ctx.calibration_inputs(match.string))
    return model


# ---------------------------------------------------------------- GGUF (llama.cpp) block formats

_GGUF = {"q4_0": ("Q4_0", "int4 symmetric"), "q4_1": ("Q4_1", "int4 with integer zero-points"),
         "q8_0": ("Q8_0", "int8 symmetric")}


def _finish_gguf(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Freeze and cast, keeping the float32 scales (GGUF's float16 values: a bf16 cast would round them)."""
    freeze(model)
    kept = {n: (m.weight_scale, m.weight_zero_point) for n, m in quantized_modules(model)}
    cast_model(model, dtype)
    for n, m in quantized_modules(model):
        m._buffers["weight_scale"], m._buffers["weight_zero_point"] = kept[n]
        m.select_kernel()
    return model


def _gguf_rtn(kind: str):
    def apply(model, match, ctx):
        from .integrations.gguf import block_qparams

        quantize(model, weights=qint8 if kind == "Q8_0" else qint4, group_size=32, symmetric=kind != "Q4_1",
                 zero_point="int" if kind == "Q4_1" else "float", exclude=ctx.exclude)
        for _, m in quantized_modules(model):  # llama-quantize's grids (Q4_0: d = m / -8)
            w = m.weight_2d().detach()
            s, zp = block_qparams(w.reshape(-1, 32), kind)
            m.fix_weight_qparams(s.reshape(w.shape[0], -1), None if zp is None else zp.reshape(w.shape[0], -1))
        return model
    return apply


def _gptq(model: nn.Module, match: re.Match, ctx: SchemeContext, **kwargs) -> nn.Module:
    """GPTQ with ``kwargs`` on the context's calibration inputs, running (and taking) ``ctx.prepare_block`` and
    ``ctx.clip`` (each static group's range searched against the inputs' mean squares)."""
    prepare, ctx.prepare_block = ctx.prepare_block, None
    if ctx.clip:
        kwargs["mse"], ctx.clip = "act", False
    return GPTQQuantizer(exclude=ctx.exclude, progress=ctx.progress, prepare_block=prepare, **kwargs).quantize(
        model, ctx.calibration_inputs(match.string))


def _gguf_gptq(kind: str):
    def apply(model, match, ctx):
        # shrink 0.5: half GPTQ, half importance-matrix rounding (llama-perplexity on SmolLM2: BENCHMARKS.md)
        return _gptq(model, match, ctx, gguf_type=kind, act_order=True, static_groups=True, shrink=0.5)
    return apply


for _name, (_kind, _what) in _GGUF.items():
    register_scheme(f"gguf-{_name}", f"llama.cpp's {_kind}: {_what}, groups of 32, float16 scales, weight-only "
                    "(exports to GGUF bit for bit)", finish=_finish_gguf)(_gguf_rtn(_kind))
    register_scheme(f"gptq-gguf-{_name}", f"GPTQ (act_order, static groups, Hessian half-shrunk to its diagonal) "
                    f"to llama.cpp's {_kind}: {_what}, groups of 32, float16 scales searched against the input energy "
                    "(calibrated; exports to GGUF bit for bit)", finish=_finish_gguf, blockwise=True)(
        _gguf_gptq(_kind))


# ---------------------------------------------------------------- the algorithms' schemes


def _gptq_scheme(bits: int, per_channel: bool, act_order: bool, zero_point: str = "float",
                 float_target: bool = False):
    def apply(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
        group = None if per_channel else int(match.group("g"))
        return _gptq(model, match, ctx, bits=bits, groupsize=group, act_order=act_order, static_groups=act_order,
                     zero_point=zero_point, float_target=float_target)
    return apply


# The unsuffixed names are the best configuration measured (BENCHMARKS.md "GPTQ"): act_order with static groups
# (the groups' scales fixed before the permuted solve, so the checkpoint needs no g_idx); "-actorder" names the
# same, "-noactorder" the reference GPTQ (columns in their natural order).
_GPTQ_VARIANTS = (("<g>", False, True, "act_order with static groups"),
                  ("<g>-actorder", False, True, "act_order with static groups (as the unsuffixed name)"),
                  ("<g>-noactorder", False, False, "columns in natural order (the reference GPTQ)"),
                  ("pc", True, True, "act_order"),
                  ("pc-noactorder", True, False, "columns in natural order (the reference GPTQ)"))
for _bits in (2, 3, 4, 8):
    for _suffix, _pc, _ao, _what in _GPTQ_VARIANTS:
        _layout = "per output channel" if _pc else "groups of <g>"
        register_scheme(f"gptq-int{_bits}-{_suffix}", f"GPTQ int{_bits} weight-only, asymmetric {_layout}; "
                        f"{_what} (calibrated)", finish=_finish, blockwise=True)(_gptq_scheme(_bits, _pc, _ao))
        register_scheme(f"gptq-int{_bits}-{_suffix}-intzp", f"gptq-int{_bits}-{_suffix} with integer zero-points "
                        "(exports to compressed-tensors / vLLM)", finish=_finish, blockwise=True)(
            _gptq_scheme(_bits, _pc, _ao, "int"))
    # GPTAQ: GPTQ fitted to the float model's outputs (in memory only: the float and quantized streams side by side)
    for _suffix, _pc in (("<g>", False), ("pc", True)):
        _layout = "per output channel" if _pc else "groups of <g>"
        for _zp, _zname in (("float", ""), ("int", "-intzp")):
            register_scheme(f"gptaq-int{_bits}-{_suffix}{_zname}", f"GPTAQ int{_bits} weight-only, asymmetric "
                            f"{_layout}: GPTQ (act_order) fitted to the float model's outputs on its own inputs, "
                            f"correcting the earlier layers' error{' (integer zero-points)' if _zp == 'int' else ''} "
                            "(calibrated; whole model in memory)", finish=_finish, blockwise=True, whole_model=True)(
                _gptq_scheme(_bits, _pc, True, _zp, float_target=True))


def _8da4w_gptq(float_target: bool):
    def apply(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
        """What ``Int8DynActInt4WeightGPTQQuantizer`` does, with the freeze and cast left to ``finish``."""
        group = int(match.group("g"))
        swap_8da4w(model, group, exclude=ctx.exclude)
        return _gptq(model, match, ctx, bits=4, groupsize=group, symmetric=True, act_order=True, static_groups=True,
                     float_target=float_target)
    return apply


register_scheme("8da4w-gptq-<g>", "8da4w with GPTQ weights: int8 dynamic per-token activations x int4 symmetric "
                "groups of <g>, act_order with static groups (calibrated)", finish=_finish, blockwise=True)(
    _8da4w_gptq(False))
register_scheme("8da4w-gptaq-<g>", "8da4w with GPTAQ weights (GPTQ fitted to the float model's outputs; calibrated; "
                "whole model in memory)", finish=_finish, blockwise=True, whole_model=True)(_8da4w_gptq(True))


def _smoothquant_scheme(dynamic: bool):
    def apply(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
        return smoothquant_w8a8(model, ctx.calibration_inputs(match.string), dynamic=dynamic, exclude=ctx.exclude)
    return apply


def _smoothquant_step(dynamic: bool) -> StreamStep:
    """SmoothQuant on one block: activation ranges from the float model's stream (max over every process's
    windows), smoothing folded, W8A8; static activations then calibrated on the calibrated stream."""
    def step(block, match, states, emit):
        if not dynamic:
            _single_process(match.string)
        stats = ActivationStats(block)
        with stats:
            for b in range(len(states["float"])):
                out = _run(block, states["float"][b])
                if emit is not None:
                    emit("float", b, out)
        stats.all_reduce()
        smooth(block, stats)
        quantize(block, weights=qint8, activations=qint8, dynamic=dynamic, exclude="lm_head")
        if not dynamic:
            _calibrate_stream(block, states["calibrated"], emit, match.string)
    return step


register_scheme("smoothquant-w8a8", "SmoothQuant (alpha 0.5) + int8 dynamic per-token activations x int8 "
                "per-channel weights (calibrated)", finish=_finish,
                stream=(("float",), _smoothquant_step(True)))(_smoothquant_scheme(True))
register_scheme("smoothquant-w8a8-static", "SmoothQuant (alpha 0.5) + int8 static per-tensor activations x int8 "
                "per-channel weights (calibrated)", finish=_finish,
                stream=(("float", "calibrated"), _smoothquant_step(False)))(_smoothquant_scheme(False))


# ---------------------------------------------------------------- transforms of the float model


@register_transform("rot", "residual stream and attention values rotated by randomised Hadamard matrices "
                    "(QuaRot; exact in float, unties tied embeddings)")
def _rotate(model: nn.Module, ctx: SchemeContext, rest: str) -> nn.Module:
    from .algorithms.rotation import rotate_model

    return rotate_model(model)


@register_transform("had", "online Hadamard transform of every down_proj's input (QuaRot; its inverse folded into "
                    "the weight, applied at run time; exact in float; qcal and hf checkpoints only)")
def _hadamard_inputs(model: nn.Module, ctx: SchemeContext, rest: str) -> nn.Module:
    from .algorithms.rotation import hadamard_mlp_inputs

    return hadamard_mlp_inputs(model)


@register_transform("clip", "clipping search: each weight group's range shrunk to minimise the rounding error "
                    "weighted by the calibration inputs' mean squares, for round-to-nearest and inside GPTQ "
                    "(calibrated)")
def _clip(model: nn.Module, ctx: SchemeContext, rest: str) -> nn.Module:
    scheme = _find(_split(rest)[1])[0]
    searchable = scheme.pattern in RTN_SCHEMES or (scheme.blockwise and not scheme.pattern.startswith("gptq-gguf"))
    if not searchable or ctx.clip:
        why = "gptq-gguf already searches its scales against the input energy" if scheme.blockwise else \
            "clip- applies to round-to-nearest and GPTQ schemes with integer weights"
        raise ValueError(f"scheme 'clip-{rest}': {why}")
    ctx.clip = True
    return model


def weight_format(name: str) -> tuple[qtype, int | None, bool]:
    """``(qtype, group_size or None for per channel, symmetric)`` of the weights scheme ``name`` produces;
    ValueError naming the scheme for one without integer weights."""
    prefixes, base = _split(name)
    rtn = match_rtn(base)
    if rtn is not None:
        kw = RTN_SCHEMES[rtn[0]][1](rtn[1])
        return kw["weights"], kw.get("group_size"), kw.get("symmetric", True)
    m = re.fullmatch(r"gpta?q-int(\d)-(\d+|pc)(-actorder|-noactorder)?(-intzp)?", base)
    if m:
        return {2: qint2, 3: qint3, 4: qint4, 8: qint8}[int(m.group(1))], \
            None if m.group(2) == "pc" else int(m.group(2)), False
    m = re.fullmatch(r"8da4w-gpta?q-(\d+)", base)
    if m:
        return qint4, int(m.group(1)), True
    m = re.fullmatch(r"(?:gptq-)?gguf-(q4_0|q4_1|q8_0)", base)
    if m:
        return (qint8 if m.group(1) == "q8_0" else qint4), 32, m.group(1) != "q4_1"
    if base in ("w8a8-static", "smoothquant-w8a8", "smoothquant-w8a8-static"):
        return qint8, None, True
    raise ValueError(f"scheme {name!r} has no integer weight format to search scales for")


@register_transform("awq", "AWQ: per-input-channel scales searched on the calibration activations against the "
                    "scheme's weight format, folded into the norms and producer linears (calibrated)")
def _awq(model: nn.Module, ctx: SchemeContext, rest: str) -> nn.Module:
    from .algorithms.awq import awq_block, awq_smooth

    qt, group, symmetric = weight_format(rest)
    if _find(_split(rest)[1])[0].blockwise and ctx.prepare_block is None:  # searched on the scheme's own pass
        ctx.prepare_block = lambda block, states: awq_block(block, states, qt, group, symmetric)
    else:
        awq_smooth(model, ctx.calibration_inputs(f"awq-{rest}"), qt, group, symmetric, progress=ctx.progress)
    return model
