"""Grouped GEMMs on a CPU that use every thread on every group size (``cpu_gemm.cpp``).

torch's CPU ``_grouped_mm`` runs one multi-threaded GEMM per group; small or uneven groups
leave threads idle, and the weight gradients are the worst (measured on 2 cores: 1.2x-1.4x
the time of ``bmm`` on equal groups). The kernel here splits the work, not each GEMM:
equal row ranges per thread for the products over rows, whole groups per thread for the
weight gradients, with torch's own single-threaded MKL sgemm inside, or for groups of up
to 64 rows the library's own AVX2 code (see the .cpp). The same library holds the MoE
layer's other CPU loops that torch would run as many small ops: the one-pass weighted
combine (``weighted_scatter``), capacity slots in GShard's priority order (``assign_slots``)
and the kept assignments' dispatch order (``pack_order``).

It is compiled once per (source, torch build, compiler) on first use, in about a second,
into ``$MOEDSL_CACHE_DIR`` (default ``~/.cache/moedsl``), and loaded with ctypes: no
torch headers, no build step at install. Where it cannot be used (not Linux, a torch
without MKL or OpenMP, no C++ compiler, or ``MOEDSL_CPU_KERNEL=0``) ``available()`` is
False, the reason is in ``why_unavailable()``, moedsl warns once (a RuntimeWarning, whatever the
reason) and callers fall back to torch's ops.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

_SRC = Path(__file__).with_name("cpu_gemm.cpp")
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared"]
# one group's call and [K, n] output cost about as much as this many rows of its GEMM
GROUP_ROWS = 16

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_why: Optional[str] = None
_tried = False

_p, _i, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def _unsupported() -> Optional[str]:
    if os.environ.get("MOEDSL_CPU_KERNEL", "1") == "0":
        return "disabled by MOEDSL_CPU_KERNEL=0"
    if not sys.platform.startswith("linux"):
        return f"built only on Linux (this is {sys.platform})"
    if not torch.backends.mkl.is_available():
        return "this torch build has no MKL (the kernel calls torch's MKL sgemm)"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "this torch build does not use OpenMP threads"
    if not (_torch_lib() / "libtorch_cpu.so").exists():
        return f"no libtorch_cpu.so in {_torch_lib()}"
    if _compiler() is None:
        return "no C++ compiler (set CXX, or install g++)"
    return None


def _torch_lib() -> Path:
    return Path(torch.__file__).resolve().parent / "lib"


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> Path:
    base = os.environ.get("MOEDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moedsl")
    return Path(base) / "kernels"


def _build() -> Path:
    """Compile the kernel (or find it compiled) and return the shared library's path."""
    cxx, lib = _compiler(), _torch_lib()
    cmd_tail = [*_FLAGS, "-L", str(lib), "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    key = hashlib.sha256(b"\0".join([_SRC.read_bytes(), " ".join(cmd_tail).encode(), torch.__version__.encode(),
                                     cxx.encode()])).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"moedsl-kernels-{os.getuid()}"):
        out = folder / f"cpu_gemm-{key}.so"
        if out.exists():
            return out
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue  # an unwritable cache: try the next place
        tmp = folder / f".{out.name}.{os.getpid()}.tmp"  # ranks of one job may build at once
        proc = subprocess.run([cxx, str(_SRC), "-o", str(tmp), *cmd_tail], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a reader sees the whole library or none
        return out
    raise RuntimeError(f"no writable cache folder (tried {_cache_dir()})")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build()))
    lib.moedsl_gmm_rows.argtypes = [_p, _i, _p, _i64, _i, _i, _p, _i, _i, _i, _p, _i, _i]
    lib.moedsl_gmm_rows.restype = None
    lib.moedsl_gmm_wgrad.argtypes = [_p, _i, _p, _i, _p, _i, _i, _i, _p, _i, _i, _i64]
    lib.moedsl_gmm_wgrad.restype = None
    lib.moedsl_combine_fwd.argtypes = [_p, _i, _p, _p, _i64, _i, _p, _i, _i]
    lib.moedsl_combine_fwd.restype = None
    lib.moedsl_combine_bwd.argtypes = [_p, _i, _p, _p, _i64, _i, _p, _i, _p, _p, _i]
    lib.moedsl_combine_bwd.restype = None
    lib.moedsl_assign_slots.argtypes = [_p, _p, _i64, _i64, _i, _i64, _i64, _p]
    lib.moedsl_assign_slots.restype = _i64
    lib.moedsl_pack_order.argtypes = [_p, _p, _i64, _i64, _p, _p]
    lib.moedsl_pack_order.restype = _i64
    lib.moedsl_check_offsets.argtypes = [_p, _i, _i64]
    lib.moedsl_check_offsets.restype = _i64
    lib.moedsl_small_kernels.argtypes = [_i]
    lib.moedsl_small_kernels.restype = _i
    # check it computes what it should before trusting it (a BLAS ABI mismatch would not)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 24, generator=g), torch.randn(3, 24, 40, generator=g)
    offs = torch.tensor([0, 20, 20, 37])
    with torch.autocast("cpu", enabled=False):  # first use may come inside a bfloat16 autocast region
        want = torch.cat([x[:20] @ w[0], x[20:] @ w[2]])
    got = _rows(lib, x, w, offs, transpose=False, threads=2)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("the compiled kernel's self-check failed")
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, building it on first use; None where it cannot be had (warns once)."""
    global _lib, _why, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _why = _unsupported()
            if _why is None:
                try:
                    _lib = _load()
                except Exception as e:  # noqa: BLE001 - any failure means: use torch's ops
                    _why = f"could not build or load {_SRC.name}: {e}"
            if _why is not None:  # whatever the reason, disabled included: said once per process
                warnings.warn(f"moedsl: the CPU grouped-GEMM kernel is unavailable ({_why}); "
                              "using torch's grouped GEMM (slower)", RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> Optional[str]:
    library()
    return _why


def _required() -> ctypes.CDLL:
    """The loaded kernel, or an error saying why there is none."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"moedsl's CPU grouped-GEMM kernel is unavailable: {why_unavailable()}")
    return lib


