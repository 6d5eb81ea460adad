"""Expert-parallel execution equals the single process: the invariant of expert parallelism
(GShard, Lepikhin et al. 2020, §2.2: sharding changes where experts compute, not what).

``check(spec, world)`` runs one training step of ``spec`` as a run executes it, in float32:
``TrainStep.for_run``, the step the ``Trainer`` builds, with the run's gradient sync (bucketed
by default: its hooks registered before backward, launching all-reduces while backward runs),
the clip by the global gradient norm, fused AdamW at the first step's learning rate and the
balancing bias. It runs it on a global batch in one process, and with the same spec, weights
and batch on ``world`` gloo processes (each with its share of the batch and its experts), and
reports the largest differences of the outputs, the aux loss, the global gradient norm, the
gradient of every parameter (summed over ranks and clipped), every parameter and balancing
bias after the optimizer step, and the router statistics (each layer's per-expert load before
and after drops, and the assignments made and dropped, summed over ranks), which must be
equal counts.

The distributed objective is the single-process one: rank r back-propagates
(task loss on its tokens + its aux loss) / world; replicated parameters' gradients are
summed over all ranks, experts' over the ranks holding the same experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moedsl.api import build_model, load_spec
from moedsl.errors import UserError

from .optim import lr_at
from .spawn import spawn
from .span_corruption import shift_right
from .step import TrainStep, balancing_gates


@dataclass
class Difference:
    world: int
    output: float  # max |distributed - single| over this check's outputs
    aux_loss: float
    grad: float  # max over every parameter's gradient, summed over ranks and clipped
    worst_param: str
    params_checked: int
    dropped: int  # assignments dropped (single process), so a check with drops is visible
    excess: float  # max over every compared value of |Δ| − rtol·|single| (ok: at most atol)
    router: float  # max |Δ| of a router statistic summed over ranks, against the single process
    worst_router: str  # where that was ("layers.3 dropped: 4 on 2 ranks, 2 in one process")
    atol: float = 2e-5
    rtol: float = 1e-4
    grad_norm: float = 0.0  # |Δ| of the global gradient norm the clip used
    param: float = 0.0  # max over every parameter and balancing bias after the optimizer step
    worst_after: str = ""  # where that was
    buckets: int = 0  # gradient all-reduces the step's sync launched on this rank
    from_hooks: int = 0  # of them, launched by the bucketed hooks while backward ran

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
    """(inputs, targets, the step's other arguments {name: [B, ...]}) of the global batch. Token
    models predict their input tokens, images get random labels, vectors random regression
    targets: what the step's task loss compares with. An encoder-decoder copies its source: a
    source of ``seq`` tokens, its rows right-padded to random lengths (the padding is routed and
    takes capacity), its labels the source's first seq/2 tokens and padding, the loss over the
    labels that are not padding."""
    g = torch.Generator().manual_seed(seed + 1)
    if spec.encoder_decoder:
        m = spec.model
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        source_mask = torch.arange(seq)[None, :] < lengths[:, None]  # [B, S]
        source = torch.randint(0, m.vocab_size, (batch, seq), generator=g).masked_fill(~source_mask, m.pad_id)
        T = max(seq // 2, 1)
        loss_mask = source_mask[:, :T]
        labels = source[:, :T]
        decoder_inputs = shift_right(labels, m.decoder_start_id)
        return source, labels, {"loss_mask": loss_mask, "decoder_inputs": decoder_inputs, "source_mask": source_mask}
    if spec.model.input == "image":  # [B, H, W, C] pixels in [0, 1); ``seq`` follows from model.image
        im = spec.model.image
        inputs = torch.rand(batch, im.size, im.size, im.channels, generator=g)
        return inputs, torch.randint(0, spec.model.classes, (batch,), generator=g), {}
    if spec.model.input == "tokens":
        inputs = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=g)
        return inputs, inputs, {}
    inputs = torch.randn(batch, seq, spec.model.d_model, generator=g)
    return inputs, torch.randn(batch, seq, spec.model.d_model, generator=g), {}


def _step(model, spec, inputs, targets, rank: int, world: int, extra: dict):
    """One training step of ``model`` as a run's first step: (output, StepOutputs, sync). The
    gradients it leaves are the synced, clipped ones AdamW stepped with."""
    from .train import RunOptions

    options = RunOptions.from_spec(spec)  # the run's defaults: grad_sync, bucket_mb, grad_clip, lr, weight decay
    step = TrainStep.for_run(model, spec, options, rank, world, amp=None, capturable=False)
    step.lr.fill_(lr_at(0, options))
    outputs = []
    hook = model.register_forward_hook(lambda _m, _a, out: outputs.append(out.output.detach()))
    try:
        figures = step(inputs, targets, **extra)
    finally:
        hook.remove()
        step.sync.close()
    return outputs[0], figures, step.sync


def _whole(t):
    """``t``, or the whole tensor of a DTensor (``placement.shard: full`` holds rows of each)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _after_step(model) -> dict:
    """What the optimizer step and the balancing step moved: every parameter, every balancing bias."""
    out = {n: _whole(p.detach()).clone() for n, p in model.named_parameters()}
    names = {m: n for n, m in model.named_modules()}
    out.update({f"{names[g]}.expert_bias": g.expert_bias.clone() for g in balancing_gates(model)})
    return out


def _single(spec, inputs, targets, extra, seed, layout):
    model = build_model(spec, seed=seed, dtype=torch.float32, layout=layout)
    output, figures, _ = _step(model, spec, inputs, targets, 0, 1, extra)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, figures, grads, _after_step(model)


def _worker(rank: int, world: int, spec_datas: list, batch: int, seq: int, seed: int, layout: str, atol: float,
            rtol: float, compile: bool = False):
    torch.set_num_threads(1)
    return [_check_one(rank, world, data, batch, seq, seed, layout, atol, rtol, compile) for data in spec_datas]


def _check_one(rank: int, world: int, spec_data, batch: int, seq: int, seed: int, layout: str, atol: float,
               rtol: float, compile: bool = False):
    spec = load_spec(spec_data)
    inputs, targets, extra = _batch(spec, batch, seq, seed)
    ref_out, ref, ref_grads, ref_after = _single(spec, inputs, targets, extra, seed, layout)
    model = build_model(spec, seed=seed, rank=rank, world_size=world, dtype=torch.float32, layout=layout,
                        compile=compile)
    share = batch // world
    mine = slice(rank * share, (rank + 1) * share)
    output, figures, sync = _step(model, spec, inputs[mine], targets[mine], rank, world,
                                  {k: v[mine] for k, v in extra.items()})
    d_out = (output - ref_out[mine]).abs().max().item()
    excess = _excess(output, ref_out[mine], rtol)
    aux = figures.aux_loss.clone()
    dist.all_reduce(aux)
    d_aux = (aux / world - ref.aux_loss).abs().item()
    excess = max(excess, _excess(aux / world, ref.aux_loss, rtol))
    d_norm = (figures.grad_norm - ref.grad_norm).abs().item()  # global: the same on every rank
    excess = max(excess, _excess(figures.grad_norm, ref.grad_norm, rtol))
    buffers = dict(model.named_buffers())

    def reference(name, value, refs):
        """The single process's ``name``: an expert parameter's rows of this rank's experts."""
        r = refs.get(name)
        if r is None:
            return torch.zeros_like(value)
        return r[buffers[name.rsplit(".", 1)[0] + ".expert_ids"]] if ".experts." in name else r

    worst, d_grad, checked = "", 0.0, 0
    for name, p in model.named_parameters():
        g = _whole(p.grad) if p.grad is not None else torch.zeros_like(_whole(p.detach()))
        r = reference(name, g, ref_grads)
        diff = (g - r).abs().max().item() if g.numel() else 0.0
        excess = max(excess, _excess(g, r, rtol))
        checked += 1
        if diff > d_grad:
            d_grad, worst = diff, name
    worst_after, d_param = "", 0.0
    for name, value in _after_step(model).items():
        r = reference(name, value, ref_after)
        diff = (value - r).abs().max().item() if value.numel() else 0.0
        excess = max(excess, _excess(value, r, rtol))
        if diff > d_param:
            d_param, worst_after = diff, name
    # router statistics: each rank counts its own tokens' assignments; summed, the batch's
    ref_counts, counts = _router_counts(ref.router_stats), _router_counts(figures.router_stats)
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
                      params_checked=checked, dropped=int(sum(int(s.dropped) for s in ref.router_stats)),
                      excess=excess, router=d_router, worst_router=worst_router, atol=atol, rtol=rtol,
                      grad_norm=d_norm, param=d_param, worst_after=worst_after, buckets=len(sync.launched),
                      from_hooks=sync.from_hooks)


