"""The ``moedsl`` command line.

A user mistake (a bad spec, a missing file, a bad option) prints one clear line
per problem and exits 2, never a traceback; a failed run exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import MoedslError, SpecError, UserError


def _cmd_validate(args) -> int:
    from .api import load_spec
    from .checks import Checks
    from .mesh import check_mesh
    from .validate import check_batch

    status = 0
    for path in args.files:
        try:
            spec = load_spec(path if path.endswith((".yaml", ".yml", ".json")) else _as_path(path))
            if args.world_size and args.world_size > 1:  # the placement and the batch on that many processes
                c = Checks.of(spec)
                check_mesh(spec, args.world_size, c)
                c.issues += check_batch(spec, spec.train.batch_size, args.world_size, origin="train.batch_size")
                c.raise_if_any()
        except SpecError as e:
            print(str(e), file=sys.stderr)
            status = 2
            continue
        if not args.quiet:
            print(f"{path}: ok: {spec.summary()}")
    return status


def _as_path(p: str):
    from pathlib import Path

    return Path(p)


def _cmd_schema(args) -> int:
    from . import schema

    if args.path:
        from importlib import resources

        print(resources.files(schema).joinpath(schema.SCHEMA_FILE))
    else:
        sys.stdout.write(schema.schema_text())
    return 0


def _compiled(args):
    from .api import load_spec
    from .compiler import compile_graph
    from .compiler.plan import make_plan

    spec = load_spec(_spec_path(args.spec))
    if getattr(args, "nodes", None):
        spec = _on_nodes(spec, args.nodes, args.world_size)
    batch = None
    if args.batch or args.seq:
        batch = (args.batch or spec.train.batch_size, args.seq or spec.train.seq_len)
    # built on the meta device (no weights), in the layout a run on --device executes; a batch
    # that does not fit is a SpecError naming --batch
    compiled = compile_graph(spec, args.rank, args.world_size, device="meta", batch=batch, layout=args.layout,
                             target=args.device, batch_origin="--batch" if args.batch else "train.batch_size")
    return spec, compiled, make_plan(spec, compiled, _settings(spec, compiled, args))


def _on_nodes(spec, nodes: int, world):
    """The spec with its mesh made ``nodes`` × (world ÷ nodes) devices (``moedsl plan --nodes``)."""
    import dataclasses

    from .spec import Mesh

    pl = spec.placement
    world = world or (pl.mesh.size if pl.mesh else 1)
    if world % nodes:
        raise UserError(f"--nodes {nodes} does not divide the {world} processes of the run (--world-size)")
    mesh = Mesh(nodes=nodes, devices_per_node=world // nodes)
    return dataclasses.replace(spec, placement=dataclasses.replace(pl, mesh=mesh))


def _settings(spec, compiled, args):
    """The scale settings the plan's training memory is for: the spec's, or the flags'."""
    from .compiler.memory_plan import Settings, micro_batch_choices

    s = Settings.of(spec)
    flag = getattr(args, "micro_batches", None)
    s = Settings(getattr(args, "shard", None) or s.shard, getattr(args, "recompute", None) or s.recompute,
                 flag or s.micro_batches)
    choices = micro_batch_choices(spec, compiled)
    if s.micro_batches not in choices:
        B, T = compiled.static.batch
        raise UserError(f"{'--micro-batches' if flag else 'train.micro_batches'} {s.micro_batches} does not split "
                        f"the {B} sequences × {T} tokens of rank {compiled.rank} into whole micro-batches whose "
                        f"tokens every routing group divides (possible: {', '.join(map(str, choices))})")
    return s


def _layout_line(compiled) -> str:
    """Which graph is shown: the layout of its capacity layers, and which run executes it."""
    name = {"grouped": "packed", "static": "padded [E, C, d]"}
    runs = {"cpu": "a CPU run", "cuda": "a GPU run"}.get(compiled.target, f"a {compiled.target} run")
    auto = "grouped" if compiled.target == "cpu" else "static"
    note = f"as {runs} executes" if compiled.layout == auto else f"--layout {compiled.layout}; {runs} executes " \
        f"{name[auto]}"
    return f"layout {name[compiled.layout]} ({note})"


def _spec_path(p: str):
    from pathlib import Path

    return Path(p)


def _cmd_plan(args) -> int:
    import json

    from .plan_report import print_plan

    spec, compiled, plan = _compiled(args)
    replans = _replan(args, spec, compiled) if args.load else None
    found = None
    if args.device_memory is not None:
        from .compiler.memory_plan import fit

        found = fit(spec, compiled, args.device_memory)
    if args.json:
        out = plan.to_dict()
        if replans is not None:
            from dataclasses import asdict

            out["replication"] = [dict(asdict(r), balancedness_before=r.before.balancedness,
                                       balancedness_after=r.after.balancedness) for r in replans[0]]
        if found is not None:
            out["fit"] = found.to_dict()
        print(json.dumps(out, indent=2))
    else:
        from rich.console import Console

        from .plan_report import print_fit

        console = Console()
        print_plan(plan, console)
        console.print(f"plan of the graph of rank {compiled.rank} of {compiled.mesh.world}, {_layout_line(compiled)}",
                      highlight=False, soft_wrap=True)
        if replans is not None:
            from .plan_report import replication_tables

            for table in replication_tables(*replans, compiled.mesh.expert_parallel):
                console.print(table)
        if found is not None:
            print_fit(found, console)
    return 1 if found is not None and not found.fits else 0


