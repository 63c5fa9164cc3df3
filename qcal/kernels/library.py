"""qcal's native library: every C kernel as a PyTorch operator (``torch.ops.qcal.*``), built on first use.

The sources are ``qcal/kernels/csrc/*.cpp`` (the linear-layer kernels) and ``qcal/runtime/csrc/*.cpp`` (attention
and the elementwise steps of the generation runtime). Each file defines its operators next to its kernels: one
schema, one CPU implementation that checks every argument, and a Meta implementation for those that compiled
graphs call. They are compiled once per source and PyTorch version with PyTorch's own extension tooling
(``torch.utils.cpp_extension.load``: ninja, its file lock, flags matching the installed torch) into
``$QCAL_CACHE_DIR`` (default ``~/.cache/qcal``), a directory only this user can write to, and a library is
loaded only if its sha256 is the one recorded when it was built.

Nothing is required: without a C++ compiler or ninja, on a CPU without AVX512-BF16/VNNI, or with
``QCAL_NATIVE=0``, :func:`available` is False and the kernels fall back to PyTorch's ops (:func:`status` says why).
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

__all__ = ["available", "status", "disabled", "load", "SOURCE_DIRS"]

SOURCE_DIRS = (Path(__file__).with_name("csrc"), Path(__file__).parents[1] / "runtime" / "csrc")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-fopenmp"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}
_NAME = "qcal_native"

_status: str | None = None
_loaded = False
_disabled = False
_private_fallback: Path | None = None


def _cpu_supported() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return _CPU_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


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


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in d.glob("*.cpp"))


def _build_dir() -> Path:
    """One directory per source content, flags, compiler, torch and Python version (old ones are left alone)."""
    h = hashlib.sha256()
    for p in sorted(p for d in SOURCE_DIRS for p in d.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(_CFLAGS + [os.environ.get("CXX", "")]).encode())
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
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


def _compile_and_load() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    build = _build_dir()
    lib = build / f"{_NAME}.so"
    if lib.exists() and not _trusted(lib):
        lib.unlink()  # ninja rebuilds a missing output
    path = cpp_load(_NAME, [str(p) for p in _sources()], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(d) for d in SOURCE_DIRS], build_directory=str(build),
                    is_python_module=False, verbose=False)
    record = build / "record.tmp"
    record.write_text(_sha256(Path(path or lib)))
    os.replace(record, lib.with_suffix(".sha256"))


def load() -> bool:
    """Build (first time) and load the library; True when its operators are registered. Never raises."""
    global _status, _loaded
    if _status is not None:
        return _loaded
    if os.environ.get("QCAL_NATIVE", "1") == "0":
        _status = "disabled (QCAL_NATIVE=0)"
        return False
    if not _cpu_supported():
        _status = "unavailable: the CPU lacks AVX512-BF16 or AVX512-VNNI"
        return False
    try:
        _compile_and_load()
    except (OSError, RuntimeError, ImportError, ValueError, Exception) as e:  # a failed build is not an error
        lines = str(e).strip().splitlines() or [type(e).__name__]
        _status = f"unavailable: build failed ({next((ln for ln in lines if 'error' in ln), lines[-1]).strip()})"
        warnings.warn(f"qcal: native kernels not built, using PyTorch's ops: {e}", RuntimeWarning, stacklevel=3)
        return False
    _loaded = True
    _status = "available (AVX512-BF16/VNNI, torch.ops.qcal)"
    return True


def available() -> bool:
    """True when the native operators are built and loaded on this machine (and not :func:`disabled`)."""
    return not _disabled and load()


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
