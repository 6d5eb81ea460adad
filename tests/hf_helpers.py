"""Helpers the Hugging Face import/export tests share (tests/test_hf_*.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moedsl.cli import main


def close(ours, theirs):
    """Equal up to 1e-4 of ``theirs``' largest magnitude (float32 sums in another order)."""
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-4 * scale, (ours - theirs).abs().max().item()


def family_cases(encoder_decoder: bool) -> list:
    """pytest params (model_type, config overrides) of every registered family that is (or is not)
    an encoder-decoder: its ``tiny_config`` and each of its ``tiny_variants`` (the config.json
    variants the family supports)."""
    import pytest

    from moedsl.hf import registered

    out = []
    for model_type, fam in sorted(registered().items()):
        if fam.encoder_decoder != encoder_decoder:
            continue
        out.append(pytest.param(model_type, {}, id=model_type))
        for over, what in fam.tiny_variants:
            out.append(pytest.param(model_type, over, id=f"{model_type}-{what.replace(' ', '_')}"))
    return out


def refused(capsys, argv, out: Path, *needles):
    """``moedsl argv`` exits 2 with one line holding every needle, and leaves ``out`` empty (no
    temporary folder beside it either); returns the line."""
    capsys.readouterr()  # transformers' own progress lines from building the checkpoint
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


def save_fused(src: Path, ref, out: Path) -> Path:
    """The transformers model ``ref`` (saved in ``src``) written to ``out`` with its in-memory
    names as they are: transformers 5's fused experts (mlp.experts.gate_up_proj / down_proj)."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


def import_tiny_mixtral(tmp: Path, vocab_size: int = 64) -> Path:
    """A tiny random Mixtral saved in ``tmp/hf`` and imported into ``tmp/imp`` (returned)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp / "hf")
    assert main(["import", str(tmp / "hf"), "--out", str(tmp / "imp")]) == 0
    return tmp / "imp"


def _losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_init_on_one_and_two_processes(imp: Path, tmp_path: Path, *extra) -> tuple:
    """``moedsl run --init imp --steps 1`` (``extra`` options after, overriding) with 1 and with 2
    processes (into tmp_path/run1, run2): the two runs' losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "moedsl", "run", str(imp / "spec.yaml"), "--init", str(imp), "--steps", "1",
            "--batch", "4", "--seq", "8", "--no-progress", "--eval-batches", "1", "--ignore-memory-check"]
    for n in (1, 2):
        r = subprocess.run(base + [*extra, "--out", str(tmp_path / f"run{n}"), "--nproc", str(n)], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
    return _losses(tmp_path / "run1"), _losses(tmp_path / "run2")


def exports_as(run: Path, out: Path, model_type: str, vocab: int) -> None:
    """``moedsl export RUN --out OUT``: transformers loads OUT as ``model_type`` with no missing or
    unexpected keys, and it computes the run's logits."""
    import torch
    import transformers

    import moedsl

    trained = moedsl.load_model(run)
    assert main(["export", str(run), "--out", str(out)]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(back).__name__ == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(back.eval()(x).logits, trained(x).output)
