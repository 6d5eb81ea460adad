"""moedsl's CPU grouped-GEMM kernel (moedsl/nn/cpu_gemm.*): every group's rows times its own
weight, and both gradients, equal a float64 per-group reference for any split of the rows
(empty groups, a group split between threads, more threads than rows), on both ways of
splitting the weight gradient; where it cannot be built, moedsl says why once and falls
back to torch's ops with the same results."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.nn import cpu_gemm

SETTINGS = dict(deadline=None, database=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not os.environ.get("MOEDSL_HYPOTHESIS_RANDOM"))

needs_kernel = pytest.mark.skipif(not cpu_gemm.available(), reason=f"kernel unavailable: {cpu_gemm.why_unavailable()}")


def test_kernel_builds_where_it_can():
    """Not a silent fallback: on Linux with an MKL/OpenMP torch and a C++ compiler it must load."""
    reason = cpu_gemm._unsupported()
    if reason:
        pytest.skip(reason)
    assert cpu_gemm.available(), cpu_gemm.why_unavailable()


def reference(x, w, sizes, dy):
    """float64 per group: y, dx, dw."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    parts = [xs @ wd[g] for g, xs in enumerate(xd.split(sizes))]
    y = torch.cat(parts) if parts else xd.new_zeros(0, w.shape[-1])
    (y * dy.double()).sum().backward()
    return y, xd.grad, wd.grad if wd.grad is not None else torch.zeros_like(wd)


@pytest.mark.slow
@needs_kernel
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 40), K=st.integers(1, 70),
       n=st.one_of(st.integers(1, 90), st.sampled_from([16, 32, 48, 64])), empty=st.floats(0.0, 0.9),
       threads=st.integers(1, 5), big=st.booleans(), small=st.booleans())
def test_grouped_mm_equals_per_group_products(seed, groups, K, n, empty, threads, big, small):
    """small: groups of <= 64 rows through the kernel's AVX2 code (where the CPU has it), or
    every product through MKL."""
    with cpu_gemm.small_kernels(small):
        check_grouped_mm(seed, groups, K, n, empty, threads, big)


def check_grouped_mm(seed, groups, K, n, empty, threads, big):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 200 if big else 12, (groups,), generator=g)
    sizes[torch.rand(groups, generator=g) < empty] = 0
    N = int(sizes.sum())
    x = torch.randn(N, K, generator=g)
    w = torch.randn(groups, K, n, generator=g)
    dy = torch.randn(N, n, generator=g)
    want_y, want_dx, want_dw = reference(x, w, sizes.tolist(), dy)
    lib = cpu_gemm.library()
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    # the primitives with any thread count (a group split between threads; threads > rows)
    y = cpu_gemm._rows(lib, x, w, offs, transpose=False, threads=threads)
    dx = cpu_gemm._rows(lib, dy, w, offs, transpose=True, threads=threads)
    dw = cpu_gemm._wgrad(lib, x, dy, offs, groups, threads)  # by groups when groups >= 4·threads, else by columns
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, K ** 0.5))
    torch.testing.assert_close(y.double(), want_y, **tol)
    torch.testing.assert_close(dx.double(), want_dx, **dict(tol, atol=1e-4 * max(1.0, n ** 0.5)))
    torch.testing.assert_close(dw.double(), want_dw, **dict(tol, atol=1e-4 * max(1.0, float(sizes.max()) ** 0.5)))
    for e in torch.nonzero(sizes == 0).flatten().tolist():
        assert torch.count_nonzero(dw[e]) == 0, f"empty group {e} got a weight gradient"
    # and through autograd
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    cpu_gemm.grouped_mm(xa, wa, sizes).backward(dy)
    torch.testing.assert_close(xa.grad.double(), want_dx, **dict(tol, atol=1e-4 * max(1.0, n ** 0.5)))
    torch.testing.assert_close(wa.grad.double(), want_dw, **dict(tol, atol=1e-4 * max(1.0, float(sizes.max()) ** 0.5)))


