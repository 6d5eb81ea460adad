"""Independent checks of moedsl's MoE formulas against the papers' equations.

Every reference below is written from the papers (Shazeer et al. 2017 eq. 1-10; GShard
Algorithm 1; Switch eq. 4-6; ST-MoE eq. 5; Expert Choice §3.1; Mixtral §2.1), with the documented
conventions where the papers leave a choice, in plain float64 torch, on fixed seeded
inputs; moedsl runs in float32 and must agree to 1e-5.

Conventions used (documented by moedsl):
- capacity C = max(ceil(capacity_factor * k * tokens / E), min_capacity) per routing group;
- assignments past capacity are dropped in priority order: all first choices (token order)
  before any second choice; drop_priority: score orders tokens inside a choice rank by
  their max gate weight, descending;
- CV^2 = population variance / (mean^2 + 1e-10);
- balance loss = E * sum_i f_i * P_i averaged over groups;
- z-loss = mean over tokens of logsumexp(h)^2;
- Shazeer load: P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i), std = softplus + eps.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import moedsl
import moedsl.nn.rng as moe_rng

D = torch.float64
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- building

def spec_of(gate=None, *, E=4, d=8, hidden=16, activation="relu", losses=None, hierarchy=None, shared=None,
            bias=False, batch_size=2):
    experts = {"count": E, "hidden": hidden, "activation": activation}
    if bias:
        experts["bias"] = True
    if shared:
        experts["shared"] = shared
    moe = {"residual": False, "prenorm": False, "experts": experts}
    if losses:
        moe["losses"] = losses
    if hierarchy is not None:
        moe["hierarchy"] = hierarchy
    else:
        moe["gate"] = gate
    return {"moedsl": 1, "name": "t", "model": {"input": "vectors", "d_model": d, "max_seq_len": 64},
            "layers": [{"moe": moe}], "train": {"batch_size": batch_size}}


def build(gate=None, *, seed=0, dtype=torch.float32, router_scale=1.0, **kw):
    """A one-MoE-layer model with non-zero random router weights (and random expert/shared biases)."""
    model = moedsl.build_model(moedsl.load_spec(spec_of(gate, **kw)), seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=D) * router_scale).to(p.dtype))
            elif ".experts.b_" in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=D) * 0.3).to(p.dtype))
            elif ".shared." in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=D) * 0.3).to(p.dtype))
    model.train()
    return model


def inputs(B=2, T=16, d=8, seed=0, offset=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=D)
    if offset is not None:
        x = x + torch.as_tensor(offset, dtype=D)
    return x.to(dtype)


def params(model):
    out = {n: p.detach().to(D) for n, p in model.named_parameters()}
    out.update({n: b.detach() for n, b in model.named_buffers()})
    return out


def capture_routing(model, path="layers.0.gate"):
    """Record the Routing the gate returns inside the model's forward."""
    seen = []
    model.get_submodule(path).register_forward_hook(lambda mod, args, out: seen.append(out))
    return seen


# ----------------------------------------------------------------------------- references

def act_fn(name):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}[name]


def ref_experts(P, x, activation, prefix="layers.0.experts."):
    """Every expert on every token: x [S, d] -> [E, S, d]. E(x) = act(x W_in + b) W_out (+ b);
    GLU: (act(x W_gate) * (x W_in)) W_out."""
    h = torch.einsum("sd,edh->esh", x, P[prefix + "w_in"])
    if prefix + "b_in" in P:
        h = h + P[prefix + "b_in"][:, None, :]
    if activation in ("swiglu", "geglu"):
        g = torch.einsum("sd,edh->esh", x, P[prefix + "w_gate"])
        if prefix + "b_gate" in P:
            g = g + P[prefix + "b_gate"][:, None, :]
        h = act_fn(activation)(g) * h
    else:
        h = act_fn(activation)(h)
    y = torch.einsum("esh,ehd->esd", h, P[prefix + "w_out"])
    if prefix + "b_out" in P:
        y = y + P[prefix + "b_out"][:, None, :]
    return y


def combine(weights, Y):
    """weights [S, E] (0 where an expert does not compute the token), Y [E, S, d] -> [S, d]."""
    return torch.einsum("se,esd->sd", weights, Y)


def cv2(v):
    v = v.to(D)
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def keep_topk_softmax(h, k):
    """softmax(KeepTopK(h, k)) as a dense [S, E] matrix."""
    idx = h.topk(k, dim=-1).indices
    masked = torch.full_like(h, -math.inf).scatter(-1, idx, h.gather(-1, idx))
    return torch.softmax(masked, dim=-1)


def kth_excluding(H, k, i):
    """The k-th largest component of each row of H, H[:, i] excluded."""
    rest = torch.cat([H[..., :i], H[..., i + 1:]], dim=-1)
    return rest.topk(k, dim=-1).values[..., k - 1]


def phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def shazeer_p(clean, H, std, k):
    """P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i), shape of clean."""
    cols = [phi((clean[..., i] - kth_excluding(H, k, i)) / std[..., i]) for i in range(clean.shape[-1])]
    return torch.stack(cols, dim=-1)


def capacity(cf, k, n, E, min_capacity=0):
    return max(math.ceil(cf * k * n / E - 1e-9), min_capacity)


