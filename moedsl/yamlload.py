"""Safe YAML loading that remembers where every value came from.

Plain data only (mappings, sequences, strings, numbers, booleans, null):
no Python tags, no duplicate keys, and hard bounds on size, nesting and alias
expansion, so a hostile or broken file fails fast with a clear message.
Scalars resolve as in YAML 1.2's core schema: ``1e-3`` is a float and ``no``
is the string "no", not ``False``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import Issue, SpecError

MAX_BYTES = 4 * 1024 * 1024  # a spec is a page of YAML; 4 MiB leaves room for explicit expert maps
MAX_VALUES = 2_000_000  # values after alias expansion (a "billion laughs" stops here)
MAX_DEPTH = 64

_CParser = getattr(yaml, "CParser", None)
_Parser = _CParser if _CParser is not None else None


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core-schema resolution of plain scalars."""


_Resolver.yaml_implicit_resolvers = {}
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_Resolver.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])

if _CParser is not None:
    class _Composer(yaml.CParser, _Resolver):  # type: ignore[misc]
        def __init__(self, stream):
            yaml.CParser.__init__(self, stream)
            _Resolver.__init__(self)
else:  # pragma: no cover - PyYAML without libyaml
    class _Composer(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,  # type: ignore[misc]
                    yaml.composer.Composer, _Resolver):
        def __init__(self, stream):
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _Resolver.__init__(self)

_T = "tag:yaml.org,2002:"


class Located:
    """Parsed YAML data plus, for every path, the (line, column) of its value and of its key."""

    def __init__(self, data: Any, values: dict, keys: dict, source: str):
        self.data = data
        self.values = values  # path tuple -> (line, col), 1-based
        self.keys = keys  # path tuple -> (line, col) of the mapping key naming it
        self.source = source

    def where(self, path, key: bool = False) -> tuple[int | None, int | None]:
        """Line and column of the value at ``path``, or of its key, or of the nearest ancestor."""
        path = tuple(path)
        while True:
            table = self.keys if key and path in self.keys else self.values
            if path in table:
                return table[path]
            if not path:
                return (None, None)
            path = path[:-1]
            key = False

    def issue(self, path, message: str, hint: str | None = None, key: bool = False) -> Issue:
        line, col = self.where(path, key=key)
        return Issue(tuple(path), message, line, col, hint)


def _err(source: str, message: str, line=None, col=None, path=()) -> SpecError:
    return SpecError([Issue(tuple(path), message, line, col)], source)


