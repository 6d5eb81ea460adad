"""Hugging Face MoE-block weights as moedsl's MoE-sublayer weights (no transformers import:
plain tensors in, plain tensors out).

transformers 5 (modeling_mixtral.py, modeling_qwen2_moe.py, modeling_qwen3_moe.py,
modeling_olmoe.py, modeling_deepseek_v3.py) holds a block's routed experts fused in memory,

    experts.gate_up_proj [E, 2I, d]   rows [0, I): gate_proj (Mixtral w1), rows [I, 2I): up_proj (w3)
    experts.down_proj    [E, d, I]    (Mixtral w2)

(an expert computes down · (act(gate · x) ⊙ up · x), each a ``F.linear``), while checkpoints on
disk keep one module per expert: ``experts.{e}.gate_proj/up_proj/down_proj.weight`` (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``, [I, d], [I, d], [d, I]). moedsl's experts
multiply from the right (``x @ w``), so each is the transpose:

    experts.w_gate [E, d, I] = gate_projᵀ      experts.w_in [E, d, I] = up_projᵀ
    experts.w_out  [E, I, d] = down_projᵀ

The router ``gate.weight`` [E, d] is the same on both sides (logits = x · Wᵀ), DeepSeek-V3's
``gate.e_score_correction_bias`` [E] is moedsl's ``gate.expert_bias`` (a spec with
``bias_balancing``). Shared experts and dense MLPs are ``nn.Linear`` on both sides, taken as they
are: gate_proj -> ``w_gate``, up_proj -> ``w_in``, down_proj -> ``w_out``; Qwen2-MoE's
``shared_expert_gate.weight`` [1, d] -> ``shared.gate.weight`` (a spec with ``shared.gate: true``).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

# the expert projections' names per expert on disk: Mixtral's, and everyone else's
_PER_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_SHARED = ("shared_expert.", "shared_experts.")  # Qwen2-MoE, DeepSeek-V3


def dense_ffn_state_dict(mlp: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A SwiGLU MLP's ``gate_proj/up_proj/down_proj.weight`` (keys under ``prefix``) as moedsl's
    ``DenseFFN`` weights ``w_gate/w_in/w_out.weight`` (the ``ffn`` layer, or a MoE layer's shared
    experts): the same [out, in] tensors."""
    return {f"{ours}.weight": mlp[f"{prefix}{theirs}.weight"]
            for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj"))}


def moe_state_dict(block: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of one HF sparse-MoE block (its ``state_dict()``: keys relative to the block,
    the in-memory fused form or the per-expert form on disk) as moedsl's MoE sublayer weights,
    keys relative to ``layers.{i}.``: ``gate.weight``, ``gate.expert_bias``, ``experts.w_gate``,
    ``experts.w_in``, ``experts.w_out``, ``shared.{w_gate,w_in,w_out,gate}.weight``."""
    out = {"gate.weight": block["gate.weight"]}
    if "gate.e_score_correction_bias" in block:
        out["gate.expert_bias"] = block["gate.e_score_correction_bias"]
    if "experts.gate_up_proj" in block:
        gate_up, down = block["experts.gate_up_proj"], block["experts.down_proj"]  # [E, 2I, d], [E, d, I]
        I = down.shape[-1]
        gate, up = gate_up[:, :I], gate_up[:, I:]  # [E, I, d] each: chunk(2) of the linear's output
    else:
        per: dict[str, dict[int, torch.Tensor]] = {}
        for key, t in block.items():
            m = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", key)
            if m:
                per.setdefault(_PER_EXPERT.get(m[2], m[2]), {})[int(m[1])] = t
        gate, up, down = (torch.stack([per[name][e] for e in range(len(per[name]))])
                          for name in ("gate_proj", "up_proj", "down_proj"))
    out["experts.w_gate"] = gate.transpose(1, 2).contiguous()  # [E, d, I]
    out["experts.w_in"] = up.transpose(1, 2).contiguous()  # [E, d, I]
    out["experts.w_out"] = down.transpose(1, 2).contiguous()  # [E, I, d]
    for prefix in _SHARED:
        if f"{prefix}gate_proj.weight" in block:
            out.update({f"shared.{k}": v for k, v in dense_ffn_state_dict(block, prefix).items()})
    if "shared_expert_gate.weight" in block:
        out["shared.gate.weight"] = block["shared_expert_gate.weight"]  # [1, d]
    return out


# the two projections of one expert of transformers' encoder-decoder MoE blocks: (in, out)
_ENCDEC_EXPERT = {"switch_transformers": ("wi", "wo"), "nllb_moe": ("fc1", "fc2")}


def encdec_moe_state_dict(block: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The weights of transformers' SwitchTransformersSparseMLP (``family`` "switch_transformers":
    ``router.classifier.weight``, ``experts.expert_{e}.wi/wo.weight``, no biases) or
    NllbMoeSparseMLP ("nllb_moe": ``experts.expert_{e}.fc1/fc2.weight`` and ``.bias``) as moedsl's
    MoE sublayer weights, keys relative to ``layers.{i}.``: ``gate.weight`` [E, d] as it is,
    ``experts.w_in`` [E, d, h] = the stacked first projections transposed, ``experts.w_out``
    [E, h, d] the second's, and with biases ``experts.b_in`` [E, h], ``experts.b_out`` [E, d]."""
    if "router.classifier.bias" in block:  # router_bias: true (neither family's published checkpoints)
        raise ValueError("the router has a bias (router_bias: true): moedsl's routers have none")
    first, second = _ENCDEC_EXPERT[family]
    count = len({k.split(".")[1] for k in block if re.fullmatch(rf"experts\.expert_\d+\.{first}\.weight", k)})

    def stacked(name: str, part: str) -> torch.Tensor:
        return torch.stack([block[f"experts.expert_{e}.{name}.{part}"] for e in range(count)])

    out = {"gate.weight": block["router.classifier.weight"],
           "experts.w_in": stacked(first, "weight").transpose(1, 2).contiguous(),
           "experts.w_out": stacked(second, "weight").transpose(1, 2).contiguous()}
    if f"experts.expert_0.{first}.bias" in block:
        out["experts.b_in"] = stacked(first, "bias")
        out["experts.b_out"] = stacked(second, "bias")
    return out