def check(specs, world: int, batch: int = 8, seq: int = 16, seed: int = 0, timeout: float = 300.0,
          layout: str = "auto", atol: float = 2e-5, rtol: float = 1e-4, compile: bool = False) -> list:
    """For each spec (one, or a list), the per-rank ``Difference``s between a ``world``-process
    run and the single process: ``result[spec][rank]``. One set of processes checks them all.
    ``layout="static"`` checks the capacity layers' static buffers and all-to-alls on a CPU.
    ``compile=True``: the ``world`` processes run their dense segments through ``torch.compile``
    (``build_model(compile=True)``), against the eager single process."""
    single = not isinstance(specs, (list, tuple))
    loaded = [load_spec(s) for s in ([specs] if single else specs)]
    for spec in loaded:
        if spec.model.input == "tokens" and not any(layer.kind == "head" for layer in spec.layers):
            raise UserError(f"{spec.name}: a token model without a head layer has no task loss: verify checks the "
                            "training step a run executes (next-token cross-entropy over the head's logits)")
    datas = [spec.data for spec in loaded]
    if batch % world:
        raise ValueError(f"batch {batch} does not split over {world} ranks")
    per_rank = spawn(_worker, world, datas, batch, seq, seed, layout, atol, rtol, compile, timeout=timeout)
    result = [[per_rank[r][i] for r in range(world)] for i in range(len(datas))]
    return result[0] if single else result
