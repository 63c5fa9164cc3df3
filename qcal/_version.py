"""qcal's version (kept in one module of the lowest layer, so that any module may read it)."""

__version__ = "0.1.0"
