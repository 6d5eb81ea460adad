"""The image layers of a Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words", §3.1): the patch embedding and the classification head. V-MoE (Riquelme et al. 2021,
§2) uses them unchanged around its MoE blocks."""
from __future__ import annotations

import torch
import torch.nn as nn


def patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut ``images`` [B, H, W, C] into non-overlapping patch × patch patches, row-major over
    the image, each flattened channel-major as ``torch.nn.functional.unfold`` (and a Conv2d
    kernel [d, C, P, P]) order them: [B, (H/P)·(W/P), C·P·P]."""
    B, H, W, C = images.shape
    P = patch
    x = images.permute(0, 3, 1, 2)  # [B, C, H, W]
    x = x.reshape(B, C, H // P, P, W // P, P)  # [B, C, h, P, w, P]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, P, P]
    return x.reshape(B, (H // P) * (W // P), C * P * P)


class PatchEmbed(nn.Module):
    """z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos (ViT eq. 1): a linear projection of the
    flattened patches (a Conv2d with stride P, written as unfold + linear), an optional learned
    class token (initialised to zero, as ViT's) and optional learned positions."""

    def __init__(self, patch: int, channels: int, num_patches: int, d_model: int, class_token: bool,
                 positions: str, init_std: float):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if class_token else None
        tokens = num_patches + (1 if class_token else 0)
        self.positions = nn.Parameter(torch.empty(tokens, d_model)) if positions == "learned" else None
        if self.proj.weight.device.type != "meta":
            nn.init.normal_(self.proj.weight, std=init_std)
            nn.init.zeros_(self.proj.bias)
            if self.positions is not None:
                nn.init.normal_(self.positions, std=init_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(patches(images.to(self.proj.weight.dtype), self.patch))  # [B, N, d]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, x.shape[-1]), x], dim=1)  # [B, 1 + N, d]
        if self.positions is not None:
            x = x + self.positions
        return x


class Classifier(nn.Module):
    """Logits [B, classes] from the tokens [B, T, d]: the class token's output (ViT §3.1: y =
    LN(z_L^0), then the head) or the mean over the tokens (global average pooling, ViT §D.3)."""

    def __init__(self, d_model: int, classes: int, pool: str, bias: bool, init_std: float):
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(d_model, classes, bias=bias)
        if self.proj.weight.device.type != "meta":
            nn.init.normal_(self.proj.weight, std=init_std)
            if bias:
                nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x[:, 0] if self.pool == "token" else x.mean(dim=1)  # [B, d]
        return self.proj(pooled)
