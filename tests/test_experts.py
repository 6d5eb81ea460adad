"""The experts' ways of computing rows grouped by expert agree with each other and with a
per-expert float64 reference, outputs and gradients: zero-padded into one batched GEMM,
moedsl's CPU grouped-GEMM kernel (``cpu_gemm``), and torch's grouped GEMM
(``torch._grouped_mm`` where the build has it, else padded). On a CPU ``Experts.forward``
picks one; whichever it picks must compute the same thing, for any split of the rows,
experts with no rows included."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.nn import cpu_gemm
from moedsl.nn.cpu_caps import CpuCaps
from moedsl.nn.experts import Experts
from moedsl.nn.grouped import grouped_matmul

SETTINGS = dict(deadline=None, database=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not os.environ.get("MOEDSL_HYPOTHESIS_RANDOM"))


def reference(ex: Experts, x: torch.Tensor, sizes: list) -> torch.Tensor:
    """Each expert's rows through its own weights, in float64."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        xs = x[start:start + n].double()
        h = xs @ ex.w_in[e].double() + (ex.b_in[e].double() if ex.b_in is not None else 0)
        if ex.glu:
            g = xs @ ex.w_gate[e].double() + (ex.b_gate[e].double() if ex.b_gate is not None else 0)
            h = ex.act(g) * h
        else:
            h = ex.act(h)
        y = h @ ex.w_out[e].double() + (ex.b_out[e].double() if ex.b_out is not None else 0)
        out.append(y)
        start += n
    return torch.cat(out)


MODES = ["padded", "torch", "auto", "aligned", "float32"] + (["kernel"] if cpu_gemm.available() else [])
# CPUs for the cost model, injected: native bfloat16 and float16 (AMX), and AVX2 only (neither)
NATIVE_16BIT = CpuCaps("AVX512", bf16=True, fp16=True)
AVX2_ONLY = CpuCaps("AVX2", bf16=False, fp16=False)


def run(ex: Experts, x: torch.Tensor, sizes: torch.Tensor, gy: torch.Tensor, mode: str):
    """Forward and backward through ``Experts.forward`` on the path ``mode``."""
    ex.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    ex.cpu_path = mode
    try:
        y = ex(xi, sizes)
    finally:
        ex.cpu_path = "auto"
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in ex.named_parameters()}
    return y.detach(), xi.grad, grads


@pytest.mark.slow
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), experts=st.integers(1, 12),
       activation=st.sampled_from(["relu", "gelu", "silu", "swiglu", "geglu"]), bias=st.booleans(),
       empty=st.floats(0.0, 0.9))
def test_padded_and_grouped_experts_agree(seed, experts, activation, bias, empty):
    g = torch.Generator().manual_seed(seed)
    d, h = 16, 32
    ex = Experts(d, h, activation, list(range(experts)), bias=bias, seed=seed)
    if bias:
        with torch.no_grad():
            for b in (ex.b_in, ex.b_gate, ex.b_out):
                if b is not None:
                    b.normal_(0, 0.1, generator=g)
    sizes = torch.randint(0, 40, (experts,), generator=g)
    sizes[torch.rand(experts, generator=g) < empty] = 0  # experts no token reached
    n = int(sizes.sum())
    x = torch.randn(n, d, generator=g)
    gy = torch.randn(n, d, generator=g)
    ref = reference(ex, x, sizes.tolist())
    results = {mode: run(ex, x, sizes, gy, mode) for mode in MODES}
    _, gx0, grads0 = results["padded"]
    for mode, (y, gx, grads) in results.items():
        if n:
            torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5, msg=f"{mode} output")
        torch.testing.assert_close(gx, gx0, rtol=1e-4, atol=1e-5, msg=f"{mode} input gradient")
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-5,
                                       msg=f"{mode} gradient of {name}")
        # an expert with no rows gets exactly zero gradient
        for e in torch.nonzero(sizes == 0).flatten().tolist():
            for name in ("w_in", "w_out", "w_gate"):
                if name in grads:
                    assert torch.count_nonzero(grads[name][e]) == 0, f"{mode}: {name}[{e}] got a gradient"


