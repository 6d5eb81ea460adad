"""moedsl's CPU grouped-GEMM kernel, product by product, against torch.bmm.

    python bench/cpu_gemm.py                    # the default shapes (about a minute)
    python bench/cpu_gemm.py --shapes 256x16,8x8 --d 256 --h 512

For E groups of n rows each (what an expert gets on a balanced router) and weights
[E, d, h], the three products of an expert GEMM: forward x·w, input gradient dy·wᵀ and
weight gradient xᵀ·dy, timed three ways, interleaved in each repeat: torch.bmm on [E, n, ·]
(the bound's way), moedsl's kernel as the layer runs it (AVX2 code for groups of <= 64 rows,
MKL above), and the same kernel with MKL for every product (``with cpu_gemm.small_kernels(False)``).
The weights rotate over enough copies to overflow the last-level cache, as one layer's
experts do in a model. Outputs are checked against bmm first. Ratios are medians over
repeats of the ratio within a repeat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moedsl.nn import cpu_caps, cpu_gemm
from moedsl.runtime.cpu import keep_freed_memory


def shape_rows(E, n, d, h, repeats, copies_bytes=96 << 20):
    lib = cpu_gemm.library()
    copies = max(2, copies_bytes // (E * d * h * 4))
    ws = [torch.randn(E, d, h) for _ in range(copies)]
    xb, dyb = torch.randn(E, n, d), torch.randn(E, n, h)
    x, dy = xb.view(-1, d), dyb.view(-1, h)
    offs = torch.arange(E + 1) * n
    threads = torch.get_num_threads()
    turn = [0]

    def w():  # the next copy: cold in cache, as the next layer's experts would be
        turn[0] = (turn[0] + 1) % copies
        return ws[turn[0]]

    products = {  # name: (bmm, kernel), each a function of the weights
        "forward x·w": (lambda wt: torch.bmm(xb, wt), lambda wt: cpu_gemm._rows(lib, x, wt, offs, False, threads)),
        "input grad dy·wᵀ": (lambda wt: torch.bmm(dyb, wt.transpose(1, 2)),
                             lambda wt: cpu_gemm._rows(lib, dy, wt, offs, True, threads)),
        "weight grad xᵀ·dy": (lambda wt: torch.bmm(xb.transpose(1, 2), dyb),
                              lambda wt: cpu_gemm._wgrad(lib, x, dy, offs, E, threads)),
    }
    rows = []
    for name, (bmm_of, kernel_of) in products.items():
        def mkl_only_of(wt, kernel_of=kernel_of):
            with cpu_gemm.small_kernels(False):
                return kernel_of(wt)
        want = bmm_of(ws[0]).reshape(-1)
        for fn in (kernel_of, mkl_only_of):
            err = float((fn(ws[0]).reshape(-1) - want).norm() / want.norm())
            assert err < 1e-5, f"{name}: the kernel disagrees with bmm ({err:.1e})"
        bmm, kernel, mkl_only = (lambda f=f: f(w()) for f in (bmm_of, kernel_of, mkl_only_of))
        fns = {"bmm": bmm, "kernel": kernel, "mkl": mkl_only}
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["bmm"])) for k in fns}
        rows.append((E, n, name, {k: statistics.median(v) * 1e3 for k, v in times.items()}, ratio))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x8,8x16,64x16,64x64,64x128,256x16,256x32,256x64",
                    help="groups x rows per group, comma-separated")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=21)
    a = ap.parse_args(argv)
    if not cpu_gemm.available():
        print(f"the kernel is unavailable here: {cpu_gemm.why_unavailable()}")
        return 1
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, d={a.d}, h={a.h}, "
          f"{a.repeats} repeats, weights cold; {cpu_caps.describe()}")
    print()
    print("| groups | rows each | product | bmm ms | kernel ms | kernel, MKL only ms | kernel/bmm | MKL only/bmm |")
    print("|---|---|---|---|---|---|---|---|")
    for s in a.shapes.split(","):
        E, n = (int(v) for v in s.split("x"))
        for E_, n_, name, ms, r in shape_rows(E, n, a.d, a.h, a.repeats):
            print(f"| {E_} | {n_} | {name} | {ms['bmm']:.2f} | {ms['kernel']:.2f} | {ms['mkl']:.2f} | "
                  f"{r['kernel']:.2f} | {r['mkl']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
