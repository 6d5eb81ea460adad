"""Self-attention modules: multi-head attention with grouped-query heads, q/k norms, sliding
windows (``Attention``) and DeepSeek's multi-head latent attention (``LatentAttention``).

Each computes what the corresponding transformers module computes (transformers 5,
modeling_mixtral.py MixtralAttention, modeling_qwen2_moe.py Qwen2MoeAttention,
modeling_qwen3_moe.py Qwen3MoeAttention, modeling_olmoe.py OlmoeAttention,
modeling_deepseek_v3.py DeepseekV3Attention) for the default rope_type, positions 0..T-1 and
no padding; ``HF_NAMES`` on each class says which transformers parameter each weight is.

Shape legend: B batch, T sequence, H query heads, K key/value heads, Dh head width,
Dn / Dr the non-rotary / rotary query-key widths and Dv the value width of latent attention,
R the latent's rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decode import attend_cached
from .documents import attend_in_documents
from .layers import RMSNorm, init_normal


def rope_inv_freq(theta: float, Dh: int, device=None) -> torch.Tensor:
    """The default rope's frequencies theta^(-2i/Dh) [Dh/2], as transformers'
    compute_default_rope_parameters."""
    return 1.0 / (theta ** (torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh))


def rope_cos_sin(inv_freq: torch.Tensor, T: int, dtype: torch.dtype, scale: float = 1.0,
                 positions: Optional[torch.Tensor] = None) -> tuple:
    """(cos, sin) of the angles position · inv_freq, times ``scale``, in ``dtype``: [T, Dh/2] at
    positions 0..T-1, or [B, 1, T, Dh/2] at ``positions`` [B, T]."""
    if positions is None:
        ang = torch.arange(T, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq  # [T, Dh/2]
    else:
        ang = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, T, Dh/2]
    cos, sin = ang.cos(), ang.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """x [B, H, T, Dh] rotated by (cos, sin) of ``rope_cos_sin``; the pairs as ``rotary`` says."""
    Dh = x.shape[-1]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary(x: torch.Tensor, theta: float, interleave: bool = False, inv_freq: Optional[torch.Tensor] = None,
           scale: float = 1.0, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE (Su et al. 2021, §3.4.2) on [B, H, T, Dh] at positions 0..T-1, frequency i is
    theta^(-2i/Dh), computed as transformers' default rope (compute_default_rope_parameters,
    apply_rotary_pos_emb: pairs (i, i + Dh/2)). With ``interleave`` the pairs are (2i, 2i + 1)
    and the result is laid out [rotated evens, rotated odds], as transformers'
    apply_rotary_pos_emb_interleave (DeepSeek-V3) does; queries and keys get the same layout,
    so their dot products are those of the interleaved rotation. ``inv_freq`` [Dh/2] replaces
    the frequencies and ``scale`` multiplies cos and sin (a scaled rope such as ``yarn``: its
    ``attention_factor``, transformers' ``attention_scaling``). ``positions`` [B, T] (decoding:
    each row's own positions) replaces 0..T-1."""
    T, Dh = x.shape[-2], x.shape[-1]
    inv_freq = rope_inv_freq(theta, Dh, x.device) if inv_freq is None else inv_freq.to(x.device)
    cos, sin = rope_cos_sin(inv_freq, T, x.dtype, scale, positions)
    return apply_rope(x, cos, sin, interleave)