def ref_keep(choices, C, E, order=None, routed=None):
    """Kept mask [n, k] for chosen experts ``choices`` [n, k] (choice rank order): all first
    choices (in ``order``, default token order) before any second choice; C slots per expert."""
    n, k = choices.shape
    order = list(range(n)) if order is None else list(order)
    kept = torch.zeros(n, k, dtype=torch.bool)
    used = [0] * E
    for r in range(k):
        for t in order:
            if routed is not None and not routed[t, r]:
                continue
            e = int(choices[t, r])
            if used[e] < C:
                used[e] += 1
                kept[t, r] = True
    return kept


def dense_weights(choices, w, kept, E):
    """[S, E] weight matrix from per-token choices [S, k], weights [S, k] and kept mask."""
    out = torch.zeros(choices.shape[0], E, dtype=D)
    return out.scatter_add(1, choices, torch.where(kept, w, torch.zeros_like(w)))


def check_stats(stats, kept_choices, all_choices, E, cap=None):
    """tokens_per_expert (after drops), expert_load (router choice), dropped (count)."""
    tpe = torch.bincount(kept_choices, minlength=E)
    load = torch.bincount(all_choices, minlength=E)
    assert stats.tokens_per_expert.tolist() == tpe.tolist()
    assert stats.expert_load.to(torch.int64).tolist() == load.tolist()
    assert int(stats.dropped) == all_choices.numel() - kept_choices.numel()
    if cap is not None:
        assert stats.capacity == cap


class FixedNoise:
    """Stands in for moedsl.nn.rng.normal / uniform: value = table[call][global index]."""

    def __init__(self, kind="normal", n=1 << 14, seed=7):
        g = torch.Generator().manual_seed(seed)
        if kind == "normal":
            self.tables = [torch.randn(n, generator=g, dtype=D) for _ in range(4)]
        else:
            self.tables = [torch.rand(n, generator=g, dtype=D) * 0.999 for _ in range(4)]
        self.calls = []

    def __call__(self, seed, stream, index, dtype=torch.float32):
        table = self.tables[len(self.calls)]
        self.calls.append(tuple(index.shape))
        return table[index].to(dtype)


# ============================================================================= 1. softmax (dense)

def test_softmax_dense_output_and_importance():
    m = build({"type": "softmax"}, losses={"importance": 0.1})
    x = inputs()
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    G = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    Y = ref_experts(P, xs, "relu")
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(G, Y), **TOL)
    imp = cv2(G.sum(0))
    st = out.router_stats[0]
    torch.testing.assert_close(st.losses["importance"].to(D), imp, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.1 * imp, **TOL)
    # dense: every expert computes every token, nothing dropped
    assert st.tokens_per_expert.tolist() == [32] * 4 and int(st.dropped) == 0


# ============================================================================= 2. noisy top-k

def test_noisy_topk_eval_output_and_importance():
    m = build({"type": "noisy_topk", "k": 2}, E=6, losses={"importance": 0.1})
    m.eval()
    x = inputs(seed=1)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    G = keep_topk_softmax(xs @ P["layers.0.gate.weight"].T, 2)  # no noise in eval
    Y = ref_experts(P, xs, "relu")
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(G, Y), **TOL)
    imp = cv2(G.sum(0))
    torch.testing.assert_close(out.router_stats[0].losses["importance"].to(D), imp, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.1 * imp, **TOL)


def test_noisy_topk_eval_is_deterministic():
    m = build({"type": "noisy_topk", "k": 2}, E=6)
    m.eval()
    x = inputs(seed=2)
    assert torch.equal(m(x).output, m(x).output)


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_noisy_topk_training_fixed_noise_output_importance_load(monkeypatch, eps):
    E, k = 6, 2
    gate = {"type": "noisy_topk", "k": k}
    if eps:
        gate["noise_epsilon"] = eps
    m = build(gate, E=E, losses={"importance": 0.1, "load": 0.1})
    noise = FixedNoise()
    monkeypatch.setattr(moe_rng, "normal", noise)
    x = inputs(seed=3)
    out = m(x)
    assert len(noise.calls) == 1, noise.calls
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    S = xs.shape[0]
    clean = xs @ P["layers.0.gate.weight"].T
    std = F.softplus(xs @ P["layers.0.gate.noise_weight"].T) + eps
    n = noise.tables[0][torch.arange(S * E)].view(S, E)  # index of (token t, expert e) = t*E + e
    H = clean + n * std
    G = keep_topk_softmax(H, k)
    Y = ref_experts(P, xs, "relu")
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(G, Y), **TOL)
    imp = cv2(G.sum(0))
    load = cv2(shazeer_p(clean, H, std, k).sum(0))
    st = out.router_stats[0]
    torch.testing.assert_close(st.losses["importance"].to(D), imp, **TOL)
    torch.testing.assert_close(st.losses["load"].to(D), load, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.1 * imp + 0.1 * load, **TOL)
    # the noise changed the routing (the check is not vacuous)
    assert not torch.equal(H.topk(k).indices.sort().values, clean.topk(k).indices.sort().values)


def test_noisy_topk_starts_with_zero_router_and_noise_weights():
    m = moedsl.build_model(moedsl.load_spec(spec_of({"type": "noisy_topk", "k": 2})), seed=0)
    assert torch.count_nonzero(m.get_parameter("layers.0.gate.weight")) == 0
    assert torch.count_nonzero(m.get_parameter("layers.0.gate.noise_weight")) == 0


