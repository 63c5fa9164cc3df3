"""qcal's own CPU kernels for AVX512-BF16/VNNI CPUs, built on first use (sources in ``csrc/``).

* ``int4_small_m.c``: int4 x bf16 (a nibble becomes a bf16 with one bit operation, 32 weights per
  ``vdpbf16ps``; 1.4-2.1x PyTorch's tinygemm at decode shapes with cached weights, on par when the
  weights stream from DRAM), and 8da4w with the per-row int8 quantization fused and the codes
  multiplied through VNNI (exact integer sums, any number of rows);
* ``int8_small_m.c``: A8W8 (row quantization fused, VNNI, the weight read in place: the integers of
  ``torch._int_mm``) and int8 weight-only (bf16 dot products on the weight in place), small M;
* ``dequant_int4.c``: one-pass int4 -> bf16 (fp32 inputs' large-M path);
* ``panel_mm.c``: large-M (prefill) A8W8, int8 and int4 weight-only GEMMs on the canonical weights, each
  thread re-laying a panel of its rows at a time (no second copy of the weight);
* ``decode_attention.c``: one-query attention over a bf16 KV cache (:mod:`qcal.kernels.attention`);
* ``prefill_attention.c``: causal attention of many query positions over a bf16 KV cache (flash style);
* ``decode_ops.c``: a Llama layer's elementwise steps (residual add + RMSNorm, rotary embedding into the
  KV cache, SiLU x up) with Hugging Face's bf16 rounding, one call each (:mod:`qcal.generation`).
Figures: ``benchmarks/bench_kernels.py``, BENCHMARKS.md.

The C source is compiled once per source/compiler/torch version with the system C compiler (``$CC``,
else ``gcc``/``cc``) into ``$QCAL_CACHE_DIR`` (default ``~/.cache/qcal``) and loaded with ctypes; its
OpenMP runtime is the one PyTorch already loaded, so it follows ``torch.set_num_threads``. Nothing
is required: without a compiler or an AVX512-BF16 CPU, or with ``QCAL_NATIVE=0``, :func:`available`
is False and the kernels fall back to PyTorch's ops (``native_status()`` says why).
Under ``torch.compile`` the kernels are operators (``torch.ops.qcal.int4_mm_small`` and the rest),
registered in C++ (``csrc/ops.cpp``, built against PyTorch's headers with ``$CXX``/``g++``) so that a
compiled decode step pays ~3 us per call; where that build fails, the same operators are registered
from Python (~10 us).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["available", "native_status", "disabled", "pack_int4", "pack_scales", "int4_mm_small", "supports_shape",
           "decode_attention", "attention_supported", "set_prefetch", "int8_row_sums", "int8_mm_q8",
           "dequant_int4", "int8wo_mm", "pack_int4_vnni", "int4_mm_q8", "add_rmsnorm", "rope_store", "silu_mul",
           "a8w8_mm_panel", "w8_mm_panel", "w4_mm_panel", "panel_supported", "prefill_attention"]

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "int4_small_m.c", _CSRC / "int8_small_m.c", _CSRC / "decode_attention.c", _CSRC / "prefetch.c",
            _CSRC / "dequant_int4.c", _CSRC / "decode_ops.c", _CSRC / "panel_mm.c",
            _CSRC / "prefill_attention.c")
_HEADERS = (_CSRC / "bf16.h", _CSRC / "prefetch.h", _CSRC / "rowquant.h", _CSRC / "vexp.h", _CSRC / "tiles.h",
            _CSRC / "a8w8.h")
_OP_SOURCE = _CSRC / "ops.cpp"
_CFLAGS = ["-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma",
           "-fopenmp", "-fPIC"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}
MAX_GROUPS = 1024  # as in the C source

_P, _I, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int  # pointer, size, thread count (or flag)
_SIGNATURES = {  # the C functions' arguments; every one returns an int status (0 = done)
    "qcal_int4_mm_small": [_P, _P, _P, _N, _P, _I, _I, _I, _I, _N],
    "qcal_decode_attention": [_P] * 5 + [_I] * 8 + [ctypes.c_float, _N],
    "qcal_int8_mm_small_q8": [_P] * 5 + [_I] * 3 + [_N],
    "qcal_int8wo_mm_small": [_P] * 4 + [_I] * 3 + [_N],
    "qcal_int4_mm_q8_vnni": [_P] * 4 + [_I] * 4 + [_N],
    "qcal_dequant_int4": [_P] * 4 + [_I] * 3 + [_N],
    "qcal_a8w8_mm_panel": [_P] * 5 + [_I] * 3 + [_N],
    "qcal_w8_mm_panel": [_P] * 4 + [_I] * 3 + [_N],
    "qcal_w4_mm_panel": [_P] * 5 + [_I] * 4 + [_N],
    "qcal_prefill_attention": [_P, _I, _P, _P, _I, _I, _P] + [_I] * 6 + [ctypes.c_float, _N],
    "qcal_add_rmsnorm": [_P] * 4 + [_I] * 2 + [ctypes.c_float],
    "qcal_rope_store": [_P, _I, _P] + [_I] * 5 + [_P] * 2,
    "qcal_silu_mul": [_P] * 2 + [_I],
}

_lib: ctypes.CDLL | None = None
_status: str | None = None
_disabled = False
_LIBRARY: torch.library.Library | None = None  # the Python-registered operator, where C++ could not be built


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


_PRIVATE_FALLBACK: Path | None = None


def _private(path: Path) -> str | None:
    """Why ``path`` is not a directory only this user can write to (None: it is)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {oct(st.st_mode & 0o777)})"
    return None


