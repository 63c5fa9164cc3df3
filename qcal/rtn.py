"""The calibration-free (round-to-nearest) schemes: each is one ``quantize(...)`` call, so it can also run
module by module as the weights arrive (quantize on load, :mod:`qcal.integrations.transformers`).

:mod:`qcal.schemes` registers them by name with the calibrated ones; this table is what the layers below the
schemes (the transformers integration) may read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .qtypes import qfloat4_e2m1, qfloat5_e2m2, qfloat6_e3m2, qfloat8_e4m3fn, qint3, qint4, qint8

__all__ = ["RTN_SCHEMES", "scheme_regex", "match_rtn", "rtn_kwargs"]


def scheme_regex(pattern: str) -> re.Pattern:
    """The regex of a scheme pattern: ``<g>`` stands for a group size (digits, group ``g``)."""
    return re.compile("^" + re.escape(pattern).replace(re.escape("<g>"), r"(?P<g>\d+)") + "$")


def _group(match: re.Match) -> int:
    return int(match.group("g"))


# pattern -> (description, the quantize() keyword arguments of a matching name)
RTN_SCHEMES: dict[str, tuple[str, Callable[[re.Match], dict]]] = {
    "int8wo": ("int8 weight-only, per output channel, symmetric (A16W8)",
               lambda m: dict(weights=qint8)),
    "int8dq": ("int8 dynamic per-token activations x int8 per-channel weights (A8W8 dynamic)",
               lambda m: dict(weights=qint8, activations=qint8, dynamic=True)),
    "int4wo-<g>": ("int4 weight-only, asymmetric groups of <g> along the input dim (A16W4)",
                   lambda m: dict(weights=qint4, group_size=_group(m), symmetric=False)),
    "int3wo-<g>": ("int3 weight-only, asymmetric groups of <g> (reference kernel; the RTN baseline of "
                   "gptq-int3-<g>)", lambda m: dict(weights=qint3, group_size=_group(m), symmetric=False)),
    "int4wo-pc": ("int4 weight-only, asymmetric, per output channel",
                  lambda m: dict(weights=qint4, symmetric=False)),
    "int4wo-<g>-intzp": ("int4wo-<g> with integer zero-points (exports to compressed-tensors / vLLM)",
                         lambda m: dict(weights=qint4, group_size=_group(m), symmetric=False, zero_point="int")),
    "int4wo-pc-intzp": ("int4wo-pc with integer zero-points (exports to compressed-tensors / vLLM)",
                        lambda m: dict(weights=qint4, symmetric=False, zero_point="int")),
    "fp8wo": ("float8 e4m3 weight-only, per output channel (a scale maps each row's absmax to 448)",
              lambda m: dict(weights=qfloat8_e4m3fn)),
    "fp6wo": ("float6 e3m2 weight-only, per output channel, bit-plane packed (6 bits a weight)",
              lambda m: dict(weights=qfloat6_e3m2)),
    "fp5wo": ("float5 e2m2 weight-only, per output channel, bit-plane packed (5 bits a weight)",
              lambda m: dict(weights=qfloat5_e2m2)),
    "fp4wo-<g>": ("float4 e2m1 weight-only, a scale per group of <g> along the input dim (4 bits a weight)",
                  lambda m: dict(weights=qfloat4_e2m1, group_size=_group(m))),
    "fp8dq": ("float8 e4m3 dynamic per-token activations x float8 e4m3 per-channel weights",
              lambda m: dict(weights=qfloat8_e4m3fn, activations=qfloat8_e4m3fn, dynamic=True)),
    "fp8dq-pt": ("float8 e4m3 dynamic per-tensor activations (one scale an input) x float8 e4m3 per-channel weights",
                 lambda m: dict(weights=qfloat8_e4m3fn, activations=qfloat8_e4m3fn, dynamic=True,
                                act_per_token=False)),
    "8da4w-<g>": ("int8 dynamic per-token activations x int4 symmetric groups of <g> (ExecuTorch)",
                  lambda m: dict(weights=qint4, group_size=_group(m), symmetric=True, activations=qint8,
                                 dynamic=True)),
}

_REGEX = {pattern: scheme_regex(pattern) for pattern in RTN_SCHEMES}


def match_rtn(name: str) -> tuple[str, re.Match] | None:
    """``(pattern, match)`` of the calibration-free scheme ``name``, or None."""
    for pattern, regex in _REGEX.items():
        m = regex.match(name)
        if m:
            return pattern, m
    return None


def rtn_kwargs(name: str) -> dict:
    """The ``quantize(...)`` arguments of the calibration-free scheme ``name`` (``int8wo``, ``int4wo-64``, ...).

    Raises ValueError for any other name (a scheme that needs calibration data, or none); the full registry,
    with the calibrated schemes, is :func:`qcal.schemes.quantize_kwargs`.
    """
    found = match_rtn(name)
    if found is None:
        raise ValueError(f"scheme {name!r} is not calibration-free (it needs calibration data, or does not exist) "
                         f"and cannot be applied module by module; calibration-free schemes: "
                         f"{', '.join(RTN_SCHEMES)}")
    pattern, m = found
    return RTN_SCHEMES[pattern][1](m)
