"""Incremental decoding: the state a decode graph carries from one forward to the next.

A decode graph (``moedsl.compiler.lower.lower(..., decode=True)``) takes the new tokens
[B, t], a ``DecodeCache`` and ``start``, the cache slot of the first new token. Rows are
left-padded: row b's prompt starts at slot ``pad[b]``, so every row writes its new tokens at
the same slots, and a token at slot s has position s - pad[b] (negative for padding), as
transformers' generate derives position ids from an attention_mask.

Each layer that keeps state between steps keeps it here under its own key, allocated on
first use at its full size (a static cache: keys and values [B, K, T_max, D] written in
place at the slots, so the tensors never move or grow between steps).

A static cache (``static=True``, for CUDA-graph capture) keeps every step's shapes the same:
``start`` may be a 0-dim device tensor, the new keys and values are written with
``index_copy_`` at the slots it names, and attention reads all T_max slots with the ones not
yet written (and the padding) masked, so one captured step serves every later slot, with no
host read of ``start`` or of the data.

Shape legend: B batch, t new tokens, L keys attended (start + t; T_max in a static cache),
T_max cache slots, H query heads, K key/value heads, D head width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kinds.gates import gate_type
from . import cpu_gemm, grouped
from .moe_ops import RouterStats, combine_packed, dispatch_packed, router_stats, weighted_sum


class DecodeCache:
    """Per-layer decoding state of one batch: attention keys and values, recurrent states."""

    def __init__(self, batch: int, max_len: int, pad: Optional[torch.Tensor] = None, device="cpu",
                 static: bool = False):
        self.batch, self.max_len, self.static = batch, max_len, static
        self.pad = (torch.zeros(batch, dtype=torch.int64, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.int64))  # [B] padding slots before each prompt
        self.tensors: dict = {}
        self.padded = bool(self.pad.any())  # without padding, one new token sees every cached key

    def kv(self, key: str, heads: int, k_dim: int, v_dim: int, like: torch.Tensor):
        """The static key and value caches of layer ``key``: [B, K, T_max, D_k], [B, K, T_max, D_v]."""
        if key not in self.tensors:
            shape = (self.batch, heads, self.max_len)
            self.tensors[key] = (like.new_zeros(shape + (k_dim,)), like.new_zeros(shape + (v_dim,)))
        return self.tensors[key]

    def state(self, key: str, make):
        """Layer ``key``'s recurrent state, ``make()`` on first use."""
        if key not in self.tensors:
            self.tensors[key] = make()
        return self.tensors[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts)


def positions(tokens: torch.Tensor, cache: DecodeCache, start) -> torch.Tensor:
    """Positions [B, t] of the new tokens at slots start..start+t-1 (negative: padding)."""
    t = tokens.shape[1]
    slots = start + torch.arange(t, device=tokens.device)
    return slots[None, :] - cache.pad.to(tokens.device)[:, None]


