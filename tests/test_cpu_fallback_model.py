"""Whole models with moedsl's CPU kernel switched off (``MOEDSL_CPU_KERNEL=0``): every op the
kernel holds (the grouped GEMMs, the combine, capacity slots, the dispatch order) falls back
to torch's, and a forward + backward of a capacity model (switch) and a dropless one (mixtral)
gives the kernel's logits, auxiliary loss and gradients; the run says once that the kernel is
off, and why."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moedsl.nn import cpu_gemm

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["switch.yaml", "mixtral.yaml"]

STEP = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from moedsl.api import build_model, load_spec
    from moedsl.nn import cpu_gemm

    out_path, *specs = sys.argv[1:]
    torch.set_num_threads(2)  # the kernel's split of rows and groups between threads is exercised
    result = {"available": cpu_gemm.available(), "why": cpu_gemm.why_unavailable()}
    for path in specs:
        spec = load_spec(path)
        torch.manual_seed(0)  # the router's jitter draws the same noise in both runs
        model = build_model(spec, seed=0, dtype=torch.float32)
        model.train()
        tokens = torch.randint(0, spec.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
        out = model(tokens[:, :-1])
        logits = out.output
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        (loss + out.aux_loss).backward()
        result[path] = {"logits": logits.detach(), "aux": out.aux_loss.detach(),
                        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    torch.save(result, out_path)
""")


def one_step(tmp_path: Path, name: str, **env) -> tuple:
    out = tmp_path / f"{name}.pt"
    run_env = {k: v for k, v in os.environ.items() if k != "MOEDSL_CPU_KERNEL"}
    run_env.update(env)
    proc = subprocess.run([sys.executable, "-c", STEP, str(out), *[str(ROOT / "specs" / s) for s in SPECS]],
                          capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out), proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(cpu_gemm._unsupported() is not None, reason=f"no kernel to compare: {cpu_gemm._unsupported()}")
def test_a_whole_model_without_the_cpu_kernel_matches_it_and_says_so_once(tmp_path):
    on, on_err = one_step(tmp_path, "on")
    off, off_err = one_step(tmp_path, "off", MOEDSL_CPU_KERNEL="0")
    assert on["available"], on["why"]
    assert not off["available"] and off["why"] == "disabled by MOEDSL_CPU_KERNEL=0"
    said = [line for line in off_err.splitlines() if "kernel is unavailable" in line]
    assert len(said) == 1 and "MOEDSL_CPU_KERNEL=0" in said[0], off_err  # once for two models, 8 layers
    assert "kernel is unavailable" not in on_err
    for spec in SPECS:
        a, b = on[str(ROOT / "specs" / spec)], off[str(ROOT / "specs" / spec)]
        torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-4, msg=f"{spec}: logits")
        torch.testing.assert_close(b["aux"], a["aux"], rtol=1e-4, atol=1e-6, msg=f"{spec}: aux loss")
        assert b["grads"].keys() == a["grads"].keys()
        experts = [n for n in a["grads"] if ".experts." in n or "w_in" in n]
        assert experts, f"{spec}: no expert weights got a gradient"
        for name, g in a["grads"].items():
            torch.testing.assert_close(b["grads"][name], g, rtol=1e-3, atol=1e-5, msg=f"{spec}: gradient of {name}")
