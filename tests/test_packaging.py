"""A regular (non-editable) install ships every package: each folder with an ``__init__.py``
under moedsl/, compiler/ and runtime/ is listed in pyproject.toml (an editable install
would hide a missing one: it imports from the source tree)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {"moedsl": "moedsl", **conf["package-dir"]}
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    missing = found - set(conf["packages"])
    assert not missing, f"packages missing from [tool.setuptools] packages: {sorted(missing)}"