def test_bfloat16_rows_padded_to_aligned_groups():
    """In bfloat16 on a CPU, Experts picks the aligned path: each expert's rows zero-padded to a
    multiple of ALIGN_ROWS before torch._grouped_mm, so that the GEMM shapes repeat between
    steps (oneDNN compiles a kernel per new shape). The padding must change nothing: output and
    gradients as the unpadded grouped GEMM gives them in bfloat16, and every GEMM's rows, forward
    and backward, a multiple of ALIGN_ROWS."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(3)
    ex = Experts(64, 96, "swiglu", list(range(6)), bias=True, seed=3)
    with torch.no_grad():
        for b in (ex.b_in, ex.b_gate, ex.b_out):
            b.normal_(0, 0.1, generator=g)
    sizes = torch.tensor([37, 0, 5, 64, 1, 70])
    x = torch.randn(int(sizes.sum()), 64, generator=g)
    gy = torch.randn(int(sizes.sum()), 64, generator=g)
    rows = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._grouped_mm.default:
                offs = (kwargs or {}).get("offs", args[2] if len(args) > 2 else None)
                rows.append(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = run(ex, x, sizes, gy, "torch")
        with Shapes():
            got = run(ex, x, sizes, gy, "aligned")
    assert len(rows) == 3 + 6  # forward: w_in, w_gate, w_out; backward: two products per weight
    for r in rows:
        assert all(n % Experts.ALIGN_ROWS == 0 for n in r), r
        assert [n > 0 for n in r] == [n > 0 for n in sizes.tolist()]  # an empty expert stays empty
    torch.testing.assert_close(got[0], base[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], base[1], rtol=2e-2, atol=2e-2)
    for name in base[2]:
        torch.testing.assert_close(got[2][name], base[2][name], rtol=2e-2, atol=5e-2, msg=name)
    assert torch.count_nonzero(got[2]["w_in"][1]) == 0


def test_sixteen_bit_choice_pads_small_even_groups_and_aligns_large_skewed_ones():
    """The cost model in bfloat16: 64 experts of 256 × 512 with a few rows each (the calls
    dominate) are padded into one batched GEMM; the skewed groups of a 64-expert top-8 layer
    (from 1 row to 3× the mean) are aligned, where padding to the longest would compute 3×
    the rows; float32 without the kernel keeps torch._grouped_mm on the groups as they are.
    (On a CPU with native 16-bit GEMMs: the model was measured on one.)"""
    ex = Experts(512, 256, "swiglu", list(range(64)), init=False)
    even = torch.full((64,), 6)
    skewed = torch.cat([torch.tensor([1, 789, 600, 20]), torch.full((60,), 230)])
    assert ex._cpu_choice(even, torch.bfloat16, NATIVE_16BIT) == "padded"
    assert ex._cpu_choice(skewed, torch.bfloat16, NATIVE_16BIT) == "aligned"
    assert ex._cpu_choice(skewed, torch.float16, NATIVE_16BIT) == "aligned"
    if not cpu_gemm.available():
        assert ex._cpu_choice(skewed, torch.float32, NATIVE_16BIT) == "torch"


def test_sixteen_bit_experts_compute_in_float32_on_a_cpu_without_a_native_gemm_for_the_type():
    """Without a native GEMM for the type every 16-bit path converts element by element (7-100×
    slower than float32 here under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2): bfloat16
    and float16 experts take the float32 path on an AVX2-only CPU, whatever the groups; a CPU
    with native bfloat16 but not float16 keeps the 16-bit model for the one, float32 for the
    other; float32 experts are never re-routed."""
    ex = Experts(512, 256, "swiglu", list(range(64)), init=False)
    even = torch.full((64,), 6)
    skewed = torch.cat([torch.tensor([1, 789, 600, 20]), torch.full((60,), 230)])
    bf16_only = CpuCaps("AVX512", bf16=True, fp16=False)
    for sizes in (even, skewed):
        assert ex._cpu_choice(sizes, torch.bfloat16, AVX2_ONLY) == "float32"
        assert ex._cpu_choice(sizes, torch.float16, AVX2_ONLY) == "float32"
        assert ex._cpu_choice(sizes, torch.float16, bf16_only) == "float32"
        assert ex._cpu_choice(sizes, torch.float32, AVX2_ONLY) == ex._cpu_choice(sizes, torch.float32, NATIVE_16BIT)
    assert ex._cpu_choice(even, torch.bfloat16, bf16_only) == "padded"
    assert ex._cpu_choice(skewed, torch.bfloat16, bf16_only) == "aligned"


def test_the_float32_path_of_sixteen_bit_experts_is_the_float32_computation_in_the_callers_dtype():
    """Under bfloat16 autocast the float32 path computes the experts as float32 does (to float32's
    precision, where the bfloat16 paths are off by ~1e-2), outputs the input's dtype and
    gives every weight its gradient; with bfloat16 weights and inputs (no autocast) it casts the
    weights for the products, returns bfloat16 and the gradients reach the bfloat16 weights."""
    g = torch.Generator().manual_seed(5)
    ex = Experts(32, 48, "swiglu", list(range(5)), bias=True, seed=5)
    with torch.no_grad():
        for b in (ex.b_in, ex.b_gate, ex.b_out):
            b.normal_(0, 0.1, generator=g)
    sizes = torch.tensor([9, 0, 3, 17, 1])
    x = torch.randn(int(sizes.sum()), 32, generator=g)
    gy = torch.randn(int(sizes.sum()), 32, generator=g)
    ref = reference(ex, x, sizes.tolist())
    exact = run(ex, x, sizes, gy, "padded")  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(ex, x, sizes, gy, "float32")
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], exact[1], rtol=1e-4, atol=1e-5)
    for name in exact[2]:
        torch.testing.assert_close(got[2][name], exact[2][name], rtol=1e-4, atol=1e-5, msg=name)
    ex16 = ex.to(torch.bfloat16)
    y, gx, grads = run(ex16, x.bfloat16(), sizes, gy.bfloat16(), "float32")
    assert y.dtype == gx.dtype == torch.bfloat16 and all(v.dtype == torch.bfloat16 for v in grads.values())
    torch.testing.assert_close(y.double(), reference(ex16, x.bfloat16(), sizes.tolist()), rtol=2e-2, atol=2e-2)
    assert torch.count_nonzero(grads["w_in"][1]) == 0 and torch.count_nonzero(grads["w_in"][0]) > 0


def test_grouped_matmul_skips_nothing_and_mixes_nothing():
    """grouped_matmul on float32 (torch._grouped_mm where aligned) and float64 (padded) equals a
    per-group product, empty groups included."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 0, 5, 0, 0, 8, 1])
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(int(sizes.sum()), 16, generator=g, dtype=dtype)
        w = torch.randn(len(sizes), 16, 8, generator=g, dtype=dtype)
        want = torch.cat([xs @ w[i] for i, xs in enumerate(x.split(sizes.tolist()))])
        torch.testing.assert_close(grouped_matmul(x, w, sizes), want)


def test_few_rows_without_grad_multiply_weight_views_as_the_grouped_path():
    """A decode step's handful of rows takes Experts._small (each hit expert's rows times views of
    its weights); it must give what the grouped path gives for every activation, with biases,
    and with experts that get no rows."""
    torch.manual_seed(0)
    for activation in ("swiglu", "gelu"):
        ex = Experts(16, 24, activation, list(range(5)), bias=True).eval()
        with torch.no_grad():
            for b in (ex.b_in, ex.b_gate, ex.b_out):
                if b is not None:
                    b.normal_()
        x = torch.randn(6, 16)
        sizes = torch.tensor([2, 0, 1, 3, 0])
        with torch.no_grad():
            small = ex(x, sizes)
            ex.SMALL_ROWS = 0  # the grouped path
            grouped = ex(x, sizes)
            del ex.SMALL_ROWS
        torch.testing.assert_close(small, grouped, rtol=1e-5, atol=1e-6)
        assert small.shape == (6, 16) and not torch.equal(small[:2], small[2:4])
