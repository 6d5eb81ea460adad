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
        ("training states", f"{human_bytes(plan.memory_train_states)} (fp32 master, grads, AdamW)"),
        ("activations", f"{human_bytes(plan.memory_activations)} (training, estimate)"),
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


def print_plan(plan, console: Console | None = None) -> None:
    console = console or Console()
    for table in plan_tables(plan):
        console.print(table)
