"""The one method registry: every method list is derived from it, and adding a method is one new file + one
registry line (shown with a throw-away method that then runs end to end through `faceveil protect`)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from conftest import WRITTEN, needs_weights

from faceveil.errors import FaceveilError
from faceveil.methods import available, registry
from faceveil.methods.base import KINDS

THROWAWAY = '''
"""A throw-away method: a constant +eps/2 shift of every face (the test's one new file)."""
import torch

from faceveil.methods.base import Perturbation


def build(name, options, targets):
    def method(batch, ensemble, cfg):
        return Perturbation(torch.full((len(batch), 3, 256, 256), cfg.eps / 2))
    return method
'''


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "throwaway_method.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "ENTRIES", list(registry.ENTRIES))
    registry.register(registry.MethodEntry("throwaway", "image", "baseline", "a constant shift (test)",
                                           "throwaway_method:build"))  # the one registry line
    yield "throwaway"
    sys.modules.pop("throwaway_method", None)


def test_every_entry_has_a_kind_and_a_loadable_builder() -> None:
    for entry in registry.ENTRIES:
        assert entry.kind in KINDS and entry.summary
        assert callable(entry.load()), entry.name


def test_names_by_kind_and_wrong_kinds_are_one_line() -> None:
    assert registry.names("image")[0] == "pgd"
    assert set(registry.names("end-cloud")) == {"apf", "apf-local"}
    assert "opom-convex" in registry.names("person") and "advcloak-convex" in registry.names("person")
    assert [e.name for e in available()] == registry.names()
    with pytest.raises(FaceveilError, match="unknown method 'nope'"):
        registry.entry("nope")
    with pytest.raises(FaceveilError, match="'opom-convex' is of kind person"):
        registry.image_method("opom-convex")
    with pytest.raises(FaceveilError, match="needs a target set"):
        registry.image_method("tip-im")


def test_listing_methods_imports_no_torch() -> None:
    import subprocess

    code = ("import sys, faceveil; names = [m.name for m in faceveil.methods.available()]; "
            "assert 'torch' not in sys.modules and 'pgd' in names, names")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_new_method_is_offered_everywhere(throwaway: str) -> None:
    from faceveil.cli import build_parser

    assert throwaway in registry.names("image") and throwaway in [m.name for m in available("image")]
    args = build_parser().parse_args(["protect", "in.jpg", "-o", "out", "--method", throwaway])
    assert args.method == throwaway


@needs_weights
def test_a_new_method_runs_end_to_end(throwaway: str, tmp_path: Path) -> None:
    from faceveil.cli import main
    from faceveil.io.images import read_image
    from faceveil.io.weights import sample_photos

    photo = sample_photos()[5]
    out = tmp_path / "out"
    assert main(["protect", str(photo), "-o", str(out), "--method", throwaway, "--judges", "mobileface",
                 "--strength", "low", "--quiet"]) in WRITTEN
    before, after = read_image(photo).rgb.astype(int), read_image(out / photo.name).rgb.astype(int)
    assert 0 < abs(after - before).max() <= 255
