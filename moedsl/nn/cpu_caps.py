"""Whether this CPU multiplies bfloat16 and float16 matrices natively, for what depends on it:
the path 16-bit experts take on a CPU (``Experts._cpu_choice``), the warning ``moedsl run``
prints before a 16-bit run on a CPU without (``runtime/preflight.py``), and the line every
benchmark prints beside its figures (``describe``).

torch's 16-bit matmuls on a CPU are oneDNN's where oneDNN has a kernel for the type on this
CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported`` / ``_fp16_supported``, which follow
``ONEDNN_MAX_CPU_ISA``), and a reference GEMM that converts element by element elsewhere.
Measured on the project's machine (AVX512 with avx512_bf16, no avx512_fp16; loaded), a 1024³
matmul on one thread, best of 3, GFLOP/s float32 / bfloat16 / float16: 42 / 150 / 0.3; with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (as on an AVX2-only CPU): 22 / 0.2 / 0.3.
An AVX2-only CPU measured elsewhere: 8 / 0.2 (float32 / bfloat16).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# the /proc/cpuinfo flags of 16-bit matrix instructions (x86): what the probe reports beside oneDNN's verdict
FLAGS_16BIT = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "avx_vnni_int16")


@dataclass(frozen=True)
class CpuCaps:
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    bf16: bool  # torch's bfloat16 GEMMs have a native (oneDNN) kernel here
    fp16: bool  # the same for float16
    flags: tuple = ()  # the FLAGS_16BIT this CPU lists in /proc/cpuinfo (whatever torch may use)

    def native(self, dtype: torch.dtype) -> bool:
        """Whether GEMMs in ``dtype`` run natively here (float32 and float64 always do)."""
        return {torch.bfloat16: self.bf16, torch.float16: self.fp16}.get(dtype, True)

    def describe(self) -> str:
        """One line for a benchmark's header: 'CPU AVX512, native bfloat16: yes, float16: no
        (cpuinfo: avx512_bf16)'."""
        yes = {True: "yes", False: "no"}
        return (f"CPU {self.capability}, native bfloat16: {yes[self.bf16]}, float16: {yes[self.fp16]} "
                f"(cpuinfo: {', '.join(self.flags) or 'no 16-bit matrix flags'})")


def _onednn(kind: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported")())
    except (AttributeError, RuntimeError):  # a build without oneDNN: torch's own 16-bit GEMM is the slow one
        return False


def _cpuinfo_flags() -> tuple:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in FLAGS_16BIT if flag in have)
    except OSError:
        pass
    return ()


@functools.lru_cache(maxsize=None)
def probe() -> CpuCaps:
    """This process's CPU as torch sees it (fixed for the process: torch reads
    ATEN_CPU_CAPABILITY and oneDNN ONEDNN_MAX_CPU_ISA once, when they load)."""
    return CpuCaps(torch.backends.cpu.get_cpu_capability(), _onednn("bf16"), _onednn("fp16"), _cpuinfo_flags())


def describe() -> str:
    """``probe().describe()``: what every benchmark prints beside its figures."""
    return probe().describe()


def slowdown(dtype: torch.dtype, n: int = 256, budget_s: float = 0.05) -> float:
    """How many times longer an n×n×n matmul takes in ``dtype`` than in float32 on one thread of
    this CPU, now: the fastest of the runs that fit in about ``budget_s`` per dtype (three at
    least, after a warm-up). One thread: on cores other processes keep busy, a team of threads
    waits for its slowest member at every op (256³ took 30 ms on 2 threads of the loaded
    project machine, 0.33 ms on one), which would measure the load, not the arithmetic.
    About 0.1 s in all where ``dtype`` is slow (10 ms a run), less where it is native."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    best, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", enabled=False):
            for dt in (torch.float32, dtype):
                x, y = a.to(dt), b.to(dt)
                torch.mm(x, y)
                runs, start = [], time.perf_counter()
                while len(runs) < 3 or time.perf_counter() - start < budget_s:
                    t = time.perf_counter()
                    torch.mm(x, y)
                    runs.append(time.perf_counter() - t)
                best[dt] = min(runs)
    finally:
        torch.set_num_threads(threads)
    return best[dtype] / best[torch.float32]