def _cache_dir() -> Path:
    """The build cache: ``$QCAL_CACHE_DIR`` or ``~/.cache/qcal``, plus ``native``, created 0700.

    A library is run as the calling user, so the directory must be private: one that is owned by another
    user or writable by others is not used (a private temporary directory of this process is, with a
    warning)."""
    global _PRIVATE_FALLBACK
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
    if _PRIVATE_FALLBACK is None:
        _PRIVATE_FALLBACK = Path(tempfile.mkdtemp(prefix="qcal-native-"))
        warnings.warn(f"qcal: kernel cache {path} is {why}; building in the private directory {_PRIVATE_FALLBACK} "
                      f"instead", RuntimeWarning, stacklevel=4)
    return _PRIVATE_FALLBACK


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _trusted(lib: Path) -> bool:
    """A cached library is loaded only if this user owns it, nobody else can write it, and its content hash
    is the one recorded when it was built (a truncated, replaced or planted file is rebuilt instead)."""
    record = lib.with_suffix(".sha256")
    try:
        st = lib.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
        rst = record.stat()
        if rst.st_uid != os.getuid() or rst.st_mode & 0o022:
            return False
        return record.read_text().strip() == _file_sha256(lib)
    except OSError:
        return False


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip()[-500:]}")


def _torch_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for a C++ file using PyTorch's headers and libraries."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cflags = [f"-I{p}" for p in include_paths()] + [
        "-O2", "-std=c++17", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    libs = library_paths()
    ldflags = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    return cflags, ldflags


def _build(cc: str, cxx: str | None) -> Path:
    """The shared library: the C kernel, plus the C++ operator when ``cxx`` is given. Cached by content."""
    versions = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(src.read_text() for src in _SOURCES + _HEADERS), versions, " ".join(_CFLAGS)]
    if cxx:
        versions = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        parts += [_OP_SOURCE.read_text(), versions, torch.__version__]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = _cache_dir() / f"qcal_native{'_op' if cxx else ''}-{key}.so"
    if _trusted(out):
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        objs = [str(Path(tmp) / (src.stem + ".o")) for src in _SOURCES]
        for src, obj in zip(_SOURCES, objs, strict=True):
            _run([cc, *_CFLAGS, "-c", str(src), "-o", obj])
        if cxx:
            cflags, ldflags = _torch_flags()
            _run([cxx, *cflags, "-shared", str(_OP_SOURCE), *objs, "-o", str(tmp_out), "-fopenmp", "-lm", *ldflags])
        else:
            _run([cc, "-shared", "-fopenmp", *objs, "-o", str(tmp_out), "-lm"])
        record = Path(tmp) / "record"
        record.write_text(_file_sha256(tmp_out))
        os.replace(record, out.with_suffix(".sha256"))  # the hash first: a reader never trusts a file without one
        os.replace(tmp_out, out)  # atomic: concurrent builders never load a half-written file
    return out


