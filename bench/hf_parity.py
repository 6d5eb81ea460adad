"""Logits of imported and exported models against transformers', for every registered family.

For each family of ``moedsl.hf`` and each config variant it declares (``tiny_config`` and
``tiny_variants``), transformers builds a tiny random model (fp32; norm weights and biases moved
off their initial 1 and 0 so that they matter), ``save_pretrained`` writes it, and then:

1. ``moedsl import`` + ``moedsl.load_model``: logits against transformers' on the same tokens;
2. ``moedsl export`` + ``AutoModelForCausalLM.from_pretrained``: missing / unexpected keys, and
   the reloaded model's logits against the original's.

The error is max |Δlogit| / max |logit| (the issue's target: at most 1e-4). No download.

    python bench/hf_parity.py            # every family and variant: a table, exit 1 if any misses
    python bench/hf_parity.py --json     # the same figures as JSON
    python bench/hf_parity.py --markdown # as a Markdown table (bench/README.md)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

try:
    import transformers
except ImportError:  # pragma: no cover - the reference is an extra
    sys.exit("bench/hf_parity.py compares against transformers: pip install 'moedsl[bench]'")

import moedsl
from moedsl.cli import main as moedsl_main
from moedsl.nn import cpu_caps
from moedsl.hf import registered
from moedsl.hf.reference import tiny_reference

TARGET = 1e-4


def _error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def one_case(model_type: str, over: dict, what: str, tmp: Path) -> dict:
    ref, cfg = tiny_reference(transformers, model_type, over)
    ref.save_pretrained(tmp / "hf")
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    quiet = ["--overwrite"]
    if moedsl_main(["import", str(tmp / "hf"), "--out", str(tmp / "imp"), *quiet]) != 0:
        return dict(family=model_type, variant=what, error="import refused")
    with torch.no_grad():
        theirs = ref(tokens).logits
        imported = _error(moedsl.load_model(tmp / "imp")(tokens).output, theirs)
    if moedsl_main(["export", str(tmp / "imp"), "--out", str(tmp / "exp"), *quiet]) != 0:
        return dict(family=model_type, variant=what, imported=imported, error="export refused")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp / "exp", output_loading_info=True)
    with torch.no_grad():
        exported = _error(back.eval()(tokens).logits, theirs)
    return dict(family=model_type, variant=what, imported=imported, exported=exported,
                missing=len(info["missing_keys"]), unexpected=len(info["unexpected_keys"]))


def cases() -> list:
    out = []
    for model_type, fam in sorted(registered().items()):
        if fam.encoder_decoder:  # measured by tests/test_hf_encdec.py (source and decoder ids, not a causal LM)
            continue
        out.append((model_type, {}, "tiny_config"))
        out.extend((model_type, over, what) for over, what in fam.tiny_variants)
    return out


def ok(row: dict) -> bool:
    return "error" not in row and row["imported"] <= TARGET and row["exported"] <= TARGET and \
        not row["missing"] and not row["unexpected"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = []
    for model_type, over, what in cases():
        with tempfile.TemporaryDirectory() as tmp:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rows.append(one_case(model_type, over, what, Path(tmp)))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print(cpu_caps.describe())
        print("| family | variant | after import | after export + reload | missing / unexpected keys |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['family']} | {r['variant']} | {r['error']} | | |")
            else:
                print(f"| {r['family']} | {r['variant']} | {r['imported']:.1e} | {r['exported']:.1e} | "
                      f"{r['missing']} / {r['unexpected']} |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"logits against transformers {transformers.__version__} (fp32; error = max|Δ| / max|logit|,"
                            f" target ≤ {TARGET:g}; {cpu_caps.describe()})")
        for col in ("family", "variant", "after import", "after export + reload", "missing / unexpected keys", "ok"):
            table.add_column(col)
        for r in rows:
            if "error" in r:
                table.add_row(r["family"], r["variant"], f"{r.get('imported', float('nan')):.1e}", r["error"], "", "no")
                continue
            table.add_row(r["family"], r["variant"], f"{r['imported']:.1e}", f"{r['exported']:.1e}",
                          f"{r['missing']} / {r['unexpected']}", "yes" if ok(r) else "NO")
        Console().print(table)
    return 0 if all(ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
