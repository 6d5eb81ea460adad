"""Training tokens per second of one Mixtral-style model in moedsl and in transformers, side by side.

    python bench/train_step.py                          # both models, fp32 and bf16, 1 process + 2 processes
    python bench/train_step.py --models mixtral --dtypes float32 --repeats 3
    python bench/train_step.py --no-nproc               # skip the 2-process section

Each model is built by transformers from a config (random weights, no download): ``mixtral``
is d_model 512, 8 experts of 1024, top-2, 4 layers; ``fine`` is the fine-grained variant with
the same active parameters, 64 experts of 256, top-8. It is saved and imported with
``moedsl import``, so both sides train the same weights on the same batch (sequence 256,
batch 8, vocabulary 32000 by default), and the first step's losses are checked equal
before anything is timed. transformers runs its own training step: the model with its
``grouped_mm`` experts and ``sdpa`` attention, its causal-LM loss, backward and
``torch.optim.AdamW(fused=True)`` (the fastest AdamW torch has on a CPU). moedsl runs its
``Trainer.step``: forward, loss, backward, gradient sync, clipping by the global norm and
fused AdamW. ``bfloat16`` is autocast on both sides (float32 master weights).

One repeat times a few steps of every implementation in turn (1-process section) (the machine's speed drifts;
a repeat's entries share its state); the table gives each one's median step and the median
over repeats of its ratio to transformers' step in the same repeat.

The 2-process section trains the same model with its experts split over two gloo processes
(one thread each, on the same cores), and prints the seconds per step each process spends
blocked on communication (``Traffic.wait_by``: in the MoE layers' all-to-alls, and in the
gradient sync and the gradient norm's all-reduce), with the gradient sync after backward
against the bucketed sync launched from backward hooks, and the MoE layers unchunked against
split into chunks whose all-to-alls overlap the experts. Each column is the larger of the two
processes' medians.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from moedsl.nn import cpu_caps

MODELS = {  # name -> (experts, top-k, expert hidden)
    "mixtral": (8, 2, 1024),
    "fine": (64, 8, 256),
}
BF16 = "bfloat16"


def _hf_config(transformers, experts: int, k: int, hidden: int, args):
    return transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=k,
        max_position_embeddings=max(512, args.seq), tie_word_embeddings=False)


def _import(transformers, name: str, args, root: Path) -> Path:
    """The model saved by transformers and imported by ``moedsl import``: the import folder."""
    from moedsl.cli import main as cli

    experts, k, hidden = MODELS[name]
    torch.manual_seed(0)
    cfg = _hf_config(transformers, experts, k, hidden, args)
    ref = transformers.MixtralForCausalLM(cfg)
    ref.save_pretrained(root / f"{name}-hf")
    rc = cli(["import", str(root / f"{name}-hf"), "--out", str(root / name)])
    if rc:
        raise SystemExit(f"moedsl import failed ({rc})")
    return root / name


def _spec_text(folder: Path, dtype: str, chunks: int = 1) -> Path:
    """The imported spec with the model's dtype (and the MoE layers' chunking) set; a new file."""
    text = (folder / "spec.yaml").read_text()
    text = re.sub(r"(\n  dtype: )\w+", rf"\g<1>{dtype}", text)
    if chunks > 1:
        text = re.sub(r"(\n(\s+)- moe:[^\n]*\n)", rf"\g<1>\g<2>    overlap: {{chunks: {chunks}}}\n", text)
    out = folder / f"spec-{dtype}-c{chunks}.yaml"
    out.write_text(text)
    return out


def _batch(vocab: int, batch: int, seq: int, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return SimpleNamespace(inputs=x[:, :-1].contiguous(), targets=x[:, 1:].contiguous())


class HFStep:
    """transformers' own training step: forward with its loss, backward, fused AdamW."""

    def __init__(self, transformers, folder: Path, dtype: str, lr: float):
        self.model = transformers.MixtralForCausalLM.from_pretrained(
            folder.parent / f"{folder.name}-hf", dtype=torch.float32, attn_implementation="sdpa",
            experts_implementation="grouped_mm").train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        self.amp = dtype == BF16

    def __call__(self, b) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(input_ids=b.inputs, labels=b.targets, shift_labels=b.targets)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


class MoedslStep:
    def __init__(self, folder: Path, dtype: str, args, compile: str = "off", chunks: int = 1,
                 grad_sync: str = "bucketed", keep_memory: bool = True):
        import moedsl
        from moedsl.runtime.train import RunOptions, Trainer

        spec = moedsl.load_spec(_spec_text(folder, dtype, chunks))
        o = RunOptions.from_spec(spec, batch=args.batch, seq=args.seq, device="cpu", data="synthetic", seed=0,
                                 progress=False, init=str(folder), weight_decay=0.0, grad_clip=0.0, lr=args.lr,
                                 keep_memory=keep_memory, compile=compile, grad_sync=grad_sync)
        self.trainer = Trainer(spec, o)

    def __call__(self, b) -> float:
        out = self.trainer.step(b, self.trainer.options.lr)
        return float(out.loss)


