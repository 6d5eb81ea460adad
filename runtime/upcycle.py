"""``moedsl upcycle``: a dense model -> an MoE model whose output equals it (sparse upcycling).

Komatsuzaki et al. 2023 ("Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", §3.1): each chosen FFN becomes an MoE layer whose experts are copies of it, the
other weights are kept. With ``granularity`` G (He et al. 2024, "Upcycling Large Language Models
into Mixture of Experts", §3: "virtual group" initialisation, as Megatron-LM's
``megatron/core/transformer/moe/upcycling_utils.py`` does for ``--moe-upcycling-granularity``)
the FFN's h hidden units are cut into G shards of h/G; expert j holds shard j mod G and the
router's rows are drawn for E/G experts and each repeated G times, so the G experts of a group
(ids gG .. gG+G-1, every shard once) always score the same. Why the output stays equal:

* ``topk`` with ``normalize`` (softmax over the chosen logits): k a multiple of G picks whole
  groups (their members tie); a chosen group's G experts share one weight w_g and the weights
  sum to 1, so Σ_g w_g = 1/G and the layer computes (1/G)·Σ shards = dense/G: the experts'
  output is scaled by G (Megatron's ``moe_activation_scale = granularity`` when the softmax
  follows the top-k). Megatron spreads that scale as G^(1/3) over fc1 and fc2 for a GLU,
  which silu(G^(1/3)·z) ≠ G^(1/3)·silu(z) makes approximate; here it goes where it is exact:
  √G on w_in (the linear branch of a GLU, or relu's positively homogeneous input) and √G on
  w_out, or G on w_out alone for gelu and silu. Biases: b_in as w_in, b_out unscaled (each
  token adds Σ weights = 1 of them).
* ``softmax`` (every expert, softmax over all E): the same sums, all groups chosen.
* ``switch`` (p·E(x), p < 1), ``gshard`` (a random second expert), ``noisy_topk``,
  ``expert_choice`` and ``hash`` change the output: refused.

``shared``: the whole FFN also becomes a shared expert (DeepSeekMoE's, added to the routed
output); both halves are halved (w_out and b_out × 1/2) so their sum is the FFN again.
``noise`` r (Nakamura et al. 2025, "Drop-Upcycling", §3.2): in each expert a random r·h of
its hidden units (a different draw per expert, seeded) get new w_in/w_gate columns and w_out
rows drawn from N(mean, std²) of that expert's matrix; that breaks the equality on purpose.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moedsl.errors import UserError
from moedsl.hf.convert import IMPORT_SHARD, import_checkpoint
from moedsl.hf.files import TOKENIZER_FILES, apart, copy_side_files, side_file, staged, write_sharded
from moedsl.hf.weights import global_shapes
from moedsl.spec_loader import load_spec

from .load import build
from .resolve import is_import_dir, resolve

LAYERS = ("all", "every-other")  # every-other: the 2nd, 4th, ... FFN (GLaM, V-MoE)
GATES = ("topk", "softmax")  # the gates whose output equals the FFN's (module docstring)
REFUSED_GATES = {"switch": "top-1 weights the expert by p < 1", "gshard": "its second expert is drawn at random",
                 "noisy_topk": "its noise changes the choice in training",
                 "expert_choice": "experts choose tokens, not tokens experts",
                 "hash": "a token's expert ignores the router"}
ROUTERS = ("normal", "zero")
HOMOGENEOUS = ("relu",)  # act(c·z) = c·act(z) for c > 0


@dataclass(frozen=True)
class Options:
    experts: int
    k: int
    layers: str = "all"
    granularity: int = 1
    gate: str = "topk"
    router: str = "normal"
    noise: float = 0.0
    shared: bool = False
    seed: int = 0

    def flags(self) -> str:
        return (f"--experts {self.experts} --k {self.k} --layers {self.layers} --granularity {self.granularity} "
                f"--gate {self.gate} --router {self.router} --noise {self.noise:g}"
                f"{' --shared' if self.shared else ''} --seed {self.seed}")


def check(o: Options) -> None:
    """Refuse, in one line, options whose upcycled model would not compute the dense model."""
    if o.layers not in LAYERS:
        raise UserError(f"--layers {o.layers}: one of {', '.join(LAYERS)}")
    if o.gate in REFUSED_GATES:
        raise UserError(f"--gate {o.gate}: the upcycled output would not equal the dense model's "
                        f"({REFUSED_GATES[o.gate]}); use {' or '.join(GATES)}")
    if o.gate not in GATES:
        raise UserError(f"--gate {o.gate}: one of {', '.join(GATES)}")
    if o.router not in ROUTERS:
        raise UserError(f"--router {o.router}: one of {', '.join(ROUTERS)}")
    if o.experts < 1 or o.granularity < 1:
        raise UserError(f"--experts {o.experts} --granularity {o.granularity}: both must be at least 1")
    if o.experts % o.granularity:
        raise UserError(f"--experts {o.experts} is not a multiple of --granularity {o.granularity}: each group of "
                        f"{o.granularity} experts holds the FFN's {o.granularity} shards once")
    if o.gate == "topk" and not 1 <= o.k <= o.experts:
        raise UserError(f"--k {o.k}: between 1 and --experts {o.experts}")
    if o.gate == "topk" and o.k % o.granularity:
        raise UserError(f"--k {o.k} is not a multiple of --granularity {o.granularity}: top-k would cut a group "
                        "of experts and miss some of the FFN's shards")
    if o.router == "zero" and o.granularity > 1 and not (o.gate == "softmax" or o.k == o.experts):
        raise UserError(f"--router zero with --granularity {o.granularity}: every expert ties, and top-k's choice "
                        "among ties need not hold every shard; use --router normal")
    if not 0.0 <= o.noise < 1.0:
        raise UserError(f"--noise {o.noise:g}: a fraction in [0, 1)")


def upcycle(src, out, experts: int, k: int, *, checkpoint=None, layers: str = "all", granularity: int = 1,
            gate: str = "topk", router: str = "normal", noise: float = 0.0, shared: bool = False, seed: int = 0,
            overwrite: bool = False, max_shard: int = IMPORT_SHARD) -> dict:
    """Write into ``out`` an import folder (spec.yaml, moedsl-format safetensors, tokenizer
    files) of the MoE model upcycled from ``src``: anything ``resolve`` reads (a dense run, an
    import folder, a spec with ``checkpoint``), or a Hugging Face dense checkpoint folder
    (config.json and safetensors: imported into a temporary folder first). Returns a summary."""
    o = Options(experts, k, layers, granularity, gate, router, noise, shared, seed)
    check(o)
    src_path = Path(src) if isinstance(src, (str, os.PathLike)) and "\n" not in str(src) else None
    out = Path(out)
    apart(out, [src_path, checkpoint])
    if checkpoint is None and src_path is not None and src_path.is_dir() and (src_path / "config.json").is_file() \
            and not is_import_dir(src_path):
        # beside --out rather than in /tmp: the import is as large as the dense model
        with tempfile.TemporaryDirectory(prefix=".moedsl-upcycle-",
                                         dir=out.parent if out.parent.is_dir() else None) as tmp:
            dense = Path(tmp) / "dense"
            import_checkpoint(str(src_path), dense)
            return _upcycle(resolve(dense), str(src), out, o, overwrite, max_shard)
    label = str(src) if src_path is not None else "the spec"
    return _upcycle(resolve(src, checkpoint), label, out, o, overwrite, max_shard)


def _upcycle(source, label: str, out: Path, o: Options, overwrite: bool, max_shard: int) -> dict:
    spec = source.spec
    moe = [layer for layer in spec.layers if layer.kind == "moe"]
    if moe:
        raise UserError(f"{label}: layer {moe[0].index} is already moe: upcycling starts from a dense model")
    ffns = [layer for layer in spec.layers if layer.kind == "ffn"]
    chosen = ffns if o.layers == "all" else ffns[1::2]
    if not chosen:
        raise UserError(f"{label}: no ffn layer to upcycle with --layers {o.layers} ({len(ffns)} ffn layers)")
    for layer in chosen:
        if layer.config.hidden % o.granularity:
            raise UserError(f"{label}: layer {layer.index}'s ffn hidden {layer.config.hidden} is not a multiple of "
                            f"--granularity {o.granularity}")
    dense = {name: t.detach() for name, t in build(source).state_dict().items()}
    text, tokenizer = _spec_text(spec, source, label, {layer.index for layer in chosen}, o)
    new = load_spec(text, source="spec.yaml")
    gen = torch.Generator().manual_seed(o.seed)
    weights = dict(dense)
    for layer in chosen:
        weights = _layer(weights, layer, o, spec.model.init_std, gen)
    want = global_shapes(new)
    absent = sorted(set(want) - set(weights))
    if absent:  # a parameter the upcycled spec has and the mapping does not make: a bug of moedsl
        raise RuntimeError(f"upcycle makes no tensor for {absent[0]}")
    plan = []
    for name, shape in want.items():
        t = weights[name]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"upcycle made {name} {tuple(t.shape)}, the spec wants {tuple(shape)}")
        plan.append((name, tuple(t.shape), t.dtype, (lambda t=t: t.contiguous())))
    with staged(out, overwrite) as tmp:
        files = write_sharded(tmp, plan, max_shard)
        (tmp / "spec.yaml").write_text(text)
        copied = []
        if tokenizer is not None:
            copied.append(_copy(tokenizer, tmp / tokenizer.name))
        for name in TOKENIZER_FILES:
            found = side_file(source.folders, name)
            if found is not None and not (tmp / name).exists():
                copied += copy_side_files(found.parent, tmp, [name])
    return {"out": str(out), "layers": [layer.index for layer in chosen], "tensors": len(plan), "files": files,
            "copied": copied}


def _copy(src: Path, dst: Path) -> str:
    dst.write_bytes(src.read_bytes())
    return dst.name


def _scales(activation: str, glu: bool, g: int) -> tuple:
    """(w_in's, w_out's) factor multiplying the expert's output by ``g`` exactly."""
    if glu or activation in HOMOGENEOUS:
        return math.sqrt(g), math.sqrt(g)
    return 1.0, float(g)