def _replan(args, spec, compiled):
    """``plan --load``: the spec's replication policy (or --policy / --redundant) on the loads."""
    from dataclasses import replace

    from .compiler.replication import replan
    from .errors import UserError
    from .plan_report import read_loads
    from .spec import Replication

    policy = spec.placement.replication
    if policy is None and args.policy is None:
        raise UserError("--load: the spec has no placement.replication; name a policy with --policy eplb|shadow")
    policy = policy or Replication(policy=args.policy)
    given = ((spec.data or {}).get("placement") or {}).get("replication") or {}
    policy = replace(policy, policy=args.policy or policy.policy,
                     redundant=policy.redundant if args.redundant is None else args.redundant,
                     dispatch=given.get("dispatch", ""))  # not given: the policy's own default
    loads, source = read_loads(args.load, policy.window)
    names = [f"layers.{layer.index}" for layer in spec.moe_layers]
    if sorted(loads) != sorted(names):
        if len(loads) != len(names):
            raise UserError(f"--load {args.load}: it has {len(loads)} MoE layer(s) ({', '.join(loads)}), the spec "
                            f"{len(names)} ({', '.join(names)})")
        loads = dict(zip(names, loads.values()))  # another model's names, the same stack: in order
    try:
        return replan(spec, compiled, loads, policy), source
    except ValueError as e:
        raise UserError(f"--load {args.load}: {e}") from None


def _cmd_compile(args) -> int:
    from rich.console import Console

    from .compiler.dot import to_dot
    from .plan_report import print_plan

    spec, compiled, plan = _compiled(args)
    console = Console()
    print_plan(plan, console)
    gm = compiled.module
    console.rule()
    console.print(f"graph of rank {compiled.rank} of {compiled.mesh.world} (torch.fx), {_layout_line(compiled)}",
                  highlight=False, soft_wrap=True)
    print(gm.code.strip())
    if args.dot:
        from pathlib import Path

        Path(args.dot).write_text(to_dot(gm.graph, spec.name))
        console.print(f"wrote {args.dot}")
    return 0


# the RunOptions field each `moedsl run` option sets, as the user writes it
_RUN_FLAGS = {"steps": "--steps", "batch": "--batch", "seq": "--seq", "lr": "--lr", "warmup": "--warmup",
              "seed": "--seed", "eval_every": "--eval-every", "eval_batches": "--eval-batches",
              "checkpoint_every": "--checkpoint-every", "timeout": "--timeout", "log_every": "--log-every",
              "pack": "--pack", "distill_teacher": "--distill-teacher", "distill_alpha": "--distill-alpha",
              "distill_temperature": "--distill-temperature", "recompute": "--recompute",
              "micro_batches": "--micro-batches", "shard": "--shard"}


def _cmd_run(args) -> int:
    import os

    from .runtime.cpu import configure_threads

    configure_threads()  # before torch loads its OpenMP runtime: idle threads sleep, not spin (runtime/cpu.py)
    from .runtime.launcher import bind_to_launcher, launched_worker

    bind_to_launcher()  # a worker of `--nproc`: stop when the launcher dies
    from .api import load_spec

    spec = load_spec(_spec_path(args.spec))
    in_job = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    launching = bool(args.nproc and args.nproc > 1 and not in_job)
    from .runtime.preflight import Replaced, check_run, sixteen_bit_warning
    from .runtime.train import RunOptions, run

    opts = RunOptions.from_spec(
        spec, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, warmup=args.warmup, seed=args.seed,
        data=args.data, eval_every=args.eval_every, eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every, out=args.out or f"runs/{spec.name}", resume=args.resume,
        device=args.device, cuda_graphs=args.cuda_graphs, progress=not args.no_progress, timeout=args.timeout,
        keep_memory=not args.no_keep_memory, init=args.init, compile=args.compile, log_every=args.log_every,
        from_scratch=args.from_scratch, pack=args.pack, distill_teacher=args.distill_teacher,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature, recompute=args.recompute,
        micro_batches=args.micro_batches, shard=args.shard)
    rank = int(os.environ.get("RANK", 0))
    if not launched_worker():  # the launcher has checked for its workers, before starting them
        world = args.nproc if launching else int(os.environ.get("WORLD_SIZE", 1))
        here = args.nproc if launching else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        given = {k: v for k, v in _RUN_FLAGS.items() if getattr(args, k, None) is not None}
        check_run(spec, opts, world, names=given, overwrite=args.overwrite, memory=not args.ignore_memory_check,
                  processes_here=here, world_name=f"{world} processes ({'--nproc' if launching else 'WORLD_SIZE'} "
                  f"{world})")
        if rank == 0:
            slow = sixteen_bit_warning(spec, opts)  # a 16-bit spec on a CPU without 16-bit GEMMs: tens of times slower
            if slow:
                print(slow, file=sys.stderr, flush=True)
    replaced = Replaced(opts.out) if args.overwrite and rank == 0 and not launched_worker() else None
    try:
        if launching:
            from .runtime.launcher import launch

            launch(args.nproc, [a for a in (args.raw or []) if a])
            return 0
        summary = _run_one(run, spec, opts)
    finally:
        if replaced is not None:
            replaced.settle()
    if rank == 0:
        if args.json:
            import json
            from dataclasses import asdict

            print(json.dumps({k: v for k, v in asdict(summary).items() if k != "losses"}, indent=2))
        else:
            from rich.console import Console

            from .runtime.report import summary_table

            Console().print(summary_table(summary))
    return 0