def key_mask(cache: DecodeCache, start, t: int, window: Optional[int], device, keys: Optional[int] = None):
    """[B, 1, t, L] boolean, True where the query at slot start + i may see the key at slot j:
    j is not padding, j <= start + i (causal), start + i - j < window (a sliding window of
    ``window`` keys, itself included), or j is the query's own slot (so that a padding query,
    whose output nothing reads, still has a key). ``keys``: L (default start + t; a static
    cache's T_max, where ``start`` may be a device tensor)."""
    L = start + t if keys is None else keys
    j = torch.arange(L, device=device)
    s = start + torch.arange(t, device=device)
    allowed = j[None, :] <= s[:, None]  # [t, L]
    if window is not None:
        allowed = allowed & (s[:, None] - j[None, :] < window)
    real = j[None, :] >= cache.pad.to(device)[:, None]  # [B, L]
    mask = allowed[None] & real[:, None, :]  # [B, t, L]
    mask = mask | (j[None, :] == s[:, None])[None]
    return mask[:, None]


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DecodeCache, key: str, start: int,
                  window: Optional[int] = None, scale: Optional[float] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write k [B, K, t, D], v [B, K, t, Dv] at slots start..start+t-1 of layer ``key``'s cache,
    then attend q [B, H, t, D] over the L = start + t cached keys: [B, H, t, Dv]. ``bias``
    [1, H, t, L] (L: T_max in a static cache) is added to the logits (T5's relative positions)."""
    t = q.shape[-2]
    ck, cv = cache.kv(key, k.shape[1], k.shape[-1], v.shape[-1], k)
    if cache.static:
        return _attend_static(q, k, v, ck, cv, cache, start, window, scale, bias)
    if start + t > cache.max_len:
        raise ValueError(f"{key}: slots {start}..{start + t - 1} past the cache's {cache.max_len}")
    ck[:, :, start:start + t] = k
    cv[:, :, start:start + t] = v
    keys, values = ck[:, :, :start + t], cv[:, :, :start + t]  # [B, K, L, D]
    B, H, K = q.shape[0], q.shape[1], keys.shape[1]
    if bias is not None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=_with_bias(
            bias, key_mask(cache, start, t, window, q.device), q.dtype), scale=scale, enable_gqa=H != K)
    if t == 1 and H != K and not cache.padded and (window is None or start < window):
        # one token seeing every key: the rep = H / K query heads of a key head are rep queries
        # against its keys [B, K, rep, D] (no copies of the keys and values, as repeat_interleave makes)
        y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, q.shape[-1]), keys, values, scale=scale)
        return y.reshape(B, H, 1, y.shape[-1])
    if keys.shape[1] != q.shape[1]:
        rep = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    if t == 1 and not cache.padded and (window is None or start < window):
        mask = None  # one token, no padding, the whole past inside its window: every key
    else:
        mask = key_mask(cache, start, t, window, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _with_bias(bias: torch.Tensor, mask: torch.Tensor, dtype) -> torch.Tensor:
    """``bias`` [1, H, t, L] with the keys ``mask`` [B, 1, t, L] hides at the dtype's lowest value."""
    return bias.to(dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _attend_static(q, k, v, ck, cv, cache: DecodeCache, start, window: Optional[int], scale: Optional[float],
                   bias: Optional[torch.Tensor] = None):
    """``attend_cached`` on a static cache: the same shapes at every slot, nothing read back to
    the host (``start``: an int or a 0-dim tensor on q's device). Slots past start + t hold
    zeros or stale keys; the mask hides them."""
    t, T_max = q.shape[-2], ck.shape[2]
    slots = start + torch.arange(t, device=q.device)
    ck.index_copy_(2, slots, k)
    cv.index_copy_(2, slots, v)
    mask = key_mask(cache, start, t, window, q.device, keys=T_max)
    if bias is not None:
        mask = _with_bias(bias, mask, q.dtype)
    return F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != ck.shape[1])


class DecodeMoE(torch.nn.Module):
    """One MoE layer of a decode graph on one process: the gate, the experts and the combine in
    one call (the compiler's ``fuse_decode_moe`` pass puts it in place of the route, dispatch,
    experts and combine nodes). A decode step has a handful of assignments (B tokens × k); with
    no gradient, on the CPU, it routes them with the gate's own choice and runs each expert's
    rows through views of its weights, summing each token's outputs in ascending expert order:
    the products and sums the packed path (``dispatch_packed``, ``Experts._small``, ``combine_packed``)
    computes, without its sort, gathers, slot bookkeeping and scatter (~30 small ops a layer).
    Where that does not hold (a gradient, a GPU, more rows, GShard's unrouted second choices) it
    runs the packed path itself. A lone token's capacity is at least one slot
    (``moedsl.kinds.moe.Gate.capacity``): nothing it chooses is dropped."""

    def __init__(self, gate, experts, name: str):
        super().__init__()
        self.gate, self.experts, self.name = gate, experts, name

    def forward(self, x: torch.Tensor, token_ids, rank: int, groups: int, gidx: Optional[torch.Tensor] = None):
        """x [S, d] (the step's tokens, each its own routing group) -> (y [S, d], aux loss, RouterStats)."""
        fast = self._direct(x, token_ids, groups, gidx)
        return fast if fast is not None else self._packed(x, token_ids, rank, groups, gidx)

    def _packed(self, x, token_ids, rank, groups, gidx):
        r = self.gate(x, token_ids, rank, groups, gidx=gidx)
        p = dispatch_packed(x, r)
        return combine_packed(self.experts(p.rows, p.sizes), p, r), r.aux_loss, router_stats(r, self.name)

    def _direct(self, x, token_ids, groups, gidx):
        gate, experts = self.gate, self.experts
        S, d = x.shape
        cap = gate.spec.capacity(1, gate.num_experts, False) if gate.spec.has_capacity else None  # a lone token's
        if (torch.is_grad_enabled() or x.device.type != "cpu" or grouped.static() or torch.is_autocast_enabled("cpu")
                or gate.training or S * gate.spec.k > experts.SMALL_ROWS or S != groups or experts.token_dropout
                or len(experts.expert_ids) != gate.num_experts or gate_type(gate.spec.type).dense or experts.training
                or x.dtype != experts.w_in.dtype):
            return None
        ids = token_ids.reshape(S, 1) if token_ids is not None else None
        choice = gate.choose(x.reshape(S, 1, d), ids, gidx.view(S, 1))
        if choice.routed is not None:
            return None  # some choices may not be routed: the packed path drops them
        k = choice.expert.shape[-1]
        expert = choice.expert.reshape(-1)
        w = choice.weight.reshape(-1).to(x.dtype)  # the weights as the combine applies them: in the rows' dtype
        chosen = expert.tolist()
        rows: dict = {}  # expert -> its assignments in order (a stable sort by expert, as dispatch_packed's)
        for i, e in enumerate(chosen):
            rows.setdefault(e, []).append(i)
        views = experts._views()
        outs = [(rows[e], experts._one(self._rows_of(x, rows[e], k), e, views)) for e in sorted(rows)]
        y = self._sum(outs, w, k, S, x)
        load = torch.bincount(expert, minlength=gate.num_experts)
        stats = RouterStats(layer=self.name, tokens_per_expert=load, expert_load=load.float(),
                            dropped=torch.zeros((), dtype=torch.int64), assignments=S * k,
                            capacity=None if cap is None else S * cap,
                            losses={n: v.detach() for n, v in choice.losses.items()})
        return y, gate.weigh(choice.losses, x), stats

    @staticmethod
    def _rows_of(x: torch.Tensor, idx: list, k: int) -> torch.Tensor:
        toks = [i // k for i in idx]
        return x[toks[0]:toks[0] + 1] if len(toks) == 1 else x[toks]

    @staticmethod
    def _sum(outs: list, w: torch.Tensor, k: int, S: int, x: torch.Tensor) -> torch.Tensor:
        """Each token's weighted expert outputs summed in ascending expert order, as the packed
        combine sums them: float32 with moedsl's kernel adds w·y to the running sum row by row,
        which Python's own additions repeat (no gathers); otherwise (bfloat16's index_add sums in
        its own way) the packed combine's own op, on the rows in its order."""
        if x.dtype == torch.float32 and cpu_gemm.available():
            weight, out = w.tolist(), [None] * S
            for idx, ye in outs:
                for j, i in enumerate(idx):
                    c = (ye if len(idx) == 1 else ye[j:j + 1]) * weight[i]
                    t = i // k
                    out[t] = c if out[t] is None else out[t] + c
            return out[0] if S == 1 else torch.cat(out)
        order = [i for idx, _ in outs for i in idx]
        tok = torch.tensor([i // k for i in order], dtype=torch.int64, device=x.device)
        return weighted_sum(torch.cat([ye for _, ye in outs]), w[order], tok, S)