# ============================================================================= 3. Mixtral top-k

def test_mixtral_top2_swiglu():
    E, k = 8, 2
    m = build({"type": "topk", "k": k}, E=E, activation="swiglu")
    seen = capture_routing(m)
    x = inputs(seed=4)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    h = xs @ P["layers.0.gate.weight"].T
    top = h.topk(k, dim=-1)
    w_sel = torch.softmax(top.values, dim=-1)  # softmax over the two selected logits
    p_all = torch.softmax(h, dim=-1).gather(-1, top.indices)
    torch.testing.assert_close(w_sel, p_all / p_all.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    # SwiGLU experts written out: E(x) = W2 (silu(W1 x) * W3 x)
    Y = torch.stack([(F.silu(xs @ P["layers.0.experts.w_gate"][e]) * (xs @ P["layers.0.experts.w_in"][e]))
                     @ P["layers.0.experts.w_out"][e] for e in range(E)])
    W = dense_weights(top.indices, w_sel, torch.ones_like(w_sel, dtype=torch.bool), E)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, Y), **TOL)
    r = seen[-1]
    got = torch.zeros(xs.shape[0], E, dtype=D).index_put_((r.token, r.expert), r.weight.to(D), accumulate=True)
    torch.testing.assert_close(got, W, **TOL)
    st = out.router_stats[0]
    assert st.capacity is None and int(st.dropped) == 0  # dropless


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_sigmoid_scores(normalize):
    E, k = 6, 3
    m = build({"type": "topk", "k": k, "score": "sigmoid", "normalize": normalize}, E=E)
    x = inputs(seed=5)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    s = torch.sigmoid(xs @ P["layers.0.gate.weight"].T)
    top = s.topk(k, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True) if normalize else top.values
    W = dense_weights(top.indices, w, torch.ones_like(w, dtype=torch.bool), E)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)


def test_topk_softmax_unnormalized():
    E, k = 6, 2
    m = build({"type": "topk", "k": k, "normalize": False}, E=E, activation="geglu")
    x = inputs(seed=6)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    p = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    top = p.topk(k, dim=-1)
    W = dense_weights(top.indices, top.values, torch.ones_like(top.values, dtype=torch.bool), E)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "geglu")), **TOL)


def test_topk_balance_loss_counts_all_k_choices():
    E, k = 6, 2
    m = build({"type": "topk", "k": k}, E=E, losses={"balance": 0.01})
    x = inputs(seed=7)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    p = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    f = torch.bincount(p.topk(k).indices.flatten(), minlength=E).to(D) / (k * xs.shape[0])
    bal = E * (f * p.mean(0)).sum()
    torch.testing.assert_close(out.router_stats[0].losses["balance"].to(D), bal, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.01 * bal, **TOL)


# ============================================================================= 4. Switch

SKEW = [1.5, -0.5, 0.8, 0.0, 0.3, -1.0, 0.6, 0.2]  # a common input component: unbalanced routing


def switch_reference(P, xs, E, C, order=None, groups=1):
    """(weights [S, E] after drops, argmax [S], kept [S], probs [S, E]) per Switch."""
    p = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    top = p.max(-1)
    n = xs.shape[0] // groups
    kept = torch.zeros(xs.shape[0], dtype=torch.bool)
    for g in range(groups):
        sl = slice(g * n, (g + 1) * n)
        o = None
        if order == "score":
            o = torch.argsort(-top.values[sl], stable=True).tolist()
        kept[sl] = ref_keep(top.indices[sl, None], C, E, order=o)[:, 0]
    W = dense_weights(top.indices[:, None], top.values[:, None], kept[:, None], E)
    return W, top.indices, kept, p