def _run_one(run, spec, opts):
    try:
        return run(spec, opts)
    except RuntimeError as e:  # a peer died or hung: one line, not a collective's traceback
        from .runtime.train import collective_failure

        failure = collective_failure(e)
        if failure is None:
            raise
        raise MoedslError(failure) from None


def _cmd_import(args) -> int:
    from pathlib import Path

    from .hf.convert import IMPORT_SHARD, import_checkpoint
    from .hf.files import parse_size

    done = import_checkpoint(args.source, Path(args.out), overwrite=args.overwrite,
                             max_shard=parse_size(args.max_shard_size) if args.max_shard_size else IMPORT_SHARD,
                             progress=args.progress)
    print(f"imported {args.source} ({done['model_type']}) into {done['out']}: spec.yaml, {done['tensors']} tensors "
          f"in {len(done['files'])} file(s)" + (f", {', '.join(done['copied'])}" if done["copied"] else ""))
    return 0


def _cmd_upcycle(args) -> int:
    from pathlib import Path

    from .hf.convert import IMPORT_SHARD
    from .hf.files import parse_size
    from .runtime.upcycle import upcycle

    done = upcycle(args.source, Path(args.out), args.experts, args.k, checkpoint=args.checkpoint,
                   layers=args.layers, granularity=args.granularity, gate=args.gate, router=args.router,
                   noise=args.noise, shared=args.shared, seed=args.seed, overwrite=args.overwrite,
                   max_shard=parse_size(args.max_shard_size) if args.max_shard_size else IMPORT_SHARD)
    print(f"upcycled {args.source} into {done['out']}: layers {', '.join(map(str, done['layers']))} -> "
          f"{args.experts} experts each; spec.yaml, {done['tensors']} tensors in {len(done['files'])} file(s)"
          + (f", {', '.join(done['copied'])}" if done["copied"] else ""))
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    from .hf.convert import export_checkpoint
    from .hf.files import parse_size

    done = export_checkpoint(Path(args.source), Path(args.out), max_shard=parse_size(args.max_shard_size),
                             overwrite=args.overwrite, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                             progress=args.progress)
    print(f"exported {args.source} as {done['model_type']} into {done['out']}: config.json, {done['tensors']} "
          f"tensors in {len(done['files'])} file(s)")
    return 0


def _cmd_distill_init(args) -> int:
    from pathlib import Path

    from .runtime.distill import distill_init, init_summary

    done = distill_init(args.teacher, _spec_path(args.dense), Path(args.out), overwrite=args.overwrite)
    print(init_summary(args.teacher, done))
    return 0


def _cmd_verify(args) -> int:
    from rich.console import Console

    from .api import load_spec
    from .runtime.equivalence import check
    from .runtime.report import verify_table

    spec = load_spec(_spec_path(args.spec))
    from .mesh import resolve_mesh

    resolve_mesh(spec, args.nproc)  # a placement error is a SpecError, before any process starts
    seq = spec.train.seq_len if spec.model.input == "image" else args.seq  # an image's tokens: from model.image
    diffs = check(spec, args.nproc, batch=args.batch, seq=seq, layout=args.layout, compile=args.compile)
    compiled = ", dense segments compiled" if args.compile else ""
    Console().print(verify_table(f"{spec.name}: one training step, {args.nproc} processes against one (batch "
                                 f"{args.batch} × {seq}, layout {args.layout}{compiled}; the run's gradient sync, "
                                 "clip and AdamW): the largest |Δ| of the outputs, the aux loss, the gradients, "
                                 "the weights after the step; all-reduces launched from backward's hooks", diffs))
    return 0 if all(d.ok() for d in diffs) else 1


def _cmd_eval(args) -> int:
    from .runtime.cpu import configure_threads

    configure_threads()  # before torch loads its OpenMP runtime, as for `run`
    from .api import evaluate

    spec = args.model if not args.checkpoint else _spec_path(args.model)
    sweep = evaluate(spec, args.capacity_factor, checkpoint=args.checkpoint, data=args.data, batch=args.batch,
                     seq=args.seq, batches=args.eval_batches, pack=args.pack)
    if args.json:
        import json

        print(json.dumps(sweep, indent=2))
        return 0
    from rich.console import Console

    from .runtime.report import eval_tables

    console = Console()
    for table in eval_tables(sweep if isinstance(sweep, list) else [sweep]):
        console.print(table)
    return 0