class _Rope:
    """One attention module's rotary tables: its frequencies per device, computed once, and the
    (cos, sin) of a positions tensor, computed once for all the modules of the same rope (``key``)
    while that tensor comes back (a decode step's layers share one positions tensor; queries and
    keys share the tables). The values are those ``rotary`` computes."""

    _step: list = [None, {}]  # [the positions tensor of the step, {(key, T, dtype, device): (cos, sin)}]

    def __init__(self, key: tuple, scale: float = 1.0):
        self.key, self.scale = key, scale
        self.inv_freq: dict = {}
        self.tables: dict = {}  # (T, dtype, device) -> (cos, sin) at positions 0..T-1

    def make_inv_freq(self, device) -> torch.Tensor:
        if self.key[0] == "yarn":
            _, theta, dim, s = self.key
            return yarn(dim, theta, s, device)[0]
        _, theta, dim = self.key
        return rope_inv_freq(theta, dim, device)

    def cos_sin(self, x: torch.Tensor, positions: Optional[torch.Tensor]) -> tuple:
        T = x.shape[-2]
        if positions is None:  # positions 0..T-1: the tables depend on T, the dtype and the device only
            if torch.compiler.is_compiling():  # inductor folds them into its kernels
                return self._compute(x, T, None)
            got = self.tables.get((T, x.dtype, x.device))
            if got is None:
                got = self._compute(x, T, None)
                if not torch.is_inference_mode_enabled():  # an inference tensor cannot serve autograd later
                    self.tables[(T, x.dtype, x.device)] = got
            return got
        if torch.compiler.is_compiling():  # packed rows under inductor: no step cache inside its graph
            return self._compute(x, T, positions)
        step = _Rope._step
        if step[0] is not positions:
            step = _Rope._step = [positions, {}]
        got = step[1].get((self.key, T, x.dtype, x.device))
        if got is None:
            got = step[1][(self.key, T, x.dtype, x.device)] = self._compute(x, T, positions)
        return got

    def _compute(self, x: torch.Tensor, T: int, positions: Optional[torch.Tensor]) -> tuple:
        inv = self.inv_freq.get(x.device)
        if inv is None:
            inv = self.inv_freq[x.device] = self.make_inv_freq(x.device)
        return rope_cos_sin(inv, T, x.dtype, self.scale, positions)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·m·ln s + 1 (Peng et al. 2023, §3.4; 1 for s <= 1), as
    transformers' modeling_deepseek_v3.py yarn_get_mscale."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn(dim: int, theta: float, s, device=None) -> tuple:
    """(inv_freq [dim/2], attention_factor) of YaRN (Peng et al. 2023, §3.2 "NTK-by-parts" and
    §3.4) for the rotary width ``dim``, exactly as transformers' modeling_rope_utils.py
    _compute_yarn_parameters: dimension d keeps its frequency (extrapolation) where it turns more
    than beta_fast times in original_max_position_embeddings, is divided by ``factor``
    (interpolation) where less than beta_slow, and is blended linearly in between."""
    base, factor = theta, s.factor
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):  # the dimension turning ``rotations`` times in the original context
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: the original frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def sliding_window_mask(T: int, window: int, device) -> torch.Tensor:
    """[T, T] boolean, True where query i may see key j: i - window < j <= i (``window`` keys,
    itself included), transformers' sliding_window_overlay and causal_mask_function."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril().triu(1 - window)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position key - query (Raffel et al. 2020, §2.1; Mesh TensorFlow
    transformer_layers.py _relative_position_bucket, as transformers' T5Attention and
    SwitchTransformersAttention compute it): half the buckets hold the distances 0..n/2-1 one each,
    the other half logarithmically wider ranges up to ``max_distance``, past which all share the
    last. ``bidirectional`` (an encoder): half the buckets for keys after the query, half for
    those at or before it; otherwise (a decoder) keys after the query all fall in bucket 0."""
    out = torch.zeros_like(relative)
    n = buckets
    if bidirectional:
        n //= 2
        out = out + (relative > 0).to(torch.long) * n
        distance = torch.abs(relative)
    else:
        distance = -torch.min(relative, torch.zeros_like(relative))
    exact = n // 2
    small = distance < exact
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                     * (n - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, n - 1))
    return out + torch.where(small, distance, large)


class RelativeBias(nn.Module):
    """A stack's T5 relative position bias (Raffel et al. 2020, §2.1): one learned scalar per
    bucket of the distance key - query and per head, ``weight`` [buckets, heads] (transformers'
    ``relative_attention_bias``, held by the stack's first layer there), computed once per
    forward and added to the logits of every self-attention of the stack."""

    def __init__(self, buckets: int, max_distance: int, heads: int, bidirectional: bool, init_std: float):
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(buckets, heads))
        init_normal(self, init_std)

    def forward(self, tokens: torch.Tensor, cache=None, start=0) -> torch.Tensor:
        """The bias [1, H, t, L] of the queries at slots start..start+t-1 (tokens [B, t]) over the
        keys at slots 0..L-1: L = t in a whole forward; decoding (``cache``), L = start + t, or the
        cache's T_max when it is static. Left padding shifts a row's queries and keys alike, so the
        distances, slot minus slot, are the positions'."""
        t = tokens.shape[1]
        device = self.weight.device
        if cache is None:
            L = t
        else:
            L = cache.max_len if cache.static else start + t
        query = start + torch.arange(t, device=device)[:, None]  # [t, 1]
        key = torch.arange(L, device=device)[None, :]  # [1, L]
        bucket = relative_position_bucket(key - query, self.bidirectional, self.buckets, self.max_distance)
        return F.embedding(bucket, self.weight).permute(2, 0, 1).unsqueeze(0)  # [1, H, t, L]


