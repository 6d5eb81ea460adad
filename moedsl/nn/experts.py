"""Experts as stacked weights: w_in [E, d, h], w_out [E, h, d] (and w_gate [E, d, h] for GLU).

A 2048-expert layer is three parameters, not 2048 modules. An ``Experts`` module holds
the experts one rank hosts (``expert_ids``: their global ids, a replica may appear on
several ranks) and computes them as one batched GEMM over a capacity buffer
[E_local, C, d], or as grouped GEMMs over rows grouped by expert (dropless).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import rng
from . import cpu_caps
from . import cpu_gemm
from . import grouped
from .grouped import grouped_matmul
from .layers import init_normal

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}


class Experts(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str, expert_ids: Sequence[int], *,
                 bias: bool = False, dropout: float = 0.0, init_scale: float = 1.0, seed: int = 0,
                 layer: int = 0, init: bool = True, token_dropout: float = 0.0):
        super().__init__()
        E = len(expert_ids)
        self.d_model, self.hidden, self.activation = d_model, hidden, activation
        self.glu = activation in ("swiglu", "geglu")
        self.act = ACTIVATIONS[activation]
        self.dropout = dropout
        # dropout on each output row while training, rows × (1 − p) otherwise: fairseq's and NLLB-MoE's
        # moe_token_dropout (transformers' NllbMoeExperts drops expert(x)·weight; a row's weight is a
        # scalar, so dropping the row before the combine weighs it is the same)
        self.token_dropout = token_dropout
        self.init_scale, self.seed, self.layer = init_scale, seed, layer
        # which global experts the slots hold: real even on the meta device (it is metadata)
        here = torch.get_default_device()
        self.register_buffer("expert_ids", torch.tensor(list(expert_ids), dtype=torch.int64,
                                                        device="cpu" if here.type == "meta" else here))
        self.w_in = nn.Parameter(torch.empty(E, d_model, hidden))
        self.w_gate = nn.Parameter(torch.empty(E, d_model, hidden)) if self.glu else None
        self.w_out = nn.Parameter(torch.empty(E, hidden, d_model))
        self.b_in = nn.Parameter(torch.zeros(E, hidden)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, hidden)) if bias and self.glu else None
        self.b_out = nn.Parameter(torch.zeros(E, d_model)) if bias else None
        if init and self.w_in.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal with std = sqrt(init_scale / fan_in) (Switch: init_scale 0.1), each
        expert's values a function of (seed, layer, global expert id): the same weights
        whichever rank hosts the expert."""
        for name, fan_in in (("w_in", self.d_model), ("w_gate", self.d_model), ("w_out", self.hidden)):
            w = getattr(self, name)
            if w is None:
                continue
            per = w[0].numel()
            std = math.sqrt(self.init_scale / fan_in)
            stream = rng.stream_id(self.layer, name)
            ids = self.expert_ids.to(w.device)
            flat = w.view(-1)
            # in chunks of ~16M values: the draw's int64/float64 temporaries stay small however big w is
            step = max(1, (1 << 24) // per)
            for lo in range(0, len(ids), step):
                idx = ids[lo:lo + step, None] * per + torch.arange(per, device=w.device)
                flat[lo * per:(lo + idx.shape[0]) * per] = rng.truncated_normal(self.seed, stream, idx, std).view(-1)
        for b in (self.b_in, self.b_gate, self.b_out):
            if b is not None:
                b.zero_()

    def _hidden(self, x: torch.Tensor, mm, b_in, b_gate) -> torch.Tensor:
        h = mm(x, self.w_in)
        if b_in is not None:
            h = h + b_in
        if self.glu:
            g = mm(x, self.w_gate)
            if b_gate is not None:
                g = g + b_gate
            h = self.act(g) * h  # SwiGLU: silu(x·W1) ⊙ (x·W3); GEGLU with gelu
        else:
            h = self.act(h)
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    # How rows grouped by expert are computed on a CPU: "auto" picks "kernel" (moedsl's grouped
    # GEMM, cpu_gemm) for float32 where it could be built; "float32" (the same products in
    # float32, the result cast back) for bfloat16/float16 where this CPU has no native GEMM for
    # the type (cpu_caps); else by the cost model below between "padded" (one batched GEMM over
    # zero-padded groups) and "aligned" (bfloat16, float16: each group padded to a multiple of
    # ALIGN_ROWS, then torch._grouped_mm) or "torch" (torch._grouped_mm on the groups as they are).
    cpu_path = "auto"

    # One GEMM call of torch._grouped_mm on a CPU costs about as much as computing this many rows
    # of all 9 GEMMs of an expert (forward and backward) at d·h = 256·512; it scales as 1 / (d·h).
    # float32: 27 rows. bfloat16 (oneDNN, about 4× float32's rate here): 54, measured at
    # 512·256 on 64 experts of 256 rows (padded 85 ms, aligned 92 ms, forward and backward).
    CALL_ROWS_AT_256x512 = 27
    CALL_ROWS_16BIT_AT_256x512 = 54

    def _pad_is_cheaper(self, sizes: torch.Tensor, longest: int, dt: torch.dtype = torch.float32) -> bool:
        """Rows zero-padded into one batched GEMM, or each expert's rows a GEMM call of its own:
        padding wins when the groups are small or even (the calls dominate), grouping when
        they are large and skewed (the padding does), or when many experts get no rows: the
        grouped GEMM skips them (their weights are never read), the padded one computes them all."""
        E, hit = sizes.numel(), int(torch.count_nonzero(sizes))
        if _sixteen_bit(dt):
            rows, per_call = int(_aligned_sizes(sizes, self.ALIGN_ROWS).sum()), self.CALL_ROWS_16BIT_AT_256x512
        else:
            rows, per_call = int(sizes.sum()), self.CALL_ROWS_AT_256x512
        call_rows = per_call * (256 * 512) / (self.d_model * self.hidden)
        return E * longest <= rows + call_rows * hit

    def _cpu_choice(self, sizes: torch.Tensor, dt: torch.dtype, caps: Optional[cpu_caps.CpuCaps] = None) -> str:
        """The path for rows grouped by ``sizes`` computed in ``dt`` on this CPU (``caps``: default
        ``cpu_caps.probe()``).

        Without a native GEMM for a 16-bit ``dt`` every 16-bit path converts element by element:
        measured forward and backward of 8 SwiGLU experts of 256 × 512 on 504 rows in bfloat16,
        under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, best of 7 on the loaded project
        machine: padded 1904 ms, aligned 1075, torch 1444, float32 (kernel) 240; 16 experts of
        128 × 256 on 302 rows: 331 / 288 / 192 / 15 ms; float16 (no native kernel there even at
        AVX512) the same way: 780 / 787 / 418 / 54 and 394 / 437 / 254 / 2.2 ms. With native
        bfloat16 the 16-bit paths stay (padded 47.5 ms against 47.3 for float32, 3.3 against 2.6)."""
        if self.cpu_path != "auto":
            return self.cpu_path
        if _sixteen_bit(dt) and not (caps or cpu_caps.probe()).native(dt):
            return "float32"
        if dt == torch.float32 and self.w_in.dtype == torch.float32 and cpu_gemm.available():
            return "kernel"  # measured: never slower than padding, faster on uneven groups
        multiple = self.ALIGN_ROWS if _sixteen_bit(dt) else 8
        if self._pad_is_cheaper(sizes, _longest(sizes, multiple), dt):
            return "padded"
        aligned = _sixteen_bit(dt) and self.d_model % 8 == 0 and self.hidden % 8 == 0
        return "aligned" if aligned and hasattr(torch, "_grouped_mm") else "torch"

    # torch's bfloat16/float16 GEMMs on a CPU are oneDNN's, which JIT-compiles a kernel for each
    # new GEMM shape (about 0.4 ms here, against 0.09 ms for a 256×512×256 product) and keeps
    # 1024 of them: grouped rows whose counts change every step make nearly every expert's
    # GEMM a new shape, several per count (forward, and both backward products of each
    # weight). Each expert's rows are padded to a multiple of ALIGN_ROWS (zero rows), so the
    # shapes repeat from step to step: measured on the 64-expert top-8 step in bfloat16, the
    # grouped GEMMs took 641 ms of the step unaligned, against 290 ms when each shape had been
    # seen before.
    ALIGN_ROWS = 32

    def _aligned(self, x: torch.Tensor, sizes: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Rows grouped by expert through ``torch._grouped_mm`` in ``dt``, each group zero-padded
        to a multiple of ALIGN_ROWS rows (x is cast once for the layer's 2-3 products)."""
        E, N = sizes.numel(), x.shape[0]
        padded = _aligned_sizes(sizes, self.ALIGN_ROWS)
        ends = torch.cumsum(padded, 0)
        group = torch.repeat_interleave(torch.arange(E, device=x.device), sizes, output_size=N)
        flat = torch.arange(N, device=x.device) + ((ends - padded) - (torch.cumsum(sizes, 0) - sizes))[group]
        total = int(ends[-1])
        xd = x.to(dt)
        buf = xd.new_zeros(total, x.shape[-1]).index_copy(0, flat, xd)
        offs = ends.to(torch.int32)

        def mm(a, b):
            return torch._grouped_mm(a.to(dt), b.to(dt), offs=offs)

        owner = torch.repeat_interleave(torch.arange(E, device=x.device), padded, output_size=total) \
            if self.b_in is not None else None
        bias = (lambda b: None if b is None else b[owner])
        y = mm(self._hidden(buf, mm, bias(self.b_in), bias(self.b_gate)), self.w_out).index_select(0, flat)
        return y if self.b_out is None else y + self.b_out[group]

    def _padded(self, x: torch.Tensor, sizes: torch.Tensor, dt: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows grouped by expert zero-padded to the longest group: [E, longest, d], one batched
        GEMM per product (the longest rounded up to 8 rows, ALIGN_ROWS in 16 bits: see there)."""
        E, N = sizes.numel(), x.shape[0]
        longest = _longest(sizes, self.ALIGN_ROWS if _sixteen_bit(dt) else 8)
        group = torch.repeat_interleave(torch.arange(E, device=x.device), sizes, output_size=N)
        pos = torch.arange(N, device=x.device) - (torch.cumsum(sizes, 0) - sizes)[group]
        flat = group * longest + pos
        buf = x.new_zeros(E * longest, x.shape[-1]).index_copy(0, flat, x).view(E, longest, -1)
        return self(buf).view(E * longest, -1).index_select(0, flat)

    # Rows grouped by expert, at most this many and no gradient to record (a decode step's B·k
    # assignments): each hit expert's rows times views of its weights, one matmul each. The
    # grouped kernel's per-call setup outweighs 1-2 rows against a 0.5 MB matrix (measured at
    # d 256, h 512: 17 µs for two experts' rows by views, 58 µs by the grouped kernel).
    SMALL_ROWS = 8

    def _views(self) -> list:
        """Each weight and bias as per-expert views (``unbind``), kept between calls and made again
        when any of them is replaced (views see in-place changes): indexing the stacked tensors
        was an op per product per decode step."""
        ps = [self.w_in, self.w_gate, self.w_out, self.b_in, self.b_gate, self.b_out]
        stamp = tuple(p.data_ptr() for p in ps if p is not None)
        got = self.__dict__.get("_expert_views")
        if got is None or got[0] != stamp:
            got = self._expert_views = (stamp, [None if p is None else p.unbind(0) for p in ps])
        return got[1]

    def _one(self, xe: torch.Tensor, e: int, views: list) -> torch.Tensor:
        """Local expert e on its rows xe [n, d] -> [n, d], through ``_views``' views of its weights."""
        w_in, w_gate, w_out, b_in, b_gate, b_out = views
        h = torch.matmul(xe, w_in[e])  # [n, h]: a view of expert e's weights, no copy
        if b_in is not None:
            h = h + b_in[e]
        if self.glu:
            g = torch.matmul(xe, w_gate[e])
            if b_gate is not None:
                g = g + b_gate[e]
            h = self.act(g) * h
        else:
            h = self.act(h)
        y = torch.matmul(h, w_out[e])
        return y if b_out is None else y + b_out[e]

    def _small(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """x [N, d] rows grouped by local expert, ``sizes`` [E_local] (few rows) -> [N, d]."""
        views = self._views()
        ys, lo = [], 0
        for e, n in enumerate(sizes.tolist()):
            if n:
                ys.append(self._one(x[lo:lo + n], e, views))
                lo += n
        if not ys:
            return x.new_empty(0, self.d_model)
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    # train.recompute: experts (runtime/recompute.py): backward recomputes the hidden activations
    # [.., h] from the input rows instead of keeping them from forward, the memory saving of
    # Shazeer et al. 2017, who store not the experts' hidden activations but recompute them in the
    # backward pass. The routing, before this module, is not recomputed.
    recompute = False

    def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E_local, T, d] (a capacity buffer) -> [E_local, T, d]; or x [N, d] rows grouped
        by local expert with ``sizes`` [E_local] -> [N, d]."""
        if self.recompute and torch.is_grad_enabled():
            y = checkpoint(self._forward, x, sizes, use_reentrant=False)
        else:
            y = self._forward(x, sizes)
        if self.token_dropout:
            y = F.dropout(y, self.token_dropout, True) if self.training else y * (1 - self.token_dropout)
        return y

    def _forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.w_in
        if x.dtype != w.dtype and not torch.is_autocast_enabled():
            x = x.to(w.dtype)
        if (sizes is not None and x.shape[0] <= self.SMALL_ROWS and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not (self.training and self.dropout)
                and not torch.is_autocast_enabled("cpu") and not grouped.static()):
            return self._small(x, sizes)
        if sizes is None:
            bias = (lambda b: None if b is None else b[:, None, :])
            h = self._hidden(x, torch.bmm, bias(self.b_in), bias(self.b_gate))
            y = torch.bmm(h, self.w_out)
            return y if self.b_out is None else y + self.b_out[:, None, :]
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if grouped.static():  # no host read of the sizes (CUDA-graph capture): grouped_matmul's static paths
            choice, method = "torch", "padded" if x.device.type == "cpu" else "auto"
        else:
            choice = method = self._cpu_choice(sizes, dt) if x.device.type == "cpu" and x.shape[0] else "auto"
        if choice == "padded":
            return self._padded(x, sizes, dt)
        if choice == "aligned":
            return self._aligned(x, sizes, dt)
        if choice == "float32":  # no native 16-bit GEMM here: float32 products, x's dtype out
            with torch.autocast("cpu", enabled=False):
                return self._grouped(x.float(), sizes, _float32_mm(sizes)).to(x.dtype)
        if choice == "kernel":  # float32: the row offsets once for the layer's 2-3 products
            offs = cpu_gemm.offsets(sizes)

            def mm(a, b):
                return cpu_gemm.grouped_mm(a, b, offs=offs)
        else:  # "torch", or "auto" off the CPU: grouped_matmul's own choice
            def mm(a, b):
                return grouped_matmul(a.to(dt), b.to(dt), sizes, method)
        return self._grouped(x, sizes, mm)

    def _grouped(self, x: torch.Tensor, sizes: torch.Tensor, mm) -> torch.Tensor:
        """x [N, d] rows grouped by local expert -> [N, d], each product ``mm(rows, w [E, k, n])``."""
        owner = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes, output_size=x.shape[0]) \
            if self.b_in is not None else None
        bias = (lambda b: None if b is None else b[owner])
        h = self._hidden(x, mm, bias(self.b_in), bias(self.b_gate))
        y = mm(h, self.w_out)
        return y if self.b_out is None else y + self.b_out[owner]

    def extra_repr(self) -> str:
        return (f"experts={len(self.expert_ids)}, d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation}")


def _longest(sizes: torch.Tensor, multiple: int = 8) -> int:
    """The largest group rounded up to a multiple of ``multiple`` rows (aligned GEMM blocks)."""
    return -(-int(sizes.max()) // multiple) * multiple


def _aligned_sizes(sizes: torch.Tensor, multiple: int) -> torch.Tensor:
    """Each group's rows rounded up to a multiple of ``multiple`` (an empty group stays empty)."""
    return (sizes + (multiple - 1)) // multiple * multiple


def _sixteen_bit(dt: torch.dtype) -> bool:
    return dt in (torch.bfloat16, torch.float16)


def _float32_mm(sizes: torch.Tensor):
    """Products over rows grouped by ``sizes`` in float32, whatever the operands' dtype (16-bit
    weights are cast for the product, differentiably): moedsl's kernel where it could be built,
    else grouped_matmul's choice."""
    if cpu_gemm.available():
        offs = cpu_gemm.offsets(sizes)
        return lambda a, b: cpu_gemm.grouped_mm(a.float(), b.float(), offs=offs)
    return lambda a, b: grouped_matmul(a.float(), b.float(), sizes)


class DenseFFN(nn.Module):
    """A position-wise FFN (dense layer, or the shared experts of a DeepSeekMoE layer)."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False, dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        self.glu = activation in ("swiglu", "geglu")
        self.act = ACTIVATIONS[activation]
        self.dropout = dropout
        self.w_in = nn.Linear(d_model, hidden, bias=bias)
        self.w_gate = nn.Linear(d_model, hidden, bias=bias) if self.glu else None
        self.w_out = nn.Linear(hidden, d_model, bias=bias)
        for lin in (self.w_in, self.w_gate, self.w_out):
            if lin is not None:
                init_normal(lin, init_std)  # weight N(0, std²), bias 0; nothing drawn on meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w_gate(x)) * self.w_in(x) if self.glu else self.act(self.w_in(x))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        return self.w_out(h)


class GatedFFN(DenseFFN):
    """Shared experts whose output is scaled per token by sigmoid(x·wᵀ), w [1, d] (``gate``, no
    bias): transformers' modeling_qwen2_moe.py, Qwen2MoeSparseMoeBlock's ``shared_expert_gate``."""

    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool = False, dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__(d_model, hidden, activation, bias, dropout, init_std)
        self.gate = nn.Linear(d_model, 1, bias=False)
        init_normal(self.gate, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * super().forward(x)
