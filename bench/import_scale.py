"""Peak memory of `moedsl import` and of loading imported weights (`--init`, `load_model`) at scale.

    python bench/import_scale.py                 # ~2.5 GB synthetic Mixtral checkpoint (bf16)
    python bench/import_scale.py --size-gb 10 --dir /big/disk

Writes a synthetic Mixtral-format checkpoint (random bf16, per-expert w1/w2/w3 names, shards of
about 500 MB with model.safetensors.index.json, as transformers' save_pretrained writes them),
then measures, each in a fresh subprocess:

* `moedsl import` (moedsl.hf.convert.import_checkpoint): wall time and peak resident memory;
* the loads `moedsl run --init` makes: one process holding every expert, and each rank of 2
  (each holds half of every layer's experts and all dense weights): peak resident memory
  against the bytes of the weights that process holds (its float32 parameters, as a run
  keeps them).

Peak = VmHWM of /proc/self/status in the child (the kernel's high-water mark of resident
memory): it includes the interpreter and torch (reported separately as "base", measured
before anything is built) and file pages of the memory-mapped safetensors while they are
mapped and touched. moedsl opens a fresh map per tensor and drops it after the read, so
those pages count for one tensor at a time, not for the whole file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_checkpoint(folder: Path, size_gb: float) -> dict:
    import torch

    from moedsl.hf.files import write_sharded

    d, h, E, vocab = 1024, 3584, 8, 32000
    per_layer = (E * 3 * d * h + 4 * d * d + E * d + 2 * d) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * d * 2) / per_layer))
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": d, "intermediate_size": h, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "num_local_experts": E, "num_experts_per_tok": 2,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    bf = torch.bfloat16
    entries = [("model.embed_tokens.weight", (vocab, d))]
    for L in range(layers):
        p = f"model.layers.{L}."
        entries += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
        entries += [(f"{p}self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        entries.append((p + "block_sparse_moe.gate.weight", (E, d)))
        for e in range(E):
            entries += [(f"{p}block_sparse_moe.experts.{e}.w1.weight", (h, d)),
                        (f"{p}block_sparse_moe.experts.{e}.w3.weight", (h, d)),
                        (f"{p}block_sparse_moe.experts.{e}.w2.weight", (d, h))]
    entries += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    folder.mkdir(parents=True)
    write_sharded(folder, [(n, s, bf, (lambda s=s: (torch.randn(s) * 0.02).to(bf))) for n, s in entries], 500 * 10**6)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config


def child_import(src: str, out: str) -> dict:
    import torch  # noqa: F401 - in the base

    base = vm("VmHWM")
    from moedsl.hf.convert import import_checkpoint

    t = time.perf_counter()
    done = import_checkpoint(src, Path(out))
    return {"seconds": time.perf_counter() - t, "peak": vm("VmHWM"), "base": base, "bytes": done["bytes"]}


def child_load(folder: str, rank: int, world: int) -> dict:
    import torch  # noqa: F401 - in the base, as in a run

    from moedsl.api import load_spec
    from moedsl.compiler import compile_graph
    from moedsl.hf.weights import load_weights

    base = vm("VmHWM")
    spec = load_spec(Path(folder) / "spec.yaml")
    t = time.perf_counter()
    model = compile_graph(spec, rank, world, device="cpu", init=False, verify_ranks=False).module
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    load_weights(model, Path(folder), spec)
    return {"seconds": time.perf_counter() - t, "peak": vm("VmHWM"), "base": base, "held": held}


def run_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.5, help="size of the synthetic checkpoint (default 2.5)")
    ap.add_argument("--dir", default="/tmp/moedsl-import-scale", help="scratch folder (removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        what, *rest = a.child
        out = child_import(*rest) if what == "import" else child_load(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return
    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    config = make_checkpoint(work / "hf", a.size_gb)
    disk = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    print(f"synthetic Mixtral: {config['num_hidden_layers']} layers, d {config['hidden_size']}, "
          f"{config['num_local_experts']} experts of {config['intermediate_size']}, bf16, {gb(disk)} on disk "
          f"({time.perf_counter() - t:.0f} s to write)")
    imp = run_child("import", work / "hf", work / "imported")
    rows = [("moedsl import", imp["seconds"], imp["peak"], imp["base"], imp["bytes"])]
    one = run_child("load", work / "imported", 0, 1)
    rows.append(("load, 1 process", one["seconds"], one["peak"], one["base"], one["held"]))
    for r in range(2):
        res = run_child("load", work / "imported", r, 2)
        rows.append((f"load, rank {r} of 2", res["seconds"], res["peak"], res["base"], res["held"]))
    from moedsl.nn import cpu_caps  # here, not at the top: only the children time anything

    print(f"\n{cpu_caps.describe()}")
    print("| step | seconds | peak (VmHWM) | base (python + torch) | weights held | (peak - base) / held |")
    print("|---|---|---|---|---|---|")
    for name, s, peak, base, held in rows:
        what = "written" if name == "moedsl import" else "held"
        print(f"| {name} | {s:.1f} | {gb(peak)} | {gb(base)} | {gb(held)} {what} | {(peak - base) / held:.2f}× |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