def _layer(weights: dict, layer, o: Options, init_std: float, gen) -> dict:
    """``weights`` with layer ``layer``'s ffn.* replaced by its experts, router and shared expert."""
    i, cfg = layer.index, layer.config
    E, G = o.experts, o.granularity
    h = cfg.hidden // G
    glu = cfg.activation in ("swiglu", "geglu")
    ffn = {n[len(f"layers.{i}.ffn."):]: weights.pop(n) for n in list(weights) if n.startswith(f"layers.{i}.ffn.")}
    half = 0.5 if o.shared else 1.0
    a_in, a_out = _scales(cfg.activation, glu, G)
    shard = [j % G for j in range(E)]

    def cols(w, a):  # nn.Linear [H, d] -> [E, d, h]: expert j's columns are shard j mod G, × a
        parts = w.t().reshape(w.shape[1], G, h)
        return torch.stack([parts[:, s] for s in shard]) * a

    def rows(w, a):  # w_out [d, H] -> [E, h, d]
        parts = w.t().reshape(G, h, w.shape[0])
        return torch.stack([parts[s] for s in shard]) * a

    p = f"layers.{i}."
    weights[p + "experts.w_in"] = cols(ffn["w_in.weight"], a_in)
    weights[p + "experts.w_out"] = rows(ffn["w_out.weight"], a_out * half)
    if glu:
        weights[p + "experts.w_gate"] = cols(ffn["w_gate.weight"], 1.0)
    if cfg.bias:
        weights[p + "experts.b_in"] = torch.stack([ffn["w_in.bias"].reshape(G, h)[s] for s in shard]) * a_in
        if glu:
            weights[p + "experts.b_gate"] = torch.stack([ffn["w_gate.bias"].reshape(G, h)[s] for s in shard])
        weights[p + "experts.b_out"] = ffn["w_out.bias"].expand(E, -1).clone() * half
    dtype = ffn["w_in.weight"].dtype
    d = ffn["w_in.weight"].shape[1]
    if o.router == "zero":
        weights[p + "gate.weight"] = torch.zeros(E, d, dtype=dtype)
    else:  # E/G rows, each repeated for the G experts of its group (Megatron's _process_router_param)
        drawn = torch.randn(E // G, d, generator=gen) * init_std
        weights[p + "gate.weight"] = drawn.repeat_interleave(G, dim=0).to(dtype)
    if o.shared:
        for name, t in ffn.items():
            weights[p + "shared." + name] = t * half if name.startswith("w_out.") else t.clone()
    if o.noise:
        _drop(weights, p, glu, cfg.bias, o.noise, gen)
    return weights


def _drop(weights: dict, p: str, glu: bool, bias: bool, r: float, gen) -> None:
    """Drop-Upcycling: in each expert, n = round(r·h) hidden units (a fresh draw per expert) get
    new weights from N(mean, std²) of that expert's matrix (Nakamura et al. 2025, §3.2)."""
    w_in = weights[p + "experts.w_in"]
    E, _, h = w_in.shape
    n = round(r * h)
    names = [("w_in", 2), ("w_out", 1)] + ([("w_gate", 2)] if glu else [])
    names += [(b, 1) for b in ("b_in", "b_gate") if bias and p + "experts." + b in weights]
    for e in range(E):
        idx = torch.randperm(h, generator=gen)[:n]
        for name, dim in names:
            t = weights[p + "experts." + name]
            one = t[e]
            mean, std = one.float().mean(), one.float().std() if one.numel() > 1 else torch.tensor(0.0)
            shape = list(one.shape)
            shape[dim - 1] = n
            fresh = (torch.randn(shape, generator=gen) * std + mean).to(t.dtype)
            one.index_copy_(dim - 1, idx, fresh)


def _spec_text(spec, source, label: str, chosen: set, o: Options) -> tuple:
    """The upcycled spec, commented as ``moedsl import`` comments its spec, and the tokenizer
    file the dense spec names (copied beside it), if any."""
    data = spec.data
    model = dict(data["model"])
    tokenizer = None
    if model.get("tokenizer"):
        tok = Path(model["tokenizer"])
        found = next((f / tok for f in source.folders if (f / tok).is_file()), tok if tok.is_file() else None)
        if found is None:
            raise UserError(f"{label}: the spec's model.tokenizer {model['tokenizer']} is not found beside it")
        tokenizer, model["tokenizer"] = found, found.name
    G = o.granularity
    a_in, a_out = None, None
    lines = [
        f"# Upcycled by `moedsl upcycle` from {label}: {o.flags()}",
        "# (sparse upcycling, Komatsuzaki et al. 2023). Each moe layer below was that dense model's ffn",
        "# layer at the same index: its experts are copies of the ffn's weights (expert j holds hidden",
        f"# units shard j mod {G} of {G}, the router's rows repeated per group of {G}, the weights scaled",
        "# so that the experts' weighted sum is the ffn: He et al. 2024's virtual groups, as Megatron-LM's",
        "# --moe-upcycling-granularity); every other layer keeps its dense weights.",
        "# " + ("--noise: Drop-Upcycling (Nakamura et al. 2025) re-drew a fraction of each expert's hidden "
                "units, so the output differs from the dense model's." if o.noise else
                "With these weights the output equals the dense model's (up to rounding)."),
        "moedsl: 1",
        f"name: {json.dumps(spec.name + '-upcycled')}",
        f"description: {json.dumps(f'{spec.name} upcycled to {o.experts} experts (top-{o.k})')}",
        f"model: {json.dumps(model)}  # {label}'s",
        "layers:",
    ]
    for layer in spec.layers:
        if layer.index not in chosen:
            lines.append(f"  - {json.dumps(_item(data, layer.path))}  # layer {layer.index}, {label}'s")
            continue
        cfg = layer.config
        a_in, a_out = _scales(cfg.activation, cfg.activation in ("swiglu", "geglu"), G)
        lines += [
            f"  - moe:  # layer {layer.index}: {label}'s ffn (hidden {cfg.hidden}, {cfg.activation}) upcycled",
            "      experts:",
            f"        count: {o.experts}  # --experts",
            f"        hidden: {cfg.hidden // G}  # the ffn's hidden {cfg.hidden} / --granularity {G}",
            f"        activation: {cfg.activation}  # the ffn's",
            f"        bias: {'true' if cfg.bias else 'false'}  # the ffn's",
            f"        dropout: {cfg.dropout}  # the ffn's",
        ]
        if o.shared:
            lines.append(f"        shared: {{count: 1, hidden: {cfg.hidden}}}  # --shared: the whole ffn; its "
                         "w_out and the experts' halved, so that their sum is the ffn")
        why = (f"w_in × {a_in:.6g}, w_out × {a_out * (0.5 if o.shared else 1):.6g}")
        if o.gate == "topk":
            lines.append(f"      gate: {{type: topk, k: {o.k}, normalize: true, drop_policy: dropless}}  # --k; "
                         f"softmax over the chosen: the weights sum to 1 ({why}); dropless: no token dropped")
        else:
            lines.append(f"      gate: {{type: softmax}}  # --gate softmax: every expert, weights summing to 1 ({why})")
        lines.append(f"      # router: --router {o.router}" + (f" (N(0, {spec.model.init_std}²), model.init_std, "
                                                                 f"seed {o.seed})" if o.router == "normal" else ""))
        if o.gate == "topk":
            lines.append("      losses: {balance: 0.01}  # Switch's load-balancing loss for training on (no effect on "
                         "the output)")
    for key, value in data.items():
        if key not in ("moedsl", "name", "description", "model", "layers"):
            lines.append(f"{key}: {json.dumps(value)}  # {label}'s")
    return "\n".join(lines) + "\n", tokenizer


def _item(data, path: tuple):
    """The spec item at JSON ``path`` (a ``Layer.path``)."""
    for key in path:
        data = data[key]
    return data
