"""environment.yml and pyproject.toml must declare the same dependency set."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names that differ from PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}
NOT_DEPENDENCIES = {"python", "pip"}


def split(spec: str) -> tuple[str, str]:
    """'Jupyter_Book>=1.0,<2' -> ('jupyter-book', '<2,>=1.0'): normalised name, sorted specifiers."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*?)\s*", spec)
    assert m, f"cannot parse requirement {spec!r}"
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    parts = sorted(p.replace(" ", "") for p in m.group(2).split(",") if p.strip())
    return name, ",".join(parts)


def pyproject_deps() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return dict(split(s) for s in specs)


def environment_deps() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps: dict[str, str] = {}
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            for spec in entry.get("pip", []):
                if not spec.startswith("-e"):
                    name, ver = split(spec)
                    deps[name] = ver
            continue
        name, ver = split(entry)
        if name not in NOT_DEPENDENCIES:
            deps[CONDA_TO_PYPI.get(name, name)] = ver
    return deps


def test_split_normalises_names_and_specifiers():
    assert split("Jupyter_Book >=1.0, <2") == ("jupyter-book", "<2,>=1.0")
    assert split("selora[book]") == ("selora", "")


def test_environment_yml_matches_pyproject():
    py, env = pyproject_deps(), environment_deps()
    missing = sorted(set(py) - set(env))
    extra = sorted(set(env) - set(py))
    assert not missing, f"environment.yml lacks {missing} (declared in pyproject.toml)"
    assert not extra, f"environment.yml declares {extra}, which pyproject.toml does not"
    differ = {n: (py[n], env[n]) for n in py if py[n] != env[n]}
    assert not differ, f"version specifiers differ (pyproject, environment.yml): {differ}"


def test_environment_installs_the_project_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [e for e in env["dependencies"] if isinstance(e, dict)][0]["pip"]
    assert "-e ." in pip, "environment.yml must install the selora package itself (pip: -e .)"
