"""Human-readable reports of a Plan (tables with rich)."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moedsl.compiler.plan import human_bytes, human_flops
from moedsl.params import human


def key_value_table(title: str) -> Table:
    """Two columns, label and value, that fit 80 columns (rich's width when piped) or a narrower
    terminal: labels kept short and on one line, values folded where they are longer than the
    rest of the line, never cut with an ellipsis (a path stays whole, to copy)."""
    t = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    return t


def plan_tables(plan) -> list:
    def both(d: dict) -> str:
        return ", ".join(f"{k} {human_bytes(v)}" for k, v in d.items())

    t = key_value_table(f"{plan.spec}: plan for rank {plan.rank} of {plan.world} "
                        f"({plan.nodes} node(s) × {plan.devices_per_node}; expert parallel {plan.expert_parallel} × "
                        f"data parallel {plan.data_parallel}), batch {plan.batch[0]} × {plan.batch[1]}")
    share = plan.params_active_per_token / max(plan.params_total, 1)
    rows = [
        ("parameters", human(plan.params_total)),
        ("active per token", f"{human(plan.params_active_per_token)} ({share:.1%})"),
        ("on this device", f"{human(plan.params_on_device)} (experts {human(plan.expert_params_on_device)})"),
        ("FLOPs / token, forward", human_flops(plan.flops_per_token_forward)),
        ("FLOPs / token, training", human_flops(plan.flops_per_token_train)),
        ("FLOPs / token, padded", f"{human_flops(plan.flops_per_token_forward_padded)} (forward, capacity padding)"),
        ("weights", f"{human_bytes(plan.memory_weights)} ({plan.dtype})"),
        ("training with", f"shard {plan.shard}, recompute {plan.recompute}, micro_batches {plan.micro_batches}"),
        ("training states", f"{human_bytes(plan.memory_train_states)} (fp32 master {human_bytes(plan.memory_params)}, "
                            f"grads {human_bytes(plan.memory_grads)}, AdamW {human_bytes(plan.memory_optimizer)})"),
        ("working copies", f"{human_bytes(plan.memory_working)} ({_working(plan)})"),
        ("activations", f"{human_bytes(plan.memory_activations)} (kept for backward, estimate)"),
        ("training step", f"{human_bytes(plan.memory_train_total)} per device"),
        ("all-to-all sent", both(plan.a2a_send_bytes) + " per step"),
        ("all-to-all received", both(plan.a2a_recv_bytes) + " per step"),
        ("all-gather sent", both(plan.gather_send_bytes) + " per step (tokens)"),
        ("CUDA graphs", "capturable (static shapes)" if plan.capturable else "no (data-dependent shapes)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out = [t]
    if plan.layers:
        lt = Table(title="MoE layers", box=box.SIMPLE, title_justify="left", padding=(0, 1, 0, 0))
        for col in ("layer", "routing", "layout", "capacity", "sent intra", "sent inter", "messages"):
            lt.add_column(col, justify="right" if col not in ("layer", "routing", "layout") else "left",
                          overflow="fold")  # a narrow terminal: a name over two lines, not cut
        lt.columns[0].min_width = min(max(len(layer.layer) for layer in plan.layers), 24)  # numbers wrap first
        for layer in plan.layers:
            lt.add_row(layer.layer, layer.scope, layer.layout, "-" if layer.capacity is None else str(layer.capacity),
                       human_bytes(layer.send_bytes["intra"]), human_bytes(layer.send_bytes["inter"]),
                       str(sum(layer.messages.values())))
        out.append(lt)
    return out


def _working(plan) -> str:
    if plan.shard == "full":
        return "the gathered layers"
    return f"{plan.dtype} casts of the weights" if plan.memory_working else f"none: {plan.dtype} computes on the master"


def fit_table(found) -> Table:
    """The settings under which a training step fits, cheapest first."""
    t = Table(title=f"settings that fit a step in {human_bytes(found.budget)} per device, cheapest first",
              box=box.SIMPLE, title_justify="left", padding=(0, 1, 0, 0))
    for col in ("shard", "recompute", "micro", "states", "activations", "step", "+FLOPs"):
        t.add_column(col, justify="left" if col in ("shard", "recompute") else "right")
    for r in found.fitting:
        s = r.settings
        t.add_row(s.shard, s.recompute, str(s.micro_batches), human_bytes(r.states), human_bytes(r.activations),
                  human_bytes(r.total), f"+{r.extra_flops:.0%}")
    return t


def miss_line(found) -> str:
    """Nothing fits: the best settings, and by how much they miss."""
    b = found.best
    parts = {"training states": b.states, "working copies": b.working, "activations": b.activations}
    largest = max(parts, key=parts.get)
    line = (f"no setting fits {human_bytes(found.budget)} per device: the best ({b.settings}) needs "
            f"{human_bytes(b.total)}, {human_bytes(b.total - found.budget)} over; its largest part is the "
            f"{largest} ({human_bytes(parts[largest])})")
    if b.alone:
        line += (f", of which {human_bytes(b.alone)} are the states of parameters this rank alone holds: no "
                 "shard mode splits them (ranks holding the same experts, data parallel > 1, would)")
    return line


def print_fit(found, console: Console) -> None:
    if found.fits:
        console.print(fit_table(found))
    else:
        console.print(miss_line(found), highlight=False, soft_wrap=True)


def print_plan(plan, console: Console | None = None) -> None:
    console = console or Console()
    for table in plan_tables(plan):
        console.print(table)


# ----------------------------------------------------------------------------- plan --load

def read_loads(path, window: int = 10) -> tuple[dict, str]:
    """The expert loads in ``path`` (layer name → load per expert) and where they came from:
    ``moedsl inspect --json`` output (each layer's ``load``, its share of the assignments before
    drops) or a run's ``metrics.jsonl`` (the mean ``expert_load`` of its last ``window`` logged
    rows: the load a replication policy would place from)."""
    import json
    from pathlib import Path

    from .errors import UserError

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"--load {path}: cannot read it ({e.strerror or e})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("layers"), list):
        return {f["layer"]: f["load"] for f in whole["layers"]}, f"{p} (moedsl inspect, {whole.get('tokens')} tokens)"
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"--load {path}: line {n} is not JSON; give the output of `moedsl inspect "
                                f"--json` or a run's metrics.jsonl") from None
            if isinstance(row, dict) and row.get("expert_load"):
                rows.append(row)
    if not rows:
        raise UserError(f"--load {path}: no expert loads in it; give the output of `moedsl inspect --json` or a "
                        f"run's metrics.jsonl")
    rows = rows[-window:]
    layers = rows[-1]["expert_load"]
    mean = {name: [sum(r["expert_load"][name][e] for r in rows) / len(rows) for e in range(len(load))]
            for name, load in layers.items()}
    return mean, f"{p} (steps {rows[0]['step']}..{rows[-1]['step']}, {len(rows)} logged rows)"


def replication_tables(replans: list, source: str, ep: int) -> list:
    """Per MoE layer: each rank's assignments per step before and after replication, the
    balancedness (mean over max) and the modelled step of the layer's experts."""
    out = []
    for r in replans:
        t = Table(title=f"{r.layer}: {r.policy}, {r.redundant} redundant slot(s); load from {source}",
                  box=box.SIMPLE, title_justify="left", padding=(0, 1, 0, 0))
        for col in ("rank", "tokens before", "tokens after", "experts after"):
            t.add_column(col, justify="left" if col == "experts after" else "right", overflow="fold")
        per = len(r.phy2log) // ep
        for k in range(ep):
            t.add_row(str(k), f"{r.before.rank_tokens[k]:,.0f}", f"{r.after.rank_tokens[k]:,.0f}",
                      " ".join(str(e) for e in r.phy2log[k * per:(k + 1) * per]))
        out.append(t)
        out.append(Text(f"balancedness (mean/max tokens per rank) {r.before.balancedness:.3f} → "
                        f"{r.after.balancedness:.3f}; modelled step of the experts {_s(r.before.total_s)} → "
                        f"{_s(r.after.total_s)} (compute {_s(r.after.compute_s)}, all-to-all "
                        f"{_s(r.after.all_to_all_s)}, replicas' gradient sums {_s(r.after.sync_s)})\n"))
    return out


def _s(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"
