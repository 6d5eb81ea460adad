"""Forward + backward of a small model over packed rows (``--pack documents``: the documents'
boolean mask through scaled_dot_product_attention, positions restarting per document) against
the same rows unpacked (``is_causal``, positions 0..T-1): what packing costs per step.

    python bench/pack_documents.py                    # batch 8, seq 256, 7 interleaved repeats

The model is specs/mixtral.yaml's block at seq 256 (d 128, 4 × [attention with rotary and 4
heads over 2 key/value heads, top-2 dropless MoE of 8 SwiGLU experts]); each row is cut into
documents of random lengths averaging ``--mean-doc`` tokens. The two are interleaved within each
repeat; the fastest of each and the median of the repeats' ratios are reported, as the machine's
speed drifts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moedsl import load_spec
from moedsl.build import build_model
from moedsl.nn import cpu_caps
from moedsl.nn.documents import document_mask, document_positions

SPEC = """moedsl: 1
name: pack-bench
model: {{vocab_size: 256, d_model: 128, max_seq_len: {seq}, norm: rmsnorm}}
layers:
  - embedding: {{}}
  - repeat: 4
    block:
      - attention: {{heads: 4, kv_heads: 2, positions: rotary}}
      - moe:
          experts: {{count: 8, hidden: 192, activation: swiglu}}
          gate: {{type: topk, k: 2, drop_policy: dropless}}
  - norm: {{}}
  - head: {{}}
"""


def documents(batch: int, seq: int, mean: int, g: torch.Generator) -> torch.Tensor:
    """[batch, seq]: each row cut where a coin of probability 1/mean falls, documents from 0."""
    starts = torch.rand(batch, seq, generator=g) < 1.0 / mean
    starts[:, 0] = False
    return starts.long().cumsum(-1)


def step_seconds(model, tokens, targets, docs) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(tokens) if docs is None else model(tokens, docs)
    F.cross_entropy(out.output.flatten(0, 1), targets.flatten()).backward()
    return time.perf_counter() - t0


def attention_seconds(attn, x, docs) -> float:
    """One attention layer's forward + backward; packed: its mask and positions made too."""
    x.grad = None
    t0 = time.perf_counter()
    if docs is None:
        y = attn(x)
    else:
        y = attn(x, positions=document_positions(docs), documents=document_mask(docs))
    y.square().mean().backward()
    return time.perf_counter() - t0


def interleaved(run, repeats: int) -> tuple:
    """(fastest unpacked s, fastest packed s, median ratio, min ratio, max ratio) of ``run(packed)``:
    on a shared machine the fastest of the repeats is the one least slowed by other work."""
    run(False), run(True)  # warm up both paths
    u, p = [], []
    for _ in range(repeats):
        u.append(run(False))
        p.append(run(True))
    r = [b / a for a, b in zip(u, p)]
    return min(u), min(p), statistics.median(r), min(r), max(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mean-doc", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(f"{cpu_caps.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = build_model(load_spec(SPEC.format(seq=a.seq))).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (a.batch, a.seq), generator=g)
    targets = torch.randint(0, 256, (a.batch, a.seq), generator=g)
    docs = documents(a.batch, a.seq, a.mean_doc, g)
    n_docs = int(docs[:, -1].sum()) + a.batch
    print(f"batch {a.batch} × seq {a.seq}, {n_docs} documents (mean {a.batch * a.seq / n_docs:.0f} tokens), "
          f"forward + backward, {a.repeats} interleaved repeats: the fastest of each, the median of the repeats' "
          "ratios (their range)")
    x = torch.randn(a.batch, a.seq, 128, generator=g, requires_grad=True)
    attn = model.get_submodule("layers.1.attention")
    rows = {"whole model": interleaved(lambda p: step_seconds(model, tokens, targets, docs if p else None),
                                       a.repeats),
            "one attention layer": interleaved(lambda p: attention_seconds(attn, x, docs if p else None),
                                               a.repeats)}
    print(f"  {'':<20} {'unpacked (is_causal)':>21} {'packed (mask)':>14} {'packed / unpacked':>18}")
    for name, (u, p, r, lo, hi) in rows.items():
        print(f"  {name:<20} {u * 1e3:18.1f} ms {p * 1e3:11.1f} ms {r:8.2f}x ({lo:.2f}-{hi:.2f})")


if __name__ == "__main__":
    main()
