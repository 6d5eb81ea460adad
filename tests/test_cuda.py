"""CUDA-graph capture: replay gives the same results as eager. Skipped without a CUDA device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moedsl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _steps(name: str, graphs: bool, steps: int = 6):
    from moedsl.runtime.train import RunOptions, Trainer

    spec = moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")
    o = RunOptions.from_spec(spec, steps=steps, device="cuda", cuda_graphs="on" if graphs else "off", progress=False)
    trainer = Trainer(spec, o, layout="static")
    assert trainer.model.compiled.static.capturable
    losses = [float(trainer.step(trainer.source.batch(i, o.batch, o.seq), o.lr).loss) for i in range(steps)]
    assert trainer.captured == graphs, "capture fell back to eager"
    return losses, {n: p.detach().cpu() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("name", ["switch", "gshard", "st-moe", "expert-choice"])
def test_graph_replay_equals_eager_training(name):
    eager, w_eager = _steps(name, graphs=False)
    graphed, w_graphed = _steps(name, graphs=True)
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for n in w_eager:
        torch.testing.assert_close(w_graphed[n], w_eager[n], rtol=1e-4, atol=1e-5)


def test_graph_replay_equals_eager_inference():
    from moedsl.runtime.cudagraph import GraphedForward

    spec = moedsl.load_spec(ROOT / "specs" / "switch.yaml")
    model = moedsl.build_model(spec, device="cuda", layout="static")
    model.eval()
    tokens = torch.randint(0, 256, (4, 64), device="cuda")
    with torch.no_grad():
        eager = model(tokens).output.clone()
    graphed = GraphedForward(model, tokens)
    for _ in range(3):
        other = torch.randint(0, 256, (4, 64), device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(graphed(other).output, model(other).output)
    torch.testing.assert_close(graphed(tokens).output, eager)


def test_run_on_cuda_with_graphs(tmp_path, capsys):
    from moedsl.cli import main

    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "8", "--device", "cuda",
                 "--cuda-graphs", "on", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "CUDA graphs on" in capsys.readouterr().out


def test_bfloat16_layer_on_cuda():
    data = moedsl.load_spec(ROOT / "specs" / "mixtral.yaml").data
    spec = moedsl.load_spec({**data, "model": {**data["model"], "dtype": "bfloat16"}})
    model = moedsl.build_model(spec, device="cuda")
    out = model(torch.randint(0, 256, (2, 64), device="cuda"))
    assert out.output.dtype == torch.bfloat16 and torch.isfinite(out.output.float()).all()
