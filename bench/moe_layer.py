"""One MoE layer, forward + backward: moedsl vs the grouped-GEMM bound vs Hugging Face.

    python bench/moe_layer.py                 # the full grid (long: see bench/README.md)
    python bench/moe_layer.py --quick         # a few rows
    python bench/moe_layer.py --tokens 4096 --experts 64 --topk 2 --act swiglu --mode dropless

Each row: the same tokens and weights through
- bound: the expert computation alone on the rows the layer's experts get: R = the
  assignments its router keeps for these tokens (k·T dropless, fewer where capacity drops
  some), over E' = the experts that get any, as evenly as they go (R mod E' experts of
  ⌈R/E'⌉ rows, the rest ⌊R/E'⌋), tokens already grouped, as torch.bmm (forward and
  backward): the layer's rows and the weights it reads, none it does not;
- moedsl: the compiled layer (route, dispatch, experts, combine), top-k softmax gate;
- HF eager / HF grouped_mm: transformers' MixtralSparseMoeBlock (SwiGLU experts) or its
  MixtralTopKRouter with NemotronHExperts (non-gated ReLU experts), with
  experts_implementation "eager" and "grouped_mm" (the fastest it offers on a CPU).
Outputs are checked against a float64 reference (and HF against moedsl on dropless rows)
before timing; timings are medians over repeats, the implementations interleaved within
each repeat so drift cancels: a ratio is the median over repeats of the ratio within a
repeat (the machine's speed drifts by 25% over minutes; pairs share its state). Ratios are
to the bound, and moedsl's to HF grouped_mm. Every row has the same target against its
bound: 1.15× from 4096 tokens, 1.5× below (capacity rows too: on a CPU moedsl computes
only the kept rows, which is what their bound counts).
The process keeps freed memory (moedsl.runtime.cpu.keep_freed_memory, what `moedsl run`
does on a CPU) for every implementation alike; --no-keep-memory times glibc's default.
--mkl-only adds moedsl with MKL for every expert product (its small-row kernels off) to the
interleaved set: what those kernels are worth, row by row.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import moedsl
from moedsl.nn import cpu_caps, cpu_gemm
from moedsl.runtime.cpu import keep_freed_memory, release_freed_memory


def moedsl_layer(d, h, E, k, act, mode, cf):
    gate = {"type": "topk", "k": k}
    if mode == "capacity":
        gate["capacity_factor"] = cf
    else:
        gate["drop_policy"] = "dropless"
    spec = {"moedsl": 1, "name": "bench", "model": {"input": "vectors", "d_model": d, "max_seq_len": 1 << 20},
            "layers": [{"moe": {"residual": False, "prenorm": False, "gate": gate,
                                "experts": {"count": E, "hidden": h, "activation": act}}}],
            "train": {"batch_size": 1}}
    model = moedsl.build_model(moedsl.load_spec(spec), seed=0, dtype=torch.float32)
    with torch.no_grad():  # a router that spreads tokens like a trained one: random, not zero
        model.get_parameter("layers.0.gate.weight").normal_(0, 1 / math.sqrt(d))
    model.train()
    return model


def hf_block(model, E, k, act, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter

    p = dict(model.named_parameters())
    w_in, w_out = p["layers.0.experts.w_in"], p["layers.0.experts.w_out"]
    d, h = w_in.shape[1], w_in.shape[2]
    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k,
                        hidden_act="silu", router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    with torch.no_grad():
        if act == "swiglu":
            block = MixtralSparseMoeBlock(cfg)
            block.gate.weight.copy_(p["layers.0.gate.weight"])
            w_gate = p["layers.0.experts.w_gate"]
            block.experts.gate_up_proj.copy_(torch.cat([w_gate.transpose(1, 2), w_in.transpose(1, 2)], dim=1))
            block.experts.down_proj.copy_(w_out.transpose(1, 2))
            return block
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        ncfg = NemotronHConfig(hidden_size=d, moe_intermediate_size=h, n_routed_experts=E, mlp_hidden_act="relu")
        ncfg._experts_implementation = impl
        router = MixtralTopKRouter(cfg)
        router.weight.copy_(p["layers.0.gate.weight"])
        experts = NemotronHExperts(ncfg)
        experts.up_proj.copy_(w_in.transpose(1, 2))
        experts.down_proj.copy_(w_out.transpose(1, 2))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = router, experts

        def forward(self, x):
            B, T, d_ = x.shape
            flat = x.reshape(-1, d_)
            _, w, idx = self.gate(flat)
            return self.experts(flat, idx, w).reshape(B, T, d_)
    return Block()


def kept_rows(model, x) -> torch.Tensor:
    """[E]: the rows each expert gets from the layer's router for ``x`` (kept assignments only)."""
    gate = model.get_submodule("layers.0.gate")
    with torch.no_grad():
        r = gate(x.reshape(-1, x.shape[-1]), None, 0, 1)
    kept = r.slot >= 0
    return torch.bincount(r.expert[kept], minlength=model.get_parameter("layers.0.experts.w_in").shape[0])


