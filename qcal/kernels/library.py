"""qcal's native library: every C kernel as a PyTorch operator (``torch.ops.qcal.*``), built on first use.

On AVX512-BF16/VNNI CPUs the sources are ``qcal/kernels/csrc/*.cpp`` (the linear-layer kernels) and
``qcal/runtime/csrc/*.cpp`` (attention and the elementwise steps of the generation runtime): every operator. On
AVX2/FMA CPUs without them (AMD Zen 1-3, most Intel client CPUs) ``qcal/kernels/csrc_avx2/*.cpp`` is built
instead: the same operators, schemas and argument checks for a subset (the bf16 / int8 / int4 small-M matmuls,
8da4w, the weight-only panels, the runtime's attention and elementwise steps) plus a bf16-weight panel;
:func:`isa` says which library is loaded
and :func:`has` whether it registers given operators. Each file defines its operators next to its kernels: one
schema, one CPU implementation that checks every argument, and a Meta implementation for those that compiled
graphs call. They are compiled once per source and PyTorch version with PyTorch's own extension tooling
(``torch.utils.cpp_extension.load``: ninja, its file lock, flags matching the installed torch) into
``$QCAL_CACHE_DIR`` (default ``~/.cache/qcal``), a directory only this user can write to, and a library is
loaded only if its sha256 is the one recorded when it was built.

Nothing is required: without a C++ compiler or ninja, on a CPU without AVX2/FMA/F16C, or with ``QCAL_NATIVE=0``,
nothing is loaded and the kernels fall back to PyTorch's ops (:func:`status` says why). :func:`available` is True
only with the full (AVX-512) operator set; ``QCAL_NATIVE_ISA=avx2`` builds the AVX2 library on an AVX-512 CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["available", "status", "disabled", "load", "isa", "has", "SOURCE_DIRS", "AVX2_SOURCE_DIRS"]

SOURCE_DIRS = (Path(__file__).with_name("csrc"), Path(__file__).parents[1] / "runtime" / "csrc")
AVX2_SOURCE_DIRS = (Path(__file__).with_name("csrc_avx2"),)
# per instruction set: compiler flags, the CPU flags it needs (/proc/cpuinfo names), the source directories
# compiled, the include directories (csrc holds the ISA-neutral headers: ops.h, parallel.h, tiles.h)
_ISAS = {
    "avx512": (["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-fopenmp"],
               {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}, SOURCE_DIRS, SOURCE_DIRS),
    "avx2": (["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], {"avx2", "fma", "f16c"}, AVX2_SOURCE_DIRS,
             AVX2_SOURCE_DIRS + SOURCE_DIRS[:1]),
}
_NAME = "qcal_native"

_status: str | None = None
_loaded = False
_isa: str | None = None
_disabled = False
_private_fallback: Path | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # no /proc/cpuinfo: ask PyTorch
    if probe and probe():
        return set(_ISAS["avx512"][1])
    cap = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return set(_ISAS["avx2"][1]) if cap in ("AVX2", "AVX512") else set()


def _cpu_isa() -> str | None:
    """The library this CPU takes: ``avx512``, ``avx2`` or None (``QCAL_NATIVE_ISA=avx2`` picks AVX2 on an
    AVX-512 CPU)."""
    flags = _cpu_flags()
    usable = [name for name, (_, needs, _, _) in _ISAS.items() if needs <= flags]
    forced = os.environ.get("QCAL_NATIVE_ISA")
    if forced:
        return forced if forced in usable else None
    return usable[0] if usable else None


def _private(path: Path) -> str | None:
    """Why ``path`` is not a directory only this user can write to (None: it is)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {oct(st.st_mode & 0o777)})"
    return None


def _cache_dir() -> Path:
    """``$QCAL_CACHE_DIR`` or ``~/.cache/qcal``, plus ``native``, created 0700.

    A library runs as the calling user, so the directory must be private: one owned by another user or writable
    by others is not used (a private temporary directory of this process is, with a warning)."""
    global _private_fallback
    root = os.environ.get("QCAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qcal")
    path = Path(root) / "native"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        why = _private(path)
    except OSError as e:
        why = f"not usable ({e})"
    if why is None:
        return path
    if _private_fallback is None:
        _private_fallback = Path(tempfile.mkdtemp(prefix="qcal-native-"))
        warnings.warn(f"qcal: kernel cache {path} is {why}; building in the private directory {_private_fallback} "
                      f"instead", RuntimeWarning, stacklevel=4)
    return _private_fallback


def _sources(isa: str) -> list[Path]:
    return sorted(p for d in _ISAS[isa][2] for p in d.glob("*.cpp"))


