"""Real data: prepare's throughput against the tokenizers library alone, the loader's tokens/s
against what a training step consumes, and prepare's peak memory on a corpus 4x the memory
it is allowed.

    python bench/data.py              # pystdlib throughput (3 repeats), loader, memory on 4 x 512 MiB
    python bench/data.py --quick      # under a minute: 2 MB of pystdlib, 1 repeat, a 32 MiB corpus

(a) **prepare** (``runtime.prepare.prepare``: read the files, tokenize in batches, hash each
document for the split, write the shards and manifest) on the standard library's .py files,
against ``tokenizers``' own ``encode_batch`` (and ``encode_batch_fast``, the call prepare makes)
on the same documents in the same batches, already in memory. The three run interleaved
within each repeat (the machine's speed drifts; a triple shares its state); the table gives
medians and the median of the per-repeat ratios. The tokenizer is a byte-level BPE trained
first with ``moedsl tokenizer train`` on the same files.

(b) **loader**: training batches from the run's own loader (``runtime.data.Tokens.batch``: per row
a generator seeded by (seed, step, row), a window of seq + 1 tokens from the memory-mapped folder,
and each token's document, which ``--pack documents`` reads); and the raw windows alone
(``Split.tokens``, B random starts from one generator), what the loader costs above reading. Against
``moedsl run``'s training step on specs/switch.yaml at its own batch and seq (CPU, the step's
default threads), timed in-process after two warm-up steps.

(c) **memory**: prepare in a subprocess under ``RLIMIT_AS`` (``ulimit -v``: address space, which
also counts what libraries reserve without touching) on a generated corpus 4x that limit (one
text file, one document per line, ``--split-lines``), tokenized by a word-level tokenizer (the
streaming is under test, not BPE's speed: a BPE on this machine would take 15 minutes for the
corpus); peak RSS is the child's VmHWM: its ``ru_maxrss`` also counts the benchmark's own pages
from before the exec (Linux keeps the forked image's high-water mark), so the table shows both.
The corpus is written in a temporary folder and deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _median_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def throughput(tmp: Path, quick: bool, repeats: int, vocab: int) -> dict:
    from moedsl.cli import main as cli
    from moedsl.runtime.corpus import Corpus, pystdlib_files
    from moedsl.runtime.prepare import _batches, prepare

    limit = (2 if quick else 24) * 2**20
    files, total = [], 0
    for p in pystdlib_files()[1]:  # the files of the `pystdlib` source, up to `limit`
        files.append(str(p))
        total += p.stat().st_size
        if total >= limit:
            break
    tok = tmp / "tok" / "tokenizer.json"
    assert cli(["tokenizer", "train", *files, "--vocab-size", str(vocab), "--out", str(tok)]) == 0
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    corpus = Corpus(files)
    batches = [texts for texts, _ in _batches(corpus, 1024)]
    text_mb = sum(len(x.encode()) for b in batches for x in b) / 1e6
    times = {"encode_batch": [], "encode_batch_fast": [], "prepare": []}
    for _ in range(repeats):
        s = time.perf_counter()
        for b in batches:
            t.encode_batch(b, add_special_tokens=False)
        times["encode_batch"].append(time.perf_counter() - s)
        s = time.perf_counter()
        for b in batches:
            t.encode_batch_fast(b, add_special_tokens=False)
        times["encode_batch_fast"].append(time.perf_counter() - s)
        out = tmp / "prepared"
        shutil.rmtree(out, ignore_errors=True)
        s = time.perf_counter()
        prepare(files, tok, out)
        times["prepare"].append(time.perf_counter() - s)
    return dict(files=len(files), text_mb=text_mb, times=times, out=tmp / "prepared", vocab=t.get_vocab_size(),
                ratio=_median_ratio(times["prepare"], times["encode_batch"]),
                ratio_fast=_median_ratio(times["prepare"], times["encode_batch_fast"]))


def loader(folder: Path, quick: bool) -> dict:
    import torch

    import moedsl
    from moedsl.runtime.data import Tokens
    from moedsl.runtime.tokens import open_tokens
    from moedsl.runtime.train import RunOptions, Trainer

    spec = moedsl.load_spec(ROOT / "specs" / "switch.yaml")
    B, T = spec.train.batch_size, spec.train.seq_len
    prepared = open_tokens(folder)
    split = prepared.splits["train"]
    source = Tokens([prepared], [1.0], seed=0, name=str(folder))
    rng = np.random.default_rng(0)

    def draw(step: int, loader: bool):
        if loader:
            return source.batch(step, B, T)
        starts = rng.integers(0, split.size - T - 1, B)
        x = torch.from_numpy(np.stack([split.tokens(int(s), T + 1) for s in starts]))
        return x[:, :-1], x[:, 1:]

    rates = {}
    for loader in (False, True):
        n, s = 0, time.perf_counter()
        while time.perf_counter() - s < (0.3 if quick else 2.0):
            draw(n, loader)
            n += 1
        rates[loader] = n * B * T / (time.perf_counter() - s)
    o = RunOptions.from_spec(spec, device="cpu", data="synthetic", seed=0, progress=False)
    trainer = Trainer(spec, o)
    (warm, steps), times = ((1, 2) if quick else (2, 8)), []
    for step in range(warm + steps):
        b = trainer.source.batch(step, B, T, 0, 1)
        s = time.perf_counter()
        trainer.step(b, o.lr)
        if step >= warm:
            times.append(time.perf_counter() - s)
    step_rate = B * T / statistics.median(times)
    return dict(B=B, T=T, windows=rates[False], windows_docs=rates[True], step=step_rate,
                step_ms=1e3 * statistics.median(times), threads=torch.get_num_threads())


CHILD = """
import json, resource, sys, time
from moedsl.runtime.prepare import prepare
loaded = 'torch' in sys.modules
s = time.perf_counter()
prepare([sys.argv[1]], sys.argv[2], sys.argv[3], separator="\\n")
status = open("/proc/self/status").read()
print(json.dumps(dict(seconds=time.perf_counter() - s, maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      hwm_kb=int(status.split("VmHWM:")[1].split()[0]),
                      vmpeak_kb=int(status.split("VmPeak:")[1].split()[0]),
                      torch=loaded or 'torch' in sys.modules)))