def balanced_groups(sizes: torch.Tensor) -> list:
    """The rows of ``sizes`` [E] spread as evenly as they go over the experts that get any:
    [(experts, rows each)], R mod E' experts of ceil(R / E') rows and the rest floor(R / E')
    (R rows, E' experts hit): as many rows and weights as the layer computes and reads, in
    the shape a batched GEMM likes best. No group for an expert that gets nothing."""
    rows, hit = int(sizes.sum()), int(torch.count_nonzero(sizes))
    if not rows:
        return []
    q, extra = divmod(rows, hit)
    return [(e, n) for e, n in ((extra, q + 1), (hit - extra, q)) if e and n]


def bound(model, sizes, act):
    """The expert GEMMs alone on ``balanced_groups(sizes)``, pre-grouped: one torch.bmm per
    product and group, each hit expert's own weights. Each group's weights are leaves of their
    own (copies of those experts' weights), so the backward writes each weight gradient once:
    slices of one stacked leaf would add a zero-filled gradient of every hit expert per group."""
    p = dict(model.named_parameters())
    hit = torch.nonzero(sizes).flatten()
    names = ["w_in", "w_out"] + (["w_gate"] if act == "swiglu" else [])
    stacked = [p[f"layers.0.experts.{n}"].detach()[hit] for n in names]
    d = stacked[0].shape[1]
    groups, lo = [], 0
    for e, n in balanced_groups(sizes):
        ws = [w[lo:lo + e].clone().requires_grad_() for w in stacked]
        groups.append((ws, torch.randn(e, n, d, requires_grad=True), torch.randn(e, n, d)))
        lo += e

    def run():
        for ws, xg, _ in groups:
            for t in ws + [xg]:
                t.grad = None
        outs = []
        for ws, xg, _ in groups:
            hid = torch.bmm(xg, ws[0])
            hid = F.silu(torch.bmm(xg, ws[2])) * hid if act == "swiglu" else F.relu(hid)
            outs.append(torch.bmm(hid, ws[1]))
        torch.autograd.backward(outs, [g for _, _, g in groups])
    return run


def reference(model, x):
    """float64: Σ over kept assignments of weight · expert(x), from moedsl's own routing."""
    gate = model.get_submodule("layers.0.gate")
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        r = gate(flat, None, 0, 1)
        ex = model.get_submodule("layers.0.experts")
        out = torch.zeros(flat.shape, dtype=torch.float64)
        kept = r.slot >= 0
        for e in torch.unique(r.expert[kept]).tolist():
            sel = kept & (r.expert == e)
            xs = flat[r.token[sel]].double()
            hid = xs @ ex.w_in[e].double()
            hid = F.silu(xs @ ex.w_gate[e].double()) * hid if ex.glu else F.relu(hid)
            out.index_add_(0, r.token[sel], (hid @ ex.w_out[e].double()) * r.weight[sel, None].double())
    return out.view(x.shape)


def timed(fn, reps_out: list):
    t = time.perf_counter()
    fn()
    reps_out.append(time.perf_counter() - t)


def row(T, E, k, act, mode, d, h, cf, repeats, hf=True, mkl_only=False):
    if k > E:
        return None
    torch.manual_seed(0)
    model = moedsl_layer(d, h, E, k, act, mode, cf)
    x = torch.randn(1, T, d)
    g = torch.randn(1, T, d)
    ref = reference(model, x)
    with torch.no_grad():
        got = model(x).output.double()
    err = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    assert err < 1e-5, f"moedsl disagrees with the float64 reference: {err:.2e}"
    xin = x.clone().requires_grad_()

    def run_moedsl():
        model.zero_grad(set_to_none=True)
        xin.grad = None
        model(xin).output.backward(g)

    sizes = kept_rows(model, x)
    impls = {"bound": bound(model, sizes, act), "moedsl": run_moedsl}
    if mkl_only:  # the same layer with MKL for every expert product (no small-row AVX2 kernels)
        def run_mkl_only():
            with cpu_gemm.small_kernels(False):
                run_moedsl()
        impls["moedsl_mkl_only"] = run_mkl_only
    agree = {}
    if hf:
        for impl in ("eager", "grouped_mm"):
            block = hf_block(model, E, k, act, impl)
            block.train()
            with torch.no_grad():
                hf_out = block(x).double()
            if mode == "dropless":
                agree[impl] = float((hf_out - got).norm() / got.norm())
                assert agree[impl] < 1e-4, f"HF {impl} disagrees with moedsl: {agree[impl]:.2e}"

            def run_hf(block=block):
                block.zero_grad(set_to_none=True)
                xin.grad = None
                block(xin).backward(g)
            impls[f"hf_{impl}"] = run_hf
    times = {name: [] for name in impls}
    slow, once = set(), {}
    for name, fn in impls.items():  # warm-up: an implementation over 2 s a run is timed twice only,
        t = time.perf_counter()     # one over 10 s (HF eager at 16384 tokens) by its warm-up run alone
        fn()
        took = time.perf_counter() - t
        if took > 2.0:
            slow.add(name)
        if took > 10.0:
            once[name] = took
    for i in range(repeats):
        for name, fn in impls.items():
            if name in once:
                if i == 0:
                    times[name].append(once[name])
            elif name not in slow or i < 2:
                timed(fn, times[name])
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    # ratios: the median of ratios within a repeat (the machine drifts; a pair shares its state)
    pair = {name: statistics.median(a / b for a, b in zip(ts, times["bound"])) for name, ts in times.items()}
    pair["moedsl_vs_hf"] = (statistics.median(a / b for a, b in zip(times["moedsl"], times["hf_grouped_mm"]))
                            if "hf_grouped_mm" in times else None)
    stats = model(x).router_stats[0]
    out = {"tokens": T, "experts": E, "k": k, "act": act, "mode": mode, "ms": med, "err": err,
           "dropped": int(stats.dropped), "max_over_mean_load": float(
               stats.tokens_per_expert.max() / max(stats.tokens_per_expert.float().mean(), 1e-9))}
    out["bound_rows"], out["bound_experts"] = int(sizes.sum()), int(torch.count_nonzero(sizes))
    out["moedsl/bound"] = pair["moedsl"]
    if mkl_only:
        out["moedsl_mkl_only/bound"] = pair["moedsl_mkl_only"]
    if hf:
        out["hf_grouped_mm/bound"] = pair["hf_grouped_mm"]
        out["hf_eager/bound"] = pair["hf_eager"]
        out["moedsl/hf_grouped_mm"] = pair["moedsl_vs_hf"]
        out["hf_eager/moedsl"] = pair["hf_eager"] / pair["moedsl"]
    # the router's GEMM (T·d·E, forward and backward) against the bound's expert GEMMs
    # (R·m·d·h, m = 3 for SwiGLU, 2 for ReLU): work the bound leaves out but a layer must do
    out["router/bound_flops"] = T * E / (out["bound_rows"] * (3 if act == "swiglu" else 2) * h)
    out["target"] = 1.15 if T >= 4096 else 1.5  # one target for every mode: the bound counts what each computes
    return out


