"""A spec from a path, YAML text, a dict or a Spec: loaded, checked against the schema and
validated into a typed ``Spec`` (``SpecError`` with every issue and its place otherwise)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from . import yamlload
from .errors import Issue, SpecError
from .spec import Spec

SpecLike = Union[str, os.PathLike, dict, Spec]


def looks_like_path(src: str) -> bool:
    """A one-line string naming a spec file, an existing path, or text with none of ``:{[``:
    a spec as YAML text is a mapping, which needs ``:`` or ``{``, so ``"nope"`` is a missing
    file, not YAML text that is no mapping."""
    return "\n" not in src and (src.endswith((".yaml", ".yml", ".json")) or os.path.exists(src)
                                 or not any(c in src for c in ":{["))


def load_spec(src: SpecLike, source: str | None = None) -> Spec:
    """Load and validate a spec from a path, YAML text, a dict, or a Spec (returned as is).

    Raises ``SpecError`` (with every issue, each with its place) for anything a user got wrong.
    """
    from . import schema
    from .validate import build_spec

    if isinstance(src, Spec):
        return src
    if isinstance(src, dict):
        located = yamlload.Located(src, {}, {}, source or "<dict>")
    elif isinstance(src, (os.PathLike, Path)) or (isinstance(src, str) and looks_like_path(src)):
        name = source or str(src)
        located = yamlload.load(yamlload.read_text(src), name)
    elif isinstance(src, str):
        located = yamlload.load(src, source or "<string>")
    else:
        raise SpecError([Issue((), f"cannot load a spec from {type(src).__name__}: give a path, YAML text, "
                               "a dict or a Spec")], source or "<spec>")
    return build_spec(located.data, located, schema.check(located.data, located))


def validate_file(path: str | os.PathLike) -> Spec:
    """``load_spec`` for a file path (never YAML text)."""
    return load_spec(Path(path))
