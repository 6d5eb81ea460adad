"""Compile time and memory as specs grow: load + validate, compile and plan on the meta device
against the number of experts (8 … 131,072) and of layers (1 … 64); the full Switch-C spec;
and the memory a built model takes against its parameters and buffers.

    python bench/compile_scale.py

Every configuration runs in a fresh process, so its peak memory (max RSS) is its own; the
process first compiles (or builds) a two-expert spec, so imports and first-use costs are
not counted against the spec measured. A built model's memory is that of a second build of
its spec in the process (the first, also shown, pays the one-time costs of its layer types).
Targets: cost growing linearly (or better) in experts × layers; Switch-C compiled and planned
in under 5 s using under 1 GiB; a built model within 5% of parameters + buffers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    t0 = time.perf_counter()
    import torch, moedsl
    from moedsl.compiler import compile_graph
    from moedsl.compiler.plan import make_plan
    # the first compile of a process pays for imports and first-use costs (1-2 s): not the spec's
    warm = {"moedsl": 1, "name": "w", "model": {"vocab_size": 16, "d_model": 8}, "layers": [{"embedding": {}},
            {"moe": {"experts": {"count": 2, "hidden": 8}, "gate": {"type": "switch"}}}, {"head": {}}]}
    ws = moedsl.load_spec(warm); make_plan(ws, compile_graph(ws, device="meta"))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    src = sys.argv[1]
    t = time.perf_counter(); spec = moedsl.load_spec(src); t_load = time.perf_counter() - t
    t = time.perf_counter(); c = compile_graph(spec, device="meta"); t_compile = time.perf_counter() - t
    t = time.perf_counter(); plan = make_plan(spec, c); t_plan = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(load=t_load, compile=t_compile, plan=t_plan, peak_mib=peak / 1024,
                          grew_mib=(peak - base) / 1024, params=plan.params_total, world=plan.world)))
""")

BUILD = textwrap.dedent("""
    import json, resource, sys, gc
    import torch, moedsl
    torch.set_num_threads(1)
    spec = moedsl.load_spec(sys.argv[1])
    warm = {"moedsl": 1, "name": "w", "model": {"vocab_size": 16, "d_model": 8}, "layers": [{"embedding": {}},
            {"moe": {"experts": {"count": 2, "hidden": 8}, "gate": {"type": "switch"}}}, {"head": {}}]}
    moedsl.build_model(warm, layout="grouped")  # imports and first-use costs
    from moedsl.runtime.cpu import release_freed_memory
    def rss():
        # what the process holds: freed temporaries (the initialisation's draws) handed back
        # to the OS first, or the allocator's free lists would count as the model's
        gc.collect(); release_freed_memory()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    grew = []
    for _ in range(2):  # the first build of a spec in a process also pays one-time costs (lazy imports and
        before = rss()  # first uses of its layer types); the second is what each built model holds
        model = moedsl.build_model(spec, dtype=torch.float32, layout="grouped")
        grew.append(rss() - before)
        tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        del model
    print(json.dumps(dict(rss_first=grew[0], rss=grew[1], tensors=tensors)))
""")


def spec_text(experts: int, layers: int, k: int = 2) -> str:
    return textwrap.dedent(f"""
        moedsl: 1
        name: scale-{experts}x{layers}
        model: {{vocab_size: 32000, d_model: 1024, max_seq_len: 2048}}
        layers:
          - embedding: {{}}
          - repeat: {layers}
            block:
              - attention: {{heads: 16}}
              - moe:
                  experts: {{count: {experts}, hidden: 2048, activation: swiglu}}
                  gate: {{type: topk, k: {k}, capacity_factor: 1.25}}
          - head: {{}}
    """)


def child(code: str, arg: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from moedsl.nn import cpu_caps  # here, not at the top: only the children time anything

    print(cpu_caps.describe())
    rows = []
    print("| experts | layers | experts × layers | load+validate ms | compile ms | plan ms | total ms "
          "| µs per expert-layer | peak RSS MiB | RSS grew MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = [(e, 4) for e in (8, 64, 512, 4096, 32768, 131072)] + [(64, n) for n in (1, 16, 64)]
    for experts, layers in grid:
        r = child(CHILD, spec_text(experts, layers))
        total = r["load"] + r["compile"] + r["plan"]
        r.update(experts=experts, layers=layers, total=total)
        rows.append(r)
        print(f"| {experts} | {layers} | {experts * layers} | {r['load'] * 1e3:.0f} | {r['compile'] * 1e3:.0f} | "
              f"{r['plan'] * 1e3:.0f} | {total * 1e3:.0f} | {total * 1e6 / (experts * layers):.1f} | "
              f"{r['peak_mib']:.0f} | {r['grew_mib']:.0f} |", flush=True)
    # linear or better: from the smallest to the largest expert count the time grows no faster
    e_rows = [r for r in rows if r["layers"] == 4]
    growth = (e_rows[-1]["total"] / e_rows[0]["total"]) / (e_rows[-1]["experts"] / e_rows[0]["experts"])
    l_rows = [r for r in rows if r["experts"] == 64]
    l_growth = (l_rows[-1]["total"] / l_rows[0]["total"]) / (l_rows[-1]["layers"] / l_rows[0]["layers"])
    print(f"\ntime growth / experts growth (8 -> 131,072): {growth:.4f} (linear = 1, below = sub-linear)")
    print(f"time growth / layers growth (1 -> 64 layers of 64 experts): {l_growth:.3f}")
    sc = child(CHILD, os.path.join(ROOT, "specs", "switch-c-2048.yaml"))
    total = sc["load"] + sc["compile"] + sc["plan"]
    print(f"\nSwitch-C (specs/switch-c-2048.yaml, {sc['params'] / 1e12:.2f}T parameters, rank 0 of {sc['world']}): "
          f"load {sc['load']:.2f} s + compile {sc['compile']:.2f} s + plan {sc['plan']:.2f} s = {total:.2f} s "
          f"(target < 5 s); peak RSS {sc['peak_mib']:.0f} MiB (target < 1024 MiB)")
    print(f"\n{cpu_caps.describe()}")
    print("| built model | parameters + buffers MiB | RSS grew MiB | overhead | first build in the process: "
          "RSS grew MiB | overhead |")
    print("|---|---|---|---|---|---|")

    def built(label, b):
        print(f"| {label} | {b['tensors'] / 2**20:.1f} | {b['rss'] / 2**20:.1f} | {b['rss'] / b['tensors'] - 1:+.1%} | "
              f"{b['rss_first'] / 2**20:.1f} | {b['rss_first'] / b['tensors'] - 1:+.1%} |", flush=True)
    for name in ("switch", "mixtral"):
        built(f"specs/{name}.yaml", child(BUILD, os.path.join(ROOT, "specs", f"{name}.yaml")))
    for label, text in (
            ("2 layers × 16 SwiGLU experts (d 1024, h 2048)",
             spec_text(16, 2).replace("vocab_size: 32000", "vocab_size: 1024")),
            # many small experts: where a module (or tensors) per expert would show
            ("2 layers × 2048 SwiGLU experts (d 64, h 128)",
             spec_text(2048, 2).replace("vocab_size: 32000", "vocab_size: 1024").replace("d_model: 1024", "d_model: 64")
             .replace("heads: 16", "heads: 4").replace("hidden: 2048", "hidden: 128"))):
        built(label, child(BUILD, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
