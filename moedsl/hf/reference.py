"""A registered family's tiny random model, built by transformers: the reference that the tests
and ``bench/hf_parity.py`` compare imports and exports against. moedsl itself never imports
transformers; the caller passes the module in."""
from __future__ import annotations

import torch

from . import registered


def tiny_reference(transformers, model_type: str, over: dict | None = None, seed: int = 0) -> tuple:
    """(model in eval mode, its config) of ``model_type``'s ``tiny_config`` with ``over``, fp32.

    transformers initialises norm weights to 1 and biases (DeepSeek-V3's choice bias included)
    to 0, where a mapping that dropped them would go unseen: they are moved off those values."""
    fam = registered()[model_type]
    torch.manual_seed(seed)
    cfg = getattr(transformers, fam.config_class)(**{**fam.tiny_config, **(over or {})})
    ref = getattr(transformers, fam.architectures[0])(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
    return ref, cfg
