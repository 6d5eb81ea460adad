"""A counter-based random number generator for routing noise.

Every random number the routers draw (noisy top-k noise, Switch jitter, GShard's
random second expert, hash tables, expert initialisation) is a pure function of
(seed, stream, index), where ``index`` is the position of the value in the
*global* batch. So a token gets the same noise whether it is routed in one
process or on rank 3 of 8, a resumed run draws what the uninterrupted one drew,
and the draw is made of plain tensor ops that a CUDA graph can capture.
The hash is Chris Wellons' "lowbias32" integer mix, applied in int64 arithmetic
(products wrap, and only the low 32 bits are kept).
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mix of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key(seed, stream, index: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (seed, stream, index); stream may be a 0-d device tensor (a step counter)."""
    s = torch.as_tensor(seed, dtype=torch.int64, device=index.device) & _M32
    s = mix32(s ^ (torch.as_tensor(stream, dtype=torch.int64, device=index.device) & _M32))
    hi = mix32(s ^ ((index >> 32) & _M32))
    return mix32(hi ^ (index & _M32))


def uniform(seed, stream, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """U(0, 1), open at both ends (24 random bits), one value per element of ``index``."""
    bits = _key(seed, stream, index) >> 8
    return ((bits.to(torch.float64) + 0.5) * (1.0 / (1 << 24))).to(dtype)


def normal(seed, stream, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) by Box-Muller from two uniforms per element."""
    u1 = uniform(seed, stream, 2 * index, torch.float32)
    u2 = uniform(seed, stream, 2 * index + 1, torch.float32)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)


def truncated_normal(seed, stream, index: torch.Tensor, std: float, bound: float = 2.0,
                     dtype=torch.float32) -> torch.Tensor:
    """N(0, std²) truncated to ±bound·std, by the inverse CDF (exact, no rejection)."""
    lo = 0.5 * (1 + math.erf(-bound / math.sqrt(2)))
    u = uniform(seed, stream, index, torch.float64) * (1 - 2 * lo) + lo
    return (std * math.sqrt(2) * torch.erfinv(2 * u - 1)).to(dtype)


def stream_id(*parts) -> int:
    """A 32-bit stream id from small ints and strings (a layer and a purpose)."""
    h = 0x811C9DC5
    for part in parts:
        for byte in str(part).encode():
            h = ((h ^ byte) * 0x01000193) & _M32
        h = ((h ^ 0x2F) * 0x01000193) & _M32
    return h
