"""A tiny encoder-decoder MoE (T5 / Switch shaped) the encoder-decoder tests share, and the copy
task they train on."""
from __future__ import annotations

TINY_ENCDEC = """\
moedsl: 1
name: tiny-encdec
model: {vocab_size: 40, d_model: 16, norm: rmsnorm, norm_eps: 1.0e-6, tie_embeddings: true, max_seq_len: 64,
        pad_id: 0, eos_id: 1, decoder_start_id: 0}
encoder:
  - embedding: {}
  - repeat: 2
    block:
      - attention: {heads: 2, causal: false, positions: relative, scaled: false, relative_buckets: 8,
                    relative_max_distance: 16}
      - cycle:
          - ffn: {hidden: 32}
          - moe: {experts: {count: 4, hidden: 32}, gate: {type: switch, capacity_factor: CF},
                 losses: {balance: 0.01, z_loss: 0.001}}
  - norm: {}
decoder:
  - embedding: {}
  - repeat: 2
    block:
      - attention: {heads: 2, causal: true, positions: relative, scaled: false, relative_buckets: 8,
                    relative_max_distance: 16}
      - cross_attention: {heads: 2, scaled: false}
      - cycle:
          - ffn: {hidden: 32}
          - moe: {experts: {count: 4, hidden: 32}, gate: {type: switch, capacity_factor: CF},
                 losses: {balance: 0.01, z_loss: 0.001}}
  - norm: {}
  - head: {rescale: true}
train: {batch_size: 4, seq_len: 12, lr: 0.003, warmup: 0}
"""


def tiny_encdec(capacity_factor: float = 2.0, **replace) -> str:
    """The tiny spec's YAML text (``replace``: whole-text substitutions, old -> new)."""
    text = TINY_ENCDEC.replace("CF", str(capacity_factor))
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def copy_batch(rows: int, source_len: int, seed: int, vocab: int = 40, pad: int = 0, eos: int = 1, start: int = 0):
    """A seq2seq batch of the copy task: the source is random ids 2.. (rows of different lengths,
    right-padded with ``pad``), the target the same ids then ``eos``. Returns (source [B, S],
    source_mask [B, S], decoder_inputs [B, T], labels [B, T], loss_mask [B, T]), the decoder's
    input the labels shifted right behind ``start`` (T5's _shift_right)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, source_len // 2), source_len + 1, (rows,), generator=g)
    if rows > 1:
        lengths[0] = source_len  # the longest row fills the source
    source = torch.full((rows, source_len), pad, dtype=torch.int64)
    labels = torch.full((rows, source_len + 1), pad, dtype=torch.int64)
    for b, n in enumerate(lengths.tolist()):
        ids = torch.randint(2, vocab, (n,), generator=g)
        source[b, :n] = ids
        labels[b, :n] = ids
        labels[b, n] = eos
    source_mask = torch.arange(source_len)[None, :] < lengths[:, None]
    loss_mask = torch.arange(source_len + 1)[None, :] <= lengths[:, None]
    decoder_inputs = torch.cat([torch.full((rows, 1), start, dtype=torch.int64), labels[:, :-1]], dim=1)
    return source, source_mask, decoder_inputs, labels, loss_mask


def copy_source():
    """A ``runtime.data.Source`` of the copy task's seq2seq batches (``Batch.decoder_inputs``,
    ``source_mask``, ``loss_mask`` filled), a pure function of (split, step, row)."""
    import torch

    from moedsl.runtime.data import Batch, Source

    class CopySource(Source):
        name = "copy"

        def rows(self, step, rows, seq, split):
            rows = list(rows)
            parts = [copy_batch(1, seq, seed=(step * 7919 + r) * 2 + (split == "eval")) for r in rows]
            source, source_mask, dec_in, labels, loss_mask = (torch.cat(p) for p in zip(*parts))
            return Batch(inputs=source, targets=labels, loss_mask=loss_mask, decoder_inputs=dec_in,
                         source_mask=source_mask)

    return CopySource()