@pytest.mark.parametrize("bias", [False, True])
def test_switch_capacity_drops_in_token_order(bias):
    E = 4
    m = build({"type": "switch", "capacity_factor": 1.0, "jitter": 0.0}, E=E, bias=bias,
              losses={"balance": 0.01})
    x = inputs(seed=8, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    C = capacity(1.0, 1, 32, E)
    W, idx, kept, p = switch_reference(P, xs, E, C)
    assert (~kept).sum() > 0, "the setup must overflow an expert"
    y = out.output.reshape(-1, 8)
    torch.testing.assert_close(y.to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    assert torch.all(y[~kept] == 0), "dropped tokens must get exactly 0 (even with expert biases)"
    st = out.router_stats[0]
    check_stats(st, idx[kept], idx, E, cap=C)
    f = torch.bincount(idx, minlength=E).to(D) / 32
    bal = E * (f * p.mean(0)).sum()
    torch.testing.assert_close(st.losses["balance"].to(D), bal, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.01 * bal, **TOL)


def test_switch_drop_priority_score():
    E = 4
    m = build({"type": "switch", "capacity_factor": 1.0, "jitter": 0.0, "drop_priority": "score"}, E=E)
    x = inputs(seed=9, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    W, idx, kept, _ = switch_reference(P, xs, E, capacity(1.0, 1, 32, E), order="score")
    W_pos, _, kept_pos, _ = switch_reference(P, xs, E, capacity(1.0, 1, 32, E))
    assert not torch.equal(kept, kept_pos), "score and position priority must differ on this input"
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)


def test_switch_default_in_eval_no_jitter_capacity_1_25():
    E = 4
    m = build({"type": "switch"}, E=E)  # jitter 0.01 and capacity 1.25 by default
    m.eval()
    x = inputs(seed=10, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    C = capacity(1.25, 1, 32, E)
    W, idx, kept, _ = switch_reference(P, xs, E, C)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    check_stats(out.router_stats[0], idx[kept], idx, E, cap=C)


def test_switch_jitter_multiplies_router_input(monkeypatch):
    E, eps = 4, 0.3
    m = build({"type": "switch", "capacity_factor": 4.0, "jitter": eps}, E=E)
    noise = FixedNoise("uniform")
    monkeypatch.setattr(moe_rng, "uniform", noise)
    x = inputs(seed=11)
    out = m(x)
    assert len(noise.calls) == 1, noise.calls
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    u = noise.tables[0][torch.arange(xs.numel())].view_as(xs)  # index of (token t, feature j) = t*d + j
    xj = xs * (1 - eps + 2 * eps * u)  # U(1 - eps, 1 + eps)
    p = torch.softmax(xj @ P["layers.0.gate.weight"].T, dim=-1)
    top = p.max(-1)
    assert not torch.equal(top.indices, (xs @ P["layers.0.gate.weight"].T).argmax(-1)), "jitter must matter"
    W = dense_weights(top.indices[:, None], top.values[:, None], torch.ones(32, 1, dtype=torch.bool), E)
    # the experts see the un-jittered input
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)


# ============================================================================= 5. GShard

def gshard_choices(P, xs):
    p = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    top = p.topk(2, dim=-1)
    g = top.values / top.values.sum(-1, keepdim=True)
    return top.indices, g, p


def test_gshard_always_output_capacity_order_and_aux():
    E = 4
    m = build({"type": "gshard", "second_expert": "always", "capacity_factor": 0.5}, E=E,
              losses={"balance": 0.01})
    seen = capture_routing(m)
    x = inputs(seed=12, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    idx, g, p = gshard_choices(P, xs)
    C = capacity(0.5, 2, 32, E)
    kept = ref_keep(idx, C, E)
    # the priority matters here: a token-major order (t0c0, t0c1, t1c0, ...) keeps a different set
    flat = ref_keep(idx.reshape(-1, 1), C, E).view(32, 2)
    assert not torch.equal(kept, flat)
    W = dense_weights(idx, g, kept, E)
    y = out.output.reshape(-1, 8)
    torch.testing.assert_close(y.to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    assert torch.all(y[~kept.any(1)] == 0)
    st = out.router_stats[0]
    check_stats(st, idx[kept], idx.flatten(), E, cap=C)
    # GShard aux: (1/E) sum_e (c_e / S) m_e, scaled by E^2 (uniform router -> 1); c_e = first choices
    c = torch.bincount(idx[:, 0], minlength=E).to(D)
    aux = E * ((c / 32) * p.mean(0)).sum()
    torch.testing.assert_close(st.losses["balance"].to(D), aux, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.01 * aux, **TOL)
    # slots: first choices fill each expert's buffer before second choices
    r = seen[-1]
    for e in range(E):
        rows = (r.expert == e) & (r.slot >= 0)
        ranks = torch.arange(r.token.numel()) % 2  # assignments listed per token, choice rank order
        order = torch.argsort(r.slot[rows])
        assert torch.all(ranks[rows][order].diff() >= 0)


def test_gshard_random_second_expert_fixed_uniform(monkeypatch):
    E = 4
    m = build({"type": "gshard", "capacity_factor": 4.0}, E=E)  # capacity never binds
    noise = FixedNoise("uniform")
    monkeypatch.setattr(moe_rng, "uniform", noise)
    x = inputs(seed=13)
    out = m(x)
    assert len(noise.calls) == 1, noise.calls
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    idx, g, _ = gshard_choices(P, xs)
    u = noise.tables[0][torch.arange(32)]  # one draw per token, index = token
    second = 2 * g[:, 1] > u
    assert 0 < second.sum() < 32
    kept = torch.stack([torch.ones(32, dtype=torch.bool), second], 1)
    W = dense_weights(idx, g, kept, E)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    st = out.router_stats[0]
    # a second expert not drawn is not routed, hence not a drop
    assert int(st.dropped) == 0
    assert st.expert_load.to(torch.int64).tolist() == torch.bincount(idx[kept], minlength=E).tolist()


def test_gshard_random_second_expert_statistics():
    """Unpatched RNG: kept second experts are consistent with 2*g2 > u, u ~ U(0, 1)."""
    E = 4
    m = build({"type": "gshard", "capacity_factor": 4.0}, E=E)
    seen = capture_routing(m)
    x = inputs(B=32, T=64, seed=14)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    idx, g, _ = gshard_choices(P, xs)
    r = seen[-1]
    S = xs.shape[0]
    first = torch.zeros(S, dtype=torch.bool)
    second = torch.zeros(S, dtype=torch.bool)
    for t, e, s in zip(r.token.tolist(), r.expert.tolist(), r.slot.tolist()):
        if s >= 0:
            if e == int(idx[t, 0]):
                first[t] = True
            elif e == int(idx[t, 1]):
                second[t] = True
            else:
                raise AssertionError(f"token {t} sent to {e}, not one of its top 2")
    assert first.all()
    prob = torch.clamp(2 * g[:, 1], max=1.0)
    mean, sd = prob.sum(), torch.sqrt((prob * (1 - prob)).sum())
    assert abs(second.sum() - mean) < 5 * sd, (int(second.sum()), float(mean), float(sd))
    assert torch.all(second[prob >= 1.0])
    # a higher g2 is kept more often: compare the top and bottom halves by g2
    order = torch.argsort(g[:, 1])
    assert second[order[S // 2:]].float().mean() > second[order[: S // 2]].float().mean()
    assert out.output.shape == x.shape


# ============================================================================= 6. expert choice

def expert_choice_reference(P, xs, E, cf, groups=1, cap=None):
    n = xs.shape[0] // groups
    C = min(capacity(cf, 1, n, E), n)
    s = torch.softmax(xs @ P["layers.0.gate.weight"].T, dim=-1)
    picked = torch.zeros_like(s, dtype=torch.bool)
    for g in range(groups):
        sl = slice(g * n, (g + 1) * n)
        top = s[sl].topk(C, dim=0).indices  # [C, E]: each expert's top-C tokens
        blk = torch.zeros(n, E, dtype=torch.bool)
        blk.scatter_(0, top, True)
        picked[sl] = blk
    kept = picked.clone()
    if cap is not None:  # a token keeps the `cap` highest-weight experts that picked it
        masked = torch.where(picked, s, torch.full_like(s, -1.0))
        best = masked.topk(cap, dim=-1).indices
        keep_cap = torch.zeros_like(picked).scatter(1, best, True)
        kept = picked & keep_cap
    return torch.where(kept, s, torch.zeros_like(s)), picked, kept, C


@pytest.mark.parametrize("cf,groups", [(1.0, 1), (2.0, 1), (1.0, 2)])
def test_expert_choice_output(cf, groups):
    E = 4
    m = build({"type": "expert_choice", "capacity_factor": cf, "routing_groups": groups}, E=E)
    x = inputs(seed=15)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    W, picked, _, C = expert_choice_reference(P, xs, E, cf, groups)
    assert C == math.ceil(cf * (32 // groups) / E)
    y = out.output.reshape(-1, 8)
    torch.testing.assert_close(y.to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    nobody = ~picked.any(1)
    if cf == 1.0:
        assert nobody.any(), "setup: some token must be picked by no expert"
    assert torch.all(y[nobody] == 0)
    st = out.router_stats[0]
    assert st.tokens_per_expert.tolist() == [C * groups] * E  # each expert exactly C per group
    assert int(st.dropped) == 0


def test_expert_choice_max_experts_per_token():
    E, cf, cap = 4, 2.0, 1
    m = build({"type": "expert_choice", "capacity_factor": cf, "max_experts_per_token": cap}, E=E)
    seen = capture_routing(m)
    x = inputs(seed=16)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    W, picked, kept, C = expert_choice_reference(P, xs, E, cf, cap=cap)
    assert (picked.sum(1) > cap).any(), "setup: the cap must bind"
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    r = seen[-1]
    per_token = torch.bincount(r.token[r.slot >= 0], minlength=32)
    assert per_token.max() <= cap
    # the picks the cap removed are counted (never lost silently)
    assert int(out.router_stats[0].dropped) == int((picked & ~kept).sum())


# ============================================================================= 7. hierarchical

HIER = {"groups": 3, "experts_per_group": 3,
        "primary": {"type": "noisy_topk", "k": 2}, "secondary": {"type": "noisy_topk", "k": 2}}


def hier_logits(P, xs):
    clean_p = xs @ P["layers.0.gate.primary_weight"].T  # [S, a]
    clean_s = torch.einsum("sd,abd->sab", xs, P["layers.0.gate.secondary_weight"])  # [S, a, b]
    std_p = std_s = None
    if "layers.0.gate.primary_noise_weight" in P:
        std_p = F.softplus(xs @ P["layers.0.gate.primary_noise_weight"].T)
    if "layers.0.gate.secondary_noise_weight" in P:
        std_s = F.softplus(torch.einsum("sd,abd->sab", xs, P["layers.0.gate.secondary_noise_weight"]))
    return clean_p, std_p, clean_s, std_s


def test_hierarchical_eval_output_and_importance():
    a, b = 3, 3
    m = build(None, E=a * b, hierarchy=HIER, losses={"importance": 0.1})
    m.eval()
    x = inputs(seed=17)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    clean_p, _, clean_s, _ = hier_logits(P, xs)
    Gp = keep_topk_softmax(clean_p, 2)  # [S, a]
    Gs = keep_topk_softmax(clean_s, 2)  # [S, a, b], G_i(x) for each group i
    W = (Gp[:, :, None] * Gs).reshape(-1, a * b)  # expert id = i*b + j
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    imp = cv2(W.sum(0))  # Importance_H(X)_{i,j} = sum_x Gp_i * G_i,j
    torch.testing.assert_close(out.router_stats[0].losses["importance"].to(D), imp, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.1 * imp, **TOL)


def test_hierarchical_softmax_primary_topk_secondary_eval():
    a, b = 2, 4
    hier = {"groups": a, "experts_per_group": b, "primary": {"type": "softmax"},
            "secondary": {"type": "topk", "k": 2}}
    m = build(None, E=a * b, hierarchy=hier)
    m.eval()
    x = inputs(seed=18)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    clean_p, _, clean_s, _ = hier_logits(P, xs)
    W = (torch.softmax(clean_p, -1)[:, :, None] * keep_topk_softmax(clean_s, 2)).reshape(-1, a * b)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)


def test_hierarchical_training_fixed_noise_load_h(monkeypatch):
    a, b, kp, kb = 3, 3, 2, 2
    m = build(None, E=a * b, hierarchy=HIER, losses={"importance": 0.1, "load": 0.1})
    noise = FixedNoise()
    monkeypatch.setattr(moe_rng, "normal", noise)
    x = inputs(seed=19)
    out = m(x)
    assert len(noise.calls) == 2, noise.calls  # primary, then secondary
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    S = xs.shape[0]
    clean_p, std_p, clean_s, std_s = hier_logits(P, xs)
    # global noise index: primary (t, i) -> t*a + i; secondary (t, i, j) -> t*a*b + i*b + j
    n_p = noise.tables[0][torch.arange(S * a)].view(S, a)
    n_s = noise.tables[1][torch.arange(S * a * b)].view(S, a, b)
    H_p = clean_p + n_p * std_p
    H_s = clean_s + n_s * std_s
    Gp = keep_topk_softmax(H_p, kp)
    Gs = keep_topk_softmax(H_s, kb)
    W = (Gp[:, :, None] * Gs).reshape(-1, a * b)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    imp = cv2(W.sum(0))
    # Load_H(X)_{i,j} = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|
    load_p = shazeer_p(clean_p, H_p, std_p, kp).sum(0)  # [a]
    sent = Gp > 0  # X^(i): the tokens the primary gate sent to group i
    P_s = shazeer_p(clean_s, H_s, std_s, kb)  # [S, a, b]
    load_i = (P_s * sent[:, :, None]).sum(0)  # [a, b]
    size = sent.sum(0).to(D)
    assert torch.all(size > 0)
    load_h = load_p[:, None] * load_i / size[:, None]
    load = cv2(load_h.flatten())
    st = out.router_stats[0]
    torch.testing.assert_close(st.losses["importance"].to(D), imp, **TOL)
    torch.testing.assert_close(st.losses["load"].to(D), load, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.1 * imp + 0.1 * load, **TOL)


# ============================================================================= 8. hash

def hash_model(E=4, vocab=50):
    spec = {"moedsl": 1, "name": "t", "model": {"vocab_size": vocab, "d_model": 8, "max_seq_len": 64},
            "layers": [{"embedding": {}}, {"moe": {"residual": False, "prenorm": False,
                                                   "experts": {"count": E, "hidden": 16},
                                                   "gate": {"type": "hash"}}}],
            "train": {"batch_size": 2}}
    return moedsl.build_model(moedsl.load_spec(spec), seed=0)


def test_hash_gate_expert_is_table_of_token_id():
    E, vocab = 4, 50
    m = hash_model(E, vocab)
    gate = m.get_submodule("layers.1.gate")
    table = gate.table
    assert table.shape == (vocab,) and table.min() >= 0 and table.max() < E
    assert len(set(table.tolist())) > 1
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(20))
    xs = torch.randn(40, 8, generator=torch.Generator().manual_seed(21))
    r = gate(xs, ids, 0, 1)
    assert r.token.tolist() == list(range(40))
    assert r.expert.tolist() == table[ids].tolist()
    assert torch.all(r.weight == 1) and torch.all(r.slot >= 0)


def test_hash_model_output():
    E, vocab = 4, 50
    m = hash_model(E, vocab)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(22))
    out = m(ids)
    P = params(m)
    xs = P["embedding.weight"][ids.flatten()]
    Y = ref_experts(P, xs, "relu", prefix="layers.1.experts.")
    choice = P["layers.1.gate.table"][ids.flatten()]
    W = torch.zeros(32, E, dtype=D).scatter(1, choice[:, None], 1.0)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, Y), **TOL)


# ============================================================================= 9. z-loss

@pytest.mark.parametrize("gate", [{"type": "topk", "k": 2}, {"type": "switch", "jitter": 0.0},
                                  {"type": "softmax"}, {"type": "expert_choice"}])
def test_z_loss(gate):
    m = build(gate, E=4, losses={"z_loss": 0.001})
    x = inputs(seed=23)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    z = (torch.logsumexp(xs @ P["layers.0.gate.weight"].T, dim=-1) ** 2).mean()
    torch.testing.assert_close(out.router_stats[0].losses["z_loss"].to(D), z, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.001 * z, **TOL)


# ============================================================================= 10. ST-MoE eval capacity

def test_eval_capacity_factor():
    E = 4
    m = build({"type": "switch", "capacity_factor": 1.0, "eval_capacity_factor": 2.0, "jitter": 0.0}, E=E)
    x = inputs(seed=24, offset=SKEW)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    Y = ref_experts(P, xs, "relu")
    for training, cf in ((True, 1.0), (False, 2.0)):
        m.train(training)
        out = m(x)
        C = capacity(cf, 1, 32, E)
        W, idx, kept, _ = switch_reference(P, xs, E, C)
        torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, Y), **TOL)
        check_stats(out.router_stats[0], idx[kept], idx, E, cap=C)
        if training:
            assert (~kept).any()


# ============================================================================= 11. aux-loss-free bias

def test_bias_balancing_chooses_but_does_not_weigh():
    E, k = 4, 2
    m = build({"type": "topk", "k": k, "bias_balancing": {"rate": 0.01}}, E=E)
    gate = m.get_submodule("layers.0.gate")
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))  # expert 2 always chosen
    seen = capture_routing(m)
    x = inputs(seed=25)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    h = xs @ P["layers.0.gate.weight"].T
    other = torch.where(torch.arange(E) == 2, torch.full_like(h, -math.inf), h).argmax(-1)
    idx = torch.stack([torch.full_like(other, 2), other], 1)
    w = torch.softmax(h.gather(1, idx), dim=-1)  # weights from the unbiased scores
    W = dense_weights(idx, w, torch.ones_like(w, dtype=torch.bool), E)
    assert not torch.equal(idx.sort(1).values, h.topk(k).indices.sort(1).values)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    r = seen[-1]
    got = torch.zeros(32, E, dtype=D).index_put_((r.token, r.expert), r.weight.to(D), accumulate=True)
    torch.testing.assert_close(got, W, **TOL)


