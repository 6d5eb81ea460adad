"""The dense layer kinds of a spec: embedding, LSTM, norms, head (self-attention: moedsl.nn.attention)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _normal(module: nn.Module, std: float) -> None:
    for p in module.parameters(recurse=False):
        if p.device.type != "meta":
            nn.init.normal_(p, std=std) if p.dim() > 1 else nn.init.zeros_(p)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, max_seq_len: int, positions: str, init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.positions = nn.Parameter(torch.empty(max_seq_len, d_model)) if positions == "learned" else None
        _normal(self, init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.weight)
        if self.positions is not None:
            x = x + self.positions[: tokens.shape[-1]]
        return x


class LSTMBlock(nn.Module):
    """Stacked LSTM of width d_model (Shazeer 2017's layers around the MoE)."""

    def __init__(self, d_model: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


class Head(nn.Module):
    """Logits over the vocabulary; with ``tied`` the embedding's weight is used."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool, init_std: float, tied: nn.Module | None = None):
        super().__init__()
        self.tied = tied is not None
        self.weight = None if self.tied else nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        if not self.tied:
            _normal(self, init_std)
            if self.bias is not None and self.bias.device.type != "meta":
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight if weight is None else weight, self.bias)
