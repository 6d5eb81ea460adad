"""moedsl import / export / generate of the encoder-decoder families (switch_transformers,
nllb-moe) against the installed transformers (tiny random models, fp32, eval mode)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moedsl.nn.layers import Embedding  # noqa: E402


@pytest.mark.parametrize("d_model", [16, 15])
def test_sinusoidal_positions_with_a_pad_id_equal_nllb_moes_including_padding_and_decoding(d_model):
    """fairseq's numbering (NllbMoeSinusoidalPositionalEmbedding): left and right padding sit at
    the pad position, whose vector is zero, and a decode step continues from the cache's length."""
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSinusoidalPositionalEmbedding

    ref = NllbMoeSinusoidalPositionalEmbedding(64, d_model, padding_idx=1)
    ours = Embedding(50, d_model, 64, "sinusoidal", 0.02, pad_id=1, scale=3.0)
    tokens = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 4, 4, 4]])
    with torch.no_grad():
        ours.weight.zero_()
        assert torch.equal(ours(tokens), ref(tokens, None))
        step = torch.tensor([[9], [9]])
        assert torch.equal(ours(step, torch.tensor([[3], [7]]))[1:], ref(step, None, cache_length=7)[1:])
        ours.weight.normal_()
        assert torch.allclose(ours(tokens) - ref(tokens, None), 3.0 * ours.weight[tokens])