def test_bias_balancing_sigmoid_and_balance_step():
    E, k, rate = 6, 2, 0.05
    m = build({"type": "topk", "k": k, "score": "sigmoid", "bias_balancing": {"rate": rate}}, E=E)
    gate = m.get_submodule("layers.0.gate")
    seen = capture_routing(m)
    P = params(m)
    Wg = P["layers.0.gate.weight"]
    Y_of = {}
    bias = torch.zeros(E, dtype=D)
    # round 1: two forwards, then a step; round 2: one forward with the new bias, then a step
    for rnd, seeds in enumerate(((26, 27), (28,))):
        load = torch.zeros(E, dtype=D)
        for sd in seeds:
            x = inputs(seed=sd)
            out = m(x)
            xs = x.reshape(-1, 8).to(D)
            s = torch.sigmoid(xs @ Wg.T)
            idx = (s + bias).topk(k, dim=-1).indices  # the bias only chooses
            w = s.gather(1, idx)
            w = w / w.sum(-1, keepdim=True)
            W = dense_weights(idx, w, torch.ones_like(w, dtype=torch.bool), E)
            Y_of[sd] = ref_experts(P, xs, "relu")
            torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, Y_of[sd]), **TOL)
            r = seen[-1]
            assert sorted(zip(r.token.tolist(), r.expert.tolist())) == sorted(
                (t, int(e)) for t in range(32) for e in idx[t])
            load += torch.bincount(idx.flatten(), minlength=E).to(D)
        gate.balance_step()
        bias = bias + rate * torch.sign(load.mean() - load)  # down if overloaded, up if underloaded
        torch.testing.assert_close(gate.expert_bias.to(D), bias, rtol=0, atol=1e-6)
        if rnd == 0:
            assert torch.count_nonzero(bias) > 0


