"""The dense layer kinds of a spec: embedding, LSTM, norms, head (self-attention: moedsl.nn.attention)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .documents import document_positions


def init_normal(module: nn.Module, std: float) -> None:
    """N(0, std²) for the module's own matrices, zeros for its vectors (biases)."""
    for p in module.parameters(recurse=False):
        if p.device.type != "meta":
            nn.init.normal_(p, std=std) if p.dim() > 1 else nn.init.zeros_(p)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, max_seq_len: int, positions: str, init_std: float,
                 pad_id: int | None = None, scale: float = 1.0, token_std: float | None = None):
        """``token_std``: the token table's init std, when it differs from ``init_std`` (T5: 1.0)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.positions = nn.Parameter(torch.empty(max_seq_len, d_model)) if positions == "learned" else None
        self.sinusoidal, self.pad_id, self.scale = positions == "sinusoidal", pad_id, scale
        init_normal(self, init_std)
        if token_std is not None:
            with torch.no_grad():
                self.weight.normal_(0.0, token_std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` [B, T] (decoding, packed documents): each token's position, negative for
        left padding."""
        x = F.embedding(tokens, self.weight)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + (self.positions[: tokens.shape[-1]] if positions is None else
                     F.embedding(positions.clamp(min=0), self.positions))
        elif self.sinusoidal:
            numbers = self._numbers(tokens, positions)
            wave = sinusoids(numbers, x.shape[-1])
            if self.pad_id is not None:  # fairseq zeroes the pad position's row of its table
                wave = wave * (numbers != self.pad_id).unsqueeze(-1)
            x = x + wave.to(x.dtype)
        return x

    def _numbers(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """[B, T] the position each token's sinusoid is taken at. Without ``pad_id``: 0, 1, ... (or
        ``positions``). With it, fairseq's ``utils.make_positions`` (M2M100's and NLLB's
        ``create_position_ids_from_input_ids``): pad_id + how many non-pad tokens there are up to and
        including this one, pad_id for a pad token; given ``positions`` (decoding: transformers
        adds the cache's length to a one-token count), pad_id + 1 + the position."""
        if self.pad_id is None:
            if positions is None:
                return torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
            return positions.clamp(min=0)
        real = tokens != self.pad_id
        count = torch.cumsum(real.long(), dim=-1) if positions is None else positions + 1
        return torch.where(real, count + self.pad_id, torch.full_like(count, self.pad_id))


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] the fixed sinusoids at ``positions`` in tensor2tensor's layout (fairseq's
    ``SinusoidalPositionalEmbedding.get_embedding``: sin(p·f_i) for i < dim/2, then cos(p·f_i),
    f_i = 10000^(-i / (dim/2 - 1)), a zero column if dim is odd), computed at the positions rather
    than looked up in a table, so no length is fixed."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angle = positions.float().unsqueeze(-1) * freq
    out = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    if dim % 2:
        out = torch.cat([out, out.new_zeros(*out.shape[:-1], 1)], dim=-1)
    return out


class LSTMBlock(nn.Module):
    """Stacked LSTM of width d_model (Shazeer 2017's layers around the MoE)."""

    def __init__(self, d_model: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, cache=None, positions: torch.Tensor | None = None, start: int = 0,
                key: str | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """``cache``: decode, continuing from the (h, c) [layers, B, d] kept under ``key``; a left-padding
        token (negative position) leaves its row's state as it was. ``documents`` [B, T] (packed rows,
        ``moedsl.nn.documents``): the state starts from zero at each document's first token."""
        if documents is not None:
            return self._per_document(x, documents)
        if cache is None:
            return self.lstm(x)[0]
        B, T, d = x.shape
        L = self.lstm.num_layers
        h, c = cache.state(key, lambda: (x.new_zeros(L, B, d), x.new_zeros(L, B, d)))
        real = positions >= 0  # [B, T]
        if not cache.static and bool(real.all()):  # a static cache reads nothing back (CUDA graphs)
            y, (h2, c2) = self.lstm(x, (h, c))
        else:  # step by step, keeping the state of padded rows
            ys, h2, c2 = [], h, c
            for i in range(T):
                yi, (hn, cn) = self.lstm(x[:, i:i + 1], (h2, c2))
                keep = real[:, i][None, :, None]  # [1, B, 1]
                h2, c2 = torch.where(keep, hn, h2), torch.where(keep, cn, c2)
                ys.append(yi)
            y = torch.cat(ys, dim=1)
        h.copy_(h2)
        c.copy_(c2)
        return y


    def _per_document(self, x: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] with each row's documents run as sequences of their own: the N documents of
        the batch become one packed batch of N sequences (their lengths on the host), each
        starting from the zero state, as it would alone."""
        B, T, d = x.shape
        positions = document_positions(documents)  # [B, T]: each token's index in its document
        starts = (positions == 0).flatten()  # [B·T]
        doc = starts.long().cumsum(0) - 1  # [B·T]: each token's document in the batch, from 0
        N = int(doc[-1]) + 1
        lengths = torch.bincount(doc, minlength=N)  # [N]
        padded = x.new_zeros(N, int(lengths.max()), d)
        padded[doc, positions.flatten()] = x.reshape(B * T, d)  # [N, L, d]
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]  # [N, L, d]
        return y[doc, positions.flatten()].view(B, T, d)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # the same products in the same order in one call (decoding: a few rows, where each op's cost counts)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


class Head(nn.Module):
    """Logits over the vocabulary; with ``tied`` the embedding's weight is used."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool, init_std: float, tied: nn.Module | None = None,
                 scale: float | None = None):
        super().__init__()
        self.tied = tied is not None
        self.scale = scale  # multiplies x before the projection (T5's d_model^-0.5 with tied embeddings)
        self.weight = None if self.tied else nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        if not self.tied:
            init_normal(self, init_std)
            if self.bias is not None and self.bias.device.type != "meta":
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale
        return F.linear(x, self.weight if weight is None else weight, self.bias)