def _register_python_op() -> None:
    """Fallback when the C++ operator could not be built: the same op with a Python CPU kernel."""
    global _LIBRARY
    _LIBRARY = torch.library.Library("qcal", "FRAGMENT")
    _LIBRARY.define("int4_mm_small(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor")
    _LIBRARY.impl("int4_mm_small", lambda x, w, sz, has_zero, group_size: _call(x, w, sz, has_zero, group_size),
                  "CPU")
    _LIBRARY.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
    _LIBRARY.impl("decode_attention", _attention_ctypes, "CPU")
    _LIBRARY.define("int8_mm_q8(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor")
    _LIBRARY.impl("int8_mm_q8", lambda x, w, wsum, ws: mm8_unchecked(x.contiguous(), w, wsum, ws), "CPU")
    _LIBRARY.define("int4_mm_q8(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor")
    _LIBRARY.impl("int4_mm_q8", lambda x, w, sz, group_size: mm4q8_unchecked(x.contiguous(), w, sz, group_size), "CPU")
    _LIBRARY.define("int8wo_mm(Tensor x, Tensor w, Tensor ws) -> Tensor")
    _LIBRARY.impl("int8wo_mm", lambda x, w, ws: mm8wo_unchecked(x.contiguous(), w, ws), "CPU")