# ============================================================================= 12. routing groups

def test_routing_groups_own_capacity():
    E, G = 4, 2
    m = build({"type": "switch", "capacity_factor": 1.0, "jitter": 0.0, "routing_groups": G}, E=E,
              losses={"balance": 0.01})
    seen = capture_routing(m)
    x = inputs(seed=29, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    C = capacity(1.0, 1, 32 // G, E)  # per group
    W, idx, kept, p = switch_reference(P, xs, E, C, groups=G)
    # one group of 32 would keep a different set (capacity 8 shared by both halves)
    _, _, kept_one, _ = switch_reference(P, xs, E, capacity(1.0, 1, 32, E))
    assert not torch.equal(kept, kept_one)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    st = out.router_stats[0]
    check_stats(st, idx[kept], idx, E)
    r = seen[-1]
    for g in range(G):
        in_g = (r.token >= g * 16) & (r.token < (g + 1) * 16) & (r.slot >= 0)
        assert torch.bincount(r.expert[in_g], minlength=E).max() <= C
    # balance loss: per group, then averaged
    bals = []
    for g in range(G):
        sl = slice(g * 16, (g + 1) * 16)
        f = torch.bincount(idx[sl], minlength=E).to(D) / 16
        bals.append(E * (f * p[sl].mean(0)).sum())
    bal = torch.stack(bals).mean()
    torch.testing.assert_close(st.losses["balance"].to(D), bal, **TOL)
    torch.testing.assert_close(out.aux_loss.to(D), 0.01 * bal, **TOL)


def test_routing_groups_gshard_always():
    E, G = 4, 2
    m = build({"type": "gshard", "second_expert": "always", "capacity_factor": 0.5, "routing_groups": G}, E=E)
    x = inputs(seed=30, offset=SKEW)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    idx, g, _ = gshard_choices(P, xs)
    C = capacity(0.5, 2, 16, E)
    kept = torch.cat([ref_keep(idx[:16], C, E), ref_keep(idx[16:], C, E)])
    W = dense_weights(idx, g, kept, E)
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), combine(W, ref_experts(P, xs, "relu")), **TOL)
    check_stats(out.router_stats[0], idx[kept], idx.flatten(), E)