@needs_kernel
@pytest.mark.parametrize("K,n", [(7, 16), (33, 40), (64, 48), (130, 21)])
def test_small_row_kernels_every_tile_shape(K, n):
    """Every row count the AVX2 code tiles differently (1-17 rows: 6-row, 3-row and 16-row
    panels and their remainders; 63-65 around the switch to MKL), columns with and without a
    tail, on one thread (whole groups) and two (groups cut between threads)."""
    g = torch.Generator().manual_seed(K * n)
    sizes = torch.tensor(list(range(1, 18)) + [63, 64, 65])
    N, G = int(sizes.sum()), len(sizes)
    x, w, dy = torch.randn(N, K, generator=g), torch.randn(G, K, n, generator=g), torch.randn(N, n, generator=g)
    want_y, want_dx, want_dw = reference(x, w, sizes.tolist(), dy)
    offs = cpu_gemm.offsets(sizes)
    lib = cpu_gemm.library()
    for threads in (1, 2):
        torch.testing.assert_close(cpu_gemm._rows(lib, x, w, offs, False, threads).double(), want_y,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cpu_gemm._rows(lib, dy, w, offs, True, threads).double(), want_dx,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cpu_gemm._wgrad(lib, x, dy, offs, G, threads).double(), want_dw,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_kernel
def test_the_kernel_loaded_first_inside_a_bfloat16_autocast_region_passes_its_self_check():
    """Its first use may come inside ``torch.autocast("cpu", torch.bfloat16)`` (the combine of a
    16-bit run): the self-check's float32 reference must not be computed in bfloat16 there, or
    the kernel is refused for the whole process."""
    code = textwrap.dedent("""
        import torch
        from moedsl.nn import cpu_gemm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print(cpu_gemm.why_unavailable())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None", out.stdout + out.stderr


@needs_kernel
def test_grouped_mm_takes_strided_operands_and_partial_grads():
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor([5, 0, 9, 2])
    xt = torch.randn(24, 16, generator=g).t()  # [16, 24] rows not contiguous
    wt = torch.randn(4, 32, 24, generator=g).transpose(1, 2)  # [4, 24, 32]: w[g] transposed views
    dy = torch.randn(16, 32, generator=g)
    want_y, want_dx, want_dw = reference(xt, wt, sizes.tolist(), dy)
    x = xt.clone().requires_grad_()
    y = cpu_gemm.grouped_mm(x, wt, sizes)  # w needs no gradient: only dx is computed
    y.backward(dy)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), want_dx, rtol=1e-4, atol=1e-4)
    w = wt.detach().clone().requires_grad_()
    cpu_gemm.grouped_mm(xt, w, sizes).backward(dy)  # x needs none: only dw
    torch.testing.assert_close(w.grad.double(), want_dw, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_grouped_mm_rejects_what_it_cannot_take():
    sizes = torch.tensor([2, 1])
    with pytest.raises(ValueError, match=r"not decrease; offset 2 is 2 after 3"):
        cpu_gemm.grouped_mm(torch.randn(4, 8), torch.randn(3, 8, 8), torch.tensor([3, -1, 2]))
    with pytest.raises(ValueError, match="sizes sum to 3"):
        cpu_gemm.grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), sizes)
    with pytest.raises(ValueError, match="float32 CPU operands"):
        cpu_gemm.grouped_mm(torch.randn(3, 8, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64), sizes)


FALLBACK = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("always")
    from moedsl.nn import cpu_gemm
    from moedsl.nn.experts import Experts
    with warnings.catch_warnings(record=True) as caught:
        ok = cpu_gemm.available()
        cpu_gemm.available()
    print("available", ok)
    print("why", cpu_gemm.why_unavailable())
    print("warnings", len(caught), *[str(w.message) for w in caught])
    torch.manual_seed(0)
    ex = Experts(16, 32, "swiglu", list(range(5)))
    sizes = torch.tensor([3, 0, 7, 1, 4])
    x = torch.randn(15, 16)
    y = ex(x, sizes)
    want = torch.cat([torch.nn.functional.silu(xs @ ex.w_gate[e]) * (xs @ ex.w_in[e]) @ ex.w_out[e]
                      for e, xs in enumerate(x.split(sizes.tolist()))])
    print("max_err", float((y - want).abs().max()))
""")


@pytest.mark.slow
@pytest.mark.parametrize("env, reason", [
    ({"MOEDSL_CPU_KERNEL": "0"}, "disabled by MOEDSL_CPU_KERNEL=0"),
    ({"CXX": "/bin/false"}, "/bin/false failed"),
    ({"CXX": "", "PATH": "<empty folder>"}, "no C++ compiler"),
])
def test_without_the_kernel_moedsl_warns_once_why_and_computes_the_same(tmp_path, env, reason):
    """Whatever the reason, the README's promise: one warning naming it, then torch's ops."""
    if sys.platform != "linux":
        pytest.skip("the kernel is built on Linux only")
    if env.get("PATH"):  # no c++ or g++ to be found
        (tmp_path / "bin").mkdir()
        env = dict(env, PATH=str(tmp_path / "bin"))
    run_env = dict(os.environ, MOEDSL_CACHE_DIR=str(tmp_path), **env)
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=run_env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["available"] == "False"
    if cpu_gemm._unsupported() is None or "MOEDSL_CPU_KERNEL" in env:
        assert reason in lines["why"], lines["why"]
    assert lines["warnings"].startswith("1 "), lines["warnings"]  # warned once, not per call
    assert lines["why"].strip() in lines["warnings"]  # naming why
    assert float(lines["max_err"]) < 1e-4
    assert not list(tmp_path.rglob("*.so")), "a failed build left a library behind"


@needs_kernel
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(0, 300), tokens=st.integers(1, 120), d=st.integers(1, 80),
       threads=st.integers(1, 4), grad_w=st.booleans())