def _build_dir(isa: str) -> Path:
    """One directory per source content, flags, compiler, torch and Python version (old ones are left alone)."""
    flags, _, _, includes = _ISAS[isa]
    h = hashlib.sha256()
    for p in sorted(p for d in includes for p in d.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(flags + [os.environ.get("CXX", "")]).encode())
    tag = f"{isa}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    path = _cache_dir() / f"{tag}-{h.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _trusted(lib: Path) -> bool:
    """A built library is loaded only if this user owns it, nobody else can write it, and its content hash is the
    one recorded when it was built (a truncated, replaced or planted file is rebuilt instead)."""
    record = lib.with_suffix(".sha256")
    try:
        for p in (lib, record):
            st = p.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
        return record.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _compile_and_load(isa: str) -> None:
    from torch.utils.cpp_extension import load as cpp_load

    flags, _, _, includes = _ISAS[isa]
    build = _build_dir(isa)
    lib = build / f"{_NAME}.so"
    if lib.exists() and not _trusted(lib):
        lib.unlink()  # ninja rebuilds a missing output
    path = cpp_load(_NAME, [str(p) for p in _sources(isa)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(d) for d in includes], build_directory=str(build),
                    is_python_module=False, verbose=False)
    record = build / "record.tmp"
    record.write_text(_sha256(Path(path or lib)))
    os.replace(record, lib.with_suffix(".sha256"))


def load() -> bool:
    """Build (first time) and load the library; True when its operators are registered. Never raises."""
    global _status, _loaded, _isa
    if _status is not None:
        return _loaded
    if os.environ.get("QCAL_NATIVE", "1") == "0":
        _status = "disabled (QCAL_NATIVE=0)"
        return False
    isa = _cpu_isa()
    if isa is None:
        forced = os.environ.get("QCAL_NATIVE_ISA")
        _status = (f"unavailable: QCAL_NATIVE_ISA={forced!r} is not one of this CPU's {_usable_isas()}" if forced
                   else "unavailable: the CPU lacks AVX2/FMA/F16C (and AVX512-BF16/VNNI)")
        return False
    try:
        _compile_and_load(isa)
    except (OSError, RuntimeError, ImportError, ValueError, Exception) as e:  # a failed build is not an error
        lines = str(e).strip().splitlines() or [type(e).__name__]
        _status = f"unavailable: build failed ({next((ln for ln in lines if 'error' in ln), lines[-1]).strip()})"
        warnings.warn(f"qcal: native kernels not built, using PyTorch's ops: {e}", RuntimeWarning, stacklevel=3)
        return False
    global _ops
    _loaded, _isa, _ops = True, isa, _read_ops()
    _status = ("available (AVX512-BF16/VNNI, torch.ops.qcal)" if isa == "avx512" else
               "available (AVX2/FMA, torch.ops.qcal: a subset of the operators)")
    return True


def _usable_isas() -> list[str]:
    flags = _cpu_flags()
    return [name for name, (_, needs, _, _) in _ISAS.items() if needs <= flags]


def isa() -> str | None:
    """The instruction set of the loaded library (``"avx512"``, ``"avx2"``), None when none is (or :func:`disabled`)."""
    return None if _disabled or not load() else _isa


def available() -> bool:
    """True when the full native operator set (the AVX-512 library) is built and loaded on this machine (and not
    :func:`disabled`); the AVX2 library's subset is asked for with :func:`has`."""
    return isa() == "avx512"


def has(*ops: str) -> bool:
    """True when the loaded library (either instruction set, not :func:`disabled`) registers every operator in
    ``ops`` (names in ``torch.ops.qcal``)."""
    return isa() is not None and all(op in _ops for op in ops)


_ops: frozenset[str] = frozenset()  # the loaded library's operators (read once: has() is plain Python under tracing)


def _read_ops() -> frozenset[str]:
    return frozenset(name.split("::", 1)[1].split(".", 1)[0] for name in torch._C._dispatch_get_all_op_names()
                     if name.startswith("qcal::"))


def status() -> str:
    """Why the native kernels are or are not used."""
    load()
    return "disabled (qcal.kernels.native.disabled)" if _disabled else (_status or "unknown")


@contextlib.contextmanager
def disabled(when: bool = True) -> Iterator[None]:
    """Within the block :func:`available` is False (if ``when``), so modules frozen there choose PyTorch's ops
    instead (to compare the two); modules that already chose a native kernel keep it."""
    global _disabled
    saved, _disabled = _disabled, _disabled or when
    try:
        yield
    finally:
        _disabled = saved