# ============================================================================= 13. shared experts

@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_shared_experts_add_dense_ffn(activation):
    E, k = 4, 2
    m = build({"type": "topk", "k": k}, E=E, activation=activation, shared={"count": 2, "hidden": 16})
    x = inputs(seed=31)
    out = m(x)
    P = params(m)
    xs = x.reshape(-1, 8).to(D)
    h = xs @ P["layers.0.gate.weight"].T
    top = h.topk(k, -1)
    W = dense_weights(top.indices, torch.softmax(top.values, -1), torch.ones(32, k, dtype=torch.bool), E)
    routed = combine(W, ref_experts(P, xs, activation))
    # two shared experts of hidden 16, summed; (stored as one FFN of hidden 32: rows [16s, 16s+16))
    w_in, w_out = P["layers.0.shared.w_in.weight"], P["layers.0.shared.w_out.weight"]
    assert w_in.shape == (32, 8) and w_out.shape == (8, 32)
    shared = torch.zeros_like(xs)
    for s in range(2):
        rows = slice(16 * s, 16 * s + 16)
        a = xs @ w_in[rows].T
        if activation == "swiglu":
            a = F.silu(xs @ P["layers.0.shared.w_gate.weight"][rows].T) * a
        else:
            a = F.relu(a)
        shared = shared + a @ w_out[:, rows].T
    assert shared.abs().max() > 0.1
    torch.testing.assert_close(out.output.reshape(-1, 8).to(D), routed + shared, **TOL)


