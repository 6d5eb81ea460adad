"""Human-readable reports of a Plan (tables with rich)."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from moedsl.compiler.plan import human_bytes, human_flops
from moedsl.params import human


def plan_tables(plan) -> list:
    def both(d: dict) -> str:
        return ", ".join(f"{k} {human_bytes(v)}" for k, v in d.items())

    t = Table(title=f"{plan.spec}: plan for rank {plan.rank} of {plan.world} "
              f"({plan.nodes} node(s) × {plan.devices_per_node}; expert parallel {plan.expert_parallel} × "
              f"data parallel {plan.data_parallel}), batch {plan.batch[0]} × {plan.batch[1]}",
              box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    share = plan.params_active_per_token / max(plan.params_total, 1)
    rows = [
        ("parameters", human(plan.params_total)),
        ("active per token", f"{human(plan.params_active_per_token)} ({share:.1%})"),
        ("on this device", f"{human(plan.params_on_device)} (experts {human(plan.expert_params_on_device)})"),
        ("FLOPs / token, forward", human_flops(plan.flops_per_token_forward)),
        ("FLOPs / token, training", human_flops(plan.flops_per_token_train)),
        ("FLOPs / token, forward with capacity padding", human_flops(plan.flops_per_token_forward_padded)),
        (f"weights ({plan.dtype})", human_bytes(plan.memory_weights)),
        ("training states (fp32 master, grads, AdamW)", human_bytes(plan.memory_train_states)),
        ("activations, training (estimate)", human_bytes(plan.memory_activations)),
        ("all-to-all sent per training step", both(plan.a2a_send_bytes)),
        ("all-to-all received per training step", both(plan.a2a_recv_bytes)),
        ("token all-gather sent per training step", both(plan.gather_send_bytes)),
        ("CUDA-graph capturable", "yes (static shapes)" if plan.capturable else "no (data-dependent shapes)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out = [t]
    if plan.layers:
        lt = Table(title="MoE layers", box=box.SIMPLE, title_justify="left")
        for col in ("layer", "routing", "layout", "capacity", "sent intra", "sent inter", "messages"):
            lt.add_column(col, justify="right" if col not in ("layer", "routing", "layout") else "left")
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
