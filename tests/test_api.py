"""The public Python API: `import faceveil` has no side effects, and the README's example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_weights

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_faceveil_imports_no_torch_and_changes_no_environment() -> None:
    code = ("import os, sys; before = dict(os.environ); import faceveil; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert dict(os.environ) == before; "
            "print(faceveil.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"})
    assert re.match(r"\d", out.stdout.strip())


def test_bad_images_are_one_line_errors() -> None:
    from faceveil.api import load_pixels
    from faceveil.errors import FaceveilError

    with pytest.raises(FaceveilError, match="H x W x 3 uint8"):
        load_pixels(np.zeros((4, 4), np.float32))
    with pytest.raises(FaceveilError, match="a path, a PIL image or a numpy array"):
        load_pixels(42)


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


@needs_weights
@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "models" in printed  # the verdict lines
    assert (tmp_path / "protected.jpg").is_file() and (tmp_path / "demo.fvmask").is_file()
