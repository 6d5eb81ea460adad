"""The ``moedsl`` command line.

A user mistake (a bad spec, a missing file, a bad option) prints one clear line
per problem and exits 2, never a traceback; a failed run exits 1.
"""
from __future__ import annotations

import argparse
import sys

from .errors import MoedslError, SpecError


def _cmd_validate(args) -> int:
    from .api import load_spec
    from .validate import resolve_mesh

    status = 0
    for path in args.files:
        try:
            spec = load_spec(path if path.endswith((".yaml", ".yml", ".json")) else _as_path(path))
            if args.world_size:
                resolve_mesh(spec, args.world_size)
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
    batch = None
    if args.batch or args.seq:
        batch = (args.batch or spec.train.batch_size, args.seq or spec.train.seq_len)
    compiled = compile_graph(spec, args.rank, args.world_size, device="meta", batch=batch)
    return spec, compiled, make_plan(spec, compiled)


def _spec_path(p: str):
    from pathlib import Path

    return Path(p)


def _cmd_plan(args) -> int:
    import json

    from .report import print_plan

    _, _, plan = _compiled(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0


def _cmd_compile(args) -> int:
    from rich.console import Console

    from .compiler.dot import to_dot
    from .report import print_plan

    spec, compiled, plan = _compiled(args)
    console = Console()
    print_plan(plan, console)
    gm = compiled.module
    console.rule(f"graph of rank {compiled.rank} of {compiled.mesh.world} (torch.fx)")
    print(gm.code.strip())
    if args.dot:
        from pathlib import Path

        Path(args.dot).write_text(to_dot(gm.graph, spec.name))
        console.print(f"wrote {args.dot}")
    return 0


def _add_compile_options(p) -> None:
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--world-size", type=_positive, default=None,
                   help="processes of the run (default: the spec's mesh, else 1)")
    p.add_argument("--rank", type=int, default=0, help="the rank to compile for (default 0)")
    p.add_argument("--batch", type=_positive, default=None, help="global batch (sequences; default: the spec's)")
    p.add_argument("--seq", type=_positive, default=None, help="sequence length (default: the spec's)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="moedsl", description="Declarative Mixture-of-Experts models: "
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
    p.set_defaults(func=_cmd_plan)

    s = sub.add_parser("schema", help="print the JSON Schema of a spec (for editors)")
    s.add_argument("--path", action="store_true", help="print where the schema file is installed instead")
    s.set_defaults(func=_cmd_schema)
    return ap


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except MoedslError as e:
        print(f"moedsl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moedsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moedsl schema | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
