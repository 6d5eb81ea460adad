"""Grouped matrix products: rows of x, grouped by consecutive runs, each run times its own weight.

``grouped_matmul(x [N, d], w [G, d, h], sizes [G])`` computes, for every group g, the rows
of run g times w[g]. On a CPU in float32 it uses moedsl's kernel (``cpu_gemm``: the threads
split the work, not each GEMM) where it could be built; else ``torch._grouped_mm`` where the
build has it for the dtype, device and alignment; else it pads the runs to the longest into
[G, max, d] for one ``bmm`` (float64 for gradcheck, odd widths). No Python loop over groups.
"""
from __future__ import annotations

import contextlib

import torch

from . import cpu_gemm

_STATIC = [False]


@contextlib.contextmanager
def static_shapes():
    """Inside: rows grouped by expert are computed with shapes fixed by the row count N and no
    host read of the group sizes (the padded product pads every group to N, a bound known
    without reading the sizes; no per-expert Python loop): what CUDA-graph capture of a decode
    step needs, whose N is its B·k assignments."""
    before = _STATIC[0]
    _STATIC[0] = True
    try:
        yield
    finally:
        _STATIC[0] = before


def static() -> bool:
    """Whether ``static_shapes`` is in force."""
    return _STATIC[0]

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_DTYPES or w.dtype != x.dtype:
        return False
    if x.device.type == "cpu":
        align = 16 // x.element_size()  # strides must be multiples of 16 bytes
        return x.shape[-1] % align == 0 and w.shape[-1] % align == 0
    if x.device.type == "cuda":
        # CUDA grouped GEMM takes 16-bit inputs on sm90+ (CUTLASS); others pad
        return x.dtype in (torch.bfloat16,) and torch.cuda.get_device_capability(x.device)[0] >= 9 and \
            x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, sizes: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """[N, d] rows in G consecutive runs of ``sizes`` (sum = N) times w [G, d, h] -> [N, h].

    method: "auto"; "cpu_kernel"; "torch" (torch._grouped_mm where it applies, else padded);
    "grouped_mm"; "padded"."""
    if method == "auto":
        method = "cpu_kernel" if cpu_gemm.usable(x, w) else "grouped_mm" if _grouped_mm_ok(x, w) else "padded"
    if method == "cpu_kernel":
        return cpu_gemm.grouped_mm(x, w, sizes)
    if method == "torch":  # torch's own ops only
        method = "grouped_mm" if _grouped_mm_ok(x, w) else "padded"
    if method == "grouped_mm":
        offs = torch.cumsum(sizes, 0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    return _padded(x, w, sizes)


def _padded(x: torch.Tensor, w: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    G, N = w.shape[0], x.shape[0]
    if N == 0:
        return x.new_zeros(0, w.shape[-1])
    # the longest group is a host read; under static_shapes every group is padded to N instead
    longest = N if _STATIC[0] else int(sizes.max())
    group = torch.repeat_interleave(torch.arange(G, device=x.device), sizes, output_size=N)
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(N, device=x.device) - starts[group]
    flat = group * longest + pos
    xp = x.new_zeros(G * longest, x.shape[-1]).index_copy(0, flat, x).view(G, longest, -1)
    return torch.bmm(xp, w).view(G * longest, -1).index_select(0, flat)