"""


def memory(tmp: Path, limit_mb: int, corpus_mb: int) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers

    rnd = random.Random(0)
    words = list(dict.fromkeys("".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9)))
                               for _ in range(5000)))
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"], vocab["<|endoftext|>"] = len(words), len(words) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    (tmp / "wl").mkdir()
    tok.save(str(tmp / "wl" / "tokenizer.json"))
    lines = [" ".join(rnd.choices(words, k=rnd.randint(100, 1500))) + "\n" for _ in range(2000)]
    src, target, n = tmp / "corpus.txt", corpus_mb * 2**20, 0
    with open(src, "w") as f:
        while n < target:
            line = lines[rnd.randrange(len(lines))]
            f.write(line)
            n += len(line)

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp / "wl" / "tokenizer.json"), str(tmp / "out")],
                       preexec_fn=limited, capture_output=True, text=True)
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    manifest = json.loads((tmp / "out" / "manifest.json").read_text()) if r.returncode == 0 else {}
    tokens = sum(s["tokens"] for s in manifest.get("splits", {}).values())
    return dict(limit_mb=limit_mb, corpus_mb=src.stat().st_size / 2**20, rc=r.returncode, tokens=tokens,
                error=r.stderr.strip().splitlines()[-1] if r.returncode else "", **got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: 2 MB of pystdlib, 1 repeat, a 32 MiB corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096, help="the BPE's vocabulary (default 4096)")
    ap.add_argument("--limit-mb", type=int, default=512, help="prepare's address-space limit, MiB (default 512)")
    ap.add_argument("--corpus-x", type=float, default=4.0, help="the memory corpus, times the limit (default 4)")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    import tokenizers

    from moedsl.nn import cpu_caps

    repeats = 1 if args.quick else args.repeats
    corpus_mb = 32 if args.quick else int(args.corpus_x * args.limit_mb)
    with tempfile.TemporaryDirectory(prefix="moedsl-bench-data-") as d:
        tmp = Path(d)
        a = throughput(tmp, args.quick, repeats, args.vocab)
        b = loader(a["out"], args.quick)
        (tmp / "mem").mkdir()
        c = memory(tmp / "mem", args.limit_mb, corpus_mb)

    con = Console(width=140)
    con.print(f"{cpu_caps.describe()}; tokenizers {tokenizers.__version__}, {os.cpu_count()} CPUs"
              + ("; --quick" if args.quick else ""))
    ta = Table(title=f"(a) prepare vs tokenizers on pystdlib: {a['files']} files, {a['text_mb']:.1f} MB, "
               f"byte-level BPE of {a['vocab']} ids, median of {repeats}")
    for col in ("", "seconds", "MB/s", "prepare / this", "target"):
        ta.add_column(col, justify="right" if col else "left")
    mb = a["text_mb"]
    med = {k: statistics.median(v) for k, v in a["times"].items()}
    ta.add_row("moedsl data prepare", f"{med['prepare']:.2f}", f"{mb / med['prepare']:.2f}", "", "")
    ta.add_row("tokenizers encode_batch", f"{med['encode_batch']:.2f}", f"{mb / med['encode_batch']:.2f}",
               f"{a['ratio']:.2f}x", f"<= 1.3x: {'met' if a['ratio'] <= 1.3 else 'MISSED'}")
    ta.add_row("tokenizers encode_batch_fast", f"{med['encode_batch_fast']:.2f}",
               f"{mb / med['encode_batch_fast']:.2f}", f"{a['ratio_fast']:.2f}x", "(the call prepare makes)")
    con.print(ta)
    tb = Table(title=f"(b) loader vs the training step: specs/switch.yaml, batch {b['B']} x seq {b['T']}, CPU, "
               f"{b['threads']} torch threads")
    for col in ("", "tokens/s", "/ step's"):
        tb.add_column(col, justify="right" if col else "left")
    tb.add_row(f"training step ({b['step_ms']:.0f} ms)", f"{b['step']:,.0f}", "1")
    r1, r2 = b["windows"] / b["step"], b["windows_docs"] / b["step"]
    tb.add_row("the run's loader (Tokens.batch)", f"{b['windows_docs']:,.0f}", f"{r2:,.0f}x (target >= 100x: "
               f"{'met' if r2 >= 100 else 'MISSED'})")
    tb.add_row("raw windows (Split.tokens)", f"{b['windows']:,.0f}", f"{r1:,.0f}x")
    con.print(tb)
    tc = Table(title="(c) prepare's memory under RLIMIT_AS (ulimit -v)")
    for col in ("limit", "corpus", "x limit", "finished", "peak RSS (VmHWM)", "ru_maxrss", "VmPeak", "MB/s",
                "tokens", "torch"):
        tc.add_column(col, justify="right")
    done = c["rc"] == 0
    tc.add_row(f"{c['limit_mb']} MiB", f"{c['corpus_mb']:,.0f} MiB", f"{c['corpus_mb'] / c['limit_mb']:.1f}",
               "yes" if done else f"NO (exit {c['rc']}: {c['error'][:60]})",
               f"{c['hwm_kb'] / 1024:.0f} MiB" if done else "", f"{c['maxrss_kb'] / 1024:.0f} MiB" if done else "",
               f"{c['vmpeak_kb'] / 1024:.0f} MiB" if done else "",
               f"{c['corpus_mb'] * 2**20 / 1e6 / c['seconds']:.1f}" if done else "", f"{c['tokens']:,}",
               str(c.get("torch", "")))
    con.print(tc)
    con.print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs while it ran")


if __name__ == "__main__":
    main()