def _register_fake() -> None:
    @torch.library.register_fake("qcal::int4_mm_small")
    def _(x, w, sz, has_zero, group_size):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qcal::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(1, 1, q.shape[1], q.shape[3])

    @torch.library.register_fake("qcal::int8_mm_q8")
    def _(x, w, wsum, ws):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qcal::int4_mm_q8")
    def _(x, w, sz, group_size):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qcal::int8wo_mm")
    def _(x, w, ws):
        return x.new_empty(x.shape[0], w.shape[0])


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is not None:
        return _lib
    if os.environ.get("QCAL_NATIVE", "1") == "0":
        _status = "disabled (QCAL_NATIVE=0)"
        return None
    if not _cpu_supported():
        _status = "unavailable: the CPU lacks AVX512-BF16 or AVX512-VNNI"
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        _status = "unavailable: no C compiler (set CC)"
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    path, op = None, False
    if cxx and os.environ.get("QCAL_NATIVE_OP", "1") != "0":
        try:  # the C++ operator is a speed-up for compiled graphs only: its failure is not an error
            path = _build(cc, cxx)
            torch.ops.load_library(str(path))
            op = True
        except (OSError, RuntimeError, subprocess.SubprocessError, ImportError):
            path = None
    try:
        path = path or _build(cc, None)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"unavailable: build failed ({e})"
        warnings.warn(f"qcal: native int4 kernel not built (nor the other native kernels), using PyTorch's ops: {e}",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    except AttributeError as e:
        _status = f"unavailable: {path} is not qcal's kernel library ({e})"
        warnings.warn(f"qcal: {_status}; using PyTorch's ops", RuntimeWarning, stacklevel=3)
        return None
    lib.qcal_set_prefetch.argtypes = [ctypes.c_int]
    lib.qcal_set_prefetch(int(os.environ.get("QCAL_PREFETCH", "0") == "1"))
    if not op:
        _register_python_op()
    _register_fake()
    _lib = lib
    _status = f"available (AVX512-BF16; {'C++' if op else 'Python'} operator for torch.compile)"
    return _lib


def available() -> bool:
    """True when the native kernel is built and loadable on this machine (and not :func:`disabled`)."""
    return not _disabled and _load() is not None


def native_status() -> str:
    """Why the native kernel is or is not used."""
    _load()
    return "disabled (qcal.kernels.native.disabled)" if _disabled else (_status or "unknown")


@contextlib.contextmanager
def disabled(when: bool = True) -> Iterator[None]:
    """Within the block :func:`available` is False (if ``when``), so modules frozen there choose PyTorch's
    ops instead (to compare the two); modules that already chose the native kernel keep it."""
    global _disabled
    saved, _disabled = _disabled, _disabled or when
    try:
        yield
    finally:
        _disabled = saved


def set_prefetch(on: bool) -> None:
    """Turn the matmul kernels' next-call weight prefetch on or off (default off; ``QCAL_PREFETCH=1``: on).

    The kernels learn the order in which weights are called (a decode step repeats it every token)
    and, while one call computes, pull the next call's weight into each thread's L2. On the 2-core
    development machine it made no difference above the run-to-run noise (BENCHMARKS.md), so it is
    off unless asked for.
    """
    if _load() is not None:
        _lib.qcal_set_prefetch(int(on))


def supports_shape(n: int, k: int, group_size: int) -> bool:
    """Shapes the kernel handles: ``n % 16 == 0``, ``k % 8 == 0``, groups of a multiple of 8 dividing ``k``."""
    return n % 16 == 0 and k % 8 == 0 and group_size % 8 == 0 and k % group_size == 0 and \
        k // group_size <= MAX_GROUPS


def _input(op: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """The checks every eager entry point makes on its activations (library loaded, 2-D bf16 CPU, ``k``
    columns); returns them contiguous."""
    if _load() is None:
        raise RuntimeError(f"qcal native kernels {native_status()}")
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k:
        raise TypeError(f"{op}: x must be a 2-D bf16 CPU tensor with {k} columns, got {x.dtype} {tuple(x.shape)} "
                        f"on {x.device}")
    return x.contiguous()


def _rows_out(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
    """``(M, K, N, y)`` of ``x (M, K)`` times a weight of ``N`` rows: the sizes and the bf16 output to fill.

    Every matmul entry point, checked or not, passes here: ``x`` must be 2-D with the weight's ``K`` columns
    (int4 weights hold two per byte), else the C kernel would read past the weight."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"qcal native: x and w must be 2-D, got {tuple(x.shape)} and {tuple(w.shape)}")
    m, k = x.shape
    wk = w.shape[1] * 2 if w.dtype == torch.uint8 else w.shape[1]
    if k != wk:
        raise ValueError(f"qcal native: the input has {k} features but the weight expects {wk}")
    n = w.shape[0]
    return m, k, n, torch.empty((m, n), dtype=torch.bfloat16)


def _checked(rc: int, what: str) -> None:
    """Raise for a C kernel's return code (-2: out of memory, else: arguments it refused)."""
    if rc:
        raise (MemoryError if rc == -2 else ValueError)(f"qcal native {what} kernel failed (code {rc})")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``(N, K)`` (uint8, 0..15) -> the kernel's layout, ``(N, K/2)`` uint8.

    Blocks of 16 rows; per block, octets of 8 columns as 32 16-bit words, nibble ``q`` of word ``j``
    holding ``codes[row j // 2, 8 o + 2 q + j % 2]``.
    """
    n, k = codes.shape
    b = codes.view(n // 16, 16, k // 8, 4, 2).to(torch.int32).permute(0, 2, 1, 4, 3)  # [blk, oct, row, e, q]
    words = b[..., 0] | (b[..., 1] << 4) | (b[..., 2] << 8) | (b[..., 3] << 12)
    return words.to(torch.uint16).contiguous().view(torch.uint8).reshape(n, k // 2)


def pack_int4_vnni(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``(N, K)`` -> the 8da4w VNNI kernel's layout, ``(N, K/2)`` uint8.

    Blocks of 16 rows; per block, octets of 8 columns as 64 bytes, row ``r``'s 4 bytes at ``4 r``, byte ``i``
    holding ``codes[r, 8 o + i] | codes[r, 8 o + 4 + i] << 4``.
    """
    n, k = codes.shape
    b = codes.view(n // 16, 16, k // 8, 2, 4)
    packed = b[:, :, :, 0] | (b[:, :, :, 1] << 4)  # [blk, row, oct, i]
    return packed.permute(0, 2, 1, 3).contiguous().view(n, k // 2)


def mm4q8_unchecked(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """8da4w in one call through VNNI: ``x (M, K)`` contiguous bf16 rows quantized as
    :func:`qcal.kernels.common.quantize_per_token`, times ``w`` from :func:`pack_int4_vnni` with symmetric
    scales from :func:`pack_scales`; ``(M, N)`` bf16. No argument checks."""
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_int4_mm_q8_vnni(x.data_ptr(), w.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group_size,
                                       torch.get_num_threads()), "8da4w")
    return y


def int4_mm_q8(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`mm4q8_unchecked` with checks (eager) or as the operator ``qcal::int4_mm_q8`` (traced)."""
    if torch.compiler.is_compiling():
        return torch.ops.qcal.int4_mm_q8(x, w, sz, group_size)
    x = _input("int4_mm_q8", x, w.shape[1] * 2)
    if not supports_shape(w.shape[0], x.shape[1], group_size):
        raise ValueError(f"int4_mm_q8: unsupported shape (N={w.shape[0]}, K={x.shape[1]}, group_size={group_size})")
    return mm4q8_unchecked(x, w, sz, group_size)


def pack_scales(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Per-group ``scale`` and ``offset`` ``(N, G)`` (``w = (u - 8) * scale - offset``) -> ``(N/16, G, 2, 16)``.

    The values are bf16, stored as their int16 bit patterns so that ``model.to(dtype)`` leaves them alone.
    """
    n, g = scale.shape
    off = torch.zeros_like(scale) if offset is None else offset
    sz = torch.stack((scale.float().view(n // 16, 16, g), off.float().view(n // 16, 16, g)), dim=2)
    return sz.permute(0, 3, 2, 1).to(torch.bfloat16).contiguous().view(torch.int16)


def mm_unchecked(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, has_zero: bool, group_size: int) -> torch.Tensor:
    """:func:`int4_mm_small` without argument checks, for eager callers that guarantee a contiguous bf16
    CPU ``x`` and a supported shape (the frozen-module kernels): eager decode is per-call overhead bound."""
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_int4_mm_small(x.data_ptr(), w.data_ptr(), sz.data_ptr(), has_zero, y.data_ptr(), m, n, k,
                                     group_size, torch.get_num_threads()), "int4")
    return y


def dequant_int4(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """The bf16 weight ``(u - 8 - zp) * s`` of canonical packed int4 codes ``(N, K/2)`` in one pass, or None
    where the kernel does not apply (groups not a multiple of 32, not available, tracing): the caller then
    dequantizes with PyTorch ops."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    gs = k // scale.shape[1]
    if gs % 32 or torch.compiler.is_compiling() or not available() or qweight.device.type != "cpu":
        return None
    s = scale.float().contiguous()
    zp = None if zero_point is None else zero_point.float().contiguous()
    w = torch.empty((n, k), dtype=torch.bfloat16)
    rc = _lib.qcal_dequant_int4(qweight.contiguous().data_ptr(), s.data_ptr(), None if zp is None else zp.data_ptr(),
                                w.data_ptr(), n, k, gs, torch.get_num_threads())
    return w if rc == 0 else None


def int8_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int32 row sums of an int8 weight ``(N, K)``, which the A8W8 kernel needs (it reads the weight
    itself in place)."""
    out = torch.empty(qweight.shape[0], dtype=torch.int32, device=qweight.device)
    for i in range(0, qweight.shape[0], 64):  # in row blocks: a whole-tensor int32 copy would inflate peak memory
        torch.sum(qweight[i:i + 64], dim=1, dtype=torch.int32, out=out[i:i + 64])
    return out


def mm8_unchecked(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """A8W8 with the per-row quantization fused: ``x (M, K)`` contiguous bf16, ``w`` the contiguous ``(N, K)``
    int8 weight, ``wsum`` its :func:`int8_row_sums`, ``ws`` the ``(N,)`` float32 weight scales; ``(M, N)`` bf16.
    No argument checks."""
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_int8_mm_small_q8(x.data_ptr(), w.data_ptr(), wsum.data_ptr(), ws.data_ptr(), y.data_ptr(), m,
                                        n, k, torch.get_num_threads()), "A8W8")
    return y


def int8_mm_q8(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8 ``x (M, K) bf16`` times the int8 weight ``w (N, K)`` (see :func:`mm8_unchecked`),
    rescaled by the row and weight scales: the numbers of ``quantize_per_token`` + ``torch._int_mm``."""
    if torch.compiler.is_compiling():
        return torch.ops.qcal.int8_mm_q8(x, w, wsum, ws)
    x = _input("int8_mm_q8", x, w.shape[1])
    if not w.is_contiguous() or w.dtype != torch.int8:
        raise ValueError(f"int8_mm_q8: unsupported shape or layout of w ({tuple(w.shape)}, {w.dtype}; needs a "
                         f"contiguous int8 tensor)")
    return mm8_unchecked(x, w, wsum, ws)


def mm8wo_unchecked(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """int8 weight-only: ``x (M, K)`` contiguous bf16 times the contiguous ``(N, K)`` int8 weight, scaled by
    ``ws`` (``(N,)`` float32) in fp32; ``(M, N)`` bf16. No argument checks."""
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_int8wo_mm_small(x.data_ptr(), w.data_ptr(), ws.data_ptr(), y.data_ptr(), m, n, k,
                                       torch.get_num_threads()), "int8 weight-only")
    return y


def int8wo_mm(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``x (M, K) bf16 @ (w * ws)^T`` for an int8 weight ``w (N, K)`` with per-channel scales ``ws``, in fp32."""
    if torch.compiler.is_compiling():
        return torch.ops.qcal.int8wo_mm(x, w, ws)
    x = _input("int8wo_mm", x, w.shape[1])
    if not w.is_contiguous() or w.dtype != torch.int8:
        raise ValueError("int8wo_mm: w must be a contiguous int8 tensor")
    return mm8wo_unchecked(x, w, ws)


def _call(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, has_zero: bool, group_size: int) -> torch.Tensor:
    """:func:`mm_unchecked` behind the checks a public entry point needs."""
    x = _input("int4_mm_small", x, w.shape[1] * 2)
    if not supports_shape(w.shape[0], x.shape[1], group_size):
        raise ValueError(f"int4_mm_small: unsupported shape (M={x.shape[0]}, N={w.shape[0]}, K={x.shape[1]}, "
                         f"group_size={group_size})")
    return mm_unchecked(x, w, sz, has_zero, group_size)


def int4_mm_small(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, has_zero: bool,
                  group_size: int) -> torch.Tensor:
    """``x (M, K) bf16 @ W^T`` for a weight packed by :func:`pack_int4` / :func:`pack_scales`; ``(M, N)`` bf16.

    Eager calls go straight to the C function (a few microseconds less per call than the
    dispatcher); traced calls use the custom op ``qcal::int4_mm_small``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.qcal.int4_mm_small(x, w, sz, has_zero, group_size)
    return _call(x, w, sz, has_zero, group_size)


def attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes these inputs (one query, batch 1, bf16 on the CPU)."""
    return (q.dim() == 4 and k.dim() == 4 and q.shape[0] == 1 and q.shape[2] == 1 and k.shape == v.shape
            and k.shape[0] == 1 and k.shape[3] == q.shape[3] and q.shape[3] % 16 == 0 and q.shape[3] <= 256
            and q.shape[1] % k.shape[1] == 0 and q.shape[1] // k.shape[1] <= 16
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
            and k.stride(3) == 1 and v.stride(3) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.numel() == k.shape[2]))
            and available())


def _attention_ctypes(q, k, v, mask, scale):
    """The Python-registered ``qcal::decode_attention`` (where the C++ operator could not be built)."""
    qc = q.contiguous()
    m = None if mask is None else mask.reshape(-1).contiguous()
    out = torch.empty((1, 1, q.shape[1], q.shape[3]), dtype=torch.bfloat16)
    rc = _lib.qcal_decode_attention(qc.data_ptr(), k.data_ptr(), v.data_ptr(), None if m is None else m.data_ptr(),
                                    out.data_ptr(), q.shape[1], k.shape[1], k.shape[2], q.shape[3], k.stride(1),
                                    k.stride(2), v.stride(1), v.stride(2), float(scale), torch.get_num_threads())
    _checked(rc, "decode attention")
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``softmax(scale q K^T + mask) V`` for one query position: ``q (1, H, 1, D)``, ``k``/``v``
    ``(1, H_kv, L, D)`` (bf16, grouped heads allowed), ``mask`` a bool tensor of ``L`` entries (True = attend)
    or None; returns ``(1, 1, H, D)`` bf16 (Hugging Face's attention-output layout). See
    :func:`attention_supported`.
    """
    if not attention_supported(q, k, v, mask):
        raise ValueError(f"decode_attention: unsupported inputs q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                         f"mask {None if mask is None else (tuple(mask.shape), mask.dtype)} ({native_status()})")
    return torch.ops.qcal.decode_attention(q, k, v, mask, scale)


def panel_supported(n: int, k: int, group_size: int | None = None) -> bool:
    """Shapes the panel (large-M) kernels take: ``n % 16 == 0``, ``k % 4 == 0`` (int4: groups of a multiple of 8
    dividing ``k``)."""
    ok = n % 16 == 0 and k % 4 == 0 and 0 < k <= 1 << 26
    return ok if group_size is None else ok and group_size % 8 == 0 and k % group_size == 0


def _panel_args(op: str, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype,
                group_size: int | None = None) -> torch.Tensor:
    """The checks of the panel kernels' entry points (bf16 rows, a contiguous weight of ``dtype``, a shape
    :func:`panel_supported` takes); returns ``x`` contiguous."""
    packed = 2 if dtype == torch.uint8 else 1  # int4 codes: two a byte
    x = _input(op, x, w.shape[1] * packed)
    if w.dtype != dtype or not w.is_contiguous() or not panel_supported(w.shape[0], x.shape[1], group_size):
        raise ValueError(f"{op}: unsupported weight {w.dtype} {tuple(w.shape)} (contiguous={w.is_contiguous()}, "
                         f"group_size={group_size}); needs contiguous {dtype}, rows % 16 == 0, columns % 4 == 0")
    return x


def a8w8_mm_panel(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """:func:`mm8_unchecked`'s numbers for many rows (prefill): ``x (M, K)`` contiguous bf16, ``w (N, K)`` contiguous
    int8, ``wsum`` its int32 row sums, ``ws (N,)`` float32; ``(M, N)`` bf16. Shapes: :func:`panel_supported`."""
    x = _panel_args("a8w8_mm_panel", x, w, torch.int8)
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_a8w8_mm_panel(x.data_ptr(), w.data_ptr(), wsum.data_ptr(), ws.data_ptr(), y.data_ptr(), m, n,
                                     k, torch.get_num_threads()), "A8W8 panel")
    return y


def w8_mm_panel(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """int8 weight-only for many rows: ``x (M, K)`` contiguous bf16 times ``(w * ws)^T`` (``w (N, K)`` contiguous
    int8, ``ws (N,)`` float32), fp32 sums; ``(M, N)`` bf16."""
    x = _panel_args("w8_mm_panel", x, w, torch.int8)
    m, k, n, y = _rows_out(x, w)
    _checked(_lib.qcal_w8_mm_panel(x.data_ptr(), w.data_ptr(), ws.data_ptr(), y.data_ptr(), m, n, k,
                                   torch.get_num_threads()), "int8 weight-only panel")
    return y


def w4_mm_panel(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """int4 weight-only for many rows: ``x (M, K)`` contiguous bf16 times the weight :func:`dequant_int4` would
    build from canonical codes ``qweight (N, K/2)`` and float32 ``scale``/``zero_point`` ``(N, K/gs)`` (contiguous),
    without building it; fp32 sums, ``(M, N)`` bf16."""
    x = _panel_args("w4_mm_panel", x, qweight, torch.uint8, group_size)
    m, k, n, y = _rows_out(x, qweight)
    _checked(_lib.qcal_w4_mm_panel(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                                   None if zero_point is None else zero_point.data_ptr(), y.data_ptr(), m, n, k,
                                   group_size, torch.get_num_threads()), "int4 weight-only panel")
    return y


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of ``q (n, H, D)`` (query ``i`` at position ``start + i``) over the first ``start + n``
    positions of ``k``/``v`` ``(H_kv, >= start + n, D)`` (bf16, any head and position strides, last dimension
    contiguous; grouped heads allowed); returns ``(n, H, D)`` bf16. fp32 scores and softmax, probabilities
    rounded to bf16 for the value product (as flash attention does), one rounding of the output."""
    _bf16_rows("prefill_attention", q=q)
    n, hq, d = q.shape
    if (q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.stride() != v.stride() or k.shape[2] != d
            or k.stride(2) != 1 or k.shape[1] < start + n or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16
            or hq % k.shape[0] or d % 16 or d > 256 or start < 0):
        raise ValueError(f"prefill_attention: unsupported q {tuple(q.shape)}, k {tuple(k.shape)} {k.dtype} (strides "
                         f"{k.stride()}), v {tuple(v.shape)}, start {start}")
    out = torch.empty_like(q)
    _checked(_lib.qcal_prefill_attention(q.data_ptr(), hq * d, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                                         out.data_ptr(), hq * d, n, hq, k.shape[0], start, d, float(scale),
                                         torch.get_num_threads()), "prefill attention")
    return out


def _bf16_rows(op: str, **tensors: torch.Tensor) -> None:
    if _load() is None:
        raise RuntimeError(f"qcal native kernels {native_status()}")
    for name, t in tensors.items():
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"{op}: {name} must be a contiguous bf16 CPU tensor, got {t.dtype} {tuple(t.shape)} "
                            f"on {t.device}")


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` in place (when given), then ``LlamaRMSNorm`` of the rows of ``x (M, N)`` with ``weight (N,)``,
    rounded as Hugging Face's bf16 ops; returns ``out`` (allocated when None)."""
    out = torch.empty_like(x) if out is None else out
    extra = {} if delta is None else {"delta": delta}
    _bf16_rows("add_rmsnorm", x=x, weight=weight, out=out, **extra)
    if x.dim() != 2 or weight.shape != (x.shape[1],) or out.shape != x.shape or (
            delta is not None and delta.shape != x.shape):
        raise ValueError(f"add_rmsnorm: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, out "
                         f"{tuple(out.shape)}, delta {None if delta is None else tuple(delta.shape)}")
    _checked(_lib.qcal_add_rmsnorm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                                   out.data_ptr(), x.shape[0], x.shape[1], float(eps)), "rmsnorm")
    return out


def rope_store(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """Rotary embedding (Hugging Face's rotate-half form, bf16 rounding) of ``src (M, H, D)`` written to ``dst``
    (any strides, last dimension contiguous; ``dst`` may be ``src``); ``cos``/``sin`` ``(M, D)``. With ``cos``
    None: a plain copy."""
    _bf16_rows("rope_store", src=src, **({} if cos is None else {"cos": cos, "sin": sin}))
    m, h, d = src.shape
    if dst.shape != src.shape or dst.dtype != torch.bfloat16 or dst.stride(2) != 1 or (
            cos is not None and (cos.shape != (m, d) or sin is None or sin.shape != (m, d))):
        raise ValueError(f"rope_store: shapes src {tuple(src.shape)}, dst {tuple(dst.shape)} (stride "
                         f"{dst.stride()}), cos {None if cos is None else tuple(cos.shape)}")
    _checked(_lib.qcal_rope_store(src.data_ptr(), h * d, dst.data_ptr(), dst.stride(0), dst.stride(1), m, h, d,
                                  None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr()),
             "rope")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate = silu(gate) * up`` in place, each step rounded to bf16 as in Hugging Face's ``LlamaMLP``."""
    _bf16_rows("silu_mul", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    _checked(_lib.qcal_silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel()), "silu_mul")
    return gate
