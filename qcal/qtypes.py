"""Quantized data types: small frozen records, comparable and serializable by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "qtype",
    "qint2",
    "qint3",
    "qint4",
    "qint8",
    "qfloat8",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qfloat6_e3m2",
    "qfloat5_e2m2",
    "qfloat4_e2m1",
    "qtypes",
    "get_qtype",
]


@dataclass(frozen=True)
class qtype:  # noqa: N801 - lower-case like torch dtypes
    """A quantized type.

    ``qmin``/``qmax`` are the representable integer range (signed) for integer types,
    or the finite range of the float format. ``dtype`` is the unpacked storage dtype. Sub-byte floats
    (``exponent_bits`` + ``mantissa_bits`` + a sign bit, no Inf/NaN, subnormals, bias ``2^(E-1) - 1``, as
    torchao's fpx and the OCP MX formats) have no torch dtype: their codes are stored as uint8 (see
    :func:`qcal.primitives.float_grid`) and packed in bit planes.
    """

    name: str
    bits: int
    is_floating_point: bool
    qmin: float
    qmax: float
    dtype: torch.dtype
    exponent_bits: int = 0
    mantissa_bits: int = 0

    @property
    def is_subbyte_float(self) -> bool:
        """A float format narrower than a byte (codes in uint8)."""
        return self.is_floating_point and self.exponent_bits > 0

    @property
    def packed_per_byte(self) -> int:
        """How many values one byte holds once packed (1 for 8-bit and float types)."""
        return 8 // self.bits if self.bits in (2, 4) and not self.is_floating_point else 1

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"qcal.{self.name}"


qint2 = qtype("qint2", 2, False, -2, 1, torch.int8)
qint3 = qtype("qint3", 3, False, -4, 3, torch.int8)
qint4 = qtype("qint4", 4, False, -8, 7, torch.int8)
qint8 = qtype("qint8", 8, False, -128, 127, torch.int8)
qfloat8_e4m3fn = qtype(
    "qfloat8_e4m3fn", 8, True, -torch.finfo(torch.float8_e4m3fn).max,
    torch.finfo(torch.float8_e4m3fn).max, torch.float8_e4m3fn,
)
qfloat8_e5m2 = qtype(
    "qfloat8_e5m2", 8, True, -torch.finfo(torch.float8_e5m2).max,
    torch.finfo(torch.float8_e5m2).max, torch.float8_e5m2,
)
qfloat8 = qfloat8_e4m3fn


def _subbyte_float(name: str, e: int, m: int) -> qtype:
    top = 2.0 ** ((1 << e) - 1 - ((1 << (e - 1)) - 1)) * (2 - 2.0**-m)  # largest exponent, all mantissa bits set
    return qtype(name, 1 + e + m, True, -top, top, torch.uint8, e, m)


qfloat6_e3m2 = _subbyte_float("qfloat6_e3m2", 3, 2)  # max 28
qfloat5_e2m2 = _subbyte_float("qfloat5_e2m2", 2, 2)  # max 7
qfloat4_e2m1 = _subbyte_float("qfloat4_e2m1", 2, 1)  # max 6 (OCP FP4)

qtypes: dict[str, qtype] = {
    q.name: q for q in (qint2, qint3, qint4, qint8, qfloat8_e4m3fn, qfloat8_e5m2, qfloat6_e3m2, qfloat5_e2m2,
                        qfloat4_e2m1)
}
qtypes["qfloat8"] = qfloat8_e4m3fn


def get_qtype(value: qtype | str, argument: str = "qtype") -> qtype:
    """Return the qtype for ``value`` (a qtype or its name); raise naming ``argument`` otherwise."""
    if isinstance(value, qtype):
        return value
    if isinstance(value, str) and value in qtypes:
        return qtypes[value]
    raise TypeError(
        f"{argument}={value!r} is not a qcal qtype; expected one of {sorted(qtypes)}"
    )
