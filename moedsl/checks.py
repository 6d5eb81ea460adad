"""The located-error machinery every semantic check reports through.

A check calls ``Checks.error(path, message, hint)`` with the JSON path of the value
at fault; the issue carries that value's line and column (when the spec came from
YAML), so the user sees the line to fix. All issues are raised together as one
``SpecError``.
"""
from __future__ import annotations

from .errors import Issue, SpecError


class NoLocation:
    """Issues for a spec without source positions (built from a dict, or in another process)."""

    def __init__(self, source: str = "<spec>"):
        self.source = source

    def issue(self, path, message, hint=None, key=False) -> Issue:
        return Issue(tuple(path), message, None, None, hint)


class Checks:
    """Collects the issues of one validation; ``located`` is a ``yamlload.Located`` (or ``NoLocation``)."""

    def __init__(self, located):
        self.located = located
        self.issues: list[Issue] = []

    @classmethod
    def of(cls, spec) -> "Checks":
        """Checks that point into ``spec``'s source."""
        return cls(spec.located or NoLocation(spec.source))

    def error(self, path, message, hint=None, key=False) -> None:
        issue = self.located.issue(tuple(path), message, hint, key=key)
        if issue not in self.issues:  # a repeated layer is reported once
            self.issues.append(issue)

    def raise_if_any(self) -> None:
        if self.issues:
            raise SpecError(self.issues, self.located.source)


def a(word: str) -> str:
    """'a switch', 'an expert_choice'."""
    return ("an " if word[0] in "aeiou" else "a ") + word
