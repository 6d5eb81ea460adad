"""Expert-parallel execution equals the single process: the invariant of expert parallelism
(GShard, Lepikhin et al. 2020, §2.2: sharding changes where experts compute, not what).

``check(spec, world)`` runs one training forward/backward of ``spec`` on a global batch in
one process, and the same spec, weights and batch on ``world`` gloo processes (each with
its share of the batch and its experts), and reports the largest differences of the
outputs, the aux loss, the gradient of every parameter, and the router statistics (each
layer's per-expert load before and after drops, and the assignments made and dropped,
summed over ranks), which must be equal counts.

The distributed objective is the single-process one: rank r back-propagates
(task loss on its tokens + its aux loss) / world; replicated parameters' gradients are
summed over all ranks, experts' over the ranks holding the same experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moedsl.api import build_model, load_spec

from .grads import GradSync
from .spawn import spawn


@dataclass
class Difference:
    world: int
    output: float  # max |distributed - single| over this check's outputs
    aux_loss: float
    grad: float  # max over every parameter's gradient
    worst_param: str
    params_checked: int
    dropped: int  # assignments dropped (single process), so a check with drops is visible
    excess: float  # max over every compared value of |Δ| − rtol·|single| (ok: at most atol)
    router: float  # max |Δ| of a router statistic summed over ranks, against the single process
    worst_router: str  # where that was ("layers.3 dropped: 4 on 2 ranks, 2 in one process")
    atol: float = 2e-5
    rtol: float = 1e-4

    def ok(self) -> bool:
        """Every value within atol + rtol·|single| (torch.allclose's rule), and every router count equal."""
        return self.excess <= self.atol and self.router == 0


def _excess(a: torch.Tensor, ref: torch.Tensor, rtol: float) -> float:
    """max(|a − ref| − rtol·|ref|): ≤ atol exactly where torch.allclose(a, ref, rtol, atol) holds."""
    if not a.numel():
        return float("-inf")
    return float(((a - ref).abs() - rtol * ref.abs()).max())


def _router_counts(stats) -> dict:
    """(layer, statistic) -> a float64 tensor of counts, for one forward's router statistics."""
    out = {}
    for s in stats:
        out[(s.layer, "tokens_per_expert")] = s.tokens_per_expert.double()
        out[(s.layer, "expert_load")] = s.expert_load.double()
        out[(s.layer, "dropped")] = s.dropped.double().reshape(1)
        out[(s.layer, "assignments")] = torch.tensor([float(s.assignments)], dtype=torch.float64)
    return out


def _batch(spec, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    if spec.model.input == "image":  # [B, H, W, C] pixels in [0, 1); ``seq`` follows from model.image
        im = spec.model.image
        return torch.rand(batch, im.size, im.size, im.channels, generator=g)
    if spec.model.input == "tokens":
        return torch.randint(0, spec.model.vocab_size, (batch, seq), generator=g)
    return torch.randn(batch, seq, spec.model.d_model, generator=g)


def _loss(spec, out, inputs) -> torch.Tensor:
    if spec.model.input == "tokens" and out.output.shape[-1] == spec.model.vocab_size:
        return F.cross_entropy(out.output.flatten(0, 1).float(), inputs.flatten())
    return out.output.float().pow(2).mean()


def _single(spec, inputs, seed, layout):
    model = build_model(spec, seed=seed, dtype=torch.float32, layout=layout)
    model.train()
    out = model(inputs)
    (_loss(spec, out, inputs) + out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    experts = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_ids")}
    return out.output.detach(), out.aux_loss.detach(), grads, experts, out.router_stats


def _worker(rank: int, world: int, spec_datas: list, batch: int, seq: int, seed: int, layout: str, atol: float,
            rtol: float, compile: bool = False):
    torch.set_num_threads(1)
    return [_check_one(rank, world, data, batch, seq, seed, layout, atol, rtol, compile) for data in spec_datas]


def _check_one(rank: int, world: int, spec_data, batch: int, seq: int, seed: int, layout: str, atol: float,
               rtol: float, compile: bool = False):
    spec = load_spec(spec_data)
    inputs = _batch(spec, batch, seq, seed)
    ref_out, ref_aux, ref_grads, ref_experts, ref_stats = _single(spec, inputs, seed, layout)
    model = build_model(spec, seed=seed, rank=rank, world_size=world, dtype=torch.float32, layout=layout,
                        compile=compile)
    model.train()
    share = batch // world
    local = inputs[rank * share:(rank + 1) * share]
    out = model(local)
    ((_loss(spec, out, local) + out.aux_loss) / world).backward()
    GradSync(model, model.compiled.mesh, rank)()
    mine = ref_out[rank * share:(rank + 1) * share]
    d_out = (out.output.detach() - mine).abs().max().item()
    excess = _excess(out.output.detach(), mine, rtol)
    aux = out.aux_loss.detach().clone()
    dist.all_reduce(aux)
    d_aux = (aux / world - ref_aux).abs().item()
    excess = max(excess, _excess(aux / world, ref_aux, rtol))
    worst, d_grad, checked = "", 0.0, 0
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if ".experts." in name:
            ids = dict(model.named_buffers())[name.rsplit(".", 1)[0] + ".expert_ids"]
            ref = ref_grads.get(name)
            ref = torch.zeros_like(g) if ref is None else ref[ids]
        else:
            ref = ref_grads.get(name, torch.zeros_like(g))
        diff = (g - ref).abs().max().item() if g.numel() else 0.0
        excess = max(excess, _excess(g, ref, rtol))
        checked += 1
        if diff > d_grad:
            d_grad, worst = diff, name
    del ref_experts
    # router statistics: each rank counts its own tokens' assignments; summed, the batch's
    ref_counts, counts = _router_counts(ref_stats), _router_counts(out.router_stats)
    d_router, worst_router = 0.0, ""
    if set(ref_counts) != set(counts):
        d_router, worst_router = float("inf"), f"layers differ: {sorted(set(ref_counts) ^ set(counts))}"
    else:
        for key in sorted(counts):
            total = counts[key].clone()
            dist.all_reduce(total)
            diff = (total - ref_counts[key]).abs().max().item()
            if diff > d_router:
                d_router = diff
                worst_router = (f"{key[0]} {key[1]}: {total.tolist()} on {world} ranks, "
                                f"{ref_counts[key].tolist()} in one process")
    return Difference(world=world, output=d_out, aux_loss=d_aux, grad=d_grad, worst_param=worst,
                      params_checked=checked, dropped=int(sum(int(s.dropped) for s in ref_stats)), excess=excess,
                      router=d_router, worst_router=worst_router, atol=atol, rtol=rtol)


def check(specs, world: int, batch: int = 8, seq: int = 16, seed: int = 0, timeout: float = 300.0,
          layout: str = "auto", atol: float = 2e-5, rtol: float = 1e-4, compile: bool = False) -> list:
    """For each spec (one, or a list), the per-rank ``Difference``s between a ``world``-process
    run and the single process: ``result[spec][rank]``. One set of processes checks them all.
    ``layout="static"`` checks the capacity layers' static buffers and all-to-alls on a CPU.
    ``compile=True``: the ``world`` processes run their dense segments through ``torch.compile``
    (``build_model(compile=True)``), against the eager single process."""
    single = not isinstance(specs, (list, tuple))
    datas = [load_spec(s).data for s in ([specs] if single else specs)]
    if batch % world:
        raise ValueError(f"batch {batch} does not split over {world} ranks")
    per_rank = spawn(_worker, world, datas, batch, seq, seed, layout, atol, rtol, compile, timeout=timeout)
    result = [[per_rank[r][i] for r in range(world)] for i in range(len(datas))]
    return result[0] if single else result