def table(rows) -> str:
    ablate = any("moedsl_mkl_only/bound" in r for r in rows)
    head = ("| tokens | E | k | act | mode | bound rows / experts | bound ms | moedsl ms | moedsl/bound | target "
            "| router FLOPs/bound "
            + ("| moedsl, MKL only/bound " if ablate else "")
            + "| HF grouped_mm/bound | HF eager/bound | moedsl vs HF grouped_mm | HF eager / moedsl |")
    lines = [head, "|" + "|".join(["---"] * (16 if ablate else 15)) + "|"]
    for r in rows:
        ms = r["ms"]
        hf = "hf_grouped_mm" in ms
        lines.append(
            f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['act']} | {r['mode']} | "
            f"{r['bound_rows']} / {r['bound_experts']} | {ms['bound']:.2f} | "
            f"{ms['moedsl']:.2f} | {r['moedsl/bound']:.2f} | ≤{r['target']:.2f} | "
            + (f"{r['router/bound_flops']:.1%} | " if "router/bound_flops" in r else "- | ")
            + (f"{r.get('moedsl_mkl_only/bound', float('nan')):.2f} | " if ablate else "")
            + (f"{r['hf_grouped_mm/bound']:.2f} | {r['hf_eager/bound']:.2f} | "
               f"{r['moedsl/hf_grouped_mm']:.2f}× | {r['hf_eager/moedsl']:.1f}× |" if hf else "- | - | - | - |"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="64,4096,16384")
    ap.add_argument("--experts", default="8,64,256")
    ap.add_argument("--topk", default="1,2,8")
    ap.add_argument("--act", default="swiglu,relu")
    ap.add_argument("--mode", default="dropless,capacity")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tokens 64,4096; experts 8,64; top-1,2; swiglu")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--mkl-only", action="store_true",
                    help="also time moedsl with MKL for every expert product (no small-row kernels), interleaved")
    ap.add_argument("--no-keep-memory", action="store_true",
                    help="glibc malloc's default: freed large blocks go back to the system (page faults every run)")
    a = ap.parse_args(argv)
    if a.mkl_only and not cpu_gemm.available():
        ap.error(f"--mkl-only compares against moedsl's CPU kernel, which is unavailable: {cpu_gemm.why_unavailable()}")
    kept = False if a.no_keep_memory else keep_freed_memory()
    if a.quick:
        a.tokens, a.experts, a.topk, a.act = "64,4096", "8,64", "1,2", "swiglu"
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    grid = list(itertools.product(ints(a.tokens), ints(a.experts), ints(a.topk), a.act.split(","),
                                  a.mode.split(",")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={a.d}, h={a.h}, fp32, "
          f"forward + backward, {a.repeats} repeats, malloc keeps freed memory: {kept}; {cpu_caps.describe()}",
          flush=True)
    rows = []
    for T, E, k, act, mode in grid:
        r = row(T, E, k, act, mode, a.d, a.h, a.capacity_factor, a.repeats, hf=not a.no_hf, mkl_only=a.mkl_only)
        gc.collect()  # the row's models and graphs (some in reference cycles), then their memory:
        release_freed_memory()  # each row's shapes are new, the last row's kept heap goes back
        if r is None:
            continue
        rows.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