def _cmd_inspect(args) -> int:
    from .runtime.cpu import configure_threads

    configure_threads()  # before torch loads its OpenMP runtime, as for `run`
    import json
    import os
    from pathlib import Path

    from .api import inspect
    from .runtime.inspect import default_out, output_console, print_tables, write_png

    r = inspect(args.model, checkpoint=args.checkpoint, text=args.text, data=args.data, tokens=args.tokens,
                seq=args.seq, batch=args.batch, capacity_factor=args.capacity_factor, top=args.top)
    out = Path(args.out) if args.out else default_out(args.model, r)
    try:
        png = write_png(r, out / "inspect.png")
        r["png"] = str(png)
        tmp = out / ".inspect.json.tmp"
        tmp.write_text(json.dumps(r, indent=1))
        os.replace(tmp, out / "inspect.json")
    except OSError as e:
        from .errors import UserError

        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if args.json:
        print(json.dumps(r))
        return 0
    console = output_console()  # 80 columns where piped
    print_tables(r, console)
    console.print(f"wrote {png} and {out / 'inspect.json'}", highlight=False, markup=False)
    return 0


def _cmd_generate(args) -> int:
    import os

    from .runtime.cpu import configure_threads

    configure_threads()  # before torch loads its OpenMP runtime, as for `run`
    from .runtime.launcher import bind_to_launcher, launched_worker

    bind_to_launcher()
    in_job = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if args.nproc and args.nproc > 1 and not in_job:
        from pathlib import Path

        if args.checkpoint is None and not Path(args.model).is_dir():  # refused once, before any worker starts
            from .errors import UserError

            raise UserError(f"{args.model}: no such folder (give a run or import folder, or a spec with --checkpoint)")
        from .runtime.generate_cli import precheck
        from .runtime.launcher import launch

        precheck(args)

        launch(args.nproc, [a for a in (args.raw or []) if a])
        return 0
    import sys

    from .runtime.generate_cli import run_cli

    printer = _in_job_rank() == 0 and not (launched_worker() and int(os.environ.get("RANK", 0)) != 0)
    streamed = printer and not args.json and not args.no_stream and args.batch == 1

    def piece(row: int, text: str) -> None:  # one row: its text as it comes, on rank 0
        sys.stdout.write(text)
        sys.stdout.flush()

    r = run_cli(args, on_text=piece if streamed else None)
    if printer:
        if args.json:
            import json

            keys = ("ids", "text", "stopped", "tokens_per_s", "device", "cuda_graphs")
            print(json.dumps({k: r[k] for k in keys if k in r}))
        elif streamed:
            print()
        else:
            for i, row in enumerate(r["ids"]):
                print(r["text"][i] if "text" in r else ",".join(str(t) for t in row))
    return 0


def _cmd_tokenizer_train(args) -> int:
    from .runtime.prepare import unescape
    from .runtime.tokenizer_train import train_tokenizer

    sep = "\n" if args.split_lines else (unescape(args.separator) if args.separator is not None else None)
    done = train_tokenizer(args.sources, args.vocab_size, args.out, field=args.field, separator=sep,
                           min_frequency=args.min_frequency, overwrite=args.overwrite,
                           progress=sys.stderr.isatty())
    if done["skipped"]:
        print(f"moedsl: skipped {done['skipped']} binary file(s)")
    special = ", ".join(f"{role} {text} = {i}" for role, (text, i) in done["special"].items())
    print(f"trained a byte-level BPE of {done['vocab_size']:,} tokens on {done['documents']:,} documents "
          f"({done['bytes'] / 1e6:,.1f} MB) into {done['out']} (+ {done['config'].name}): {special}")
    return 0


def _cmd_data_prepare(args) -> int:
    from .runtime.prepare import prepare, unescape

    sep = "\n" if args.split_lines else (unescape(args.separator) if args.separator is not None else None)
    prepare(args.sources, args.tokenizer, args.out, field=args.field, separator=sep, held_out=args.held_out,
            overwrite=args.overwrite, progress=not args.no_progress, report=lambda text: print(f"moedsl: {text}"))
    return 0


def _add_source_options(p) -> None:
    """SRC... and how documents are read from them (``runtime.corpus``)."""
    p.add_argument("sources", nargs="+", metavar="SRC", help="text files, folders (recursive; binary files "
                   "skipped), .jsonl, .parquet, a datasets save_to_disk folder, or pystdlib")
    p.add_argument("--field", default="text", help="the JSONL field / parquet or datasets column holding the text "
                   "(default text)")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--split-lines", action="store_true", help="each line of a text file is a document (default: "
                     "each file is one)")
    cut.add_argument("--separator", metavar="TEXT", help="cut text files into documents at TEXT (\\n, \\t "
                     "understood; e.g. '\\n\\n' for paragraphs)")


