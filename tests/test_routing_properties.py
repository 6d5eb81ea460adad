"""Property tests of moedsl's routing invariants: capacity (GShard §2.2, Switch §2.2), counted
drops, and outputs that sum only the kept assignments (Shazeer et al. 2017, eq. 1).

For random shapes, gate types and capacity settings, one MoE layer over bare vectors is
run, the Routing its gate returned inside the forward is captured, and checked against:
- no expert keeps more than its capacity C per routing group; slots are unique within
  (group, expert), lie in the group's range [g*C, (g+1)*C), and are in priority order
  (first choices before second choices; token order, or max gate weight for
  drop_priority: score);
- dropped assignments are counted (`dropped` == routed assignments with slot -1), have
  weight 0 and contribute exactly 0: the layer output equals a float64 reference that
  sums weight * expert(x) over the kept assignments only, and a token with nothing
  kept gets exactly 0;
- the chosen experts and the kept weights are the gate's formula (top-k / Switch /
  GShard / noisy top-k / dense softmax), recomputed here from the logits and from the
  random numbers the gate drew (recorded, not replaced);
- expert choice: every expert takes exactly C tokens per group (without a per-token cap).

The inputs come from a drawn seed (never adversarial ties); an example whose float32
routing could legitimately differ from the float64 reference (a near-tie) is skipped.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moedsl
import moedsl.nn.rng as moe_rng

D = torch.float64
GAP = 1e-5  # float32 vs float64 decisions closer than this are skipped

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not os.environ.get("MOEDSL_HYPOTHESIS_RANDOM"))


# ----------------------------------------------------------------------------- configs

@st.composite
def configs(draw, types=("topk", "noisy_topk", "switch", "gshard", "softmax")):
    t = draw(st.sampled_from(types))
    E = draw(st.integers(2, 8))
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    cfg = {"type": t, "E": E, "d": draw(st.integers(1, 6)), "groups": groups,
           "B": groups * draw(st.integers(1, 2)), "T": draw(st.integers(1, 8)),
           "training": draw(st.booleans()), "activation": draw(st.sampled_from(["relu", "swiglu"])),
           "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2 ** 20)),
           "router_scale": draw(st.sampled_from([0.3, 1.0, 3.0]))}
    gate = {"type": t}
    if t in ("topk", "noisy_topk"):
        gate["k"] = draw(st.integers(1, E))
    if t == "topk":
        gate["score"] = draw(st.sampled_from(["softmax", "sigmoid"]))
        gate["normalize"] = draw(st.booleans())
    if t == "noisy_topk" and draw(st.booleans()):
        gate["noise_epsilon"] = 0.1
    if t == "switch":
        gate["jitter"] = draw(st.sampled_from([0.0, 0.2]))
    if t == "gshard":
        gate["second_expert"] = draw(st.sampled_from(["random", "always"]))
        gate["normalize"] = draw(st.booleans())
    if t == "expert_choice" and draw(st.booleans()):
        gate["max_experts_per_token"] = draw(st.integers(1, E))
    if t != "softmax":
        drop = t in ("switch", "gshard", "expert_choice") or draw(st.booleans())
        if drop:
            gate["drop_policy"] = "drop"
            gate["capacity_factor"] = draw(st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 3.0]))
            if draw(st.booleans()):
                gate["min_capacity"] = draw(st.integers(0, 4))
            if draw(st.booleans()):
                gate["eval_capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
            if t != "expert_choice":
                gate["drop_priority"] = draw(st.sampled_from(["position", "score"]))
        if groups > 1:
            gate["routing_groups"] = groups
    cfg["gate"] = gate
    return cfg


def build(cfg):
    experts = {"count": cfg["E"], "hidden": 4, "activation": cfg["activation"], "bias": cfg["bias"]}
    spec = {"moedsl": 1, "name": "p", "model": {"input": "vectors", "d_model": cfg["d"], "max_seq_len": 64},
            "layers": [{"moe": {"residual": False, "prenorm": False, "experts": experts, "gate": cfg["gate"]}}],
            "train": {"batch_size": cfg["B"]}}
    m = moedsl.build_model(moedsl.load_spec(spec), seed=0, dtype=torch.float32)
    g = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".gate." in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=D) * cfg["router_scale"]).to(p.dtype))
            elif ".b_" in name:
                p.copy_((torch.randn(p.shape, generator=g, dtype=D) * 0.3).to(p.dtype))
    m.train(cfg["training"])
    x = torch.randn(cfg["B"], cfg["T"], cfg["d"], generator=g, dtype=D).to(torch.float32)
    return m, x


class Recorder:
    """Wraps moedsl.nn.rng.normal / uniform and keeps what they returned (values unchanged)."""

    def __init__(self):
        self.normal, self.uniform = [], []
        self._saved = None

    def __enter__(self):
        self._saved = (moe_rng.normal, moe_rng.uniform)
        orig_normal, orig_uniform = self._saved

        def normal(*a, **k):
            out = orig_normal(*a, **k)
            self.normal.append(out.detach().clone())
            return out

        def uniform(*a, **k):
            out = orig_uniform(*a, **k)
            self.uniform.append(out.detach().clone())
            return out

        moe_rng.normal, moe_rng.uniform = normal, uniform
        return self

    def __exit__(self, *exc):
        moe_rng.normal, moe_rng.uniform = self._saved


def run(cfg):
    m, x = build(cfg)
    seen = []
    m.get_submodule("layers.0.gate").register_forward_hook(lambda mod, a, out: seen.append(out))
    with Recorder() as rec:
        out = m(x)
    assert len(seen) == 1
    P = {n: p.detach().to(D) for n, p in m.named_parameters()}
    return out, seen[0], P, x.reshape(-1, cfg["d"]).to(D), rec


# ----------------------------------------------------------------------------- references

def ref_experts(P, xs, activation):
    h = torch.einsum("sd,edh->esh", xs, P["layers.0.experts.w_in"])
    if "layers.0.experts.b_in" in P:
        h = h + P["layers.0.experts.b_in"][:, None, :]
    if activation == "swiglu":
        g = torch.einsum("sd,edh->esh", xs, P["layers.0.experts.w_gate"])
        if "layers.0.experts.b_gate" in P:
            g = g + P["layers.0.experts.b_gate"][:, None, :]
        h = F.silu(g) * h
    else:
        h = F.relu(h)
    y = torch.einsum("esh,ehd->esd", h, P["layers.0.experts.w_out"])
    if "layers.0.experts.b_out" in P:
        y = y + P["layers.0.experts.b_out"][:, None, :]
    return y  # [E, S, d]


def topk_gap(v, k, relative=False):
    """Smallest gap between the k-th and (k+1)-th largest, and between consecutive chosen
    values (their rank order matters for the priority). ``relative``: for positive scores
    (probabilities, sigmoids) that float32 resolves only to a relative precision."""
    if k >= v.shape[-1]:
        s = v.sort(-1, descending=True).values
    else:
        s = v.topk(k + 1, -1).values
    if s.shape[-1] < 2:
        return math.inf
    gap = s[..., :-1] - s[..., 1:]
    if relative:
        gap = gap / s[..., :-1].clamp(min=1e-30)
    return float(gap.min())


def capacity_of(cfg, n, k):
    g = cfg["gate"]
    if cfg["type"] == "softmax":
        return n
    if "capacity_factor" not in g:
        return None
    cf = g["capacity_factor"] if cfg["training"] else g.get("eval_capacity_factor", g["capacity_factor"])
    kk = 1 if cfg["type"] == "expert_choice" else k
    C = max(math.ceil(cf * kk * n / cfg["E"] - 1e-9), g.get("min_capacity", 0))
    return min(C, n) if cfg["type"] == "expert_choice" else C


def reference_choice(cfg, P, xs, rec):
    """Per token: chosen experts [S, k] (rank order), weights [S, k], routed [S, k], the gap of
    the closest float decision (to skip near-ties), and the chosen experts' router probabilities
    before any renormalisation over the k [S, k] (what V-MoE's batch prioritized routing ranks by)."""
    t, E, g = cfg["type"], cfg["E"], cfg["gate"]
    S = xs.shape[0]
    W = P["layers.0.gate.weight"]
    gaps = []
    if t == "switch" and cfg["training"] and g.get("jitter", 0.01) > 0:
        eps = g.get("jitter", 0.01)
        u = rec.uniform[0].to(D).reshape(S, -1)
        xs = xs * (1 - eps + 2 * eps * u)
    h = xs @ W.T
    routed = raw = None
    if t == "softmax":
        idx = torch.arange(E).expand(S, E)
        w = torch.softmax(h, -1)
    elif t == "switch":
        p = torch.softmax(h, -1)
        gaps.append(topk_gap(p, 1, relative=True))
        w, idx = p.max(-1, keepdim=True)
    elif t == "gshard":
        gaps.append(topk_gap(torch.softmax(h, -1), 2, relative=True))
        top = torch.softmax(h, -1).topk(2, -1)
        idx, w = top.indices, top.values
        raw = w
        if g.get("normalize", True):
            w = w / w.sum(-1, keepdim=True)
        routed = torch.ones(S, 2, dtype=torch.bool)
        if g.get("second_expert", "random") == "random":
            u = rec.uniform[-1].to(D).reshape(S)
            routed[:, 1] = 2 * w[:, 1] > u
            gaps.append(float((2 * w[:, 1] - u).abs().min()))
    elif t == "topk":
        k = g["k"]
        s = torch.sigmoid(h) if g.get("score") == "sigmoid" else torch.softmax(h, -1)
        gaps.append(topk_gap(s, k, relative=True))
        top = s.topk(k, -1)
        idx, w = top.indices, top.values
        raw = w
        if g.get("normalize", True):
            w = w / w.sum(-1, keepdim=True)
    elif t == "noisy_topk":
        k = g["k"]
        H = h
        if cfg["training"]:
            std = F.softplus(xs @ P["layers.0.gate.noise_weight"].T) + g.get("noise_epsilon", 0.0)
            H = h + rec.normal[0].to(D).reshape(S, E) * std
        gaps.append(topk_gap(H, k))
        top = H.topk(k, -1)
        idx, w = top.indices, torch.softmax(top.values, -1)
        raw = torch.softmax(H, -1).gather(-1, idx)
    else:
        raise AssertionError(t)
    if routed is None:
        routed = torch.ones_like(idx, dtype=torch.bool)
    return idx, w, routed, min(gaps, default=math.inf), (w if raw is None else raw)


def reference_slots(idx, routed, prio, C, E, groups):
    """Slot of every (token, rank) assignment: per group, all rank-0 assignments (tokens in
    priority order) before rank 1, ...; position within (group, expert), g*C + pos, or -1."""
    S, k = idx.shape
    n = S // groups
    slot = torch.full((S, k), -1, dtype=torch.int64)
    for gr in range(groups):
        toks = list(range(gr * n, (gr + 1) * n))
        if prio is not None:
            toks.sort(key=lambda tt: -float(prio[tt]))  # stable: ties keep token order
        used = [0] * E
        for r in range(k):
            for tt in toks:
                if not routed[tt, r]:
                    continue
                e = int(idx[tt, r])
                if C is None:
                    slot[tt, r] = 0
                elif used[e] < C:
                    slot[tt, r] = gr * C + used[e]
                    used[e] += 1
    return slot


# ----------------------------------------------------------------------------- checks shared by all gates

def check_invariants(cfg, out, r, P, xs, C_group):
    S, G, E = xs.shape[0], cfg["groups"], cfg["E"]
    n = S // G
    kept = r.slot >= 0
    # weight 0 where dropped
    assert torch.all(r.weight[~kept] == 0)
    # capacity per (group, expert); slots unique and in the group's range
    if C_group is not None:
        assert r.capacity == G * C_group
        grp = r.token // n
        assert torch.all(r.slot[kept] >= grp[kept] * C_group)
        assert torch.all(r.slot[kept] < (grp[kept] + 1) * C_group)
        key = r.expert[kept] * (G * C_group) + r.slot[kept]
        assert key.unique().numel() == key.numel(), "two assignments share a slot"
        for gr in range(G):
            in_g = kept & (grp == gr)
            assert torch.bincount(r.expert[in_g], minlength=E).max() <= C_group
    else:
        assert r.capacity is None
    # stats
    st = out.router_stats[0]
    assert st.tokens_per_expert.tolist() == torch.bincount(r.expert[kept], minlength=E).tolist()
    # the output is the sum over kept assignments only (float64 reference); dropped give exactly 0
    Y = ref_experts(P, xs, cfg["activation"])
    ref = torch.zeros(S, xs.shape[1], dtype=D).index_add(
        0, r.token[kept], Y[r.expert[kept], r.token[kept]] * r.weight[kept].to(D)[:, None])
    y = out.output.reshape(S, -1)
    torch.testing.assert_close(y.to(D), ref, rtol=1e-5, atol=1e-5)
    nothing = torch.ones(S, dtype=torch.bool)
    nothing[r.token[kept]] = False
    assert torch.all(y[nothing] == 0), "a token with every assignment dropped must get exactly 0"


# ----------------------------------------------------------------------------- properties

@settings(max_examples=150, **SETTINGS)
@given(configs())
def test_topk_style_routing_invariants(cfg):
    out, r, P, xs, rec = run(cfg)
    S, E, G = xs.shape[0], cfg["E"], cfg["groups"]
    idx, w, routed, gap, raw = reference_choice(cfg, P, xs, rec)
    assume(gap > GAP)
    k = idx.shape[1]
    n = S // G
    C = capacity_of(cfg, n, k)
    # assignments are listed token-major in rank order
    assert r.token.tolist() == torch.arange(S).repeat_interleave(k).tolist()
    assert r.expert.view(S, k).tolist() == idx.tolist(), "the chosen experts are not the gate's formula"
    slot = r.slot.view(S, k)
    kept = slot >= 0
    # kept weights are the formula's weights
    torch.testing.assert_close(r.weight.view(S, k)[kept].to(D), w[kept], rtol=1e-5, atol=1e-6)
    # dropped assignments are counted: routed but no slot
    st = out.router_stats[0]
    assert int(r.dropped) == int((routed & ~kept).sum()) == int(st.dropped)
    assert st.expert_load.to(torch.int64).tolist() == torch.bincount(idx[routed], minlength=E).tolist()
    # not-routed (GShard's random second expert) never takes a slot
    assert not torch.any(kept & ~routed)
    # priority order and exact slots
    prio = None
    if cfg["gate"].get("drop_priority") == "score" and C is not None:
        prio = raw.max(-1).values
        for gr in range(G):
            s = prio[gr * n:(gr + 1) * n].sort().values
            assume(s.numel() < 2 or float(s.diff().min()) > GAP)
    expect = reference_slots(idx, routed, prio, C, E, G)
    assert slot.tolist() == expect.tolist(), "slots / drops do not follow the priority order"
    # a normalised top-k's kept weights sum to 1 for every token with nothing dropped
    g = cfg["gate"]
    if cfg["type"] in ("topk", "noisy_topk", "softmax") and g.get("normalize", True):
        full = (kept == routed).all(-1)
        sums = r.weight.view(S, k).to(D).sum(-1)
        torch.testing.assert_close(sums[full], torch.ones_like(sums[full]), rtol=0, atol=1e-5)
    check_invariants(cfg, out, r, P, xs, C)


@settings(max_examples=80, **SETTINGS)
@given(configs(types=("expert_choice",)))
def test_expert_choice_invariants(cfg):
    out, r, P, xs, rec = run(cfg)
    S, E, G = xs.shape[0], cfg["E"], cfg["groups"]
    n = S // G
    C = capacity_of(cfg, n, 1)
    probs = torch.softmax(xs @ P["layers.0.gate.weight"].T, -1)
    cap = cfg["gate"].get("max_experts_per_token")
    picked = torch.zeros(S, E, dtype=torch.bool)
    for gr in range(G):
        blk = probs[gr * n:(gr + 1) * n]
        if C < n:
            s = blk.topk(C + 1, dim=0).values
            assume(float(((s[C - 1] - s[C]) / s[C - 1].clamp(min=1e-30)).min()) > GAP)
        picked[gr * n:(gr + 1) * n].scatter_(0, blk.topk(C, dim=0).indices, True)
    kept = r.slot >= 0
    got = torch.zeros(S, E, dtype=torch.bool)
    got[r.token[kept], r.expert[kept]] = True
    all_pairs = torch.zeros(S, E, dtype=torch.bool)
    all_pairs[r.token, r.expert] = True
    assert torch.equal(all_pairs, picked), "each expert must pick its top-C tokens by softmax score"
    torch.testing.assert_close(r.weight[kept].to(D), probs[r.token[kept], r.expert[kept]], rtol=1e-5, atol=1e-6)
    if cap is None:
        assert torch.equal(got, picked)
        for gr in range(G):
            in_g = kept & (r.token // n == gr)
            assert torch.bincount(r.expert[in_g], minlength=E).tolist() == [C] * E
        assert int(r.dropped) == 0
    else:
        assert got.sum(1).max() <= cap
        ranked = torch.where(picked, probs, torch.full_like(probs, -1.0))
        best = ranked.topk(min(cap, E), -1)
        expect = picked & torch.zeros_like(picked).scatter(1, best.indices, True)
        assume(all(topk_gap(ranked[t][picked[t]], cap, relative=True) > GAP for t in range(S) if picked[t].sum() > cap))
        assert torch.equal(got, expect)
        assert int(r.dropped) == int((picked & ~got).sum())
    assert int(out.router_stats[0].dropped) == int(r.dropped)
    check_invariants(cfg, out, r, P, xs, C)


@settings(max_examples=40, **SETTINGS)
@given(configs(types=("topk", "switch", "gshard")), st.integers(0, 2 ** 20))
def test_capacity_never_exceeded_under_skew(cfg, skew_seed):
    """A strongly skewed router (one expert preferred by every token) still keeps at most C
    per (group, expert), counts every drop, and gives dropped tokens exactly 0."""
    gate = dict(cfg["gate"], drop_policy="drop")
    gate.setdefault("capacity_factor", 0.5)
    gate.pop("jitter", None)
    cfg = dict(cfg, gate=gate)
    m, x = build(cfg)
    with torch.no_grad():
        wg = m.get_parameter("layers.0.gate.weight")
        g = torch.Generator().manual_seed(skew_seed)
        wg[int(torch.randint(0, cfg["E"], (1,), generator=g))] += 5.0 * x.reshape(-1, cfg["d"]).mean(0)
    seen = []
    m.get_submodule("layers.0.gate").register_forward_hook(lambda mod, a, out: seen.append(out))
    out = m(x)
    r = seen[0]
    S = x.shape[0] * x.shape[1]
    k = r.token.numel() // S
    C = capacity_of(cfg, S // cfg["groups"], k)
    P = {n: p.detach().to(D) for n, p in m.named_parameters()}
    check_invariants(cfg, out, r, P, x.reshape(S, -1).to(D), C)
    assert int(r.dropped) + int((r.slot >= 0).sum()) == int(out.router_stats[0].expert_load.sum())
