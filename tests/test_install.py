"""Install without npm (issue 25): setup.sh never calls npm and takes Python 3.11-3.13 like pyproject.toml; a wheel
carries every data file the package reads. The fetch itself is tested in test_weights_fetch.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _commands(script: str) -> list[str]:
    """The script's lines without comments."""
    return [line.split("#", 1)[0] for line in script.splitlines() if line.split("#", 1)[0].strip()]


def test_setup_never_calls_npm() -> None:
    assert not [line for line in _commands(SETUP.read_text()) if re.search(r"\bnpm\b", line)]


def test_setup_and_pyproject_take_the_same_pythons() -> None:
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.14"
    assert "(3, 11) <= sys.version_info[:2] <= (3, 13)" in SETUP.read_text()


def test_setup_says_what_it_does() -> None:
    steps = [line for line in _commands(SETUP.read_text()) if line.strip().startswith("say ")]
    assert len(steps) >= 5  # interpreter, venv, torch, packages, weights, kernels


def test_package_data_covers_every_data_file() -> None:
    """`pip install .` and a built wheel hold every non-Python file under faceveil/ (pyproject's package-data)."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["faceveil"]
    package = ROOT / "faceveil"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "faceveil/data holds the reference outputs"
    missing = [name for name in data if not any(_glob_matches(name, pattern) for pattern in patterns)]
    assert not missing, f"not in the wheel: {missing}"


def _glob_matches(name: str, pattern: str) -> bool:
    """setuptools' glob: '*' stays within one folder."""
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatch(p, w) for p, w in zip(parts, wanted, strict=True))