def read_text(path: str | Path) -> str:
    """Read a spec file, refusing what cannot be a spec before parsing it."""
    p = Path(path)
    src = str(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise _err(src, "no such file") from None
    except OSError as e:
        raise _err(src, f"cannot read: {e.strerror or e}") from None
    if p.is_dir():
        raise _err(src, "is a directory, not a spec file")
    if size > MAX_BYTES:
        raise _err(src, f"file is {size / 2**20:.1f} MiB; a spec may be at most {MAX_BYTES // 2**20} MiB")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _err(src, f"cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _err(src, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", line, 1) from None


def load(text: str, source: str = "<spec>") -> Located:
    """Parse YAML text into plain data with locations. Raises SpecError, never anything else."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise _err(source, f"spec text is larger than {MAX_BYTES // 2**20} MiB")
    if "\x00" in text:
        raise _err(source, "contains a NUL character: not a text file")
    try:
        composer = _Composer(text)
        try:
            root = composer.get_single_node()
        finally:
            composer.dispose()
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, source) from None
    except yaml.YAMLError as e:
        raise _err(source, f"malformed YAML: {e}") from None
    except RecursionError:
        raise _err(source, f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if root is None:
        raise _err(source, "empty spec: expected a mapping with moedsl, name, model and layers", 1, 1)
    return _Builder(source, text).build(root)


def _yaml_error(e: yaml.MarkedYAMLError, source: str) -> SpecError:
    """Place a parse error where the user must look: an unclosed bracket or a key without
    its ': ' at the line where that construct began, anything else where the parser stopped."""
    problem = (e.problem or "").strip()
    context = (e.context or "").strip()
    mark = e.problem_mark
    if e.context_mark is not None and ("simple key" in context or "flow" in context):
        mark = e.context_mark
        if e.problem_mark is not None and e.problem_mark.line != mark.line:
            problem += f" at line {e.problem_mark.line + 1}"
    if "'\\t'" in problem:  # PyYAML: found character '\t' that cannot start any token
        text = "a tab character: YAML indents with spaces, not tabs"
    elif "flow mapping" in context or "flow sequence" in context:
        bracket = "{" if "mapping" in context else "["
        text = f"the '{bracket}' opened here is not closed ({problem})"
    elif "simple key" in context and "':'" in problem:
        text = f"expected 'key: value' ({problem}); a ':' needs a space after it"
    else:
        text = f"{problem} ({context})" if context and problem else (problem or context or "cannot parse")
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return _err(source, f"malformed YAML: {text}", line, col)


class _Builder:
    def __init__(self, source: str, text: str = ""):
        self.source = source
        self.text = text
        self.values: dict = {}
        self.keys: dict = {}

    def build(self, root) -> Located:
        self.measure(root, (), 0, {}, set())
        data = self.node(root, (), 0)
        return Located(data, self.values, self.keys, self.source)

    def fail(self, node, path, message):
        m = node.start_mark
        raise _err(self.source, message, m.line + 1, m.column + 1, path)

    def measure(self, node, path, depth, sizes, open_nodes) -> int:
        """How many values ``node`` expands to, counted over shared (aliased) nodes once each,
        so that an alias bomb is refused before anything is expanded."""
        if depth > MAX_DEPTH:
            self.fail(node, path, f"nested too deeply (more than {MAX_DEPTH} levels)")
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            self.fail(self._alias_into(node), path,
                      "an alias refers to the mapping or list that contains it (a cycle)")
        open_nodes.add(key)
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self.measure(c, path + (i,), depth + 1, sizes, open_nodes)
                        for i, c in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                size += self.measure(v, path + (name,), depth + 1, sizes, open_nodes)
        open_nodes.discard(key)
        if size > MAX_VALUES:
            self.fail(node, path, f"the spec expands to more than {MAX_VALUES:,} values "
                      "(YAML aliases that nest to blow up in size?)")
        sizes[key] = size
        return size

    def _alias_into(self, node):
        """The alias event (with its place) that refers back into ``node``, for a cycle's error;
        the composed graph itself keeps only the anchor's place."""
        anchor, found = None, node
        try:
            for ev in yaml.parse(self.text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
                if anchor is None and getattr(ev, "anchor", None) and ev.start_mark.index == node.start_mark.index:
                    anchor = ev.anchor if not isinstance(ev, yaml.AliasEvent) else None
                elif isinstance(ev, yaml.AliasEvent) and ev.anchor == anchor and \
                        node.start_mark.index <= ev.start_mark.index <= node.end_mark.index:
                    found = ev
                    break
        except yaml.YAMLError:  # pragma: no cover - the text composed once already
            pass
        return found

    def node(self, node, path, depth):
        # the first place a path is seen wins (aliases revisit nodes under new paths)
        self.values.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _T + "seq":
                self.fail(node, path, f"tag {node.tag!r} is not allowed: specs are plain YAML")
            return [self.node(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != _T + "map":
                self.fail(node, path, f"tag {node.tag!r} is not allowed: specs are plain YAML")
            return self.mapping(node, path, depth)
        self.fail(node, path, "unsupported YAML node")  # pragma: no cover

    def mapping(self, node, path, depth):
        out: dict = {}
        seen: dict = {}
        merged: list = []
        for knode, vnode in node.value:
            if knode.tag == _T + "merge":
                merged.append((knode, vnode))
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self.fail(knode, path, "mapping keys must be plain names, not collections")
            key = knode.value
            if key in seen:
                first = seen[key]
                self.fail(knode, path + (key,),
                          f"duplicate key {key!r} (first defined at line {first.line + 1})")
            seen[key] = knode.start_mark
            self.keys[path + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
            out[key] = self.node(vnode, path + (key,), depth + 1)
        # YAML merge keys (<<: *anchor): explicit keys win, earlier merges win over later ones
        for knode, vnode in merged:
            sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    self.fail(src, path, "'<<' merges a mapping (or a list of mappings) into this one")
                sub = self.mapping(src, path, depth)
                for k, v in sub.items():
                    if k not in out:
                        out[k] = v
                        self.keys.setdefault(path + (k,), (knode.start_mark.line + 1, knode.start_mark.column + 1))
        return out

    def scalar(self, node, path):
        tag, v = node.tag, node.value
        try:
            if tag == _T + "str":
                return v
            if tag == _T + "null":
                return None
            if tag == _T + "bool":
                return v.lower() == "true"
            if tag == _T + "int":
                s = v.replace("_", "")
                if s.startswith("0o"):
                    return int(s[2:], 8)
                if s.startswith("0x"):
                    return int(s[2:], 16)
                return int(s)
            if tag == _T + "float":
                s = v.lower()
                if s.endswith(".inf"):
                    return float("-inf") if s.startswith("-") else float("inf")
                if s == ".nan":
                    return float("nan")
                return float(s)
        except ValueError:
            self.fail(node, path, f"{v!r} is not a valid {tag.rsplit(':', 1)[-1]}")
        self.fail(node, path, f"tag {tag!r} is not allowed: specs are plain YAML "
                  "(no Python objects, timestamps or binary)")
