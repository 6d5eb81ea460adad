"""bench/moe_layer.py's bound is the work the layer does, no more: the rows its router keeps,
over the experts that get any, and every row is judged against that bound the same way."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", ROOT / "bench" / "moe_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bound_at_64_tokens_over_256_experts_computes_the_64_kept_rows_not_one_per_expert():
    """64 tokens top-1 reach at most 64 of 256 experts: the bound's GEMMs are those 64 rows
    (forward and backward of 3 SwiGLU products: 18·R·d·h FLOPs), and with a capacity that
    drops some, only the kept ones."""
    ml = bench()
    d, h = 16, 32
    torch.manual_seed(0)
    x = torch.randn(1, 64, d)
    for mode in ("dropless", "capacity"):
        model = ml.moedsl_layer(d, h, 256, 1, "swiglu", mode, 0.5)  # capacity 1 a expert: collisions drop
        dropped = int(model(x).router_stats[0].dropped)
        assert (dropped > 0) == (mode == "capacity")
        sizes = ml.kept_rows(model, x)
        assert int(sizes.sum()) == 64 - dropped and int(torch.count_nonzero(sizes)) <= 64
        groups = ml.balanced_groups(sizes)
        assert sum(e * n for e, n in groups) == 64 - dropped
        assert sum(e for e, _ in groups) == int(torch.count_nonzero(sizes))
        with FlopCounterMode(display=False) as flops:
            ml.bound(model, sizes, "swiglu")()
        assert flops.get_total_flops() == 18 * (64 - dropped) * d * h


@pytest.mark.slow
def test_capacity_rows_are_judged_against_the_same_target_as_dropless_rows():
    ml = bench()
    for tokens, target in ((64, 1.5), (4096, 1.15)):
        rows = [ml.row(tokens, 8, 2, "relu", mode, 16, 32, 1.25, 1, hf=False) for mode in ("dropless", "capacity")]
        assert [r["target"] for r in rows] == [target, target]
        assert rows[0]["bound_rows"] == 2 * tokens and rows[1]["bound_rows"] == 2 * tokens - rows[1]["dropped"]