def _masked_logits_bias(q: torch.Tensor, T: int, L: int, causal: bool, window: Optional[int], bias=None,
                        keys=None, offset=0) -> torch.Tensor:
    """The float mask SDPA adds to the logits [B or 1, H or 1, T, L]: ``bias`` (a relative position
    bias), with the keys a query may not see (later keys where ``causal``; outside the ``window``;
    the False of ``keys`` [B, L], the padding) at the dtype's lowest value, as transformers adds
    its masks (a row that sees no key averages them all instead of giving NaN)."""
    allowed = None
    if causal or window is not None:
        s = offset + torch.arange(T, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        allowed = j <= s if causal else torch.ones(T, L, dtype=torch.bool, device=q.device)
        if window is not None:
            allowed = allowed & (s - j < window)
        allowed = allowed[None, None]
    if keys is not None:
        real = keys.to(torch.bool)[:, None, None, :]  # [B, 1, 1, L]
        allowed = real if allowed is None else allowed & real
    mask = bias.to(q.dtype) if bias is not None else q.new_zeros(1, 1, T, L)
    if allowed is not None:
        mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)
    return mask


def _attend(q, k, v, causal: bool, window: Optional[int], dropout: float, scale: Optional[float] = None,
            gqa: bool = False, documents=None, bias=None, keys=None):
    """Softmax attention of q [B, H, T, D] over k [B, H, T, D], v [B, H, T, Dv]; with ``gqa``, k and v
    have K heads (H divisible by K) and query head h attends with key/value head h // (H / K).
    ``documents``: packed rows' mask (``moedsl.nn.documents.document_mask``): each query keeps to
    its document. ``bias`` [1, H, T, L]: added to the logits (T5's relative positions); ``keys``
    [B, L] bool: the keys that are real (False: padding, never attended to)."""
    if documents is not None:
        if bias is not None or keys is not None:
            raise ValueError("packed documents with a position bias or padded keys are not supported")
        return attend_in_documents(q, k, v, documents, causal, window, dropout, scale, gqa)
    if bias is not None or keys is not None:
        mask = _masked_logits_bias(q, q.shape[-2], k.shape[-2], causal, window, bias, keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=gqa)
    mask = sliding_window_mask(q.shape[-2], window, q.device) if window is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          dropout_p=dropout, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017, §3.2.2) with grouped-query heads
    (Ainslie et al. 2023), rotary positions, an optional RMSNorm of queries and keys (``qk_norm``:
    "head" over each head's Dh as in Qwen3-MoE, "projection" over the whole q and k projections
    as in OLMoE), OLMoE's clamp of q, k, v (``clip_qkv``) and a causal sliding window."""

    # moedsl parameter prefix -> transformers' (self_attn.<name>), same layout
    HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
                "q_norm": "q_norm", "k_norm": "k_norm"}

    def __init__(self, d_model: int, heads: int, kv_heads: int, positions: str, rope_theta: float,
                 causal: bool, dropout: float, bias: bool, init_std: float, *, head_dim: Optional[int] = None,
                 out_bias: Optional[bool] = None, qk_norm: str = "none", qk_norm_eps: float = 1e-5,
                 clip_qkv: Optional[float] = None, sliding_window: Optional[int] = None, scaled: bool = True):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = head_dim if head_dim is not None else d_model // heads
        self.scale = None if scaled else 1.0  # None: SDPA's 1/sqrt(head_dim); T5 does not scale
        self.rotary = positions == "rotary"
        self.rope_theta, self.causal, self.dropout = rope_theta, causal, dropout
        self.qk_norm, self.clip_qkv, self.sliding_window = qk_norm, clip_qkv, sliding_window
        q, kv = heads * self.head_dim, kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, q, bias=bias)
        self.wk = nn.Linear(d_model, kv, bias=bias)
        self.wv = nn.Linear(d_model, kv, bias=bias)
        self.wo = nn.Linear(q, d_model, bias=bias if out_bias is None else out_bias)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            init_normal(lin, init_std)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, qk_norm_eps), RMSNorm(self.head_dim, qk_norm_eps)
        elif qk_norm == "projection":
            self.q_norm, self.k_norm = RMSNorm(q, qk_norm_eps), RMSNorm(kv, qk_norm_eps)
        elif qk_norm != "none":
            raise ValueError(f"qk_norm must be none, head or projection, got {qk_norm!r}")

    def _rope(self) -> _Rope:
        rope = self.__dict__.get("_rope_tables")
        if rope is None:
            rope = self._rope_tables = _Rope(("default", self.rope_theta, self.head_dim))
        return rope

    def forward(self, x: torch.Tensor, cache=None, positions: Optional[torch.Tensor] = None, start: int = 0,
                key: Optional[str] = None, documents=None, bias: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cache`` (a ``moedsl.nn.decode.DecodeCache``): decode x, the tokens at slots
        start..start+T-1 at ``positions`` [B, T], against the keys and values cached under ``key``.
        Packed rows (no cache): ``positions`` [B, T] each token's within its document and
        ``documents`` the rows' document mask (``moedsl.nn.documents``). ``bias`` [1, H, T, L]: the
        stack's relative position bias (``RelativeBias``), added to the logits; ``keys`` [B, T]
        bool (an encoder's source mask; None: all real): the padding no query attends to."""
        B, T, _ = x.shape
        if cache is not None and not torch.is_grad_enabled() and self.qk_norm == "none" and self.clip_qkv is None:
            return self._decode(x, cache, positions, start, key, bias)
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, T, H·Dh], [B, T, K·Dh], [B, T, K·Dh]
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or K, T, Dh]
        if self.rotary:
            cos, sin = self._rope().cos_sin(q, positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = attend_cached(q, k, v, cache, key, start, self.sliding_window, self.scale, bias)
            return self.wo(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        # grouped-query heads: SDPA reads each key/value head for its H/K query heads (enable_gqa),
        # with no repeated copy of k and v and no sum over the copies in backward
        y = _attend(q, k, v, self.causal, self.sliding_window, self.dropout if self.training else 0.0,
                    scale=self.scale, gqa=self.kv_heads != self.heads, documents=documents, bias=bias, keys=keys)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def _qkv(self) -> tuple:
        """wq, wk and wv stacked into one projection, [(H + 2K)·Dh, d] (and their biases), for
        decoding, where a step's few rows make each projection's call cost count. Made again
        when any of the three changes in place (a training step, a loaded checkpoint: the
        tensors' version counters) or is replaced."""
        ps = [self.wq.weight, self.wk.weight, self.wv.weight]
        if self.wq.bias is not None:
            ps += [self.wq.bias, self.wk.bias, self.wv.bias]
        stamp = tuple((p.data_ptr(), p._version) for p in ps)
        got = self.__dict__.get("_qkv_stacked")
        if got is None or got[0] != stamp:
            got = self._qkv_stacked = (stamp, torch.cat(ps[:3]), torch.cat(ps[3:]) if len(ps) > 3 else None)
        return got[1], got[2]

    def _decode(self, x: torch.Tensor, cache, positions: Optional[torch.Tensor], start: int, key: str, bias=None):
        """``forward`` with a cache and no gradient (no q/k norm, no clamp): the same values with
        fewer ops: one projection for q, k and v, and one rotation for the queries and keys
        together (their heads side by side: the same cos and sin apply to every head)."""
        B, T, _ = x.shape
        H, K, Dh = self.heads, self.kv_heads, self.head_dim
        w, b = self._qkv()
        qkv = F.linear(x, w, b).view(B, T, H + 2 * K, Dh).transpose(1, 2)  # [B, H + 2K, T, Dh]
        qk, v = qkv[:, :H + K], qkv[:, H + K:]
        if self.rotary:
            cos, sin = self._rope().cos_sin(qk, positions)
            qk = apply_rope(qk, cos, sin)
        y = attend_cached(qk[:, :H], qk[:, H:], v, cache, key, start, self.sliding_window, self.scale, bias)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * Dh))