@contextlib.contextmanager
def small_kernels(enabled: bool):
    """Within: products over few rows (<= 64) use the kernel's own AVX2 code (the default, where
    the CPU has AVX2 and FMA), or with ``enabled=False`` MKL's sgemm like every other product.
    The previous setting comes back on exit. For tests and side-by-side timing."""
    lib = _required()
    previous = lib.moedsl_small_kernels(int(enabled))
    try:
        yield
    finally:
        lib.moedsl_small_kernels(previous)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether grouped_mm below takes these operands (float32 CPU tensors, sizes that fit an int)."""
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and x.dim() == 2 and w.dim() == 3
            and max(x.shape[0], x.shape[1], w.shape[1], w.shape[2]) < 2**31 and (_lib is not None or available()))


def _rows(lib, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transpose: bool, threads: int) -> torch.Tensor:
    """out[rows of g] = x[rows of g] · w[g] (w[g]^T if transpose)."""
    G = w.shape[0]
    K, n = (w.shape[2], w.shape[1]) if transpose else (w.shape[1], w.shape[2])
    out = x.new_empty(x.shape[0], n)
    lib.moedsl_gmm_rows(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), w.stride(1), int(transpose),
                        offs.data_ptr(), G, K, n, out.data_ptr(), n, threads)
    return out


def _wgrad(lib, x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, G: int, threads: int) -> torch.Tensor:
    dw = x.new_empty(G, x.shape[1], dy.shape[1])
    lib.moedsl_gmm_wgrad(x.data_ptr(), x.stride(0), dy.data_ptr(), dy.stride(0), offs.data_ptr(), G, x.shape[1],
                         dy.shape[1], dw.data_ptr(), 0, threads, GROUP_ROWS)
    return dw


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Rows with unit column stride (what the kernel reads)."""
    return t if t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1] else t.contiguous()


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs):
        x, w = _dense(x), _dense(w)
        ctx.save_for_backward(x, w, offs)
        return _rows(_lib, x, w, offs, transpose=False, threads=torch.get_num_threads())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy, threads = _dense(dy), torch.get_num_threads()
        dx = _rows(_lib, dy, w, offs, transpose=True, threads=threads) if ctx.needs_input_grad[0] else None
        dw = _wgrad(_lib, x, dy, offs, w.shape[0], threads) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def offsets(sizes: torch.Tensor) -> torch.Tensor:
    """Group sizes [G] -> row offsets [G + 1] (int64 on the CPU), what ``grouped_mm`` takes."""
    offs = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    torch.cumsum(sizes.to("cpu", torch.int64), 0, out=offs[1:])
    return offs


