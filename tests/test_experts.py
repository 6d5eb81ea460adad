"""The experts' ways of computing rows grouped by expert agree with each other and with a
per-expert float64 reference, outputs and gradients: zero-padded into one batched GEMM,
moedsl's CPU grouped-GEMM kernel (``cpu_gemm``), and torch's grouped GEMM
(``torch._grouped_mm`` where the build has it, else padded). On a CPU ``Experts.forward``
picks one; whichever it picks must compute the same thing, for any split of the rows,
experts with no rows included."""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moedsl.nn import cpu_gemm
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


MODES = ["padded", "torch", "auto"] + (["kernel"] if cpu_gemm.available() else [])


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
