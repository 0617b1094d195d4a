"""The house's layering and acyclicity (pyproject.toml, [tool.importlinter]): `lint-imports` keeps every contract.
Imports inside functions count, so a lazy upward import fails here too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    assert linter.is_file(), "import-linter is missing: install the dev extra (pip install -e '.[dev]')"
    # This checkout's faceveil, whatever an editable install elsewhere points to.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(linter), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