def test_weighted_scatter_is_the_combine(seed, rows, tokens, d, threads, grad_w):
    """out[tok[i]] += w[i]·y[i] (tokens hit several times, or never) and both gradients, against
    index_add in float64, for any thread count."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, d, generator=g).requires_grad_()
    w = torch.rand(rows, generator=g).requires_grad_(grad_w)
    tok = torch.randint(0, tokens, (rows,), generator=g)
    gout = torch.randn(tokens, d, generator=g)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_gemm.weighted_scatter(y, w, tok, tokens)
        out.backward(gout)
    finally:
        torch.set_num_threads(saved)
    yd, wd = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.zeros(tokens, d, dtype=torch.float64).index_add(0, tok, yd * wd[:, None])
    ref.backward(gout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad.double(), yd.grad, rtol=1e-5, atol=1e-5)
    if grad_w:
        torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-4 * max(1.0, d ** 0.5))
    else:
        assert w.grad is None


@needs_kernel
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), G=st.integers(1, 4), S=st.integers(1, 40), k=st.integers(1, 4),
       E=st.integers(1, 9), C=st.integers(0, 12), unrouted=st.floats(0.0, 0.6), mask=st.booleans())
def test_assign_slots_kernel_is_the_torch_algorithm(seed, G, S, k, E, C, unrouted, mask):
    """The one-pass slots (CPU, position priority) equal routing's sort-based ones exactly."""
    from moedsl.nn.routing import assign_slots, assign_slots_torch

    g = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, E, (G, S, k), generator=g)
    routed = torch.rand(G, S, k, generator=g) >= unrouted if mask else None
    want = assign_slots_torch(expert, routed, E, C)
    assert torch.equal(cpu_gemm.assign_slots(expert, routed, E, C), want)
    assert torch.equal(assign_slots(expert, routed, E, C), want)  # what the gates call
    # strided choices (a transposed view) are read as their values
    tr = expert.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(cpu_gemm.assign_slots(tr, routed, E, C), want)


@needs_kernel
def test_assign_slots_kernel_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"expert id 5 at choice 3 is outside \[0, 4\)"):
        cpu_gemm.assign_slots(torch.tensor([[[0], [1], [2], [5]]]), None, 4, 2)
    with pytest.raises(ValueError, match="int64 choices"):
        cpu_gemm.assign_slots(torch.zeros(2, 3, dtype=torch.int32), None, 4, 2)


@needs_kernel
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), A=st.integers(0, 200), n_dest=st.integers(1, 12), dropped=st.floats(0, 1))
def test_pack_order_is_the_masked_stable_sort(seed, A, n_dest, dropped):
    g = torch.Generator().manual_seed(seed)
    dest = torch.randint(0, n_dest, (A,), generator=g)
    slot = torch.where(torch.rand(A, generator=g) < dropped, -1, torch.randint(0, 5, (A,), generator=g))
    key = torch.where(slot >= 0, dest, n_dest)
    want = torch.sort(key, stable=True).indices[: int((slot >= 0).sum())]
    order, sizes = cpu_gemm.pack_order(dest, slot, n_dest)
    assert torch.equal(order, want)
    assert torch.equal(sizes, torch.bincount(dest[slot >= 0], minlength=n_dest))
    with pytest.raises(ValueError, match="outside"):
        cpu_gemm.pack_order(torch.full((3,), n_dest), torch.zeros(3, dtype=torch.int64), n_dest)