# ============================================================================= gradients

def tiny(gate, **kw):
    return build(gate, E=3, d=4, hidden=5, dtype=torch.float64, **kw)


def tiny_input():
    return inputs(B=2, T=3, d=4, seed=32, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("gate", [{"type": "topk", "k": 2}, {"type": "switch", "capacity_factor": 2.0, "jitter": 0.0},
                                  {"type": "softmax"}])
def test_gradcheck_output_wrt_x(gate):
    """Finite differences agree with autograd in float64 (a float64 model routes in float64:
    router_dtype float32 only ever widens the router's precision)."""
    m = tiny(gate)
    m.eval()
    x = tiny_input()
    assert torch.autograd.gradcheck(lambda x: m(x).output, (x,))


def test_gradcheck_output_wrt_x_float64_strict():
    m = tiny({"type": "topk", "k": 2})
    m.eval()
    x = tiny_input()
    assert torch.autograd.gradcheck(lambda x: m(x).output, (x,))


def test_gradcheck_expert_path_float64_strict():
    """Zero router weights give constant gate weights (softmax of zero logits = 1/E): the
    expert path alone, which must be exact in float64."""
    m = tiny({"type": "softmax"})
    with torch.no_grad():
        m.get_parameter("layers.0.gate.weight").zero_()
    x = tiny_input()
    assert torch.autograd.gradcheck(lambda x: m(x).output, (x,))


def test_gradients_reach_router_noise_and_every_expert():
    E = 4
    m = build({"type": "noisy_topk", "k": 2}, E=E, losses={"importance": 0.1, "load": 0.1})
    x = inputs(seed=33)
    out = m(x)
    assert torch.all(out.router_stats[0].tokens_per_expert > 0)
    (out.output.pow(2).sum() + out.aux_loss).backward()
    gw = m.get_parameter("layers.0.gate.weight").grad
    gn = m.get_parameter("layers.0.gate.noise_weight").grad
    assert gw is not None and torch.count_nonzero(gw) > 0
    assert gn is not None and torch.count_nonzero(gn) > 0
    for name in ("w_in", "w_out"):
        grad = m.get_parameter(f"layers.0.experts.{name}").grad
        assert grad is not None
        for e in range(E):
            assert torch.count_nonzero(grad[e]) > 0, (name, e)


@pytest.mark.parametrize("gate", [{"type": "switch", "capacity_factor": 1.0, "jitter": 0.0},
                                  {"type": "gshard", "second_expert": "always"},
                                  {"type": "expert_choice"}])
def test_gradients_capacity_gates(gate):
    E = 4
    m = build(gate, E=E, activation="swiglu", losses={"z_loss": 0.001})
    x = inputs(seed=34).requires_grad_(True)
    out = m(x)
    assert torch.all(out.router_stats[0].tokens_per_expert > 0)
    (out.output.pow(2).sum() + out.aux_loss).backward()
    assert torch.count_nonzero(m.get_parameter("layers.0.gate.weight").grad) > 0
    assert torch.count_nonzero(x.grad) > 0
    for name in ("w_in", "w_gate", "w_out"):
        grad = m.get_parameter(f"layers.0.experts.{name}").grad
        for e in range(E):
            assert torch.count_nonzero(grad[e]) > 0, (name, e)


@settings(deadline=None, database=None, max_examples=30)
@given(d=st.integers(1, 700), rows=st.integers(1, 40), eps=st.sampled_from([1e-6, 1e-5, 1e-2]), seed=st.integers(0, 2**16))
def test_rmsnorm_without_gradient_is_the_same_bits_as_with(d, rows, eps, seed):
    """RMSNorm x / sqrt(mean(x²) + eps) · g (Zhang & Sennrich 2019, eq. 4; transformers'
    MixtralRMSNorm). Without a gradient to record (decoding), float32 goes through one
    ``F.rms_norm`` call; it must be the same values, bit for bit, as the ops a training step
    records, whatever the width."""
    from moedsl.nn.layers import RMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(d, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = torch.randn(rows, d, generator=g) * 4
    recorded = norm(x.requires_grad_())
    with torch.no_grad():
        plain = norm(x)
    want = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps) * norm.weight.detach()
    assert torch.equal(recorded.detach(), plain)
    torch.testing.assert_close(plain, want, rtol=1e-6, atol=1e-6)
