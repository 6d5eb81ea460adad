"""``latent_attention``: multi-head latent attention (DeepSeek-V2, Liu et al. 2024, §2.1;
DeepSeek-V3, DeepSeek-AI 2024, §2.1.1), as a residual sublayer: keys and values come up from a
normalised low-rank latent, each key's rotary part is shared by all heads, queries come from one
projection or a low-rank path. Computes transformers' modeling_deepseek_v3.py DeepseekV3Attention
for rope_type "default" and "yarn" (``rope_scaling``: YaRN, Peng et al. 2023, as transformers'
``_compute_yarn_parameters`` and DeepseekV3Attention's softmax scale compute it). The module is
``moedsl.nn.attention.LatentAttention``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moedsl.schema import defaults

from . import LayerKind, register, wider

_D = defaults("latent_attention")
_Y = defaults("yarn")


@dataclass(frozen=True)
class Yarn:
    """YaRN scaling of the rotary part (the schema's ``yarn``); see ``moedsl.nn.attention.yarn``."""

    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = _Y["beta_fast"]
    beta_slow: float = _Y["beta_slow"]
    mscale: Optional[float] = _Y["mscale"]
    mscale_all_dim: Optional[float] = _Y["mscale_all_dim"]
    attention_factor: Optional[float] = _Y["attention_factor"]
    truncate: bool = _Y["truncate"]


@dataclass(frozen=True)
class LatentAttention:
    heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int  # resolved: defaults to qk_nope_head_dim
    q_lora_rank: Optional[int] = _D["q_lora_rank"]
    rope_theta: float = _D["rope_theta"]
    rope_interleave: bool = _D["rope_interleave"]
    rope_scaling: Optional[Yarn] = _D["rope_scaling"]
    norm_eps: float = _D["norm_eps"]
    causal: bool = _D["causal"]
    dropout: float = _D["dropout"]
    bias: bool = _D["bias"]
    residual: bool = _D["residual"]
    prenorm: bool = _D["prenorm"]


class LatentAttentionKind(LayerKind):
    name = "latent_attention"
    config = LatentAttention
    sublayer = True

    def build(self, data, path, model, checks) -> LatentAttention:
        from . import take

        scaling = take(Yarn, data["rope_scaling"]) if data.get("rope_scaling") is not None else None
        a = take(LatentAttention, data, v_head_dim=data.get("v_head_dim", data["qk_nope_head_dim"]),
                 rope_scaling=scaling)
        if a.qk_rope_head_dim % 2:
            checks.error(path + ("qk_rope_head_dim",),
                         f"rotary positions need an even qk_rope_head_dim, got {a.qk_rope_head_dim}")
        if "v_head_dim" not in data and a.v_head_dim == 0:
            checks.error(path + ("qk_nope_head_dim",), "v_head_dim defaults to qk_nope_head_dim, which is 0",
                         "set v_head_dim")
        return a

    def module(self, cfg: LatentAttention, model):
        from moedsl.nn.attention import LatentAttention as Module

        return Module(model.d_model, cfg.heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                      cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.rope_theta, cfg.rope_interleave, cfg.norm_eps,
                      cfg.causal, cfg.dropout, cfg.bias, model.init_std, cfg.rope_scaling)

    def flops(self, cfg: LatentAttention, model, seq: int) -> float:
        """The projections, plus QKᵀ (width Dn + Dr) and AV (width Dv) per head over the keys a
        query attends to on average."""
        from .attention import mean_keys

        ctx = mean_keys(seq, cfg.causal, None)
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return super().flops(cfg, model, seq) + 2 * ctx * cfg.heads * per_head

    def activations(self, cfg: LatentAttention, model) -> float:
        """Its pre-norm's input and output (float32) and its own input (d_model each); the low-rank query,
        normed (its input, the normed rows, the scaled rows); the latent likewise, and its rotary
        key; the up-projected keys and values; q before and after the rotation, and the keys; the
        attention output."""
        h, qk, v = cfg.heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        q_path = 3.0 * cfg.q_lora_rank if cfg.q_lora_rank is not None else 0.0
        latent = 3.0 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return model.d_model * (2.0 * wider(model) + 1.0) + q_path + latent + h * (cfg.qk_nope_head_dim + v) + 3.0 * h * qk + h * v

    def document_kwargs(self, ctx, layer) -> dict:
        """The documents' mask, and each token's position within its document for the rotary part."""
        return {"positions": ctx.document_positions(), "documents": ctx.document_mask()}

    def decode_args(self, ctx, layer) -> tuple:
        """Keys and values cached per layer (a causal layer only: a token must not see later ones)."""
        if not layer.config.causal:
            ctx.cannot_decode(layer, "causal: false attention sees later tokens: it cannot decode one token "
                              "at a time")
        return ctx.decode_state(layer, self.target(layer))


register(LatentAttentionKind())