def _add_compile_options(p) -> None:
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--world-size", type=_positive, default=None,
                   help="processes of the run (default: the spec's mesh, else 1)")
    p.add_argument("--rank", type=int, default=0, help="the rank to compile for (default 0)")
    p.add_argument("--batch", type=_positive, default=None, help="global batch (sequences; default: the spec's)")
    p.add_argument("--seq", type=_positive, default=None, help="sequence length (default: the spec's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="the device the graph is for: its layout is the one a run there executes "
                        "(default: cpu; weights are never allocated, the graph is built on the meta device)")
    p.add_argument("--layout", choices=["auto", "static", "grouped"], default="auto",
                   help="how capacity layers compute: static (padded [E, C, d] buffers, CUDA-graph capturable), "
                        "grouped (only the kept rows, packed), or auto: grouped on cpu, static on cuda (default)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line said in one line (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = _Parser(prog="moedsl", description="Declarative Mixture-of-Experts models: "
                 "validate, compile, plan and run YAML specs.")
    ap.add_argument("--version", action="version", version=f"moedsl {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    v = sub.add_parser("validate", help="check specs; print FILE:LINE:COL: path: message per mistake")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--world-size", type=_positive, default=None,
                   help="also check the placement for a run of this many processes")
    v.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    v.set_defaults(func=_cmd_validate)

    c = sub.add_parser("compile", help="compile a spec on the meta device: print its plan and its torch.fx graph")
    _add_compile_options(c)
    c.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT")
    c.set_defaults(func=_cmd_compile)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory and all-to-all bytes of a compiled spec")
    _add_compile_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--load", metavar="FILE", help="expert loads (`moedsl inspect --json` output or a run's "
                   "metrics.jsonl): each rank's tokens before and after replication, and the balancedness")
    p.add_argument("--policy", choices=("eplb", "shadow"), help="with --load: the replication policy "
                   "(default: the spec's placement.replication)")
    p.add_argument("--redundant", type=_nonnegative, metavar="R", help="with --load: redundant slots per MoE "
                   "layer (default: the spec's placement.replication.redundant)")
    p.add_argument("--nodes", type=_positive, default=None,
                   help="the run's nodes: the mesh becomes nodes × (world size ÷ nodes) devices (default: the "
                        "spec's placement.mesh, else one node)")
    p.add_argument("--shard", choices=["none", "optimizer", "full"], default=None,
                   help="the training memory under this placement.shard (default: the spec's)")
    p.add_argument("--recompute", choices=["none", "experts", "layers"], default=None,
                   help="the training memory under this train.recompute (default: the spec's)")
    p.add_argument("--micro-batches", type=_positive, default=None,
                   help="the training memory under this train.micro_batches (default: the spec's)")
    p.add_argument("--device-memory", type=_memory_size, default=None, metavar="SIZE",
                   help="list the cheapest settings (shard mode, recompute, micro-batches) under which a training "
                        "step fits SIZE per device (80GiB, 80GB, 81920MiB), or by how much the best misses "
                        "(exit status 1)")
    p.set_defaults(func=_cmd_plan)

    r = sub.add_parser("run", help="train a spec (CPU, one GPU, or N processes): metrics, plot, checkpoints")
    r.add_argument("spec", metavar="SPEC")
    r.add_argument("--nproc", type=_positive, default=None,
                   help="start this many worker processes (torch's elastic launcher); under torchrun, omit it")
    r.add_argument("--steps", type=_whole, help="training steps (default: the spec's train.steps)")
    r.add_argument("--batch", type=_whole, help="global batch in sequences")
    r.add_argument("--seq", type=_whole, help="tokens per sequence")
    r.add_argument("--lr", type=_number, help="peak learning rate")
    r.add_argument("--warmup", type=_whole, help="warm-up steps")
    r.add_argument("--seed", type=_whole, help="seed of weights, data and routing noise")
    r.add_argument("--data", help="synthetic (default), a prepared folder (moedsl data prepare), several mixed by "
                   "weight (a:0.7,b:0.3), raw text (a text file, pystdlib): tokenized with the model's tokenizer, "
                   "as bytes only for a model without one, or a JSONL file of prompt/completion or chat messages "
                   "records (instruction data, the model's tokenizer); for image specs digits (default) or an .npz "
                   "file with arrays images [N, H, W(, C)] and labels [N]")
    r.add_argument("--pack", choices=["none", "documents"], default=None,
                   help="documents: a row of a prepared folder packs several documents; each token attends only "
                        "to earlier tokens of its own document, positions restart at each (default: train.pack)")
    r.add_argument("--shard", choices=["none", "optimizer", "full"], default=None,
                   help="split training states over each parameter's data-parallel ranks: optimizer (AdamW's "
                        "moments, ZeRO-1), full (parameters and gradients too, FSDP2) (default: placement.shard)")
    r.add_argument("--eval-every", type=_whole, help="held-out evaluation every N steps")
    r.add_argument("--eval-batches", type=_whole, help="batches per held-out evaluation")
    r.add_argument("--checkpoint-every", type=_whole, help="save a checkpoint every N steps (and at the end)")
    r.add_argument("--log-every", type=_whole, help="read the step metrics (a collective and a wait for the device) "
                   "every N steps, and at evaluations, checkpoints and the last step (default 1)")
    r.add_argument("--out", help="output folder (default: runs/SPEC-NAME)")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out (or the given one)")
    r.add_argument("--init", metavar="DIR",
                   help="initial weights from an import folder (moedsl import): each process reads only the "
                        "experts it holds")
    r.add_argument("--distill-teacher", metavar="RUN_OR_IMPORT",
                   help="distil from this teacher (a run, checkpoint or import folder; the same tokenizer): the loss "
                        "mixes its soft targets with the labels, Switch Transformer §4.2 (default: train.distill)")
    r.add_argument("--distill-alpha", type=float, metavar="A",
                   help="the teacher's soft targets' weight; 1 - A goes to the labels (default 0.25)")
    r.add_argument("--distill-temperature", type=float, metavar="T",
                   help="softmax temperature of the soft targets; the soft term is scaled by T² (default 1)")
    r.add_argument("--recompute", choices=["none", "experts", "layers"], default=None,
                   help="recompute activations in backward instead of keeping them: experts (the experts' hidden "
                        "activations), layers (each sublayer); routing draws are reused (default: train.recompute)")
    r.add_argument("--micro-batches", type=_positive, metavar="M",
                   help="split each step's batch into M micro-batches, gradients accumulated and synchronised once "
                        "(capacity and balancing losses per micro-batch; default: train.micro_batches)")
    r.add_argument("--from-scratch", action="store_true",
                   help="train an import's spec from random weights (without it or --init, such a run is refused)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, moedsl refuses to write over one); the old "
                        "run waits in OUT/.replaced until the new one has trained a step, and comes back if it "
                        "fails before")
    r.add_argument("--ignore-memory-check", action="store_true",
                   help="start even when the plan needs more memory per process than this machine has free")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="capture the step as a CUDA graph (auto: when the graph is static and on CUDA)")
    r.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the graph's dense segments (norms, attention, residuals, head; the MoE "
                        "layers stay eager). auto: see the README's 'Compiled steps'")
    r.add_argument("--timeout", type=_number, default=300.0,
                   help="seconds a collective may wait before the run fails")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    r.add_argument("--no-keep-memory", action="store_true",
                   help="on a CPU, let malloc return freed memory to the system (slower steps: every step "
                        "page-faults its activations in again; default: keep it, as a GPU's caching allocator does)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=_cmd_run)

    vf = sub.add_parser("verify", help="check that N processes compute one training step as one does: outputs, "
                        "aux loss, every gradient (synced and clipped), every parameter after AdamW")
    vf.add_argument("spec", metavar="SPEC")
    vf.add_argument("--nproc", type=_positive, default=2, help="processes (gloo, CPU; default 2)")
    vf.add_argument("--batch", type=_positive, default=8, help="global batch in sequences (default 8)")
    vf.add_argument("--seq", type=_positive, default=16, help="sequence length (default 16)")
    vf.add_argument("--layout", choices=["auto", "static", "grouped"], default="auto",
                    help="static: check the capacity layers' padded buffers and fixed-size all-to-alls")
    vf.add_argument("--compile", action="store_true",
                    help="the N processes run torch.compile'd dense segments (against one eager process)")
    vf.set_defaults(func=_cmd_verify)

    ev = sub.add_parser("eval", help="evaluate a trained run on its held-out data at an inference capacity factor: "
                        "loss, bits per byte (text), accuracy (image classifiers), dropped fraction")
    ev.add_argument("model", metavar="MODEL", help="a `moedsl run` output folder (its latest checkpoint), an import "
                    "folder (on its spec's train.data), or a spec with --checkpoint")
    ev.add_argument("--capacity-factor", default=None, metavar="C[,C...]",
                    help="every token-choice gate's evaluation capacity factor (0: dropless; a dropless gate drops "
                    "past it; default: the spec's); several, comma-separated, evaluate a sweep on one loaded model")
    ev.add_argument("--checkpoint", metavar="PATH", help="the checkpoint to load (MODEL is then a spec)")
    ev.add_argument("--data", help="held-out data, as `moedsl run --data` (a prepared folder: its eval split; "
                    "default: the run's)")
    ev.add_argument("--batch", type=_positive, default=None, help="evaluation batch (default: the run's)")
    ev.add_argument("--pack", choices=["none", "documents"], default=None,
                    help="documents: attention and positions keep to each document of a row (default: the run's)")
    ev.add_argument("--seq", type=_positive, default=None, help="sequence length (default: the run's --seq)")
    ev.add_argument("--eval-batches", type=_positive, default=None,
                    help="held-out batches, token and vector models (default: the run's)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)

    ins = sub.add_parser("inspect", help="what the experts of a trained model learned: load, drops, the tokens "
                         "each takes, how often consecutive tokens keep their expert (Mixtral §5)")
    ins.add_argument("model", metavar="MODEL", help="a `moedsl run` output folder (its latest checkpoint), an "
                     "import folder, or a spec with --checkpoint")
    src = ins.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE|TEXT", help="a text file, read whole in consecutive sequences, or "
                     "else the text itself (through the model's tokenizer.json if it has one, else as bytes)")
    src.add_argument("--data", help="synthetic, pystdlib or a text file: its held-out part, as `moedsl run --data` "
                     "(default: the run's data; pystdlib where that is synthetic and the model has a "
                     "tokenizer.json)")
    ins.add_argument("--checkpoint", metavar="PATH", help="the weights (MODEL is then a spec): a checkpoint, a run "
                     "folder or an import folder")
    ins.add_argument("--tokens", type=_positive, default=65536, help="tokens to inspect (default 65536)")
    ins.add_argument("--seq", type=_positive, default=None, help="tokens per sequence (default: the run's)")
    ins.add_argument("--batch", type=_positive, default=None, help="sequences per batch (default: the run's; the "
                     "routing groups and the capacity follow it)")
    ins.add_argument("--capacity-factor", default=None, metavar="C",
                     help="every token-choice gate's evaluation capacity factor (0: dropless; a dropless gate drops "
                     "past it; default: the spec's)")
    ins.add_argument("--top", type=_positive, default=8, help="tokens shown per expert (default 8)")
    ins.add_argument("--out", metavar="DIR", help="where inspect.png and inspect.json go (default: MODEL/inspect for "
                     "a run folder, else ./inspect-NAME)")
    ins.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ins.set_defaults(func=_cmd_inspect)

    im = sub.add_parser("import", help="a Hugging Face checkpoint (local folder or local cache) -> a spec "
                        "and moedsl-format weights")
    im.add_argument("source", metavar="HF_DIR", help="a folder with config.json and *.safetensors, or ORG/NAME "
                    "already in the Hugging Face cache (nothing is downloaded)")
    im.add_argument("--out", required=True, metavar="DIR", help="where spec.yaml and the weights go")
    im.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    im.add_argument("--max-shard-size", default=None, help="largest weights file (default 2GB)")
    _add_progress_option(im)
    im.set_defaults(func=_cmd_import)

    up = sub.add_parser("upcycle", help="a dense model -> an MoE model whose output equals it (sparse upcycling)")
    up.add_argument("source", metavar="SRC", help="a dense run's --out folder, an import folder, a spec with "
                    "--checkpoint, or a Hugging Face dense checkpoint folder (imported first)")
    up.add_argument("--experts", type=int, required=True, metavar="E", help="experts per upcycled layer")
    up.add_argument("--k", type=int, required=True, metavar="K", help="experts per token (a multiple of "
                    "--granularity)")
    up.add_argument("--out", required=True, metavar="DIR", help="where spec.yaml and the weights go (an import "
                    "folder)")
    up.add_argument("--checkpoint", help="the weights, when SRC is a spec")
    up.add_argument("--layers", default="all", choices=["all", "every-other"], help="the ffn layers upcycled: all, "
                    "or the 2nd, 4th, ... (GLaM, V-MoE)")
    up.add_argument("--granularity", type=int, default=1, metavar="G", help="cut each ffn into G shards of "
                    "hidden/G; expert j holds shard j mod G (Megatron's --moe-upcycling-granularity)")
    up.add_argument("--gate", default="topk", help="topk (softmax over the chosen k) or softmax (every expert): "
                    "the gates whose output equals the dense model's")
    up.add_argument("--router", default="normal", choices=["normal", "zero"], help="router weights: N(0, "
                    "model.init_std²), or zero")
    up.add_argument("--noise", type=float, default=0.0, metavar="R", help="re-draw a fraction R of each expert's "
                    "hidden units (Drop-Upcycling)")
    up.add_argument("--shared", action="store_true", help="the ffn also becomes a shared expert (both halved)")
    up.add_argument("--seed", type=int, default=0, help="seed of the router and --noise draws")
    up.add_argument("--max-shard-size", default=None, help="largest weights file (default 2GB)")
    up.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    up.set_defaults(func=_cmd_upcycle)

    ex = sub.add_parser("export", help="an import folder, a run or a checkpoint -> a Hugging Face checkpoint")
    ex.add_argument("source", metavar="DIR", help="an import folder, a run's --out folder, a checkpoint folder, "
                    "or a spec with --checkpoint")
    ex.add_argument("--out", required=True, metavar="HF_DIR")
    ex.add_argument("--checkpoint", help="the weights, when DIR is a spec")
    ex.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_progress_option(ex)
    ex.set_defaults(func=_cmd_export)

    di = sub.add_parser("distill-init", help="a dense student initialised from a teacher's non-expert weights "
                        "(Switch Transformer §4.2) -> an import folder for run --init")
    di.add_argument("teacher", metavar="TEACHER", help="a run, checkpoint or import folder")
    di.add_argument("--dense", required=True, metavar="SPEC", help="the student's spec (the same vocabulary and "
                    "tokenizer)")
    di.add_argument("--out", required=True, metavar="DIR", help="where spec.yaml and the weights go")
    di.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    di.set_defaults(func=_cmd_distill_init)

    gn = sub.add_parser("generate", help="continue a prompt with a trained or imported model (KV cache; greedy or "
                        "sampled); an encoder-decoder's prompt is its source, encoded once")
    gn.add_argument("model", metavar="MODEL", help="a `moedsl run` output folder, an import folder, or a spec with "
                    "--checkpoint")
    what = gn.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text (a tokenizer.json beside the weights, or UTF-8 bytes for a byte-level "
                      "vocabulary); an encoder-decoder's source, which gets model.eos_id at its end as in training")
    what.add_argument("--prompt-ids", metavar="IDS", help="token ids, comma-separated: 1,2,3")
    gn.add_argument("--max-new-tokens", type=_positive, required=True, metavar="N")
    gn.add_argument("--temperature", type=_number, default=None, help="0: greedy; else sample (default: the "
                    "import's generation_config.json, else greedy)")
    gn.add_argument("--top-k", type=_positive, default=None, help="sample among the K most likely tokens (with a "
                    "temperature above 0)")
    gn.add_argument("--top-p", type=_number, default=None, help="sample from the nucleus of probability P (with a "
                    "temperature above 0)")
    gn.add_argument("--stop", action="append", metavar="IDS|TEXT", help="also stop a row that ends with these ids "
                    "(5 or 7,8) or this text (through the tokenizer, or UTF-8 bytes); repeatable. The model's "
                    "eos_token_id (its generation_config.json) always stops")
    gn.add_argument("--no-stream", action="store_true", help="print one row when done instead of token by token as it comes")
    gn.add_argument("--seed", type=_whole, default=0, help="seed of the sampling")
    gn.add_argument("--batch", type=_positive, default=1, help="rows, each continuing the prompt (default 1)")
    gn.add_argument("--checkpoint", metavar="PATH", help="the weights (an import folder or a DCP checkpoint) when "
                    "MODEL is a spec")
    gn.add_argument("--nproc", type=_positive, default=None, help="processes, the experts split between them")
    gn.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: the GPU when there is one (one process), else the CPU")
    gn.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help="decode through a captured CUDA graph (auto: on a GPU, in one process)")
    gn.add_argument("--json", action="store_true", help="one JSON object: ids (new ids per row), text, stopped (per "
                    "row: eos, stop or length), tokens_per_s, device, cuda_graphs")
    gn.set_defaults(func=_cmd_generate)

    tk = sub.add_parser("tokenizer", help="train a tokenizer on text").add_subparsers(dest="action", required=True)
    tt = tk.add_parser("train", help="a byte-level BPE (any text encodes) with bos/eos/pad special tokens -> "
                       "tokenizer.json + tokenizer_config.json")
    _add_source_options(tt)
    tt.add_argument("--vocab-size", type=_positive, required=True, metavar="N", help="ids in all: 256 bytes, 3 "
                    "special tokens, the merges learned")
    tt.add_argument("--out", required=True, metavar="PATH", help="the tokenizer.json to write (or a folder for "
                    "it); tokenizer_config.json goes beside it")
    tt.add_argument("--min-frequency", type=_positive, default=2, metavar="N", help="a merge is learned from "
                    "pairs seen at least this often (default 2)")
    tt.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer")
    tt.set_defaults(func=_cmd_tokenizer_train)

    da = sub.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    dp = da.add_parser("prepare", help="tokenize text into memory-mapped token shards with a held-out split, "
                       "for `moedsl run --data DIR`")
    _add_source_options(dp)
    dp.add_argument("--tokenizer", required=True, metavar="PATH", help="a tokenizer.json (its eos ends each "
                    "document: eos_token of the tokenizer_config.json beside it, or a common name)")
    dp.add_argument("--out", required=True, metavar="DIR")
    dp.add_argument("--held-out", type=_number, default=0.05, metavar="P", help="fraction of documents held out "
                    "for evaluation, chosen by a hash of each document's text (default 0.05; at least one)")
    dp.add_argument("--overwrite", action="store_true", help="replace an --out that holds something else")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    dp.set_defaults(func=_cmd_data_prepare)

    s = sub.add_parser("schema", help="print the JSON Schema of a spec (for editors)")
    s.add_argument("--path", action="store_true", help="print where the schema file is installed instead")
    s.set_defaults(func=_cmd_schema)
    return ap


