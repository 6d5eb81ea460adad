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


def _decode_logits(model, ids, steps: int, graphed: bool):
    """Prefill ids [B, T], then ``steps`` greedy tokens, one at a time: the logits of each step."""
    from moedsl.nn.decode import DecodeCache
    from moedsl.runtime.cudagraph import GraphedDecodeStep
    from moedsl.runtime.generate import decode_module

    B, T = ids.shape
    dec = decode_module(model, static=graphed)
    cache = DecodeCache(B, T + steps, device="cuda", static=graphed)
    out = []
    with torch.inference_mode():
        logits = dec(ids, cache, 0).output[:, -1]
        step = None
        for i in range(steps):
            nxt = logits.argmax(-1)[:, None]
            if graphed:
                step = step or GraphedDecodeStep(dec, cache, nxt, T + i)
                logits = step(nxt, T + i).clone()
            else:
                logits = dec(nxt, cache, T + i).output[:, -1]
            out.append(logits.float().cpu())
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["mixtral", "switch", "deepseek-v3-small", "shazeer-lstm-moe"])
def test_graphed_decoding_equals_eager_decoding(name):
    """A decode step captured once (static cache, the slot a device tensor) and replayed for 12
    tokens gives the logits the eager dynamic decoder gives, and generate uses it by default."""
    spec = moedsl.load_spec(ROOT / "specs" / f"{name}.yaml")
    model = moedsl.build_model(spec, device="cuda", seed=0, dtype=torch.float32).eval()
    ids = torch.randint(0, spec.model.vocab_size, (2, 7), device="cuda", generator=None)
    eager = _decode_logits(model, ids, 12, graphed=False)
    graphed = _decode_logits(model, ids, 12, graphed=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    timings: dict = {}
    out = moedsl.generate(model, ids, 8, timings=timings)
    assert timings["graphs"] is True and out.shape == (2, 15)


def test_graphed_decoding_in_bfloat16_takes_the_grouped_gemm():
    data = moedsl.load_spec(ROOT / "specs" / "mixtral.yaml").data
    spec = moedsl.load_spec({**data, "model": {**data["model"], "dtype": "bfloat16"}})
    model = moedsl.build_model(spec, device="cuda", seed=0).eval()
    timings: dict = {}
    out = moedsl.generate(model, [[1, 2, 3, 4], [5, 6]], 16, graphs="on", timings=timings)
    assert timings["graphs"] is True and int(out.max()) < spec.model.vocab_size


def test_generate_cli_on_cuda_reports_graphs(tmp_path, capsys):
    import json

    from moedsl.cli import main

    assert main(["run", str(ROOT / "specs" / "switch.yaml"), "--steps", "2", "--device", "cuda",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["device"] == "cuda" and got["cuda_graphs"] is True and len(got["ids"][0]) == 8