class CrossAttention(nn.Module):
    """Encoder-decoder attention (Vaswani et al. 2017, §3.2.3): queries from the decoder's stream
    x [B, T, d], keys and values from the encoder's output ``memory`` [B, S, d], the source's
    padding masked, no position information (transformers' SwitchTransformersLayerCrossAttention,
    NllbMoeAttention over encoder_hidden_states). Decoding, the keys and values are computed from
    ``memory`` on a sequence's first step and kept in its cache."""

    def __init__(self, d_model: int, heads: int, head_dim: int, bias: bool, scaled: bool, dropout: float,
                 init_std: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.scale = None if scaled else 1.0
        inner = heads * head_dim
        self.wq = nn.Linear(d_model, inner, bias=bias)
        self.wk = nn.Linear(d_model, inner, bias=bias)
        self.wv = nn.Linear(d_model, inner, bias=bias)
        self.wo = nn.Linear(inner, d_model, bias=bias)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            init_normal(lin, init_std)

    def _kv(self, memory: torch.Tensor) -> tuple:
        B, S, _ = memory.shape
        k = self.wk(memory).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        v = self.wv(memory).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor, source_mask: Optional[torch.Tensor] = None,
                cache=None, key: Optional[str] = None) -> torch.Tensor:
        """``source_mask`` [B, S] bool: the real source tokens (None: all). ``cache``: decoding,
        the keys and values of ``memory`` kept under ``key`` (made on the sequence's first step)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            k, v = cache.state(key, lambda: self._kv(memory))
        else:
            k, v = self._kv(memory)
        y = _attend(q, k, v, False, None, self.dropout if self.training else 0.0, scale=self.scale,
                    keys=source_mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, §2.1.2-2.1.3; DeepSeek-V3):
    keys' and values' non-rotary parts come up from a normalised latent of rank R; each key's
    rotary part is one projection of the input shared by all heads; queries come from one
    projection or a low-rank path with its own RMSNorm. Scores are scaled by (Dn + Dr)^-1/2.
    Weight names follow DeepSeek-V3's reference inference code (inference/model.py, MLA)."""

    HF_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
                "wo": "o_proj"}

    def __init__(self, d_model: int, heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope_theta: float,
                 rope_interleave: bool, norm_eps: float, causal: bool, dropout: float, bias: bool,
                 init_std: float, rope_scaling=None):
        super().__init__()
        self.heads, self.kv_lora_rank = heads, kv_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_theta, self.rope_interleave = rope_theta, rope_interleave
        self.causal, self.dropout = causal, dropout
        qk = qk_nope_head_dim + qk_rope_head_dim
        self.q_lora = q_lora_rank is not None
        self.scale = qk ** -0.5
        self.rope_scaling = rope_scaling  # a ``Yarn`` config, or None
        if rope_scaling is not None and rope_scaling.mscale_all_dim:  # DeepseekV3Attention: yarn_apply_mscale
            self.scale *= yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) ** 2
        if not self.q_lora:
            self.wq = nn.Linear(d_model, heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, heads * qk, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(heads * v_head_dim, d_model, bias=bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_normal(m, init_std)

    def _rope(self) -> _Rope:
        rope = self.__dict__.get("_rope_tables")
        if rope is None:
            theta, Dr, s = self.rope_theta, self.rope, self.rope_scaling
            rope = _Rope(("default", theta, Dr)) if s is None else \
                _Rope(("yarn", theta, Dr, s), yarn(Dr, theta, s)[1])
            self._rope_tables = rope
        return rope

    def forward(self, x: torch.Tensor, cache=None, positions: Optional[torch.Tensor] = None, start: int = 0,
                key: Optional[str] = None, documents=None) -> torch.Tensor:
        """``cache``: decode, and packed rows (``positions``, ``documents``), as ``Attention.forward``;
        the cache holds the heads' expanded keys [B, H, T_max, Dn+Dr] and values [B, H, T_max, Dv]
        (what transformers' cache holds)."""
        B, T, _ = x.shape
        H, Dn, Dr, Dv = self.heads, self.nope, self.rope, self.v_dim
        q = self.wq(x) if not self.q_lora else self.wq_b(self.q_norm(self.wq_a(x)))  # [B, T, H·(Dn+Dr)]
        q = q.view(B, T, H, Dn + Dr).transpose(1, 2)  # [B, H, T, Dn+Dr]
        q_nope, q_rope = q.split([Dn, Dr], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, Dr], dim=-1)  # [B, T, R], [B, T, Dr]
        kv = self.wkv_b(self.kv_norm(latent)).view(B, T, H, Dn + Dv).transpose(1, 2)  # [B, H, T, Dn+Dv]
        k_nope, v = kv.split([Dn, Dv], dim=-1)
        k_rope = k_rope.view(B, 1, T, Dr)  # one rotary key part, shared by the heads
        cos, sin = self._rope().cos_sin(q_rope, positions)
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, Dr)], dim=-1)  # [B, H, T, Dn+Dr]
        if cache is not None:
            y = attend_cached(q, k, v, cache, key, start, None, self.scale)
            return self.wo(y.transpose(1, 2).reshape(B, T, H * Dv))
        y = _attend(q, k, v, self.causal, None, self.dropout if self.training else 0.0, self.scale,
                    documents=documents)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * Dv))  # y: [B, H, T, Dv]


def hf_parameter_names(module: nn.Module) -> dict[str, str]:
    """For an ``Attention`` or ``LatentAttention``: each of its parameter names (e.g.
    ``wkv_a.weight``) -> the name of the same tensor, in the same layout, inside transformers'
    attention module of that family (``kv_a_proj_with_mqa.weight``; prefix ``self_attn.``)."""
    out = {}
    for name, _ in module.named_parameters():
        prefix, _, rest = name.partition(".")
        out[name] = f"{module.HF_NAMES[prefix]}.{rest}"
    return out