def grouped_mm(x: torch.Tensor, w: torch.Tensor, sizes: Optional[torch.Tensor] = None, *,
               offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, K] rows in G consecutive runs of ``sizes`` (sum = N) times w [G, K, n] -> [N, n],
    differentiable in x and w. Takes the runs as ``sizes`` or as ``offs = offsets(sizes)``
    (computed once for several products over the same runs)."""
    _required()
    if not usable(x, w):
        raise ValueError(f"grouped_mm takes float32 CPU operands x [N, K], w [G, K, n]; got x "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}, w {w.dtype} {tuple(w.shape)} on {w.device}")
    if offs is None:
        offs = offsets(sizes)
    if offs.dtype != torch.int64 or offs.device.type != "cpu" or offs.shape != (w.shape[0] + 1,) \
            or not offs.is_contiguous():
        raise ValueError(f"grouped_mm: offsets must be contiguous int64 [{w.shape[0] + 1}] on the CPU, got "
                         f"{offs.dtype} {tuple(offs.shape)} on {offs.device}")
    bad = _lib.moedsl_check_offsets(offs.data_ptr(), w.shape[0], x.shape[0])  # in C: no host reads of a tensor
    if bad == w.shape[0] + 1:
        raise ValueError(f"grouped_mm: sizes sum to {int(offs[-1])}, x has {x.shape[0]} rows")
    if bad >= 0:
        raise ValueError(f"grouped_mm: offsets must start at 0 and not decrease; offset {bad} is "
                         f"{int(offs[bad])}" + (f" after {int(offs[bad - 1])}" if bad else ""))
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has {x.shape[1]} columns, w[g] has {w.shape[1]} rows")
    return _GroupedMM.apply(x, w, offs)


def _combine(y, w, tok, num_tokens):
    """(out [num_tokens, d] with out[tok[i]] += w[i] · y[i], the dense operands the kernel read)."""
    y, w, tok = _dense(y), w.contiguous(), tok.contiguous()
    out = y.new_zeros(num_tokens, y.shape[1])
    _lib.moedsl_combine_fwd(y.data_ptr(), y.stride(0), w.data_ptr(), tok.data_ptr(), y.shape[0], y.shape[1],
                            out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out, y, w, tok


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, tok, num_tokens):
        out, y, w, tok = _combine(y, w, tok, num_tokens)
        ctx.save_for_backward(y, w, tok)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, w, tok = ctx.saved_tensors
        g = _dense(g)
        dy = torch.empty_like(y) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        if dy is not None or dw is not None:
            _lib.moedsl_combine_bwd(y.data_ptr(), y.stride(0), w.data_ptr(), tok.data_ptr(), y.shape[0], y.shape[1],
                                    g.data_ptr(), g.stride(0), 0 if dy is None else dy.data_ptr(),
                                    0 if dw is None else dw.data_ptr(), torch.get_num_threads())
        return dy, dw, None, None


def combine_usable(y: torch.Tensor, w: torch.Tensor, tok: torch.Tensor) -> bool:
    """Whether ``weighted_scatter`` takes these (float32 rows and weights, int64 token ids, CPU)."""
    return (y.dtype == torch.float32 and w.dtype == torch.float32 and tok.dtype == torch.int64
            and y.device.type == "cpu" and y.dim() == 2 and w.shape == (y.shape[0],) and tok.shape == w.shape
            and y.shape[1] < 2**31 and (_lib is not None or available()))


def weighted_scatter(y: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The MoE combine in one pass each way: out [num_tokens, d] with out[tok[i]] += w[i] · y[i],
    differentiable in y and w. ``tok`` must hold ids in [0, num_tokens) (the router's)."""
    if not combine_usable(y, w, tok):
        raise ValueError(f"weighted_scatter takes float32 rows [N, d], float32 weights [N] and int64 token ids "
                         f"[N] on the CPU; got {y.dtype} {tuple(y.shape)}, {w.dtype} {tuple(w.shape)}, "
                         f"{tok.dtype} {tuple(tok.shape)}")
    if not (torch.is_grad_enabled() and (y.requires_grad or w.requires_grad)):
        return _combine(y, w, tok, num_tokens)[0]  # nothing to record: the kernel without autograd's ~5 us
    return _Combine.apply(y, w, tok, num_tokens)