def _time_steps(step, batches) -> float:
    """Median seconds of a step over ``batches``."""
    ts = []
    for b in batches:
        t = time.perf_counter()
        step(b)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def one_process(transformers, folders: dict, args) -> list:
    rows = []
    for name, folder in folders.items():
        for dtype in args.dtypes:
            impls = {"transformers": HFStep(transformers, folder, dtype, args.lr),
                     "moedsl eager": MoedslStep(folder, dtype, args, compile="off")}
            first = _batch(args.vocab, args.batch, args.seq, 0)
            losses = {k: f(first) for k, f in impls.items()}  # the same weights and batch: the same loss
            tol = 1e-4 if dtype == "float32" else 3e-2
            if abs(losses["moedsl eager"] - losses["transformers"]) > tol * max(1.0, abs(losses["transformers"])):
                raise SystemExit(f"{name} {dtype}: first-step losses differ: {losses}")
            step = None
            if args.compile:
                t = time.perf_counter()
                impls["moedsl compiled"] = step = MoedslStep(folder, dtype, args, compile="on")
                step(first)  # compiles
                warm = time.perf_counter() - t
            else:
                warm = None
            for f in impls.values():  # warm-up
                f(_batch(args.vocab, args.batch, args.seq, 1))
            times: dict = {k: [] for k in impls}
            for r in range(args.repeats):
                batches = [_batch(args.vocab, args.batch, args.seq, 2 + r * args.steps + i) for i in range(args.steps)]
                for k, f in impls.items():
                    times[k].append(_time_steps(f, batches))
            ref = times["transformers"]
            for k, ts in times.items():
                ratio = statistics.median(r / t for r, t in zip(ref, ts))
                rows.append(dict(model=name, dtype=dtype, impl=k, step_s=statistics.median(ts),
                                 tokens_per_s=args.batch * args.seq / statistics.median(ts), ratio=ratio,
                                 warm=warm if k == "moedsl compiled" else None,
                                 loss=losses.get(k, losses["moedsl eager"])))
                _print_row(rows[-1])
            del impls, step
            _free()
    return rows


def _free() -> None:
    """Give back what the finished implementations held (moedsl's trainer keeps freed memory)."""
    import gc

    from moedsl.runtime.cpu import release_freed_memory

    gc.collect()
    release_freed_memory()


def _print_row(r) -> None:
    warm = f" (compiled in {r['warm']:.0f} s)" if r.get("warm") else ""
    print(f"| {r['model']} | {r['dtype']} | {r['impl']}{warm} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} "
          f"| {r['ratio']:.2f}× |", flush=True)


def _worker(rank: int, world: int, folder: str, dtype: str, args, settings: list) -> list:
    """Every setting on this rank in turn, one trainer at a time (three at once do not fit in
    memory at vocabulary 32000 with 64 experts): step time and time blocked, per kind."""
    import gc

    from moedsl.compiler.collectives import Traffic

    torch.set_num_threads(1)
    out = []
    n = args.batch // world
    for s in settings:
        f = MoedslStep(Path(folder), dtype, args, chunks=s[1], grad_sync=s[0], keep_memory=False)
        f(SimpleNamespace(**{k: v[rank * n:(rank + 1) * n] for k, v in vars(_batch(args.vocab, args.batch, args.seq, 1)).items()}))
        ts, a2a, grads = [], [], []
        for i in range(args.repeats * args.steps):
            b = _batch(args.vocab, args.batch, args.seq, 2 + i)
            b = SimpleNamespace(inputs=b.inputs[rank * n:(rank + 1) * n], targets=b.targets[rank * n:(rank + 1) * n])
            torch.distributed.barrier()
            Traffic.reset()
            t = time.perf_counter()
            f(b)
            ts.append(time.perf_counter() - t)
            a2a.append(Traffic.wait_by.get("all_to_all", 0.0))
            grads.append(Traffic.wait_by.get("gradients", 0.0))
        out.append((s, statistics.median(ts), statistics.median(a2a), statistics.median(grads)))
        del f
        gc.collect()
    return out


def two_processes(folders: dict, args, hf_rows: list) -> None:
    from moedsl.runtime.spawn import spawn

    settings = [("after_backward", 1), ("bucketed", 1), ("bucketed", args.chunks)]
    print(f"\n2 gloo processes, 1 thread each, experts split between them (global batch {args.batch} × {args.seq}); "
          "blocked: seconds per step a process spends inside collectives (max over the two); "
          f"{cpu_caps.describe()}\n")
    print("| model | dtype | gradient sync | MoE chunks | step ms | tokens/s | blocked in all-to-alls ms "
          "| blocked in the gradient sync ms | blocked, share of step | × transformers (1 process, 2 threads) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, folder in folders.items():
        for dtype in args.dtypes:
            res = spawn(_worker, 2, str(folder), dtype, args, settings, timeout=1800.0)
            hf = next((r["step_s"] for r in hf_rows if r["model"] == name and r["dtype"] == dtype
                       and r["impl"] == "transformers"), None)
            for i, s in enumerate(settings):
                step, a2a, grads = (max(rank[i][j] for rank in res) for j in (1, 2, 3))
                vs = f"{hf / step:.2f}×" if hf else "-"
                print(f"| {name} | {dtype} | {s[0]} | {s[1]} | {step * 1e3:.0f} | {args.batch * args.seq / step:,.0f} "
                      f"| {a2a * 1e3:.0f} | {grads * 1e3:.0f} | {(a2a + grads) / step:.0%} | {vs} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,fine", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--chunks", type=int, default=2, help="MoE chunks of the overlapped setting (2 processes)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip moedsl compiled")
    ap.add_argument("--no-nproc", dest="nproc", action="store_false", help="skip the 2-process section")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the 1-process section")
    args = ap.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="moedsl-bench-step-"))
    folders = {name: _import(transformers, name, args, root) for name in args.models.split(",")}
    print(f"\ntraining step, 1 process, {args.threads} threads, batch {args.batch} × {args.seq}, d_model {args.d}, "
          f"{args.layers} layers, vocabulary {args.vocab}; transformers {transformers.__version__}, "
          f"torch {torch.__version__}; {cpu_caps.describe()}\n")
    print("| model | dtype | implementation | step ms | tokens/s | × transformers |")
    print("|---|---|---|---|---|---|")
    rows = one_process(transformers, folders, args) if args.single else []
    _free()
    if args.nproc:
        two_processes(folders, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
