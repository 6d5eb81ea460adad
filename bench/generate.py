"""Generation on the CPU: moedsl.generate against transformers' generate, the same weights.

    python bench/generate.py                    # d 256, 4 layers, 8 experts (top 2), batch 1 and 8
    python bench/generate.py --repeats 3 --new 16

A Mixtral is built by transformers from a config (random weights, no download), saved and
imported with ``moedsl import``; both then continue the same prompts greedily. Each
implementation's prefill time is a generate of 1 new token (the prompt's forward and one
pick); its decode time per token is (generate of N tokens − generate of 1) / (N − 1). The two
run interleaved within each repeat (the machine's speed drifts; a pair shares its state) and
the table gives medians over repeats and the median of the per-repeat ratios. The ids are
checked equal before timing. Tokens per second count every row: batch · tokens / seconds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on shared cores, waking "
                    "a second thread for each small op of a decode step costs more than it gives)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from rich.console import Console
    from rich.table import Table

    import moedsl
    from moedsl.cli import main as cli

    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=args.d, intermediate_size=2 * args.d,
                                     num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                     num_local_experts=args.experts, num_experts_per_tok=2,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(cfg).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    tmp = Path(tempfile.mkdtemp(prefix="moedsl-bench-gen-"))
    ref.save_pretrained(tmp / "hf")
    assert cli(["import", str(tmp / "hf"), "--out", str(tmp / "imp")]) == 0
    model = moedsl.load_model(tmp / "imp")

    def ours(ids, n):
        return moedsl.generate(model, ids, n)

    def theirs(ids, n):
        with torch.inference_mode():
            return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                do_sample=False)

    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        assert torch.equal(ours(ids, args.new), theirs(ids, args.new)), "the ids differ"
        got = {"moedsl": {"prefill": [], "decode": []}, "transformers": {"prefill": [], "decode": []}}
        ratios = {"prefill": [], "decode": []}
        for _ in range(args.repeats):
            rep = {}
            for name, fn in (("moedsl", ours), ("transformers", theirs)):
                one = _time(lambda: fn(ids, 1))
                many = _time(lambda: fn(ids, args.new))
                rep[name] = {"prefill": B * args.prompt / one, "decode": B * (args.new - 1) / max(many - one, 1e-9)}
                for k in rep[name]:
                    got[name][k].append(rep[name][k])
            for k in ratios:
                ratios[k].append(rep["moedsl"][k] / rep["transformers"][k])
        med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in got.items()}
        rows.append((B, med, {k: statistics.median(v) for k, v in ratios.items()}))

    t = Table(title=f"generate on the CPU: Mixtral d {args.d}, {args.layers} layers, {args.experts} experts (top 2), "
              f"prompt {args.prompt}, {args.new} new tokens, torch threads {torch.get_num_threads()}, median of "
              f"{args.repeats}", title_justify="left")
    for col in ("batch", "prefill tok/s moedsl", "prefill tok/s HF", "prefill ratio", "decode tok/s moedsl",
                "decode tok/s HF", "decode ratio"):
        t.add_column(col, justify="right")
    for B, med, r in rows:
        t.add_row(str(B), f"{med['moedsl']['prefill']:.0f}", f"{med['transformers']['prefill']:.0f}",
                  f"{r['prefill']:.2f}×", f"{med['moedsl']['decode']:.0f}", f"{med['transformers']['decode']:.0f}",
                  f"{r['decode']:.2f}×")
    Console().print(t)


if __name__ == "__main__":
    main()
