"""Human-readable reports of a Plan (tables with rich)."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

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