def _add_progress_option(p) -> None:
    # None: moedsl.hf.write_progress decides by size (AUTO_BYTES), without importing moedsl.hf for --help
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tensors and bytes written (a bar on a terminal, a line every 10%% otherwise); default: "
                   "when writing 64 MB or more")


def _without_nproc(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _nonnegative(text: str) -> int:
    n = _whole(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n
def _memory_size(text: str) -> int:
    from .dtypes import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _whole(text: str) -> int:
    """A whole number; its range is the preflight's to check, with every other problem at once."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    """A number (nan and inf too: the preflight names them with every other problem at once)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _in_job_rank() -> int:
    import os

    return int(os.environ.get("RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0


def main(argv=None) -> int:
    own = argv is None  # the process's own command line (the CLI, a worker), not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in ("run", "generate"):  # what the workers of --nproc re-run: the same options without --nproc
        args.raw = _without_nproc(argv)
    code = _dispatch(args)
    if own:
        _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """A worker of a multi-process run (``--nproc``, torchrun) that is done: leave the process
    group and end the process without the interpreter's teardown. There, a C++ thread of the
    process group that is still joinable can abort the process ("terminate called without an
    active exception", signal 6) after its work succeeded: seen in 2 of 8 two-process runs.
    Everything the run writes is closed by now; only stdout and stderr are flushed here."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _dispatch(args) -> int:
    try:
        return args.func(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except MoedslError as e:
        from .runtime.preflight import RunRefused

        if isinstance(e, RunRefused):  # the same on every rank of a job: rank 0 says it
            if _in_job_rank() == 0:
                print(str(e), file=sys.stderr)
            return e.exit_code
        print(f"moedsl: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("moedsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moedsl schema | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
