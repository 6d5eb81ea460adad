"""Activation recomputation (train.recompute: experts | layers, runtime/recompute.py): the same
gradients as keeping every activation, bit for bit, with the routing's random draws reused, and
the experts' hidden activations not kept from forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moedsl
from moedsl.errors import MoedslError
from moedsl.runtime.recompute import apply_recompute
from moedsl.runtime.spawn import spawn
from moedsl.runtime.train import RunOptions, Trainer

HIDDEN = 48  # the experts' width: no other tensor of these models is this wide


def tiny(gate: dict, activation: str = "swiglu", dropout: float = 0.1, losses=None, placement=None) -> dict:
    experts = {"count": 4, "hidden": HIDDEN, "activation": activation}
    d = {"moedsl": 1, "name": "tiny", "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16, "dropout": dropout},
         "layers": [{"embedding": {}},
                    {"repeat": 2, "block": [{"attention": {"heads": 2}},
                                            {"moe": {"experts": experts, "gate": gate, "losses": losses or {}}}]},
                    {"norm": {}}, {"head": {}}],
         "train": {"batch_size": 4, "seq_len": 8}}
    if placement:
        d["placement"] = placement
    return d


GATES = {  # every draw a gate makes in training, and the balancing load a recomputation counts again
    "noisy_topk": ({"type": "noisy_topk", "k": 2}, {"load": 0.01}),
    "switch_jitter": ({"type": "switch", "jitter": 0.1, "capacity_factor": 1.0}, {"balance": 0.01}),
    "gshard_random": ({"type": "gshard", "second_expert": "random"}, {"balance": 0.01}),
    "topk_bias": ({"type": "topk", "k": 2, "drop_policy": "dropless", "bias_balancing": {"rate": 0.01}}, {}),
}


def backward(data: dict, mode: str, amp=None, rank: int = 0, world: int = 1):
    """The gradients and buffers (gate counters, balancing loads) after one training forward and
    backward of the task loss + aux loss, with ``mode`` recomputation."""
    model = moedsl.build_model(data, seed=3, rank=rank, world_size=world)
    model.train()
    apply_recompute(model, mode)
    torch.manual_seed(0)  # dropout
    x = torch.randint(0, 32, (4 // world, 8), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = model(x)
        loss = F.cross_entropy(out.output.flatten(0, 1).float(), x.flatten()) + out.aux_loss
    loss.backward()
    return ({n: p.grad for n, p in model.named_parameters()}, {n: b.clone() for n, b in model.named_buffers()})


def differ(a: dict, b: dict) -> list:
    return [n for n in a if (a[n] is None) != (b[n] is None) or (a[n] is not None and not torch.equal(a[n], b[n]))]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["experts", "layers"])
@pytest.mark.parametrize("gate", list(GATES))
def test_recomputed_gradients_equal_the_kept_ones_bit_for_bit_and_the_routing_is_not_redrawn(gate, mode, amp):
    gate_, losses = GATES[gate]
    data = tiny(gate_, losses=losses)
    ref_grads, ref_buffers = backward(data, "none", amp)
    grads, buffers = backward(data, mode, amp)
    assert sum(g is not None for g in grads.values()) > 10
    assert not differ(ref_grads, grads), f"{gate} {mode}: gradients differ: {differ(ref_grads, grads)[:5]}"
    # the gates' draw counters advanced once, the balancing load counted once, as without recomputation
    assert not differ(ref_buffers, buffers), f"{gate} {mode}: buffers differ: {differ(ref_buffers, buffers)}"


def saved_activations(data: dict, mode: str) -> list:
    """The tensors autograd keeps from a training forward for backward (not the parameters), each
    storage once."""
    model = moedsl.build_model(data, seed=3)
    model.train()
    apply_recompute(model, mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        F.cross_entropy(out.output.flatten(0, 1), x.flatten()) + out.aux_loss
    return list(kept.values())


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_recompute_experts_keeps_none_of_the_experts_hidden_activations(activation):
    data = tiny({"type": "topk", "k": 2, "drop_policy": "dropless"}, activation, dropout=0.0)
    nbytes = (lambda ts: sum(t.untyped_storage().nbytes() for t in ts))
    kept = saved_activations(data, "none")
    hidden = [t for t in kept if t.dim() and t.shape[-1] == HIDDEN]
    # per MoE layer: 32 tokens × k 2 rows of the hidden width; SwiGLU keeps silu(x·W1), x·W1, x·W3, their product
    rows = 4 * 8 * 2
    assert len(hidden) == 2 * (4 if activation == "swiglu" else 1)
    assert all(t.numel() == rows * HIDDEN for t in hidden)
    experts = saved_activations(data, "experts")
    assert not [t for t in experts if t.dim() and t.shape[-1] == HIDDEN]
    assert nbytes(kept) - nbytes(experts) >= nbytes(hidden)
    # layers keeps each sublayer's inputs only: less again
    assert nbytes(saved_activations(data, "layers")) < nbytes(experts)


def _ep_worker(rank: int, world: int, data: dict, mode: str):
    torch.set_num_threads(1)
    grads, buffers = backward(data, "none", rank=rank, world=world)
    got, got_buffers = backward(data, mode, rank=rank, world=world)
    return differ(grads, got), differ(buffers, got_buffers), sum(g is not None for g in got.values())


@pytest.mark.slow
def test_recomputing_layers_with_experts_on_two_processes_reruns_their_all_to_alls_and_matches():
    """Each rank holds 2 of the 4 experts: a recomputed MoE sublayer runs its all-to-alls again in
    backward, in the same order on both ranks (never stopped early), and its gates redraw nothing."""
    data = tiny({"type": "noisy_topk", "k": 2}, placement={"expert_parallel": 2}, losses={"load": 0.01})
    for grads, buffers, count in spawn(_ep_worker, 2, data, "layers"):
        assert count > 10 and not grads and not buffers, (grads, buffers)


def test_a_run_with_recomputation_trains_as_one_without(tmp_path):
    data = tiny(GATES["gshard_random"][0], losses=GATES["gshard_random"][1])
    spec = moedsl.load_spec(data)
    losses = {}
    for mode in ("none", "layers", "experts"):
        o = RunOptions.from_spec(spec, steps=3, device="cpu", progress=False, out=tmp_path / mode, recompute=mode,
                                 compile="off", eval_every=3, eval_batches=1)
        t = Trainer(spec, o)
        losses[mode] = [float(t.step(t.source.batch(s, 4, 8, 0, 1), o.lr).loss) for s in range(3)]
    assert losses["layers"] == losses["none"] == losses["experts"], losses
    assert RunOptions.from_spec(moedsl.load_spec({**data, "train": {**data["train"], "recompute": "experts"}}),
                                steps=1).recompute == "experts"


def test_an_unknown_recompute_mode_is_refused_by_name():
    model = moedsl.build_model(tiny(GATES["noisy_topk"][0]))
    with pytest.raises(ValueError, match="recompute must be one of none, experts, layers, not 'all'"):
        apply_recompute(model, "all")


def test_compile_on_with_recomputed_layers_is_refused_before_the_run(tmp_path):
    from moedsl.runtime.preflight import check_run

    spec = moedsl.load_spec(tiny(GATES["noisy_topk"][0]))
    o = RunOptions.from_spec(spec, steps=1, device="cpu", out=tmp_path / "r", recompute="layers", compile="on")
    with pytest.raises(MoedslError, match="--compile on and train.recompute layers: choose one"):
        check_run(spec, o, 1)