def slots_usable(expert: torch.Tensor, routed: Optional[torch.Tensor]) -> bool:
    """Whether ``assign_slots`` takes these (int64 choices [G, S, k], bool routed, on the CPU)."""
    return (expert.dtype == torch.int64 and expert.device.type == "cpu" and expert.dim() == 3
            and (routed is None or (routed.dtype == torch.bool and routed.shape == expert.shape))
            and (_lib is not None or available()))


def assign_slots(expert: torch.Tensor, routed: Optional[torch.Tensor], num_experts: int,
                 capacity: int) -> torch.Tensor:
    """routing.assign_slots for position priority (GShard's order) in one pass: slot [G, S, k],
    g·C + the choice's position among its group's choices of that expert, -1 past C or not routed."""
    if not slots_usable(expert, routed):
        raise ValueError(f"assign_slots takes int64 choices [G, S, k] and a bool mask of that shape on the CPU; "
                         f"got {expert.dtype} {tuple(expert.shape)}"
                         + ("" if routed is None else f", {routed.dtype} {tuple(routed.shape)}"))
    G, S, k = expert.shape
    expert = expert.contiguous()
    routed = None if routed is None else routed.contiguous()
    slot = torch.empty_like(expert)
    bad = _lib.moedsl_assign_slots(expert.data_ptr(), None if routed is None else routed.data_ptr(), G, S, k,
                                   num_experts, capacity, slot.data_ptr())
    if bad >= 0:
        raise ValueError(f"assign_slots: expert id {int(expert.view(-1)[bad])} at choice {bad} is outside "
                         f"[0, {num_experts})")
    return slot


def pack_usable(dest: torch.Tensor, slot: torch.Tensor) -> bool:
    """Whether ``pack_order`` takes these (int64 [A] destinations and slots on the CPU)."""
    return (dest.dtype == torch.int64 and slot.dtype == torch.int64 and dest.device.type == "cpu"
            and slot.device.type == "cpu" and dest.dim() == 1 and slot.shape == dest.shape
            and (_lib is not None or available()))


def pack_order(dest: torch.Tensor, slot: torch.Tensor, n_dest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept assignments (slot >= 0) sorted by destination, stably, and their count per
    destination: (order [N], sizes [n_dest]), what dispatch_packed's masked stable sort gives."""
    if not pack_usable(dest, slot):
        raise ValueError(f"pack_order takes int64 destinations and slots [A] on the CPU; got "
                         f"{dest.dtype} {tuple(dest.shape)}, {slot.dtype} {tuple(slot.shape)}")
    dest, slot = dest.contiguous(), slot.contiguous()
    order = torch.empty_like(dest)
    sizes = torch.empty(n_dest, dtype=torch.int64)
    n = _lib.moedsl_pack_order(dest.data_ptr(), slot.data_ptr(), dest.numel(), n_dest, order.data_ptr(),
                               sizes.data_ptr())
    if n < 0:
        i = -1 - n
        raise ValueError(f"pack_order: destination {int(dest[i])} of assignment {i} is outside [0, {n_dest})")
    return order[:n], sizes
