"""Generation on the CPU: moedsl.generate against transformers' generate, the same weights.

    python bench/generate.py                    # d 256, 4 layers, 8 experts (top 2), batch 1 and 8
    python bench/generate.py --repeats 3 --new 16
    python bench/generate.py --cuda             # on a GPU: CUDA-graph decoding, eager, transformers

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

from moedsl.nn import cpu_caps


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
    ap.add_argument("--cuda", action="store_true", help="on the GPU: moedsl with its CUDA-graph decoding and eager "
                    "beside transformers (the ratio of interest there: graphs against eager)")
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
    device = "cuda" if args.cuda else "cpu"
    model = moedsl.load_model(tmp / "imp", device=device)
    ref.to(device)

    def sync():
        if args.cuda:
            torch.cuda.synchronize()

    def ours(graphs):
        def fn(ids, n):
            timings: dict = {}
            out = moedsl.generate(model, ids, n, graphs=graphs, timings=timings)
            assert timings["graphs"] == (graphs == "on"), "CUDA-graph decoding fell back to eager"
            return out
        return fn

    def theirs(ids, n):
        with torch.inference_mode():
            out = ref.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                               max_new_tokens=n, do_sample=False)
        sync()
        return out.cpu()

    impls = {"moedsl": ours("on" if args.cuda else "off")}
    if args.cuda:
        impls["moedsl eager"] = ours("off")
    impls["transformers"] = theirs
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        want = theirs(ids, args.new)
        for name, fn in impls.items():
            assert torch.equal(fn(ids, args.new), want), f"{name}: the ids differ from transformers'"
        got = {n: {"prefill": [], "decode": []} for n in impls}
        ratios = {"prefill": [], "decode": [], "graphs": []}
        for _ in range(args.repeats):
            rep = {}
            for name, fn in impls.items():
                one = _time(lambda: fn(ids, 1))
                many = _time(lambda: fn(ids, args.new))
                rep[name] = {"prefill": B * args.prompt / one, "decode": B * (args.new - 1) / max(many - one, 1e-9)}
                for k in rep[name]:
                    got[name][k].append(rep[name][k])
            for k in ("prefill", "decode"):
                ratios[k].append(rep["moedsl"][k] / rep["transformers"][k])
            if args.cuda:
                ratios["graphs"].append(rep["moedsl"]["decode"] / rep["moedsl eager"]["decode"])
        med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in got.items()}
        rows.append((B, med, {k: statistics.median(v) if v else None for k, v in ratios.items()}))

    where = f"the GPU ({torch.cuda.get_device_name()})" if args.cuda else "the CPU"
    t = Table(title=f"generate on {where}: Mixtral d {args.d}, {args.layers} layers, {args.experts} experts (top 2), "
              f"prompt {args.prompt}, {args.new} new tokens, torch threads {torch.get_num_threads()}, median of "
              f"{args.repeats}" + ("; moedsl decodes through a CUDA graph, 'moedsl eager' without" if args.cuda else "")
              + f"; {cpu_caps.describe()}",
              title_justify="left")
    cols = ["batch", "prefill tok/s moedsl", "prefill tok/s HF", "prefill ratio", "decode tok/s moedsl"]
    cols += ["decode tok/s moedsl eager"] if args.cuda else []
    cols += ["decode tok/s HF", "decode ratio"] + (["graphs / eager"] if args.cuda else [])
    for col in cols:
        t.add_column(col, justify="right")
    for B, med, r in rows:
        cells = [str(B), f"{med['moedsl']['prefill']:.0f}", f"{med['transformers']['prefill']:.0f}",
                 f"{r['prefill']:.2f}×", f"{med['moedsl']['decode']:.0f}"]
        cells += [f"{med['moedsl eager']['decode']:.0f}"] if args.cuda else []
        cells += [f"{med['transformers']['decode']:.0f}", f"{r['decode']:.2f}×"]
        cells += [f"{r['graphs']:.2f}×"] if args.cuda else []
        t.add_row(*cells)
    Console().print(t)


if __name__ == "__main__":
    main()
