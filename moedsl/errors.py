"""Errors a user can cause: each names the place in the spec and what would be right."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

PathT = tuple  # a path into the spec: ("layers", 2, "moe", "gate", "k")


def format_path(path: Sequence) -> str:
    """("layers", 2, "moe", "gate", "k") -> "layers[2].moe.gate.k"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class Issue:
    """One mistake in a spec: where it is, what is wrong, what would be right."""

    path: PathT
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None

    def format(self, source: str = "<spec>") -> str:
        where = source
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        text = f"{where}: {format_path(self.path)}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class SpecError(ValueError):
    """A spec that cannot be used. Carries every issue found, each with its place.

    ``str(err)`` gives one ``FILE:LINE:COL: path: message`` line per issue.
    """

    def __init__(self, issues: Iterable[Issue], source: str = "<spec>"):
        self.issues: list[Issue] = sorted(
            issues, key=lambda i: (i.line if i.line is not None else 10**9, i.column or 0))
        self.source = source
        if not self.issues:
            raise ValueError("SpecError needs at least one issue")
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(i.format(self.source) for i in self.issues)

    @property
    def paths(self) -> list[str]:
        return [format_path(i.path) for i in self.issues]


class MoedslError(RuntimeError):
    """A clear, user-facing failure outside the spec itself (a run, a checkpoint). The CLI
    prints it in one line and exits with ``exit_code``: 1, a run that failed."""

    exit_code = 1


class UserError(MoedslError):
    """A user's mistake outside the spec (an option, a path, a checkpoint that does not fit
    the spec): the CLI exits 2, as for a spec error."""

    exit_code = 2
